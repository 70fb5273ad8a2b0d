"""`lycoris convert --to peft / --to kohya` for LoHa and LoKr: files written by LyCORIS 4.1.3's
kohya network (random factors) on a tiny SD1 UNet and its CLIP text encoder become PEFT
folders that the `peft` package loads, and every converted layer's output there equals the
layer's output with LyCORIS's adapter applied; the folder converted back loads in LyCORIS
with the same outputs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from lycoris import kohya as lycoris_kohya
from safetensors.torch import load_file
from torch import nn

from _checkpoints import gen, run
from swift_lycoris.presets import preset_to_toml
from swift_lycoris import kohya as swift_kohya
from test_kohya import closing, reset_lycoris_class  # noqa: F401 (closing is a fixture)

# LyCORIS's preset for the test networks: attention, MLP and ResNet blocks (3×3 and 1×1
# convs), and the CLIP attention/MLP layers (LyCORIS 4.1.3's `full` names the time
# embedding twice on a diffusers UNet and fails).
PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}

CASES = [
    # (algo, network_args, component, skipped expected)
    ("loha", {}, "unet", 0),
    ("loha", {"use_tucker": True}, "unet", 0),
    ("loha", {}, "text_encoder", 0),
    ("lokr", {}, "unet", 0),
    # factor 4 splits conv_in's 4 input channels (1, 4) in LyCORIS (sorted) and (4, 1) in
    # PEFT (unsorted): conv_in and conv_out have no PEFT form under this config.
    ("lokr", {"decompose_both": True, "factor": 4}, "unet", 2),
    ("lokr", {"use_tucker": True}, "unet", 0),
    ("lokr", {"full_matrix": True}, "text_encoder", 0),
    ("lokr", {"decompose_both": True}, "text_encoder", 0),
]


class _TextModelHolder(nn.Module):
    """The module tree of transformers 4's CLIPTextModel (`text_model.encoder.…`), which kohya's
    `lora_te_text_model_…` names and PEFT folders follow; transformers 5's CLIPTextModel names
    its modules without `text_model.`."""

    def __init__(self, text):
        super().__init__()
        self.text_model = text


def _inputs(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn((2, layer.in_channels, 6, 6), generator=generator)
    return torch.randn((3, layer.in_features), generator=generator)


def _lycoris_network(unet, text, algo, args, file):
    """LyCORIS 4.1.3's kohya network applied to (text, unet), every factor random, saved to `file`."""
    reset_lycoris_class(PRESET)
    preset = file.with_suffix(".toml")
    preset.write_text(preset_to_toml(PRESET))
    network = lycoris_kohya.create_network(1.0, 4, 2, None, text, unet, algo=algo, conv_dim=4, conv_alpha=3, preset=str(preset),
                                           **{k: str(v) for k, v in args.items()})
    network.apply_to(text, unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=g))
    network.save_weights(str(file), torch.float32, None)
    return network


