#!/usr/bin/env python3
"""Stable Diffusion-shaped checkpoints with random weights, for tests and benchmarks.

The structure of each family is the published one (SD 1.5, SD 2.1 and SDXL base
`unet/config.json` and `text_encoder*/config.json`: block types, ResNets per level,
transformer depths, linear or conv projections, text-encoder depths, SDXL's
`text_time` embedding); only the widths shrink with --scale, so the key sets are
the real ones. Nothing is downloaded.

    python scripts/generate_checkpoints.py --family sd1 --out /tmp/sd1           # diffusers folder
    python scripts/generate_checkpoints.py --family sdxl --out /tmp/x --shards 3  # sharded
    python scripts/generate_checkpoints.py --family sd2 --out /tmp/sd2.safetensors \
        --ldm-via .build/debug/lycoris                                           # single file
    python scripts/generate_checkpoints.py --family sd1 --out /tmp/pair --pair 16 \
        --unet-width 320 --text-width 768          # SD1.5-sized base/ and tuned/ folders

A single (LDM) file is built from the diffusers folder with the key mapping
`lycoris layers --json` reports (the thing under test; the tests check the result
with diffusers' own single-file converter), plus the embeddings, which are not
adaptable layers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

# Published structure; widths are multiplied by `scale` / 320 (UNet) and `scale` / 768 (CLIP).
FAMILIES = {
    "sd1": dict(
        unet=dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  widths=[1, 2, 4, 4], heads=8, linear=False, depth=1),
        text=[dict(layers=12, act="quick_gelu", projection=False)],
    ),
    "sd2": dict(
        unet=dict(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                  up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                  widths=[1, 2, 4, 4], heads=[5, 10, 20, 20], linear=True, depth=1),
        text=[dict(layers=23, act="gelu", projection=False)],
    ),
    "sdxl": dict(
        unet=dict(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  widths=[1, 2, 4], heads=[5, 10, 20], linear=True, depth=[1, 2, 10]),
        text=[dict(layers=12, act="quick_gelu", projection=False), dict(layers=32, act="gelu", projection=True)],
    ),
}


def build_models(family, unet_width=32, text_width=32, seed=0):
    """(unet, [text encoders]) of `family` with random weights (deterministic in `seed`)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = FAMILIES[family]
    torch.manual_seed(seed)
    texts = []
    for text in spec["text"]:
        config = CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text["layers"],
                                num_attention_heads=max(1, text_width // 16), hidden_act=text["act"], vocab_size=1000,
                                max_position_embeddings=77, projection_dim=text_width)
        model = (CLIPTextModelWithProjection if text["projection"] else CLIPTextModel)(config)
        texts.append(model)
    u = spec["unet"]
    channels = [unet_width * w for w in u["widths"]]
    heads = u["heads"] if isinstance(u["heads"], int) else [max(1, c // 16) for c in channels]
    kwargs = dict(down_block_types=u["down_block_types"], up_block_types=u["up_block_types"], block_out_channels=channels,
                  layers_per_block=2, attention_head_dim=heads, use_linear_projection=u["linear"],
                  transformer_layers_per_block=u["depth"], norm_num_groups=min(32, unet_width), sample_size=8,
                  cross_attention_dim=sum(t.config.hidden_size for t in texts))
    if family == "sdxl":
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=texts[1].config.projection_dim + 6 * 8)
    unet = UNet2DConditionModel(**kwargs)
    with torch.no_grad():
        for model in [unet] + texts:
            for parameter in model.parameters():
                parameter.normal_(0, 0.05)
    return unet, texts


def tune(models, rank, noise=0.002, seed=0):
    """The models changed in place the way a fine-tune changes them: every Linear and Conv2d
    weight W (out, in, ...) gets a rank-`rank` change U·V (entries of U·V of std ~0.01) plus
    Gaussian noise of std `noise`; every other parameter is left alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for module in model.modules():
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                weight = module.weight
                out, columns = weight.shape[0], weight[0].numel()
                r = min(rank, out, columns)
                u = torch.randn(out, r, generator=generator)
                v = torch.randn(r, columns, generator=generator) * (0.01 / r ** 0.5)
                change = u @ v + noise * torch.randn(out, columns, generator=generator)
                weight += change.reshape(weight.shape)


def save_component(state_dict, folder, stem, shards):
    """diffusers/transformers layout: one file, or `shards` files plus the index json."""
    os.makedirs(folder, exist_ok=True)
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    if shards <= 1:
        save_file(state_dict, os.path.join(folder, f"{stem}.safetensors"))
        return
    keys = list(state_dict)
    weight_map = {}
    for index in range(shards):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        save_file({k: state_dict[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def save_diffusers(unet, texts, out, shards=1):
    save_component(unet.state_dict(), os.path.join(out, "unet"), "diffusion_pytorch_model", shards)
    for index, text in enumerate(texts):
        # Published folders spell every CLIP key under `text_model.` (transformers 5 drops it
        # for CLIPTextModel when saving; lycoris reads both).
        state = {(k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v
                 for k, v in text.state_dict().items()}
        save_component(state, os.path.join(out, "text_encoder" + ("_2" if index else "")), "model", shards)
    with open(os.path.join(out, "unet", "config.json"), "w") as f:
        json.dump(dict(unet.config), f, default=str)


def ldm_state_dict(folder, lycoris):
    """The single-file (LDM) state dict of a diffusers folder, keyed as `lycoris layers` maps it."""
    from safetensors import safe_open

    report = json.loads(subprocess.run([lycoris, "layers", folder, "--json"], check=True, capture_output=True,
                                       text=True).stdout)
    handles = {}

    def tensor(file, key):
        if file not in handles:
            handles[file] = safe_open(os.path.join(folder, file), "pt")
        return handles[file].get_tensor(key)

    out, fused = {}, {}
    for layer in report["layers"]:
        other = layer["other_key"]
        pairs = [(layer["file"], layer["key"], other)]
        if layer["bias"]:
            pairs.append((layer["bias_file"], layer["bias"], other[: -len("weight")] + "bias"))
        for file, key, ldm in pairs:
            value = tensor(file, key)
            if ldm.endswith("in_proj_weight") or ldm.endswith("in_proj_bias"):
                fused.setdefault(ldm, {})[key.split(".")[-2]] = value
            else:
                out[ldm] = value
    for ldm, parts in fused.items():
        out[ldm] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    family = report["family"]
    # Not adaptable, so not in the report: embeddings and the second encoder's projection.
    for component, (prefix, openclip) in text_encoder_prefixes(family).items():
        path = os.path.join(folder, component)
        if not os.path.isdir(path):
            continue
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        for file in files:
            with safe_open(os.path.join(path, file), "pt") as handle:
                for key in handle.keys():
                    if key.startswith("text_model.embeddings.") or key == "text_projection.weight":
                        value = handle.get_tensor(key)
                        if not openclip:
                            out[prefix + key] = value
                        elif key.endswith("token_embedding.weight"):
                            out[prefix + "token_embedding.weight"] = value
                        elif key.endswith("position_embedding.weight"):
                            out[prefix + "positional_embedding"] = value
                        else:
                            out[prefix + "text_projection"] = value.T.contiguous()
    return out


def text_encoder_prefixes(family):
    """Single-file prefix of each text encoder folder, and whether it is OpenCLIP-spelled."""
    if family == "sdxl":
        return {"text_encoder": ("conditioner.embedders.0.transformer.", False),
                "text_encoder_2": ("conditioner.embedders.1.model.", True)}
    if family == "sd2":
        return {"text_encoder": ("cond_stage_model.model.", True)}
    return {"text_encoder": ("cond_stage_model.transformer.", False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--out", required=True, help="a folder (diffusers) or, with --ldm-via, a .safetensors file")
    parser.add_argument("--unet-width", type=int, default=32, help="UNet base channels (published: 320)")
    parser.add_argument("--text-width", type=int, default=32, help="CLIP hidden size (published: 768/1024/1280)")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ldm-via", metavar="LYCORIS", help="write a single LDM file, mapped by this lycoris executable")
    parser.add_argument("--pair", type=int, metavar="RANK",
                        help="write OUT/base and OUT/tuned: tuned = base + a rank-RANK change + noise per layer")
    args = parser.parse_args()
    unet, texts = build_models(args.family, args.unet_width, args.text_width, args.seed)
    if args.pair:
        save_diffusers(unet, texts, os.path.join(args.out, "base"), args.shards)
        tune([unet] + texts, args.pair, seed=args.seed + 1)
        save_diffusers(unet, texts, os.path.join(args.out, "tuned"), args.shards)
        return
    if not args.ldm_via:
        save_diffusers(unet, texts, args.out, args.shards)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_diffusers(unet, texts, folder)
        save_file(ldm_state_dict(folder, args.ldm_via), args.out)


if __name__ == "__main__":
    sys.exit(main())
