"""`lycoris extract` against LyCORIS 4.1.3's `extract_diff` on a small SD1-shaped pair
(tuned = base + a rank-4 change + noise on every Linear/Conv2d): the same modules, kinds,
ranks, alphas and tensor shapes, the same reconstructions (exact SVD), and a randomised
fixed-rank path within 1% of the exact SVD's reconstruction error per layer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from _checkpoints import gen, run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    unet, texts = gen.build_models("sd1", unet_width=16, text_width=32, seed=3)
    gen.save_diffusers(unet, texts, str(root / "base"))
    base = copy.deepcopy(unet), copy.deepcopy(texts[0])
    gen.tune([unet, texts[0]], rank=4, noise=0.002, seed=4)
    gen.save_diffusers(unet, texts, str(root / "tuned"))
    return root, base, (unet, texts[0])


def lycoris_extract(pair, mode, linear, conv, use_bias=False, small_conv=True):
    from lycoris.utils import extract_diff

    _, (base_unet, base_te), (tuned_unet, tuned_te) = pair
    state = extract_diff([base_te], [tuned_te], base_unet, tuned_unet, mode=mode, linear_mode_param=linear,
                         conv_mode_param=conv, use_bias=use_bias, sparsity=0.98, small_conv=small_conv)
    # transformers 5 builds CLIPTextModel without its `text_model` level; kohya names have it.
    return {(k.replace("lora_te_encoder_", "lora_te_text_model_encoder_")): v for k, v in state.items()}


def ours(pair, tmp_path, *args):
    root = pair[0]
    out = tmp_path / "extracted.safetensors"
    report = json.loads(run("extract", str(root / "base"), str(root / "tuned"), str(out), "--json", *args).stdout)
    with safe_open(str(out), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, report


def modules(state):
    grouped = {}
    for key, value in state.items():
        name, suffix = key.split(".", 1)
        grouped.setdefault(name, {})[suffix] = value
    return grouped


def reconstruction(parts):
    """ΔW as the module stores it (float32)."""
    if "diff" in parts:
        return parts["diff"].float()
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    if "lora_mid.weight" in parts:
        mid = parts["lora_mid.weight"].float()
        return torch.einsum("i j k l, j r, p i -> p r k l", mid, down.flatten(1), up.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


@pytest.mark.parametrize("mode,linear,conv,flags", [
    ("fixed", 4, 3, []),
    ("fixed", 6, 2, ["--disable-tucker"]),
    ("threshold", 0.02, 0.03, []),
    ("ratio", 0.3, 0.4, []),
    ("quantile", 0.5, 0.6, []),
])
def test_same_modules_ranks_and_reconstructions(pair, tmp_path, mode, linear, conv, flags):
    theirs = modules(lycoris_extract(pair, mode, linear, conv, small_conv="--disable-tucker" not in flags))
    option = {"fixed": "dim", "threshold": "threshold", "ratio": "ratio", "quantile": "quantile"}[mode]
    value = (lambda v: str(int(v))) if mode == "fixed" else str
    state, report = ours(pair, tmp_path, "--mode", mode, f"--linear-{option}", value(linear), f"--conv-{option}", value(conv),
                         "--exact", *flags)
    mine = modules(state)
    assert set(mine) == set(theirs)
    kinds = {layer["kind"] for layer in report["layers"]}
    assert "low rank" in kinds
    for name, parts in theirs.items():
        assert set(mine[name]) == set(parts), name
        for suffix, tensor in parts.items():
            assert mine[name][suffix].shape == tensor.shape, (name, suffix)
            assert mine[name][suffix].dtype == torch.float16
        if "alpha" in parts:
            assert mine[name]["alpha"].item() == parts["alpha"].item(), name
        want, got = reconstruction(parts), reconstruction(mine[name])
        assert torch.allclose(got, want, rtol=0, atol=2e-3 * want.abs().max().item() + 1e-6), name


def test_randomized_fixed_rank_within_one_percent(pair, tmp_path):
    """Per layer, ‖ΔW − ours‖ ≤ 1.01·‖ΔW − exact‖ with ΔW from the files."""
    _, (base_unet, base_te), (tuned_unet, tuned_te) = pair
    exact = modules(ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--exact", "--dtype", "f32")[0])
    fast, report = ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--dtype", "f32")
    fast = modules(fast)
    deltas = {}
    for prefix, base, tuned in [("lora_unet", base_unet, tuned_unet), ("lora_te", base_te, tuned_te)]:
        tuned_parameters = dict(tuned.named_parameters())
        for key, value in base.named_parameters():
            path = key if prefix == "lora_unet" or key.startswith("text_model.") else "text_model." + key
            deltas[prefix + "_" + path[: -len(".weight")].replace(".", "_")] = tuned_parameters[key] - value
    checked = 0
    for name, parts in exact.items():
        delta = deltas[name].detach()
        exact_error = (delta - reconstruction(parts)).norm()
        fast_error = (delta - reconstruction(fast[name])).norm()
        assert fast_error <= 1.01 * exact_error + 1e-7, name
        checked += "lora_up.weight" in parts
    assert checked > 100
    errors = {layer["name"]: layer["relative_error"] for layer in report["layers"]}
    name = next(n for n, p in fast.items() if "lora_up.weight" in p)
    reported = (deltas[name].detach() - reconstruction(fast[name])).norm() / deltas[name].detach().norm()
    assert abs(errors[name] - reported.item()) < 1e-4


def test_sparse_bias_as_lycoris_stores_it(pair, tmp_path):
    """Without Tucker (LyCORIS's Tucker residual is taken against the tuned weight, a bug
    not copied), the sparse residual has LyCORIS's keys, dtypes and entries."""
    theirs = modules(lycoris_extract(pair, "fixed", 4, 3, use_bias=True, small_conv=False))
    mine = modules(ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--exact", "--disable-tucker",
                        "--sparse-bias", "--sparsity", "0.98")[0])
    checked = 0
    for name, parts in theirs.items():
        if "bias_indices" not in parts:
            continue
        got = mine[name]
        assert got["bias_indices"].dtype == torch.int16 and got["bias_size"].dtype == torch.int16
        assert got["bias_values"].dtype == torch.float16
        assert got["bias_size"].tolist() == parts["bias_size"].tolist(), name
        dense = lambda p: torch.sparse_coo_tensor(p["bias_indices"].long(), p["bias_values"].float(),
                                                  tuple(p["bias_size"].tolist()), check_invariants=True).to_dense()
        # The kept entries agree but for values at the quantile itself (rounding of the SVD).
        a, b = dense(parts), dense(got)
        both = (a != 0) & (b != 0)
        assert both.sum() >= 0.97 * max((a != 0).sum(), (b != 0).sum()), name
        assert torch.allclose(a[both], b[both], atol=2e-3 * a.abs().max().item()), name
        checked += 1
    assert checked > 100