def _peft_model(folder, model):
    config_json = json.loads((folder / "adapter_config.json").read_text())
    config = peft.PeftConfig.from_pretrained(str(folder))
    assert config.peft_type.value == config_json["peft_type"]
    adapted = peft.inject_adapter_in_model(config, copy.deepcopy(model))
    result = peft.set_peft_model_state_dict(adapted, load_file(str(folder / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    return adapted, config_json


@pytest.mark.parametrize("algo,args,component,skipped", CASES,
                         ids=[f"{a}-{'-'.join(k for k in args) or 'default'}-{c}" for a, args, c, _ in CASES])
def test_peft_lycoris_round_trip(algo, args, component, skipped, tmp_path, closing):
    unet, texts = gen.build_models("sd1", unet_width=16, text_width=32, seed=5)
    folder = tmp_path / "model"
    gen.save_diffusers(unet, texts, str(folder))
    text = _TextModelHolder(texts[0])
    clean = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(text)}
    source = tmp_path / f"{algo}.safetensors"
    network = _lycoris_network(unet, text, algo, args, source)
    adapted_reference = unet if component == "unet" else text

    out = tmp_path / "peft"
    printed = run("convert", str(source), str(out), "--to", "peft", "--model", str(folder), "--component", component).stdout
    own = [m for m in network.loras if (m.lora_name.startswith("lora_unet_")) == (component == "unet")]
    assert f"converted {len(own) - skipped} " in printed, printed
    assert printed.count("its factors need another decompose_factor") == skipped, printed
    assert printed.count(": a PEFT folder has one type") == 0 and printed.count(f"no {component} layer") == len(network.loras) - len(own)
    assert printed.count("\n  ") == skipped + len(network.loras) - len(own), printed

    adapted, config = _peft_model(out, clean[component])
    assert config["peft_type"] == algo.upper()
    modules = dict(adapted.named_modules())
    reference = dict(adapted_reference.named_modules())
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    g = torch.Generator().manual_seed(3)
    assert all(isinstance(modules[path], peft.tuners.lycoris_utils.LycorisLayer) for path in config["target_modules"])
    # Outputs of every conv and every third other layer (each module is converted alike;
    # checking all 280 UNet layers through both libraries costs minutes on two cores).
    checked = [path for index, path in enumerate(config["target_modules"])
               if index % 3 == 0 or isinstance(modules[path].base_layer, nn.Conv2d)]
    outputs = {}  # path: (x, LyCORIS's output)
    with torch.no_grad():
        for path in checked:
            layer = modules[path]
            x = _inputs(layer.base_layer, g)
            outputs[path] = (x, reference[path](x))
            assert not torch.allclose(outputs[path][1], layer.base_layer(x), atol=1e-3), f"{path}: the adapter changes nothing"
            torch.testing.assert_close(layer(x), outputs[path][1], rtol=1e-4, atol=1e-4, msg=path)
    assert len(config["target_modules"]) == len(own) - skipped
    assert {prefix + p.replace(".", "_") for p in config["target_modules"]} <= {m.lora_name for m in own}

    back = tmp_path / "back.safetensors"
    run("convert", str(out), str(back), "--to", "kohya", "--model", str(folder), "--component", component)
    fresh = {"unet": copy.deepcopy(clean["unet"]), "text_encoder": copy.deepcopy(clean["text_encoder"])}
    if algo == "lokr" and args.get("use_tucker"):
        # LyCORIS 4.1.3 cannot read its own Tucker LoKr files (it takes the rank from
        # lokr_w2_a's second axis, which is out_k there): this server reads them back.
        reloaded, _ = swift_kohya.create_network_from_weights(1.0, str(back), None, fresh["text_encoder"], fresh["unet"])
        closing.append(reloaded)
        reloaded.apply_to(fresh["text_encoder"], fresh["unet"], True, True)
        reloaded.eval()
    else:
        reset_lycoris_class(PRESET)
        reloaded, weights = lycoris_kohya.create_network_from_weights(1.0, str(back), None, fresh["text_encoder"],
                                                                      fresh["unet"])
        reloaded.apply_to(fresh["text_encoder"], fresh["unet"], apply_text_encoder=component != "unet",
                          apply_unet=component == "unet")
        reloaded.load_state_dict(weights, strict=False)
    again = dict(fresh[component].named_modules())
    with torch.no_grad():
        for path, (x, expected) in outputs.items():
            torch.testing.assert_close(again[path](x), expected, rtol=1e-4, atol=1e-4, msg=path)


def test_mixed_folder_types_and_misfit_lokr_reported(tmp_path):
    """A file mixing LoHa and LoKr modules becomes a folder of the majority type; the others
    are listed as skipped, not dropped silently."""
    unet, texts = gen.build_models("sd1", unet_width=16, text_width=32, seed=5)
    folder = tmp_path / "model"
    gen.save_diffusers(unet, texts, str(folder))
    loha, lokr = tmp_path / "loha.safetensors", tmp_path / "lokr.safetensors"
    _lycoris_network(copy.deepcopy(unet), None, "loha", {}, loha)
    _lycoris_network(copy.deepcopy(unet), None, "lokr", {}, lokr)
    a, b = load_file(str(loha)), load_file(str(lokr))
    lokr_names = sorted({k.split(".")[0] for k in b})[:3]
    mixed = {k: v for k, v in a.items() if k.split(".")[0] not in lokr_names}
    mixed.update({k: v for k, v in b.items() if k.split(".")[0] in lokr_names})
    from safetensors.torch import save_file
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    printed = run("convert", str(tmp_path / "mixed.safetensors"), str(tmp_path / "peft"), "--to", "peft",
                  "--model", str(folder)).stdout
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    for name in lokr_names:
        assert f"  {name}: a PEFT folder has one type: this one is LOHA" in printed, printed


@pytest.mark.parametrize("config", [
    peft.LoHaConfig(r=2, alpha=5, target_modules=["to_q", "to_v", "conv1"], rank_pattern={"conv1": 3},
                    alpha_pattern={"to_v": 1.5}, init_weights=False),
    # r=1: W2 decomposed (scale alpha/r); conv1's r=4 keeps both halves whole, where
    # LyCORIS scales by 1, so PEFT's alpha/r = 0.75 must land in lokr_w1.
    peft.LoKrConfig(r=1, alpha=3, target_modules=["to_q", "to_v", "conv1"], rank_pattern={"conv1": 4},
                    init_weights=False),
], ids=["loha", "lokr"])
def test_peft_folder_into_lycoris(config, tmp_path):
    """A folder `peft` itself saves (random factors, alpha ≠ r, per-module patterns) converted to
    a kohya file: LyCORIS 4.1.3 loads it and every layer's output equals PEFT's."""
    unet, texts = gen.build_models("sd1", unet_width=16, text_width=32, seed=5)
    folder = tmp_path / "model"
    gen.save_diffusers(unet, texts, str(folder))
    torch.manual_seed(11)
    adapted = peft.inject_adapter_in_model(config, copy.deepcopy(unet))
    out = tmp_path / "peft"
    out.mkdir()
    config.save_pretrained(str(out))
    from safetensors.torch import save_file
    save_file(peft.get_peft_model_state_dict(adapted), str(out / "adapter_model.safetensors"))
    back = tmp_path / "back.safetensors"
    printed = run("convert", str(out), str(back), "--to", "kohya", "--model", str(folder)).stdout
    paths = [n for n, m in adapted.named_modules() if isinstance(m, peft.tuners.lycoris_utils.LycorisLayer)]
    assert f"converted {len(paths)} " in printed and "skipped" not in printed, printed
    fresh = copy.deepcopy(unet)
    reset_lycoris_class(PRESET)
    reloaded, weights = lycoris_kohya.create_network_from_weights(1.0, str(back), None, None, fresh)
    reloaded.apply_to(None, fresh, apply_text_encoder=False, apply_unet=True)
    reloaded.load_state_dict(weights, strict=False)
    assert len(reloaded.unet_loras) == len(paths)
    ours, theirs = dict(fresh.named_modules()), dict(adapted.named_modules())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path in paths:
            x = _inputs(theirs[path].base_layer, g)
            expected = theirs[path](x)
            assert not torch.allclose(expected, theirs[path].base_layer(x), atol=1e-3), path
            torch.testing.assert_close(ours[path](x), expected, rtol=1e-4, atol=1e-4, msg=path)


def test_sdxl_single_file_second_text_encoder_fused_in_proj(tmp_path):
    """SDXL's second text encoder in a single LDM file keeps q/k/v fused in OpenCLIP's
    `in_proj_weight`; kohya's q_proj/k_proj/v_proj modules map to the transformers modules
    PEFT adapts (`text_model.encoder.layers.N.self_attn.q_proj`), and back."""
    from _checkpoints import make_checkpoints
    from safetensors.torch import save_file

    unet, texts, _, single = make_checkpoints("sdxl", tmp_path, seed=2)
    text = texts[1]
    g = torch.Generator().manual_seed(9)
    source, delta = {}, {}
    for index, part in enumerate(("q_proj", "k_proj", "v_proj", "out_proj")):
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{part}"
        width, rank, alpha = 32, 2 + index % 2, 3.0
        w = {k: torch.randn(shape, generator=g) for k, shape in
             (("hada_w1_a", (width, rank)), ("hada_w1_b", (rank, width)), ("hada_w2_a", (width, rank)), ("hada_w2_b", (rank, width)))}
        source.update({f"{name}.{k}": v for k, v in w.items()})
        source[f"{name}.alpha"] = torch.tensor(alpha)
        delta[f"text_model.encoder.layers.0.self_attn.{part}"] = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * alpha / rank
    kohya = tmp_path / "te2.safetensors"
    save_file(source, str(kohya))
    out = tmp_path / "peft"
    printed = run("convert", str(kohya), str(out), "--to", "peft", "--model", str(single), "--component", "text_encoder_2").stdout
    assert "converted 4 modules" in printed and "skipped" not in printed, printed
    adapted, config = _peft_model(out, text)
    assert sorted(config["target_modules"]) == sorted(delta)
    modules = dict(adapted.named_modules())
    x = torch.randn(3, 32, generator=g)
    with torch.no_grad():
        for path, dw in delta.items():
            torch.testing.assert_close(modules[path](x), modules[path].base_layer(x) + x @ dw.T, rtol=1e-4, atol=1e-4, msg=path)
    back = tmp_path / "back.safetensors"
    run("convert", str(out), str(back), "--to", "kohya", "--model", str(single), "--component", "text_encoder_2")
    restored = load_file(str(back))
    assert set(restored) == set(source)
    for key, value in source.items():
        torch.testing.assert_close(restored[key], value, msg=key)
