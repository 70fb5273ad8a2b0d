"""`lycoris extract` against LyCORIS 4.1.3's `extract_diff` on small SD1-, SD2- and SDXL-shaped
pairs (tuned = base + a rank-4 change + noise on every Linear/Conv2d), from each layout
(diffusers folders, SDXL's sharded; single LDM files, where SD2's and SDXL-TE2's OpenCLIP
q/k/v are thirds of a fused in_proj): the same modules (LyCORIS's names mapped to kohya's
through `lycoris layers`), the same ranks and kinds, and per layer a reconstruction error
‖ΔW − stored‖_F within 1% of LyCORIS's (its exact SVD; ours the randomised fixed-rank path)."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from _checkpoints import gen, layers, lycoris_cli, run
from test_checkpoint_extract import modules, ours, reconstruction


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family_pair(request, tmp_path_factory):
    """(root, base models, tuned models, family, LyCORIS's modules) with both layouts under root."""
    from lycoris.utils import extract_diff

    family = request.param
    root = tmp_path_factory.mktemp(family + "-pair")
    unet, texts = gen.build_models(family, unet_width=16, text_width=32, seed=5)
    shards = 2 if family == "sdxl" else 1
    gen.save_diffusers(unet, texts, str(root / "base"), shards=shards)
    base = copy.deepcopy(unet), copy.deepcopy(texts)
    gen.tune([unet, *texts], rank=4, noise=0.002, seed=6)
    gen.save_diffusers(unet, texts, str(root / "tuned"), shards=shards)
    for side in ("base", "tuned"):
        save_file(gen.ldm_state_dict(str(root / side), lycoris_cli()), str(root / f"{side}.safetensors"))
    theirs = extract_diff(list(base[1]), list(texts), base[0], unet, mode="fixed", linear_mode_param=4,
                          conv_mode_param=3, small_conv=True)
    return root, base, (unet, texts), family, modules(theirs)


def kohya_name(name, aliases):
    """LyCORIS's module name in kohya's spelling: the UNet through `lycoris layers`' aliases
    (SDXL's kohya names are LDM paths), text encoders with the `text_model` level that
    transformers 5 leaves out."""
    name = aliases.get(name, name)
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        if name.startswith(prefix) and not name.startswith(prefix + "text_model_"):
            return prefix + "text_model_" + name[len(prefix):]
    return name


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_extract_matches_lycoris(family_pair, tmp_path, layout):
    root, (base_unet, base_texts), (tuned_unet, tuned_texts), family, theirs = family_pair
    table = layers(root / "base")["layers"]
    aliases = {alias: layer["name"] for layer in table for alias in layer["aliases"]}
    theirs = {kohya_name(name, aliases): parts for name, parts in theirs.items()}
    # SDXL's text_projection is not an adaptable layer here (README Parity); LyCORIS extracts it.
    theirs = {name: parts for name, parts in theirs.items() if not name.endswith("text_projection")}
    pair = (root, None, None)
    if layout == "diffusers":
        state, report = ours(pair, tmp_path, "--linear-dim", "4", "--conv-dim", "3", "--dtype", "f32")
    else:
        sources = (root / "base.safetensors", root / "tuned.safetensors")
        out = tmp_path / "extracted.safetensors"
        report = json.loads(run("extract", *map(str, sources), str(out), "--json", "--linear-dim", "4", "--conv-dim", "3",
                                "--dtype", "f32").stdout)
        with safe_open(str(out), "pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    mine = modules(state)
    assert set(mine) == set(theirs)
    # ΔW of every layer, from the models, by kohya name.
    deltas = {}
    components = [("lora_unet", base_unet, tuned_unet)]
    te_prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    components += list(zip(te_prefixes, base_texts, tuned_texts))
    for prefix, base, tuned in components:
        tuned_parameters = dict(tuned.named_parameters())
        for key, value in base.named_parameters():
            if not key.endswith(".weight"):
                continue
            path = key if prefix == "lora_unet" or key.startswith("text_model.") else "text_model." + key
            name = kohya_name(prefix + "_" + path[: -len(".weight")].replace(".", "_"), aliases)
            deltas[name] = (tuned_parameters[key] - value).detach()
    checked = 0
    for name, parts in theirs.items():
        got = mine[name]
        assert ("diff" in got) == ("diff" in parts), name
        if "lora_down.weight" in parts:
            assert got["lora_down.weight"].shape[0] == parts["lora_down.weight"].shape[0], name
            assert ("lora_mid.weight" in got) == ("lora_mid.weight" in parts), name
        delta = deltas[name]
        their_error = (delta - reconstruction(parts).reshape(delta.shape)).norm()
        our_error = (delta - reconstruction(got).reshape(delta.shape)).norm()
        assert our_error <= 1.01 * their_error + 1e-6, name
        checked += 1
    assert checked == len(report["layers"]) - sum(layer.get("kind") == "unchanged" for layer in report["layers"])
    assert checked > 100
