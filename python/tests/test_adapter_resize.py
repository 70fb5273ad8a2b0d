"""`lycoris resize` against torch: each LoRA module's product M = up·down (with a Tucker
core: up·(mid ⋆ down)) is decomposed by torch.linalg.svd; the new rank follows kohya's
resize_lora rules (restated below from their definitions), the stored factors rebuild the
rank-r' truncation with the old scale alpha/r, other algorithms are copied byte for byte,
and metadata is kept and amended."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _checkpoints import run


def kohya_rank(s: torch.Tensor, method: str | None, param: float | None, cap: int) -> int:
    """resize_lora's rank: index by the rule, clamped to [1, len-1], plus one; capped; 1 for a zero matrix."""
    n = len(s)
    if method is None:
        rank = cap
    else:
        if method == "sv_ratio":
            index = int((s > s[0] / param).sum())
        elif method == "sv_cumulative":
            index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param))) + 1
        else:
            index = int(torch.searchsorted(torch.cumsum(s * s, 0) / (s * s).sum(), torch.tensor(param * param))) + 1
        rank = min(max(index, 1), n - 1) + 1
    if s[0] <= 1e-6:
        return 1
    return min(rank, cap)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("resize")
    g = torch.Generator().manual_seed(7)
    t = {}
    # (name, up shape, down shape, mid shape or None, alpha)
    specs = [("lora_unet_a_to_q", (40, 12), (12, 30), None, 6.0),
             ("lora_unet_b_conv1", (24, 8, 1, 1), (8, 16, 3, 3), None, 8.0),
             ("lora_unet_c_conv2", (24, 6, 1, 1), (6, 16, 1, 1), (6, 6, 3, 3), 3.0),
             ("lora_te_d_fc1", (64, 16), (16, 20), None, None)]
    for name, up, down, mid, alpha in specs:
        # Decaying spectra so the dynamic rules choose different ranks.
        decay = torch.linspace(1, 0.05, up[1]).reshape(1, -1, *([1] * (len(up) - 2)))
        t[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * decay
        t[f"{name}.lora_down.weight"] = torch.randn(down, generator=g)
        if mid:
            t[f"{name}.lora_mid.weight"] = torch.randn(mid, generator=g)
        if alpha is not None:
            t[f"{name}.alpha"] = torch.tensor(alpha)
    for suffix, shape in [("hada_w1_a", (10, 2)), ("hada_w1_b", (2, 12)), ("hada_w2_a", (10, 2)), ("hada_w2_b", (2, 12))]:
        t[f"lora_unet_e_proj.{suffix}"] = torch.randn(shape, generator=g)
    path = root / "in.safetensors"
    save_file(t, str(path), metadata={"ss_network_dim": "16", "ss_training_comment": "x", "sshs_model_hash": "stale"})
    return path, t


def product(parts):
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    if "lora_mid.weight" in parts:
        return torch.einsum("i j k l, j r, p i -> p r k l", parts["lora_mid.weight"].float(), down.flatten(1), up.flatten(1)).flatten(1)
    return up.flatten(1) @ down.flatten(1)


def grouped(path):
    out = {}
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        for key in handle.keys():
            name, suffix = key.split(".", 1)
            out.setdefault(name, {})[suffix] = handle.get_tensor(key)
    return out, metadata


@pytest.mark.parametrize("method,param,cap", [(None, None, 4), ("sv_ratio", 4.0, 10), ("sv_cumulative", 0.7, 10),
                                              ("sv_fro", 0.9, 10), ("sv_fro", 0.99, 3)])
def test_resize_matches_svd_and_kohya_rules(adapter, tmp_path, method, param, cap):
    path, source = adapter
    out = tmp_path / "out.safetensors"
    args = ["resize", str(path), str(out), "--rank", str(cap), "--json"]
    if method:
        args += ["--dynamic-method", method, "--dynamic-param", str(param)]
    report = {m["name"]: m for m in json.loads(run(*args).stdout)["modules"]}
    result, metadata = grouped(out)
    originals, _ = grouped(path)
    for name, parts in originals.items():
        if "lora_up.weight" not in parts:
            assert all(torch.equal(result[name][k], v) for k, v in parts.items()), "copied unchanged"
            continue
        rank = parts["lora_up.weight"].shape[1]
        scale = (parts["alpha"].item() if "alpha" in parts else rank) / rank
        m = product(parts)
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        r = kohya_rank(s, method, param, cap)
        new = result[name]
        assert new["lora_down.weight"].shape[0] == r and report[name]["new_rank"] == r, name
        assert "lora_mid.weight" not in new
        assert new["lora_down.weight"].shape[1] == parts["lora_down.weight"].shape[1], name
        alpha = new["alpha"].item()
        assert alpha == pytest.approx(scale * r, rel=1e-6)
        rebuilt = alpha / r * product(new)
        truncated = scale * (u[:, :r] * s[:r]) @ vh[:r]
        assert torch.allclose(rebuilt, truncated, atol=1e-4 * truncated.abs().max().item()), name
        assert report[name]["fro_retained"] == pytest.approx(float((s[:r] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-4)
        assert report[name]["sum_retained"] == pytest.approx(float(s[:r].sum() / s.sum()), rel=1e-4)
    if method and cap == 10:
        assert any(m["new_rank"] < cap for m in report.values()), "the rule, not the cap, chose some ranks"
    assert metadata["ss_network_dim"] == (str(cap) if method is None else "Dynamic")
    assert metadata["ss_training_comment"].endswith("; x") and "sshs_model_hash" not in metadata


def test_resized_tucker_conv_keeps_its_kernel(adapter, tmp_path):
    path, _ = adapter
    out = tmp_path / "out.safetensors"
    run("resize", str(path), str(out), "--rank", "2")
    result, _ = grouped(out)
    assert result["lora_unet_c_conv2"]["lora_down.weight"].shape == (2, 16, 3, 3)
    assert result["lora_unet_c_conv2"]["lora_up.weight"].shape == (24, 2, 1, 1)


def test_sparse_bias_kept_and_progress_quiet(tmp_path):
    """A LoRA module's sparse bias (ΔW = (alpha/r)·(up·down + S)) is copied unchanged, as alpha/r
    is kept; --json and --quiet leave stderr empty; the table (a long name cut) fits 100 columns."""
    g = torch.Generator().manual_seed(11)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_with_a_long_tail"
    tensors = {f"{name}.lora_up.weight": torch.randn(12, 6, generator=g), f"{name}.lora_down.weight": torch.randn(6, 10, generator=g),
               f"{name}.alpha": torch.tensor(3.0), f"{name}.bias_indices": torch.tensor([[0, 5, 11], [9, 0, 3]], dtype=torch.int16),
               f"{name}.bias_values": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16),
               f"{name}.bias_size": torch.tensor([12, 10], dtype=torch.int16)}
    source = tmp_path / "sparse.safetensors"
    save_file(tensors, str(source))
    for flags in (["--json"], ["--quiet"]):
        out = tmp_path / f"resized{flags[0]}.safetensors"
        result = run("resize", str(source), str(out), "--rank", "2", *flags)
        assert result.stderr == ""
        if flags == ["--quiet"]:
            table = [line for line in result.stdout.splitlines() if "→" in line]
            assert len(table) == 2 and max(len(line) for line in table) <= 100, result.stdout
        with safe_open(str(out), "pt") as handle:
            for suffix in ("bias_indices", "bias_values", "bias_size"):
                assert torch.equal(handle.get_tensor(f"{name}.{suffix}"), tensors[f"{name}.{suffix}"]), suffix
            assert handle.get_tensor(f"{name}.alpha").item() == pytest.approx(3.0 / 6 * 2)
