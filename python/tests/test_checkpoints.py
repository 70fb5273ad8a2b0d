"""Checkpoint naming (`lycoris layers`) on SD1.x, SD2.x and SDXL-shaped models in both
layouts: kohya names against the models' own module names, and the LDM <-> diffusers key
mapping against diffusers' single-file converter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from _checkpoints import layers, model, run  # noqa: F401 (model is a fixture)

def tensor_of(root, layer):
    """The layer's weight as the report locates it (file, key, row block)."""
    path = root / layer["file"] if root.is_dir() else root
    with safe_open(str(path), "pt") as handle:
        value = handle.get_tensor(layer["key"])
    if layer["rows"]:
        value = value[layer["rows"][0]:layer["rows"][1]]
    return value


def kohya_names(module: nn.Module, prefix: str, path_prefix: str = "") -> set[str]:
    """What kohya's create_network names: every Linear and Conv2d, `prefix_` + dotted path with `_`."""
    return {prefix + "_" + (path_prefix + name).replace(".", "_") for name, child in module.named_modules()
            if isinstance(child, (nn.Linear, nn.Conv2d))}


def test_family_and_layout_are_detected(model):
    family, _, _, folder, single, _ = model
    for path, layout in [(folder, "diffusers"), (single, "single-file")]:
        report = layers(path)
        assert (report["family"], report["layout"]) == (family, layout)


def test_linear_and_conv_names_are_kohyas(model):
    """The Linear/Conv2d layers reported are exactly the ones kohya wraps, under its names
    (SD1/SD2 UNets: diffusers paths; SDXL: LDM paths, with the diffusers spelling as alias)."""
    family, unet, texts, folder, _, _ = model
    report = layers(folder)
    matrices = [layer for layer in report["layers"] if len(layer["shape"]) in (2, 4)]
    unet_layers = [layer for layer in matrices if layer["component"] == "unet"]
    diffusers_names = {layer["aliases"][0] if family == "sdxl" else layer["name"] for layer in unet_layers}
    assert diffusers_names == kohya_names(unet, "lora_unet")
    prefixes = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    for prefix, text, component in zip(prefixes, texts, ["text_encoder", "text_encoder_2"]):
        # kohya targets CLIPAttention and CLIPMLP: the encoder layers (not text_projection).
        expected = {name for name in kohya_names(getattr(text, "text_model", text).encoder, prefix, "text_model.encoder.")}
        assert {layer["name"] for layer in matrices if layer["component"] == component} == expected
    if family == "sdxl":
        names = {layer["name"] for layer in unet_layers}
        assert {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_3_0_op",
                "lora_unet_output_blocks_2_2_conv", "lora_unet_middle_block_1_proj_in", "lora_unet_label_emb_0_0",
                "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2"} <= names


def test_single_file_is_what_diffusers_converts_back(model):
    """The single file built from the reported LDM keys converts, with diffusers' own
    single-file converter, back into exactly the diffusers state dicts."""
    from diffusers.loaders import single_file_utils as sfu

    family, unet, texts, _, single, _ = model
    with safe_open(str(single), "pt") as handle:
        checkpoint = {key: handle.get_tensor(key) for key in handle.keys()}
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    expected = unet.state_dict()
    assert set(converted) == set(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key
    encoders = {"sd1": [None], "sd2": ["cond_stage_model.model."],
                "sdxl": [None, "conditioner.embedders.1.model."]}[family]
    for text, prefix in zip(texts, encoders):
        if prefix is None:
            converted = sfu.convert_ldm_clip_checkpoint(checkpoint)
        else:
            converted = sfu.convert_open_clip_checkpoint(text, checkpoint, prefix=prefix)
        expected = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                    for k, v in text.state_dict().items()}
        assert set(converted) == set(expected)
        for key, value in expected.items():
            assert torch.equal(converted[key], value), key


def test_both_layouts_name_the_same_tensors(model):
    """Every kohya name resolves in both layouts to the same values (OpenCLIP's fused
    in_proj sliced into q, k, v)."""
    family, _, _, folder, single, _ = model
    by_folder = {layer["name"]: layer for layer in layers(folder)["layers"]}
    by_single = {layer["name"]: layer for layer in layers(single)["layers"]}
    assert set(by_folder) == set(by_single)
    for name, layer in by_folder.items():
        other = by_single[name]
        assert layer["aliases"] == other["aliases"] and layer["shape"] == other["shape"], name
        assert torch.equal(tensor_of(folder, layer), tensor_of(single, other)), name
        assert layer["other_key"] == other["key"], name
    if family != "sd1":
        fused = [layer for layer in by_single.values() if layer["rows"]]
        assert fused and all(layer["key"].endswith("attn.in_proj_weight") for layer in fused)


def test_model_type_override(model):
    """--model-type decides the naming: an SDXL file read as SD1 names its UNet by diffusers
    paths and its first encoder lora_te_; an SD1/SD2 file read as SDXL the reverse."""
    family, _, _, _, single, _ = model
    target = "sd1" if family == "sdxl" else "sdxl"
    report = json.loads(run("layers", str(single), "--json", "--model-type", target).stdout)
    assert report["family"] == target
    names = {layer["name"] for layer in report["layers"]}
    if target == "sd1":
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    else:
        assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in names
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert not any(name.startswith("lora_te_" if target == "sdxl" else "lora_te1_") for name in names)
