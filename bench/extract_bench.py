#!/usr/bin/env python3
"""`lycoris extract` against LyCORIS 4.1.3's `extract_diff`, side by side on one generated
SD1.5-shaped pair (scripts/generate_checkpoints.py --pair: random weights, tuned = base +
a rank-16 change + noise on every Linear/Conv2d; written to a scratch folder, never
committed), then `lycoris merge` of the extracted file into the base and `lycoris resize`
of it to rank 16.

    bench/extract_bench.py [--unet-width 320] [--text-width 768] [--threads 2] [--layers-subset]
                           [--lycoris .build/release/lycoris] [--work /tmp/extract-bench]

With --layers-subset only a sample of the model's layers is built: one Linear or Conv2d per
distinct weight shape (the first in module order, UNet and text encoder), at the given
widths, base and tuned as diffusers folders holding just those weights (the same tune
recipe), and both sides extract exactly that sample — LyCORIS from torch modules at the
same paths. A full-size comparison (width 320/768: ~40 layers, every SD 1.5 shape) then
takes minutes instead of the hours the whole pair's SVDs take; merge and resize are not
run (the sample is no model).

Both sides run as their own process with the same thread count (our --threads, torch's
set_num_threads), each timed and its peak RSS read from wait4. LyCORIS gets its models
already built (loading is not timed for it; ours includes reading the files and writing
the output). The reconstruction error of a layer is ‖ΔW − stored‖_F / ‖ΔW‖_F with ΔW from
the pair's files; the table gives the mean over layers, and the worst ratio ours/LyCORIS.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def measured(command, env=None):
    """(seconds, peak RSS in MiB, stdout) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{command[0]} failed ({status})")
    return seconds, usage.ru_maxrss / 1024, stdout


LYCORIS_SIDE = r"""
import sys, time, torch
sys.path.insert(0, {scripts!r})
import generate_checkpoints as gen
from safetensors.torch import load_file, save_file
from lycoris.utils import extract_diff
torch.set_num_threads({threads})

def sample(path):
    # torch modules at the paths of a --layers-subset file's weights (2-D: Linear, 4-D: Conv2d)
    root = torch.nn.Module()
    for key, weight in load_file(path).items():
        *parents, leaf = key[: -len(".weight")].split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        layer = (torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False) if weight.dim() == 2 else
                 torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False))
        layer.weight.data.copy_(weight)
        node.add_module(leaf, layer)
    return root

def load(folder):
    if {subset}:
        return sample(folder + "/unet/diffusion_pytorch_model.safetensors"), sample(folder + "/text_encoder/model.safetensors")
    unet, texts = gen.build_models("sd1", {unet_width}, {text_width})
    unet.load_state_dict(load_file(folder + "/unet/diffusion_pytorch_model.safetensors"))
    state = load_file(folder + "/text_encoder/model.safetensors")
    keys = set(texts[0].state_dict())
    texts[0].load_state_dict({{(k if k in keys else k[len("text_model."):]): v for k, v in state.items()}})
    return unet, texts[0]

base_unet, base_te = load({base!r})
tuned_unet, tuned_te = load({tuned!r})
start = time.perf_counter()
state = extract_diff([base_te], [tuned_te], base_unet, tuned_unet, mode="fixed", linear_mode_param=64,
                     conv_mode_param=32, small_conv=True)
seconds = time.perf_counter() - start
save_file({{k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v.contiguous() for k, v in state.items()}}, {out!r})
print(seconds)
"""


def layers_subset(folder, unet_width, text_width):
    """Base and tuned diffusers folders holding one Linear/Conv2d weight per distinct shape of
    the SD1.5-shaped model at these widths (the first in module order), tuned as the full pair is."""
    import torch

    import generate_checkpoints as gen

    with torch.device("meta"):
        unet, texts = gen.build_models("sd1", unet_width, text_width)
    picked = {}
    for component, model, prefix in [("unet", unet, ""), ("text_encoder", texts[0], "text_model.")]:
        seen = set()
        for path, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and tuple(module.weight.shape) not in seen:
                seen.add(tuple(module.weight.shape))
                name = path if path.startswith(prefix) else prefix + path
                picked.setdefault(component, []).append((name, tuple(module.weight.shape), type(module)))
    generator = torch.Generator().manual_seed(0)
    base = {component: {} for component in picked}
    modules = []
    for component, entries in picked.items():
        for name, shape, kind in entries:
            layer = (torch.nn.Linear(shape[1], shape[0], bias=False) if kind is torch.nn.Linear else
                     torch.nn.Conv2d(shape[1], shape[0], shape[2:], bias=False))
            with torch.no_grad():
                layer.weight.normal_(0, 0.05, generator=generator)
            base[component][name + ".weight"] = layer.weight.detach().clone()
            modules.append((component, name, layer))
    gen.tune([layer for _, _, layer in modules], rank=16, seed=1)
    tuned = {component: {} for component in picked}
    for component, name, layer in modules:
        tuned[component][name + ".weight"] = layer.weight.detach().clone()
    for side, state in [("base", base), ("tuned", tuned)]:
        gen.save_component(state["unet"], str(folder / side / "unet"), "diffusion_pytorch_model", 1)
        gen.save_component(state["text_encoder"], str(folder / side / "text_encoder"), "model", 1)
    return sum(len(entries) for entries in picked.values())


