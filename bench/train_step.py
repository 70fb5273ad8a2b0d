#!/usr/bin/env python3
"""Section 5 of the benchmarks (see bench/README.md): a whole kohya training step through
``swift_lycoris.kohya`` (adapter math in lycoris-server) against the same step through
``lycoris.kohya`` (LyCORIS 4.1.3, in-process torch CPU), same thread count, as a ratio.

    python bench/train_step.py [--server PATH] [--threads 1,2] [--algos lora,loha] [--batches 4,1]
                               [--steps 20] [--min-steps 10] [--case-seconds 10] [--warmup 3]
                               [--dim 8] [--alpha 4] [--modes default,bypass] [--quick]
                               [--profile STEPS] [--device cuda]

The models are swift_lycoris.demo's tiny diffusers UNet2DConditionModel + transformers
CLIPTextModel (``tiny_models``) with its synthetic data (``synthetic_data``), or with
``--model sd15`` a UNet and text encoder with Stable Diffusion 1.5's shapes (random weights,
``--latent`` × ``--latent`` latents, 77-token prompts; ~4 GB per side); both networks
use the "full" preset, the same dim/alpha/conv_dim/conv_alpha, and start from the same
random parameter values. One step is kohya's sequence: ``on_step_start``, text-encoder
forward, UNet forward, MSE loss, backward, AdamW step, ``zero_grad(set_to_none=True)``
(text encoder and UNet adapters both trained; no gradient clipping, which demo.py adds).
Each case runs in each of ``--modes``: ``default`` (LyCORIS's rebuild mode) and ``bypass``
(``bypass_mode=True`` in both networks' kwargs, kohya's ``network_args``: LyCORIS computes
op(x, W0) + Δ(x) instead of rebuilding W0 + ΔW; ours moves activations for every layer).
``torch.set_num_threads(N)`` for both sides and ``server_threads=N`` for ours. The two
networks step alternately (ours, LyCORIS, ours, …) so both see the same machine load; the
row is the median over the timed steps after the warm-up steps.

With ``--device cuda`` both sides run on the GPU (models, data, adapters; LyCORIS computes
its adapters there, ours through the server as swift_lycoris does for a CUDA model), a step
ends with ``torch.cuda.synchronize()``, and each case adds the peak CUDA memory torch
allocated during its timed steps per side and the server process's resident memory. This is
what scripts/gpu-check.sh runs on a GPU host (``--model sd15 --latent 64``, LoRA, LoHa,
LoKr, batch 1 and 4).

For ours, ``swift_lycoris.server.Server.call`` / ``call_encoded`` / ``call_record`` / ``notify``
and ``swift_lycoris.arena.Arena.put`` / ``take`` are wrapped *in this process only*
(monkeypatching; the package is not edited) to count round trips and time the client-observed wait inside server calls (JSON encode, pipe
write, server work, pipe read, JSON decode) against everything else (torch base layers,
autograd, arena copies, optimizer).

The table goes to stdout (same columns as bench.py); progress to stderr. Requires torch,
diffusers, transformers, lycoris-lora 4.1.3 and swift_lycoris (``python/`` is put on
sys.path when the package is not installed); when one is missing the section prints why and
exits 0.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTION = "5 step"
GOAL = 1.15  # the project's goal for ours / LyCORIS (LoRA and LoHa)
CUDA_GOAL = 1.10  # issue 8's goal on one GPU (LoRA, LoHa and LoKr)


def progress(text):
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- instrumentation


class Meter:
    """Counts and times Server.call / call_encoded / call_record / notify / queue_encoded (a notification
    sent with the next request) / Arena.put / Arena.take (wrapped on the classes, in this
    process only)."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self):
        self.calls = Counter()
        self.method_ns = Counter()
        self.call_ns = 0
        self.notifies = Counter()
        self.copy_ns = 0

    def install(self, server_cls, arena_cls):
        meter = self
        clock = time.perf_counter_ns

        def timed(original, record):
            """`original`, timed while the meter is on; record(method or None, elapsed ns)."""
            @functools.wraps(original)
            def wrapper(self, *args, **kwargs):
                if not meter.enabled:
                    return original(self, *args, **kwargs)
                t0 = clock()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    record(args[0] if args else None, clock() - t0)
            return wrapper

        def record_call(method, elapsed):
            meter.call_ns += elapsed
            meter.method_ns[method] += elapsed
            meter.calls[method] += 1

        def record_notify(method, elapsed):
            meter.call_ns += elapsed
            meter.notifies[method] += 1

        def record_copy(_, elapsed):
            meter.copy_ns += elapsed

        server_cls.call = timed(server_cls.call, record_call)
        server_cls.call_encoded = timed(server_cls.call_encoded, record_call)
        server_cls.call_record = timed(server_cls.call_record, record_call)
        server_cls.notify = timed(server_cls.notify, record_notify)
        server_cls.queue_encoded = timed(server_cls.queue_encoded, record_notify)
        for name in ("put", "take", "put_many", "take_many", "output"):
            setattr(arena_cls, name, timed(getattr(arena_cls, name), record_copy))


