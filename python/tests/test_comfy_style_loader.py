"""Files from `lycoris extract`, and the adapters `lycoris merge` takes, loaded by a loader
written here from ComfyUI's key mapping and weight rules (/work/shared/reference/loaders.md:
`comfy/lora.py` and `comfy/weight_adapter/`), applied to the base checkpoint:

- it finds every module (no "lora key not loaded"), and the patched weights reproduce, per
  layer, the relative reconstruction error `extract` reports;
- for merge's inputs (LoRA and LoHa with alpha, two multipliers) the patched weights equal
  `lycoris merge`'s output;
- LyCORIS 4.1.3 loading the same file (`create_lycoris_from_weights` on the torch models,
  `apply_to`) gives the same UNet and text-encoder outputs as the models with the patched
  weights.

On SD1-, SD2- and SDXL-shaped pairs: the UNet as ComfyUI holds it (SDXL: the LDM single
file's keys; SD1/SD2: diffusers keys, ComfyUI's other spelling), text encoders in the
transformers layout ComfyUI converts them to."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _checkpoints import gen, layers, lycoris_cli, run
from test_checkpoint_merge import lora, loha, write_adapter

# The text-encoder layers ComfyUI maps (and nothing else of a text encoder).
COMFY_TEXT_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(mlp\.fc1|mlp\.fc2|self_attn\.(q|k|v|out)_proj)\.weight$")
LDM_UNET = "model.diffusion_model."


def comfy_key_map(components, family):
    """kohya module name -> (component, key): UNet weights as `lora_unet_` + their path with
    `_` (LDM keys without `model.diffusion_model.`, diffusers keys as they are), text-encoder
    encoder-layer projections behind `lora_te_` (SD1/SD2) or `lora_te1_`/`lora_te2_` (SDXL)."""
    table = {}
    for key in components["unet"]:
        if key.endswith(".weight"):
            path = key[len(LDM_UNET):] if key.startswith(LDM_UNET) else key
            table["lora_unet_" + path[: -len(".weight")].replace(".", "_")] = ("unet", key)
    prefixes = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    for component, prefix in prefixes.items():
        for key in components.get(component, {}):
            if COMFY_TEXT_LAYER.search(key):
                table[prefix + key[: -len(".weight")].replace(".", "_")] = (component, key)
    return table


def comfy_delta(parts, shape):
    """The change one module makes, scaled as ComfyUI scales it."""
    if "diff" in parts:
        return parts["diff"].float().reshape(shape)
    if "hada_w1_a" in parts:
        p = {k: v.float() for k, v in parts.items()}
        scale = p["alpha"].item() / p["hada_w1_b"].shape[0] if "alpha" in p else 1.0
        return ((p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])).reshape(shape) * scale
    up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
    if "lora_mid.weight" in parts:
        # The Tucker core contracted into down: (r, in, k...) = Σ_j mid[i, j, k...]·down[j, in].
        mid = parts["lora_mid.weight"].float()
        down = torch.einsum("ijhw,jc->ichw", mid, down.flatten(1))
    scale = parts["alpha"].item() / parts["lora_down.weight"].shape[0] if "alpha" in parts else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def comfy_apply(components, family, adapter_path, strength=1.0):
    """(patched copies of the components' tensors, module names not loaded)."""
    table = comfy_key_map(components, family)
    grouped = {}
    for key, value in load_file(str(adapter_path)).items():
        name, suffix = key.split(".", 1)
        grouped.setdefault(name, {})[suffix] = value
    patched = {c: dict(tensors) for c, tensors in components.items()}
    not_loaded = []
    for name, parts in grouped.items():
        if name not in table:
            not_loaded.append(name)
            continue
        component, key = table[name]
        weight = patched[component][key]
        patched[component][key] = weight + strength * comfy_delta(parts, weight.shape)
    return patched, not_loaded


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family + "-comfy")
    unet, texts = gen.build_models(family, unet_width=16, text_width=32, seed=8)
    gen.save_diffusers(unet, texts, str(root / "base"))
    base = copy.deepcopy(unet), copy.deepcopy(texts)
    gen.tune([unet, *texts], rank=4, noise=0.002, seed=9)
    gen.save_diffusers(unet, texts, str(root / "tuned"))
    tensors = {}
    for side in ("base", "tuned"):
        components = {"text_encoder": load_file(str(root / side / "text_encoder" / "model.safetensors"))}
        if family == "sdxl":
            components["text_encoder_2"] = load_file(str(root / side / "text_encoder_2" / "model.safetensors"))
            ldm = gen.ldm_state_dict(str(root / side), lycoris_cli())
            components["unet"] = {k: v for k, v in ldm.items() if k.startswith(LDM_UNET)}
        else:
            components["unet"] = load_file(str(root / side / "unet" / "diffusion_pytorch_model.safetensors"))
        tensors[side] = components
    return family, root, base, tensors