def test_tucker_residual_is_against_the_change(pair, tmp_path):
    """With Tucker cores and a sparse bias, ΔW − (up·mid·down + sparse) is smaller than ΔW −
    up·mid·down: the residual stored is the change's, not the tuned weight's."""
    state, report = ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--sparse-bias", "--dtype", "f32")
    errors = {layer["name"]: layer["relative_error"] for layer in report["layers"]}
    plain = {layer["name"]: layer["relative_error"] for layer in json.loads(
        run("extract", str(pair[0] / "base"), str(pair[0] / "tuned"), str(tmp_path / "x.safetensors"), "--json",
            "--linear-dim", "4", "--conv-dim", "3").stdout)["layers"]}
    tucker = [n for n, p in modules(state).items() if "lora_mid.weight" in p]
    assert tucker and all(errors[n] < plain[n] for n in tucker)


def test_lycoris_merges_the_file_to_the_reported_error(pair, tmp_path):
    """LyCORIS's own merge (lycoris.utils.merge) of the extracted file onto the base models
    gives, per layer, ‖W_merged − W_tuned‖ / ‖ΔW‖ equal to the relative error the report
    states (Tucker cores and whole `diff` layers included)."""
    from lycoris.utils import merge

    _, (base_unet, base_te), _ = pair
    state, report = ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--dtype", "f32")
    # LyCORIS names the transformers-5 CLIPTextModel's layers without `text_model`.
    state = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in state.items()}
    unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    merge([te], unet, state, 1.0)
    errors = {layer["name"]: layer["relative_error"] for layer in report["layers"]}
    checked = 0
    for name, module, w0, wt in merged_layers(pair, unet, te, errors):
        error = ((module.weight.detach() - wt).norm() / (wt - w0).norm()).item()
        assert error == pytest.approx(errors[name], abs=1e-4), name
        checked += 1
    assert checked == len(errors)