# --------------------------------------------------------------------------- table (as bench.py)

ROWS = []


def row(case, server, baseline, ratio):
    ROWS.append((SECTION, case, server, baseline, ratio))
    progress(f"  [{SECTION}] {case}: {server} | {baseline} | {ratio}")


def print_table(header_lines, footer_lines):
    cols = ("section", "case", "server (what is measured)", "baseline", "ratio")
    widths = [max(len(cols[i]), *(len(r[i]) for r in ROWS)) if ROWS else len(cols[i]) for i in range(5)]
    out = list(header_lines)
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out.append(line)
    out.append("-" * len(line))
    for r in ROWS:
        out.append("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    out.extend(footer_lines)
    print("\n".join(out), flush=True)


# --------------------------------------------------------------------------- the two networks


def lycoris_preset_file(directory):
    """The "full" preset as LyCORIS can run it (as python/tests/test_kohya.py does): without
    the names time_embedding.linear_1/2, which the class TimestepEmbedding already covers
    (LyCORIS 4.1.3 would add those layers twice and fail); the modules are the same."""
    from swift_lycoris.presets import preset_to_toml, resolve_preset

    preset = resolve_preset("full")
    preset["unet_target_name"] = [n for n in preset["unet_target_name"] if not n.startswith("time_embedding.")]
    path = os.path.join(directory, "lycoris_full_preset.toml")
    with open(path, "w") as f:
        f.write(preset_to_toml(preset))
    return path, preset


def build_lycoris(te, unet, algo, dim, alpha, preset_path, preset, extra):
    import lycoris.kohya as lk

    # LyCORIS keeps the preset in class attributes: start from a clean state.
    cls = lk.LycorisNetworkKohya
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = {}, {}, False, []
    cls.apply_preset(preset)
    network = lk.create_network(1.0, dim, alpha, None, te, unet, algo=algo, preset=preset_path,
                                conv_dim=str(dim), conv_alpha=str(alpha), **extra)
    network.apply_to(te, unet, True, True)
    return network


def build_ours(te, unet, algo, dim, alpha, threads, extra):
    from swift_lycoris import kohya

    network = kohya.create_network(1.0, dim, alpha, None, te, unet, algo=algo, preset="full",
                                   conv_dim=str(dim), conv_alpha=str(alpha), server_threads=str(threads), **extra)
    network.apply_to(te, unet, True, True)
    return network


class Side:
    """One network on its own copy of the models, with kohya's setup calls and an AdamW."""

    def __init__(self, name, network, te, unet, lr):
        import torch

        self.name, self.network, self.te, self.unet = name, network, te, unet
        groups, _ = network.prepare_optimizer_params(lr, lr, lr)
        self.optimizer = torch.optim.AdamW(groups, lr=lr)
        network.prepare_grad_etc(te, unet)
        network.on_epoch_start(te, unet)

    def step(self, data, index):
        import torch

        noisy, noise, timesteps, tokens = data
        network, te, unet = self.network, self.te, self.unet
        network.on_step_start(te, unet)
        hidden = te(tokens[index])[0]
        prediction = unet(noisy[index], timesteps[index], encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(prediction, noise[index])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if loss.is_cuda:
            torch.cuda.synchronize()
        return value


def sd15_models(seed):
    """A UNet and text encoder with Stable Diffusion 1.5's shapes (random weights)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    return unet, text_encoder


def sd15_data(count, latent, seed):
    """Noisy latents, noise, timesteps and 77-token prompts for :func:`sd15_models`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, 4, latent, latent, generator=generator)
    noise = torch.randn(count, 4, latent, latent, generator=generator)
    timesteps = torch.randint(0, 1000, (count,), generator=generator)
    tokens = torch.randint(0, 49408, (count, 77), generator=generator)
    alphas = torch.cos(timesteps.float() / 1000 * torch.pi / 2) ** 2
    noisy = alphas.sqrt().view(-1, 1, 1, 1) * latents + (1 - alphas).sqrt().view(-1, 1, 1, 1) * noise
    return noisy, noise, timesteps, tokens


def same_values(ours, lyco, std, seed=3):
    """The same random values in every adapter parameter of both networks (so both compute the
    same function; LoRA's zero-initialised up factors would otherwise make ΔW = 0)."""
    import torch

    ours_params, lyco_params = dict(ours.named_parameters()), dict(lyco.named_parameters())
    if set(ours_params) != set(lyco_params):
        only_ours = sorted(set(ours_params) - set(lyco_params))[:3]
        only_lyco = sorted(set(lyco_params) - set(ours_params))[:3]
        raise RuntimeError(f"parameter keys differ: only ours {only_ours}, only LyCORIS {only_lyco}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(ours_params):
            value = torch.randn(ours_params[key].shape, generator=g) * std
            ours_params[key].copy_(value)
            lyco_params[key].copy_(value)
    return len(ours.lora_names), sum(p.numel() for p in ours_params.values())


# --------------------------------------------------------------------------- measurement


def median(values):
    return statistics.median(values) if values else float("nan")


def measure_case(ours, lyco, data, batch, steps, min_steps, warmup, cap_s, meter, first_loss):
    """Warm-up, then timed steps of each side, alternating (ours, LyCORIS, ours, …): `steps`
    of them, or fewer when the case has run `cap_s` seconds (at least `min_steps` unless it
    has run 3 × `cap_s`: an overloaded machine). Returns per-side step times (ms) and, for
    ours, per-step server-call time, copy time, and per-method call counts and times; on
    CUDA, each side's largest step working set (peak allocated during a timed step − allocated
    before it, MB)."""
    import torch

    count = data[0].shape[0]
    ours_ms, lyco_ms, rpc_ms, copy_ms = [], [], [], []
    working_mb = {"ours": 0.0, "lyco": 0.0}
    cuda = data[0].is_cuda

    def stepped(side, key, index, timed):
        if not (cuda and timed):
            return side.step(data, index)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = side.step(data, index)
        working_mb[key] = max(working_mb[key], (torch.cuda.max_memory_allocated() - before) / 2**20)
        return loss

    calls, method_ns, notifies = Counter(), Counter(), Counter()
    clock = time.perf_counter
    started = clock()
    i = 0
    while True:
        index = torch.arange(i * batch, (i + 1) * batch) % count
        timed = i >= warmup
        meter.reset()
        meter.enabled = timed
        t0 = clock()
        loss_ours = stepped(ours, "ours", index, timed)
        t1 = clock()
        meter.enabled = False
        loss_lyco = stepped(lyco, "lyco", index, timed)
        t2 = clock()
        if first_loss is not None and i == 0:
            first_loss.append((loss_ours, loss_lyco))
        if timed:
            ours_ms.append((t1 - t0) * 1e3)
            lyco_ms.append((t2 - t1) * 1e3)
            rpc_ms.append(meter.call_ns / 1e6)
            copy_ms.append(meter.copy_ns / 1e6)
            calls.update(meter.calls)
            method_ns.update(meter.method_ns)
            notifies.update(meter.notifies)
        i += 1
        n, elapsed = len(ours_ms), t2 - started
        if n >= steps or (n >= min_steps and elapsed > cap_s) or elapsed > 3 * cap_s:
            break
    n = max(1, len(ours_ms))
    return {"ours": ours_ms, "lyco": lyco_ms, "rpc": rpc_ms, "copy": copy_ms,
            "calls": {k: v / n for k, v in calls.items()},
            "call_us": {k: method_ns[k] / calls[k] / 1e3 for k in calls},
            "notifies": {k: v / n for k, v in notifies.items()}, "working_mb": working_mb}


def peak_rss_mb(pid):
    """The peak resident memory of process `pid` (VmHWM), MB; NaN where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def gpu_memory_mb(pid):
    """The GPU memory process `pid` uses now (nvidia-smi's used_memory), MB; NaN where
    nvidia-smi does not list it (the server has no CUDA context on the arena path)."""
    import subprocess

    try:
        listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return float("nan")
    for line in listing.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return float("nan")


def null_call_us(network, count=300, warmup=50):
    """Median client-observed time of a call that does no work (network.set_training with the
    mode the server already has) through swift_lycoris's Server.call: the per-round-trip
    floor of this client (JSON, pipe write, select, read, wake-ups)."""
    server, mode = network.core.server, bool(network.training)
    times = []
    for i in range(warmup + count):
        t0 = time.perf_counter_ns()
        server.call("network.set_training", {"training": mode})
        if i >= warmup:
            times.append(time.perf_counter_ns() - t0)
    return median(times) / 1e3


def profile_case(side, data, batch, steps, top):
    """cProfile of `steps` steps of one side (stderr)."""
    import cProfile
    import io
    import pstats
    import torch

    count = data[0].shape[0]
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(steps):
        side.step(data, torch.arange(i * batch, (i + 1) * batch) % count)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(top)
        progress(f"--- cProfile of {steps} steps, {side.name}, batch {batch}, by {order} ---\n{text.getvalue()}")


def per_method(result):
    names = {"parameters.set": "set"}
    items = sorted(result["calls"].items(), key=lambda kv: -kv[1])
    return ", ".join(f"{v:g} {names.get(k, k)} x {result['call_us'][k]:.0f} us" for k, v in items)


def git_state():
    """HEAD and the modified files under python/swift_lycoris and Sources (the code measured)."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "python/swift_lycoris", "Sources"],
                                capture_output=True, text=True, timeout=10).stdout.split("\n")
    except Exception as error:  # no git
        return f"git: unavailable ({error})"
    changed = [line[3:] for line in status if line.strip()]
    return f"code: git {head or '?'}" + (f", uncommitted changes in {', '.join(changed)}" if changed else ", clean")


# --------------------------------------------------------------------------- main


def device_line(torch, device):
    """The GPU (name, memory, driver-side CUDA version) or "CPU"."""
    if device != "cuda":
        return "CPU"
    properties = torch.cuda.get_device_properties(0)
    return (f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, compute capability "
            f"{properties.major}.{properties.minor}, torch CUDA {torch.version.cuda}")


def machine_lines(extra):
    from bench import machine_summary

    return [machine_summary(), f"python: {sys.executable} {platform.python_version()}"] + extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("LYCORIS_SERVER"),
                        help="lycoris-server binary (default: $LYCORIS_SERVER, then swift_lycoris's search)")
    parser.add_argument("--threads", default="1,2", help="thread counts N (torch and server BLAS)")
    parser.add_argument("--algos", default="lora,loha")
    parser.add_argument("--batches", default="4,1", help="batch sizes (4 is the main case)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; --quick 4)")
    parser.add_argument("--min-steps", type=int, default=None,
                        help="timed steps a case keeps even past --case-seconds (default 10; --quick 2)")
    parser.add_argument("--case-seconds", type=float, default=10.0,
                        help="a case stops early (after --min-steps) once it has run this long; it stops at 3x "
                             "this even below --min-steps (an overloaded machine; the row shows n)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 3; --quick 1)")
    parser.add_argument("--dim", type=int, default=8, help="network_dim = conv_dim")
    parser.add_argument("--alpha", type=float, default=4.0, help="network_alpha = conv_alpha")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--modes", default="default,bypass",
                        help="network modes: default (rebuild) and/or bypass (bypass_mode=True on both sides)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also cProfile STEPS steps of each side per case (stderr)")
    parser.add_argument("--profile-top", type=int, default=30)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: swift_lycoris.demo's models (the goal's case); sd15: a Stable Diffusion 1.5-shaped "
                             "UNet (320/640/1280/1280 channels) and CLIP ViT-L/14 text encoder, random weights, "
                             "built from their configs (~4 GB per side)")
    parser.add_argument("--latent", type=int, default=32, help="latent size for --model sd15 (64 is 512 px)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides' models, data and adapters live (cuda: the first GPU)")
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 20)
    min_steps = min(steps, args.min_steps or (2 if args.quick else 10))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    title = ("5 step — kohya training step, swift_lycoris.kohya (lycoris-server) vs lycoris.kohya (LyCORIS, "
             f"in-process torch {args.device.upper()}); ratio = ours / LyCORIS (< 1: ours is faster)")
    started = time.time()

    if args.server:
        os.environ["LYCORIS_SERVER"] = os.path.abspath(args.server)
    try:
        import torch
        import lycoris  # noqa: F401
        import lycoris.kohya  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        try:
            import swift_lycoris  # noqa: F401
        except ImportError:
            sys.path.insert(0, os.path.join(ROOT, "python"))
        from swift_lycoris import arena as sl_arena
        from swift_lycoris import server as sl_server
        from swift_lycoris.demo import synthetic_data, tiny_models
        sl_server.find_server()
        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device")
    except Exception as error:  # a missing package, or no server binary
        print_table([title] + machine_lines([f"UNAVAILABLE ({type(error).__name__}: {error}); section 5 skipped"]),
                    [])
        return 0
    import logging
    from importlib.metadata import version

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    for noisy_logger in ("swift_lycoris", "swift_lycoris.kohya", "swift_lycoris.server"):
        logging.getLogger(noisy_logger).setLevel(logging.WARNING)

    meter = Meter()
    meter.install(sl_server.Server, sl_arena.Arena)
    threads_list = [int(t) for t in args.threads.split(",")]
    algos = args.algos.split(",")
    modes = args.modes.split(",")
    if not set(modes) <= {"default", "bypass"}:
        parser.error(f"--modes takes default and/or bypass, not {args.modes}")
    batches = [int(b) for b in args.batches.split(",")]
    if args.model == "tiny":
        base_unet, base_te = tiny_models(0)
        base_unet.requires_grad_(False)
        base_te.requires_grad_(False)
        data = synthetic_data(16, 1)
        model_line = "swift_lycoris.demo.tiny_models(0) (UNet 32/64 ch, 8x8 latents; CLIP 2 layers, 16 tokens)"

        def models():
            return copy.deepcopy(base_te), copy.deepcopy(base_unet)
    else:
        data = sd15_data(4, args.latent, 1)
        model_line = (f"SD 1.5-shaped UNet (320/640/1280/1280 ch, {args.latent}x{args.latent} latents) + CLIP ViT-L/14 "
                      "text encoder (12 layers, 77 tokens), random weights from their configs")

        def models():
            unet, te = sd15_models(0)
            return te.requires_grad_(False), unet.requires_grad_(False)
        if args.device == "cuda":  # build once (seconds of random init at this size), copy per side
            base_te, base_unet = models()

            def models():
                return copy.deepcopy(base_te), copy.deepcopy(base_unet)
    device = torch.device(args.device)
    data = tuple(t.to(device) for t in data)
    cpu_models = models

    def models():
        te, unet = cpu_models()
        return te.to(device), unet.to(device)
    header = [title] + machine_lines([
        f"versions: torch {torch.__version__}, lycoris-lora {version('lycoris-lora')}, "
        f"diffusers {version('diffusers')}, transformers {version('transformers')}",
        f"server: {sl_server.find_server()}",
        f"setup: {model_line}, "
        f"preset full, dim {args.dim} alpha {args.alpha:g} (conv the same), AdamW lr {args.lr:g}; "
        f"median of {steps} steps (at least {min_steps}; a case stops early after {args.case_seconds:g} s) after "
        f"{warmup} warm-up, the two sides alternating step by step",
        f"device: {device_line(torch, args.device)}",
        git_state(),
    ])
    footer = []
    loss_diffs = []
    ratios = []
    std = {"lora": 0.05, "loha": 0.2, "lokr": 0.05}

    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        preset_path, preset = lycoris_preset_file(tmp)
        for algo, mode, threads in [(a, m, t) for a in algos for m in modes for t in threads_list]:
            label = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}.get(algo, algo) + (" bypass" if mode == "bypass" else "")
            extra = {"bypass_mode": "True"} if mode == "bypass" else {}
            torch.set_num_threads(threads)
            progress(f"section 5: {algo} ({mode}), N={threads}")
            te_o, unet_o = models()
            te_l, unet_l = models()
            ours_net = build_ours(te_o, unet_o, algo, args.dim, args.alpha, threads, extra)
            try:
                lyco_net = build_lycoris(te_l, unet_l, algo, args.dim, args.alpha, preset_path, preset, extra)
                ours_net.to(device)
                lyco_net.to(device)
                if set(ours_net.lora_names) != {m.lora_name for m in lyco_net.loras}:
                    raise RuntimeError("the two networks adapt different layers")
                modules, _ = same_values(ours_net, lyco_net, std.get(algo, 0.05))
                blas = ours_net.core.server.info.get("capabilities", {}).get("blas_threads", "?")
                ours = Side("ours", ours_net, te_o, unet_o, args.lr)
                lyco = Side("LyCORIS", lyco_net, te_l, unet_l, args.lr)
                floor = null_call_us(ours_net)
                for batch in batches:
                    first = []
                    result = measure_case(ours, lyco, data, batch, steps, min_steps, warmup, args.case_seconds,
                                          meter, first)
                    o, l = median(result["ours"]), median(result["lyco"])
                    rpc = median(result["rpc"])
                    python = median([t - r for t, r in zip(result["ours"], result["rpc"])])
                    copies = median(result["copy"])
                    case = f"{label} d{args.dim} full ({modules} modules), batch {batch}, N={threads}"
                    row(f"{case} (server BLAS {blas})", f"ours {o:.1f} ms, n={len(result['ours'])}",
                        f"LyCORIS {l:.1f} ms, n={len(result['lyco'])}", f"{o / l:.2f}x")
                    ratios.append((f"{label} b{batch} N={threads}", o / l))
                    trips = sum(result["calls"].values())
                    notes = sum(result["notifies"].values())
                    row(f"{case}: ours split",
                        f"in server calls {rpc:.1f} ms = {trips:g} round trips x {1e3 * rpc / max(trips, 1):.0f} us "
                        f"(null call {floor:.0f} us)" + (f", +{notes:g} notification" if notes else ""),
                        f"Python {python:.1f} ms (arena put/take {copies:.1f})",
                        f"{100 * rpc / o:.0f}% rpc")
                    row(f"{case}: ours calls/step", per_method(result), "-", "-")
                    if device.type == "cuda":
                        adapters = sum(p.numel() * p.element_size() for p in ours_net.parameters()) / 2**20
                        path = "device path" if ours_net.core._device_path else "arena path"
                        row(f"{case}: memory",
                            f"ours ({path}) step working set {result['working_mb']['ours']:.0f} MB CUDA, server "
                            f"GPU {gpu_memory_mb(ours_net.core.server._process.pid):.0f} MB, peak RSS "
                            f"{peak_rss_mb(ours_net.core.server._process.pid):.0f} MB",
                            f"LyCORIS step working set {result['working_mb']['lyco']:.0f} MB CUDA",
                            f"adapters {adapters:.0f} MB")
                    if first:
                        (lo, ll), = first
                        loss_diffs.append(abs(lo - ll) / max(abs(ll), 1e-12))
                    if args.profile:
                        profile_case(ours, data, batch, args.profile, args.profile_top)
                        profile_case(lyco, data, batch, args.profile, args.profile_top)
            finally:
                ours_net.close()
        footer.append(f"both networks: {modules} modules, the same parameter values at the start; first-step loss "
                      f"ours vs LyCORIS: max relative difference {max(loss_diffs, default=float('nan')):.1e} "
                      f"over {len(loss_diffs)} cases")
    goal = CUDA_GOAL if device.type == "cuda" else GOAL
    met = [name for name, ratio in ratios if ratio <= goal]
    footer.append(f"goal (ours / LyCORIS <= {goal:.2f}x for {', '.join(algos)}): met in {len(met)} of {len(ratios)} cases"
                  + (f" ({', '.join(met)})" if met else "")
                  + (f"; worst {max(r for _, r in ratios):.2f}x" if ratios else ""))
    footer.append(f"section 5 wall time {time.time() - started:.0f} s")
    print_table(header, footer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