def test_extracted_file_reproduces_the_reported_reconstruction(setup, tmp_path):
    family, root, _, tensors = setup
    out = tmp_path / "extracted.safetensors"
    report = json.loads(run("extract", str(root / "base"), str(root / "tuned"), str(out), "--json",
                            "--linear-dim", "4", "--conv-dim", "3", "--dtype", "f32").stdout)
    patched, not_loaded = comfy_apply(tensors["base"], family, out)
    assert not_loaded == []
    table = comfy_key_map(tensors["base"], family)
    checked = 0
    for layer in report["layers"]:
        if layer["kind"] == "unchanged":
            continue
        component, key = table[layer["name"]]
        w0, wt, loaded = tensors["base"][component][key], tensors["tuned"][component][key], patched[component][key]
        error = ((loaded - wt).norm() / (wt - w0).norm()).item()
        assert error == pytest.approx(layer["relative_error"], abs=1e-4), layer["name"]
        checked += 1
    assert checked > 100


def test_merge_inputs_load_as_lycoris_merge_writes_them(setup, tmp_path):
    """A LoRA (alpha 2, rank 4) on every linear and conv layer ComfyUI maps, a LoHa (alpha 1,
    rank 2) on the linear ones, merged with multipliers 0.7 and -0.5: ComfyUI-style patched
    weights = `lycoris merge` output (diffusers layout)."""
    family, root, _, tensors = setup
    report = layers(root / "base")["layers"]
    table = comfy_key_map(tensors["base"], family)
    a, b = {}, {}
    for index, layer in enumerate(report):
        # The spelling this layout's key map has (SDXL: the LDM one, kohya's; SD1/SD2: the
        # diffusers one, kohya's too); ComfyUI's diffusers->LDM table is not rewritten here.
        name = next((n for n in [layer["name"], *layer["aliases"]] if n in table), None)
        if name is None or len(layer["shape"]) not in (2, 4):
            continue
        a[name] = (lora(layer["shape"], 4, seed=index)[0], 2.0)
        if len(layer["shape"]) == 2:
            b[name] = (loha(layer["shape"], 2, seed=1000 + index)[0], 1.0)
    write_adapter(tmp_path / "a.safetensors", a)
    write_adapter(tmp_path / "b.safetensors", b)
    merged = tmp_path / "merged"
    run("merge", "--base", str(root / "base"), "--adapter", f"{tmp_path / 'a.safetensors'}:0.7",
        "--adapter", f"{tmp_path / 'b.safetensors'}:-0.5", "--out", str(merged), "--strict")
    patched, not_loaded = comfy_apply(tensors["base"], family, tmp_path / "a.safetensors", 0.7)
    assert not_loaded == []
    patched, not_loaded = comfy_apply(patched, family, tmp_path / "b.safetensors", -0.5)
    assert not_loaded == []
    folder_key = {layer["other_key"]: layer["key"] for layer in report if family == "sdxl" and layer["component"] == "unet"}
    checked = 0
    for component, values in patched.items():
        folder_file = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
                       "text_encoder_2": "text_encoder_2/model.safetensors"}[component]
        with safe_open(str(merged / folder_file), "pt") as handle:
            for key, value in values.items():
                if not torch.equal(value, tensors["base"][component][key]):
                    written = handle.get_tensor(folder_key.get(key, key))
                    assert torch.allclose(written, value, rtol=1e-5, atol=1e-6), key
                    checked += 1
    assert checked == len(a)