def merged_layers(pair, unet, te, names):
    """(kohya name, module of the merged models `unet`/`te`, base weight, tuned weight) for
    every layer named in `names`."""
    _, (base_unet, base_te), (tuned_unet, tuned_te) = pair
    for prefix, merged, base, tuned in [("lora_unet", unet, base_unet, tuned_unet), ("lora_te", te, base_te, tuned_te)]:
        tuned_modules, base_modules = dict(tuned.named_modules()), dict(base.named_modules())
        for path, module in merged.named_modules():
            name = prefix + "_" + (path if prefix == "lora_unet" else "text_model." + path).replace(".", "_")
            if name in names and hasattr(module, "weight"):
                yield name, module, base_modules[path].weight.detach(), tuned_modules[path].weight.detach()


def test_merge_applies_the_sparse_bias(pair, tmp_path):
    """`lycoris merge` of a file extracted with --sparse-bias adds the sparse residual S to
    up·(mid)·down (ΔW = (alpha/r)·(up·down + S), as the LyCORIS author's A1111 extension
    rebuilt it): the merged weights are base + that, computed here in torch from the file,
    and reproduce per layer the relative error extract reports. LyCORIS 4.1.3's own loader
    (lycoris.utils.merge, through get_module/make_module as create_lycoris_from_weights)
    drops the three keys: its merge is ours minus S."""
    from lycoris.utils import merge

    root, (base_unet, base_te), _ = pair
    state, report = ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--sparse-bias", "--dtype", "f32")
    extracted = tmp_path / "extracted.safetensors"
    merged_folder = tmp_path / "merged"
    result = json.loads(run("merge", "--base", str(root / "base"), "--adapter", str(extracted), "--out", str(merged_folder),
                            "--json").stdout)
    assert result["written"] and not result["failed"] and not result["unmatched"]
    merged = {}
    for part, prefix in [("unet/diffusion_pytorch_model.safetensors", "lora_unet_"), ("text_encoder/model.safetensors", "lora_te_")]:
        with safe_open(str(merged_folder / part), "pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight"):
                    merged[prefix + key[: -len(".weight")].replace(".", "_")] = handle.get_tensor(key)
    lycoris_state = {k.replace("lora_te_text_model_", "lora_te_"): v.clone() for k, v in state.items()}
    unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    merge([te], unet, lycoris_state, 1.0)
    errors = {layer["name"]: layer["relative_error"] for layer in report["layers"]}
    sparse_layers = 0
    for name, module, w0, wt in merged_layers(pair, unet, te, errors):
        parts = modules(state)[name]
        ours_w = merged[name]
        sparse = torch.zeros(w0.shape[0], w0[0].numel())
        if "bias_indices" in parts:
            sparse = torch.sparse_coo_tensor(parts["bias_indices"].long(), parts["bias_values"].float(),
                                             tuple(parts["bias_size"].tolist()), check_invariants=True).to_dense()
            sparse_layers += 1
        scale = parts["alpha"].item() / parts["lora_down.weight"].shape[0] if "alpha" in parts else 1.0
        want = w0 + scale * (reconstruction(parts) + sparse.reshape(w0.shape))
        assert torch.allclose(ours_w, want, atol=1e-6), name
        assert torch.allclose(module.weight.detach(), ours_w - scale * sparse.reshape(w0.shape), atol=1e-6), name
        error = ((ours_w - wt).norm() / (wt - w0).norm()).item()
        assert error == pytest.approx(errors[name], abs=1e-4), name
    assert sparse_layers > 100
