"""`lycoris merge` onto generated SD1.x / SD2.x / SDXL checkpoints in both layouts: several
adapters with multipliers, kohya names and aliases, OpenCLIP's fused in_proj, --dtype,
--strict. The expectation is computed here in torch from the base weights and the adapter
tensors (LoRA: m·(alpha/r)·up·down; LoHa: m·(alpha/r)·(w1a·w1b)⊙(w2a·w2b)); the merged
single files are read back through diffusers' own single-file converter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from _checkpoints import layers, model, run  # noqa: F401 (model is a fixture)

def pick(report, family):
    """A UNet attention projection, a 3x3 conv, a text-encoder q_proj and fc1 (by kohya name)."""
    names = {layer["name"]: layer for layer in report["layers"]}
    te = "lora_te1" if family == "sdxl" else "lora_te"
    wanted = [te + "_text_model_encoder_layers_1_self_attn_q_proj", te + "_text_model_encoder_layers_1_mlp_fc1"]
    if family == "sdxl":
        wanted += ["lora_te2_text_model_encoder_layers_3_self_attn_v_proj",
                   "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_output_blocks_2_0_in_layers_2"]
    else:
        wanted += ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
                   "lora_unet_up_blocks_0_resnets_2_conv1"]
    return [names[name] for name in wanted]


def lora(shape, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=generator) * 0.1
    up = torch.randn((shape[0], rank) + (1,) * (len(shape) - 2), generator=generator) * 0.1
    delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    return {"lora_down.weight": down, "lora_up.weight": up}, delta


def loha(shape, rank, seed):
    generator = torch.Generator().manual_seed(seed)
    t = {k: torch.randn(s, generator=generator) * 0.2 for k, s in
         [("hada_w1_a", (shape[0], rank)), ("hada_w1_b", (rank, shape[1])),
          ("hada_w2_a", (shape[0], rank)), ("hada_w2_b", (rank, shape[1]))]}
    delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    return t, delta


def write_adapter(path, modules):
    tensors = {}
    for name, (parts, alpha) in modules.items():
        for suffix, value in parts.items():
            tensors[f"{name}.{suffix}"] = value.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))


def diffusers_tensors(folder):
    """{(component, key): tensor} of a diffusers folder (shards joined)."""
    out = {}
    for component in ["unet", "text_encoder", "text_encoder_2"]:
        path = folder / component
        if not path.is_dir():
            continue
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                out.update({(component, key): handle.get_tensor(key) for key in handle.keys()})
    return out


def single_as_diffusers(single, unet, texts, family):
    """A merged single file converted by diffusers' single-file converter, keyed like diffusers_tensors."""
    from diffusers.loaders import single_file_utils as sfu

    with safe_open(str(single), "pt") as handle:
        checkpoint = {key: handle.get_tensor(key).float() for key in handle.keys()}
    out = {("unet", k): v for k, v in sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config)).items()}
    prefixes = {"sd1": [None], "sd2": ["cond_stage_model.model."], "sdxl": [None, "conditioner.embedders.1.model."]}[family]
    for component, text, prefix in zip(["text_encoder", "text_encoder_2"], texts, prefixes):
        converted = (sfu.convert_ldm_clip_checkpoint(checkpoint) if prefix is None
                     else sfu.convert_open_clip_checkpoint(text, checkpoint, prefix=prefix))
        out.update({(component, k): v for k, v in converted.items()})
    return out


@pytest.fixture(scope="module")
def adapters(model):
    """Adapter A: LoRA (alpha 2, rank 4) on every picked layer, m = 0.7. Adapter B: LoHa
    (alpha 1, rank 2) on the linear ones, m = -0.5, UNet names in the other spelling."""
    family, _, _, folder, _, root = model
    picked = pick(layers(folder), family)
    a_modules, b_modules, expected = {}, {}, {}
    for index, layer in enumerate(picked):
        shape = layer["shape"]
        parts, delta = lora(shape, 4, seed=10 + index)
        a_modules[layer["name"]] = (parts, 2.0)
        total = 0.7 * (2.0 / 4) * delta
        if len(shape) == 2:
            parts, delta = loha(shape, 2, seed=50 + index)
            name = layer["aliases"][0] if layer["aliases"] else layer["name"]
            b_modules[name] = (parts, 1.0)
            total = total + -0.5 * (1.0 / 2) * delta
        key = layer["key"] if layer["key"].startswith(("text_model.", "text_projection")) or layer["component"] == "unet" \
            else "text_model." + layer["key"]
        expected[(layer["component"], key)] = total
    write_adapter(root / "a.safetensors", a_modules)
    write_adapter(root / "b.safetensors", b_modules)
    return root / "a.safetensors", root / "b.safetensors", expected


