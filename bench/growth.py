#!/usr/bin/env python3
"""Cost growth (issue 9 part 6, bench/README.md section 6): how one adapted layer's time and
memory grow with tokens, rank and width, LyCORIS 4.1.3 (its better of bypass/rebuild) and
delegated through swift_lycoris.create_lycoris (b) side by side, so that SDXL-sized layers
(width 640/1280, 1024–4096 tokens) can be predicted.

Each point is a row of bench/layers.py (same measurement: the adapter share of one forward +
backward, best of rounds × iters, the columns interleaved round by round), without the
engine-in-process column. Memory (MiB) is the adapter share of what autograd saves for
backward in the client (LyCORIS's better mode; for (b) the torch side, where the server
keeps its tape instead), the server's peak RSS and the arena's size after the point.

Sweeps (LoRA unless said; r = 16, alpha = 8):
  tokens  linear 640→640 with 256, 1024, 4096 tokens
  rank    linear 640→640 @ 1024 tokens, r = 4, 16, 64
  width   linear d→d @ 1024 tokens, d = 320, 640, 1280
  conv    conv 3×3 640→640 at 16×16, 32×32 (256, 1024 positions)

    python bench/growth.py [--server PATH] [--threads 2] [--rounds 2] [--iters 2]
                           [--only TEXT] [--plot bench/growth.png] [--quick]

Run by bench/run.sh (section 6, after layers.py). Table on stdout, progress on stderr.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from layers import add_measure_arguments, import_stack, measure_row, progress, summarize  # noqa: E402

RANK, ALPHA = 16, 8


def linear(width, tokens):
    return {"kind": "linear", "in": width, "out": width}, [1, tokens, width]


def conv(width, side):
    return {"kind": "conv2d", "in": width, "out": width, "kernel": 3, "padding": 1}, [1, width, side, side]


# (sweep, x value, x label, layer, input shape, rank)
POINTS = (
    [("tokens", t, f"linear 640 @{t}", *linear(640, t), RANK) for t in (256, 1024, 4096)]
    + [("rank", r, f"linear 640 @1024 r{r}", *linear(640, 1024), r) for r in (4, 16, 64)]
    + [("width", d, f"linear {d} @1024", *linear(d, 1024), RANK) for d in (320, 640, 1280)]
    + [("conv", s * s, f"conv3 640 @{s}x{s}", *conv(640, s), RANK) for s in (16, 32)]
)
AXES = {"tokens": "tokens (linear 640→640, r16)", "rank": "rank r (linear 640, 1024 tokens)",
        "width": "width d (linear d→d, 1024 tokens, r16)", "conv": "positions H·W (conv 3×3 640→640, r16)"}


def print_table(points, threads):
    print(f"section 6 growth — LoRA adapter share of one layer's forward+backward, {threads} threads: "
          "time (ms, best of each) and memory (MiB)")
    print("LyC = LyCORIS 4.1.3's better mode; (b) delegated; saved = adapter share of autograd's saved tensors; "
          "server = server peak RSS; arena = arena size")
    header = f"{'point':<24} {'base':>7} {'LyC':>7} {'mode':<7} {'(b)':>7} {'b/LyC':>6} {'via':<4} " \
             f"{'LyC saved':>9} {'(b) saved':>9} {'server':>7} {'arena':>6}"
    print(header)
    print("-" * len(header))
    for p in points:
        ratio = "  -   " if p["ratio_b"] is None else f"{p['ratio_b']:6.2f}"
        print(f"{p['label']:<24} {p['base']:7.2f} {p['lyc']:7.2f} {p['mode']:<7} {p['b']:7.2f} {ratio} {p['via']:<4} "
              f"{p['mem_lyc']:9.1f} {p['mem_b']:9.1f} {p['server']:7.0f} {p['arena']:6.0f}")


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in AXES if any(p["sweep"] == s for p in points)]
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4 * len(sweeps), 7), squeeze=False)
    for column, sweep in enumerate(sweeps):
        chosen = [p for p in points if p["sweep"] == sweep]
        xs = [p["x"] for p in chosen]
        time_axis, memory_axis = axes[0][column], axes[1][column]
        # Shares below zero are noise (the base layer alone timed slower): drawn at 0.01 ms.
        time_axis.plot(xs, [max(p["lyc"], 0.01) for p in chosen], "o-", label="LyCORIS 4.1.3, better mode")
        time_axis.plot(xs, [max(p["b"], 0.01) for p in chosen], "s-", label="(b) delegated (create_lycoris)")
        time_axis.plot(xs, [p["base"] for p in chosen], ":", color="grey", label="base layer alone")
        memory_axis.plot(xs, [max(p["mem_lyc"], 0.01) for p in chosen], "o-", label="LyCORIS: saved for backward")
        memory_axis.plot(xs, [max(p["mem_b"], 0.01) for p in chosen], "s-", label="(b): saved in torch")
        memory_axis.plot(xs, [p["server"] for p in chosen], "^--", label="(b): server peak RSS")
        memory_axis.plot(xs, [p["arena"] for p in chosen], "v--", label="(b): arena size")
        for axis in (time_axis, memory_axis):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.grid(alpha=0.3, which="both")
        time_axis.set_title(AXES[sweep], fontsize=9)
        time_axis.set_ylabel("adapter share of fwd+bwd (ms)")
        memory_axis.set_xlabel(AXES[sweep].split(" (")[0])
        memory_axis.set_ylabel("memory (MiB)")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("Cost growth of one LoRA layer: LyCORIS vs delegated (log-log; lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    progress(f"growth: plot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_measure_arguments(parser, rounds=2, iters=2)
    parser.add_argument("--only", default="", help="only points whose label or sweep contains TEXT")
    parser.add_argument("--plot", default="", help="write a matplotlib PNG there")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 iteration")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.iters = 1, 1
    stack = import_stack(args, "section 6 growth")
    if stack is None:
        return 0
    torch, lycoris_modules, sl = stack
    points = []
    for sweep, x, label, layer, shape, rank in POINTS:
        if args.only and args.only not in f"{sweep} {label}":
            continue
        progress(f"growth: {label}")
        memory = {}
        options = {"linear_dim": rank, "linear_alpha": ALPHA}
        columns, via = measure_row(torch, lycoris_modules, sl, None, args, label, "lora", "LoConModule", options,
                                   layer, shape, "auto", memory=memory)
        summary = summarize(columns)
        points.append({"sweep": sweep, "x": x, "label": label, "via": via[:4], **summary,
                       "mem_lyc": memory[summary["mode"]], "mem_b": memory["b"],
                       "server": memory["server"], "arena": memory["arena"]})
        progress("growth: " + json.dumps(points[-1]))
    print_table(points, args.threads)
    if args.plot and points:
        plot(points, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