def test_lycoris_loads_the_same_file_to_the_same_outputs(setup, tmp_path):
    from lycoris import create_lycoris_from_weights

    family, root, (base_unet, base_texts), tensors = setup
    out = tmp_path / "extracted.safetensors"
    run("extract", str(root / "base"), str(root / "tuned"), str(out), "--linear-dim", "4", "--conv-dim", "3", "--dtype", "f32")
    patched, _ = comfy_apply(tensors["base"], family, out)
    state = load_file(str(out))
    report = layers(root / "base")["layers"]
    diffusers_spelling = {layer["name"]: (layer["aliases"][0] if family == "sdxl" and layer["aliases"] else layer["name"])
                          for layer in report}
    te_prefixes = ["lora_te1_", "lora_te2_"] if family == "sdxl" else ["lora_te_"]

    def for_lycoris(prefixes, rename):
        """The file's modules of one model, named as LyCORIS names that model's modules."""
        result = {}
        for key, value in state.items():
            name, suffix = key.split(".", 1)
            for prefix in prefixes:
                if name.startswith(prefix):
                    result[f"lycoris_{rename(name, prefix)}.{suffix}"] = value
        return result

    def text_path(text):
        """kohya's text-encoder path as LyCORIS names `text`'s modules (transformers 5 builds
        CLIPTextModel without its `text_model` level)."""
        strip = not any(k.startswith("text_model.") for k in text.state_dict())
        return lambda name, prefix: name[len(prefix) + len("text_model_") * strip:]

    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    hidden = []
    for index, (text, prefix) in enumerate(zip(base_texts, te_prefixes)):
        component = "text_encoder" if index == 0 else "text_encoder_2"
        adapted = copy.deepcopy(text)
        network, _ = create_lycoris_from_weights(1.0, None, adapted, weights_sd=for_lycoris([prefix], text_path(text)))
        network.apply_to()
        assert len(network.loras) > 10
        loaded = copy.deepcopy(text)
        strip = not any(k.startswith("text_model.") for k in text.state_dict())
        loaded.load_state_dict({(k[len("text_model."):] if strip and k.startswith("text_model.") else k): v
                                for k, v in patched[component].items()})
        with torch.no_grad():
            theirs, ours = adapted(ids).last_hidden_state, loaded(ids).last_hidden_state
            plain = text(ids).last_hidden_state
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain, theirs, rtol=1e-4, atol=1e-5)
        hidden.append(theirs)

    adapted = copy.deepcopy(base_unet)
    network, _ = create_lycoris_from_weights(
        1.0, None, adapted, weights_sd=for_lycoris(["lora_unet_"], lambda name, prefix: diffusers_spelling[name][len(prefix):]))
    network.apply_to()
    assert len(network.loras) > 50
    loaded = copy.deepcopy(base_unet)
    if family == "sdxl":
        # The LDM keys back to the diffusers model's through `lycoris layers`.
        to_diffusers = {layer["other_key"]: layer["key"] for layer in report if layer["component"] == "unet"}
        unet_state = loaded.state_dict()
        for key, value in patched["unet"].items():
            if key in to_diffusers:
                unet_state[to_diffusers[key]] = value
        loaded.load_state_dict(unet_state)
    else:
        loaded.load_state_dict(patched["unet"])
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 7, base_unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, base_texts[1].config.projection_dim, generator=generator),
                                      "time_ids": torch.randn(1, 6, generator=generator)}
    with torch.no_grad():
        theirs = adapted(sample, 10, context, **extra).sample
        ours = loaded(sample, 10, context, **extra).sample
        plain = base_unet(sample, 10, context, **extra).sample
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, theirs, rtol=1e-4, atol=1e-5)