def reconstruction(handle, name):
    import torch

    keys = set(handle.keys())
    if f"{name}.diff" in keys:
        return handle.get_tensor(f"{name}.diff").float()
    up = handle.get_tensor(f"{name}.lora_up.weight").float()
    down = handle.get_tensor(f"{name}.lora_down.weight").float()
    if f"{name}.lora_mid.weight" in keys:
        mid = handle.get_tensor(f"{name}.lora_mid.weight").float()
        return torch.einsum("i j k l, j r, p i -> p r k l", mid, down.flatten(1), up.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def errors(pair, lycoris, ours, theirs):
    """{module: (our relative error, theirs)} over the modules both files hold."""
    from safetensors import safe_open

    report = json.loads(subprocess.run([lycoris, "layers", str(pair / "base"), "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    result = {}
    with safe_open(str(ours), "pt") as a, safe_open(str(theirs), "pt") as b:
        names = {k.split(".")[0] for k in a.keys()} & {k.split(".")[0] for k in b.keys()}
        for layer in report["layers"]:
            if layer["name"] not in names:
                continue
            with safe_open(str(pair / "base" / layer["file"]), "pt") as fb, \
                    safe_open(str(pair / "tuned" / layer["file"]), "pt") as ft:
                delta = ft.get_tensor(layer["key"]).float() - fb.get_tensor(layer["key"]).float()
            norm = delta.norm().item()
            result[layer["name"]] = tuple((delta - reconstruction(h, layer["name"])).norm().item() / norm for h in (a, b))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-width", type=int, default=320)
    parser.add_argument("--text-width", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lycoris", default=str(ROOT / ".build" / "release" / "lycoris"))
    parser.add_argument("--work", default="/tmp/extract-bench")
    parser.add_argument("--layers-subset", action="store_true",
                        help="one layer per distinct shape instead of the whole pair (see above)")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    pair = work / f"{'subset' if args.layers_subset else 'pair'}-{args.unet_width}-{args.text_width}"
    if args.generate_only:
        print(f"{layers_subset(pair, args.unet_width, args.text_width)} layers sampled", file=sys.stderr)
        return
    if not (pair / "tuned").exists():
        print(f"generating {pair}", file=sys.stderr)
        # In a child process: the peak RSS of the processes measured below would otherwise
        # start at this one's (Linux keeps ru_maxrss across fork and exec).
        if args.layers_subset:
            subprocess.run([sys.executable, __file__, "--layers-subset", "--generate-only", "--work", str(work),
                            "--unet-width", str(args.unet_width), "--text-width", str(args.text_width)], check=True)
        else:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_checkpoints.py"), "--family", "sd1", "--out",
                            str(pair), "--pair", "16", "--unet-width", str(args.unet_width), "--text-width",
                            str(args.text_width)], check=True)
    ours, theirs, merged = work / "ours.safetensors", work / "lycoris.safetensors", work / "merged"
    print("lycoris extract", file=sys.stderr)
    our_time, our_rss, _ = measured([args.lycoris, "extract", str(pair / "base"), str(pair / "tuned"), str(ours),
                                     "--linear-dim", "64", "--conv-dim", "32", "--threads", str(args.threads), "--quiet"])
    print("LyCORIS extract_diff", file=sys.stderr)
    script = LYCORIS_SIDE.format(scripts=str(ROOT / "scripts"), threads=args.threads, unet_width=args.unet_width,
                                 subset=args.layers_subset,
                                 text_width=args.text_width, base=str(pair / "base"), tuned=str(pair / "tuned"), out=str(theirs))
    total, their_rss, stdout = measured([sys.executable, "-c", script], env={**os.environ, "TQDM_DISABLE": "1"})
    their_time = float(stdout.strip().splitlines()[-1])
    if not args.layers_subset:
        print("lycoris merge", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(merged)], check=True)
        merge_time, merge_rss, _ = measured([args.lycoris, "merge", "--base", str(pair / "base"), "--adapter", str(ours),
                                             "--out", str(merged), "--quiet"])
        print("lycoris resize", file=sys.stderr)
        resize_time, resize_rss, _ = measured([args.lycoris, "resize", str(ours), str(work / "resized.safetensors"),
                                               "--rank", "16", "--json", "--quiet"])
    per_layer = errors(pair, args.lycoris, ours, theirs)
    mean = lambda values: sum(values) / len(values)
    ours_mean, theirs_mean = mean([e[0] for e in per_layer.values()]), mean([e[1] for e in per_layer.values()])
    worst = max(e[0] / e[1] for e in per_layer.values() if e[1] > 0)
    what = "one layer per distinct shape of an SD1.5-shaped model" if args.layers_subset else "SD1.5-shaped pair"
    print(f"{what} (UNet width {args.unet_width}, text width {args.text_width}), fixed 64/32, "
          f"{args.threads} threads, {len(per_layer)} layers compared")
    print("| | time (s) | peak RSS (MiB) | mean rel. error |")
    print("|---|---:|---:|---:|")
    print(f"| lycoris extract | {our_time:.1f} | {our_rss:.0f} | {ours_mean:.5f} |")
    print(f"| LyCORIS 4.1.3 extract_diff (models built; process {total:.1f} s) | {their_time:.1f} | {their_rss:.0f} | {theirs_mean:.5f} |")
    print(f"| ratio | {their_time / our_time:.1f}x faster | {our_rss / their_rss:.2f} | worst layer {worst:.4f}x |")
    if not args.layers_subset:
        print(f"| lycoris merge (extracted file into base) | {merge_time:.1f} | {merge_rss:.0f} | |")
        print(f"| lycoris resize (extracted file to rank 16) | {resize_time:.1f} | {resize_rss:.0f} | |")


if __name__ == "__main__":
    main()
