"""`lycoris convert --to peft / --to kohya`: kohya LoRA files of an SD1 and an SDXL UNet as
HF PEFT folders, loaded by the `peft` package itself (its LoRA layers' ΔW equal
(alpha/r)·up·down), and back to the same kohya file."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _checkpoints import gen, layers, run


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_peft_round_trip(family, tmp_path):
    unet, texts = gen.build_models(family, unet_width=16, text_width=32, seed=5)
    folder = tmp_path / "model"
    gen.save_diffusers(unet, texts, str(folder))
    report = {layer["name"]: layer for layer in layers(folder)["layers"] if layer["component"] == "unet"}
    picked = [name for name in report if name.endswith(("attn1_to_q", "attn2_to_v", "ff_net_2"))][:4]
    picked += [name for name in report if len(report[name]["shape"]) == 4 and report[name]["shape"][2] == 3][:2]
    g = torch.Generator().manual_seed(1)
    source = {}
    for index, name in enumerate(picked):
        shape = report[name]["shape"]
        rank = 4 if index % 2 == 0 else 2
        source[f"{name}.lora_down.weight"] = torch.randn((rank, *shape[1:]), generator=g)
        source[f"{name}.lora_up.weight"] = torch.randn((shape[0], rank) + (1,) * (len(shape) - 2), generator=g)
        source[f"{name}.alpha"] = torch.tensor(float(rank) / 2 if index < 3 else 8.0)
    kohya = tmp_path / "lora.safetensors"
    save_file(source, str(kohya))
    out = tmp_path / "peft"
    run("convert", str(kohya), str(out), "--to", "peft", "--model", str(folder))
    config = peft.LoraConfig.from_pretrained(str(out))
    model = peft.inject_adapter_in_model(config, copy.deepcopy(unet))
    result = peft.set_peft_model_state_dict(model, load_file(str(out / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    modules = dict(model.named_modules())
    for name in picked:
        path = report[name]["key"][: -len(".weight")]
        layer = modules[path]
        up, down = source[f"{name}.lora_up.weight"], source[f"{name}.lora_down.weight"]
        scale = source[f"{name}.alpha"].item() / down.shape[0]
        expected = scale * (up.flatten(1) @ down.flatten(1)).reshape(layer.base_layer.weight.shape)
        assert torch.allclose(layer.get_delta_weight("default"), expected, atol=1e-5), name
    back = tmp_path / "back.safetensors"
    run("convert", str(out), str(back), "--to", "kohya", "--model", str(folder))
    with safe_open(str(back), "pt") as handle:
        restored = {k: handle.get_tensor(k) for k in handle.keys()}
    assert set(restored) == set(source)
    for key, value in source.items():
        assert torch.allclose(restored[key].reshape(value.shape), value), key
    if family == "sdxl":
        assert not any("down_blocks" in n or "up_blocks" in n for n in picked), "kohya's SDXL names are LDM paths"
        assert any("input_blocks" in n or "output_blocks" in n for n in picked)
