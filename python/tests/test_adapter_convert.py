"""`lycoris convert`: prefix rewrites, keep/drop by regular expression, dtype, and the
DyLoRA conv repair (LyCORIS 4.1.3 writes a conv module's lora_up 2-D and cannot read it
back), checked on the written file's keys, dtypes, shapes and values."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _checkpoints import run


def read(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def test_convert(tmp_path):
    g = torch.Generator().manual_seed(0)
    source = {
        "lycoris_down_blocks_0_conv1.lora_down.weight": torch.randn(4, 8, 3, 3, generator=g),
        "lycoris_down_blocks_0_conv1.lora_up.weight": torch.randn(6, 4, generator=g),   # DyLoRA's 2-D conv up
        "lycoris_down_blocks_0_conv1.alpha": torch.tensor(4.0),
        "lycoris_mid_block_proj_in.hada_w1_a": torch.randn(5, 2, generator=g),
        "lycoris_mid_block_proj_in.hada_w1_b": torch.randn(2, 7, generator=g),
        "lycoris_mid_block_proj_in.hada_w2_a": torch.randn(5, 2, generator=g),
        "lycoris_mid_block_proj_in.hada_w2_b": torch.randn(2, 7, generator=g),
        "lycoris_up_blocks_1_conv2.lora_down.weight": torch.randn(2, 3, generator=g),
        "lycoris_up_blocks_1_conv2.lora_up.weight": torch.randn(3, 2, generator=g),
    }
    path, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file(source, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    result = run("convert", str(path), str(out), "--dtype", "f16", "--rename", "lycoris_=lora_unet_", "--drop", "up_blocks_1")
    assert "dropped: 1\n  lora_unet_up_blocks_1_conv2\n" in result.stdout, result.stdout
    assert "conv lora_up reshaped to N-D: lora_unet_down_blocks_0_conv1" in result.stdout, result.stdout
    tensors, metadata = read(out)
    assert metadata == {"ss_network_module": "lycoris.kohya"}
    expected = {k.replace("lycoris_", "lora_unet_"): v for k, v in source.items() if "up_blocks_1" not in k}
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        got = tensors[key]
        if key.endswith("alpha"):
            assert got.dtype == torch.float32 and got.item() == 4.0
            continue
        assert got.dtype == torch.float16
        assert torch.equal(got.reshape(value.shape), value.half()), key
    assert tensors["lora_unet_down_blocks_0_conv1.lora_up.weight"].shape == (6, 4, 1, 1)
    # --keep: only what matches stays.
    run("convert", str(path), str(out), "--keep", "mid_block")
    tensors, _ = read(out)
    assert {k.split(".")[0] for k in tensors} == {"lycoris_mid_block_proj_in"}
    assert all(torch.equal(tensors[k], source[k]) for k in tensors), "no dtype given: bytes unchanged"


def test_bad_pattern_is_a_usage_error(tmp_path):
    result = run("convert", "x.safetensors", str(tmp_path / "y.safetensors"), "--drop", "(", check=False)
    assert result.returncode == 64 and "not a regular expression" in result.stderr