@pytest.mark.parametrize("layout", ["diffusers", "single"])
def test_merge_several_adapters(model, adapters, layout, tmp_path):
    family, unet, texts, folder, single, _ = model
    a, b, expected = adapters
    source = folder if layout == "diffusers" else single
    out = tmp_path / ("merged" if layout == "diffusers" else "merged.safetensors")
    result = run("merge", "--base", str(source), "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5",
                 "--out", str(out), "--json")
    report = json.loads(result.stdout)
    assert report["written"] and not report["unmatched"] and not report["failed"]
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        modules = {k.split(".")[0] for k in fa.keys()}, {k.split(".")[0] for k in fb.keys()}
    assert sorted((m["adapter"], m["module"]) for m in report["merged"]) == sorted(
        [(str(a), name) for name in modules[0]] + [(str(b), name) for name in modules[1]])
    base = diffusers_tensors(folder)
    if layout == "diffusers":
        merged = diffusers_tensors(out)
        assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in folder.rglob("*"))
    else:
        merged = single_as_diffusers(out, unet, texts, family)
    assert set(merged) >= set(base)
    for key, value in base.items():
        if key in expected:
            want = value + expected[key]
            assert torch.allclose(merged[key], want, rtol=1e-5, atol=1e-6), key
            assert not torch.equal(merged[key], value), key
        else:
            assert torch.equal(merged[key], value), key
    if family != "sd1" and layout == "single":
        assert any(m["rows"] for m in report["merged"]), "a q/k/v module merged into its third of in_proj"


def test_merged_text_encoder_outputs(model, adapters, tmp_path):
    """The merged text encoder's hidden states equal the base encoder's with the adapters
    applied on the fly (forward hooks adding x·ΔWᵀ)."""
    family, _, texts, folder, _, _ = model
    a, b, expected = adapters
    out = tmp_path / "merged"
    run("merge", "--base", str(folder), "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5", "--out", str(out))
    text = texts[0]
    merged_state = {k: v for (c, k), v in diffusers_tensors(out).items() if c == "text_encoder"}
    merged = type(text)(text.config)
    strip = not any(k.startswith("text_model.") for k in text.state_dict())
    merged.load_state_dict({(k[len("text_model."):] if strip and k.startswith("text_model.") else k): v
                            for k, v in merged_state.items()})
    hooks = []
    modules = dict(text.named_modules())
    for (component, key), delta in expected.items():
        if component != "text_encoder":
            continue
        path = key[:-len(".weight")]
        module = modules[path[len("text_model."):] if strip else path]
        hooks.append(module.register_forward_hook(lambda mod, inp, output, d=delta: output + inp[0] @ d.T))
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = text(ids).last_hidden_state
        for hook in hooks:
            hook.remove()
        ours = merged(ids).last_hidden_state
        plain = text(ids).last_hidden_state
    assert torch.allclose(ours, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, adapted, rtol=1e-4, atol=1e-5)


def test_dtype_and_strict(model, adapters, tmp_path):
    family, _, _, _, single, root = model
    a, _, expected = adapters
    out = tmp_path / "half.safetensors"
    run("merge", "--base", str(single), "--adapter", str(a), "--multiplier", "0.7", "--out", str(out), "--dtype", "f16",
        "--quiet")
    with safe_open(str(out), "pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert dtypes == {torch.float16}
    # One module no layer has: --strict writes nothing and exits 1, naming it and the prefixes looked for.
    stray = root / "stray.safetensors"
    write_adapter(stray, {"lora_unet_no_such_block_to_q": (lora([4, 4], 1, 0)[0], 1.0)})
    refused = tmp_path / "refused.safetensors"
    result = run("merge", "--base", str(single), "--adapter", str(a), "--adapter", str(stray), "--out", str(refused),
                 "--strict", check=False)
    assert result.returncode == 1 and not refused.exists()
    assert "lora_unet_no_such_block_to_q" in result.stdout and "looked for: lora_unet_" in result.stdout
    assert "--strict wrote nothing" in result.stderr
    # Without --strict the rest merges and the stray module is listed.
    result = run("merge", "--base", str(single), "--adapter", str(a), "--adapter", str(stray), "--out", str(refused))
    assert refused.exists() and "unmatched adapter modules (no base weight with that path): 1" in result.stdout
