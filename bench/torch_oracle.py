"""LyCORIS 4.1.3 in-process on torch CPU: forward + backward timings for bench.py.

Run by bench.py with the interpreter given by --python / LYCORIS_BENCH_PYTHON, one process
per thread count:

    python torch_oracle.py --threads N --iters K --warmup W [--min-seconds S]

It prints a first JSON line {"available": true, "torch": "...", "lycoris": "...", "threads": N}
(or {"available": false, "reason": "..."} when torch or lycoris cannot be imported, and
exits), then reads one case (JSON) per line on stdin and answers each with one line
{"key": ..., "fwd_ms": [...], "total_ms": [...]}; bench.py alternates these with the
server's measurement of the same case so that both see the same machine load.

Each case is {"key", "algo": "lora"|"loha", "kind": "linear"|"conv2d", "shape": input shape,
"mode": "full"|"delta", "rank", "alpha", and the layer geometry}. What one iteration times:

  full   y = module(x) (LyCORIS's own forward: base op + op(x, ΔW) in its default rebuild
         mode), then y.backward(g): ∂x and ∂factors; the base layer is frozen
         (requires_grad False), as in adapter training.
  delta  y = op(x, ΔW) with ΔW = module.get_diff_weight(...) (the adapter's contribution
         alone, what lycoris-server's plain `forward` returns), then y.backward(g).

x requires grad in both (the server returns ∂x too). Gradients are reset (set to None)
before every iteration, outside the timed region.
"""

import argparse
import json
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=0.0)
    args = parser.parse_args()

    try:
        import torch
        import torch.nn as nn
        import lycoris
        from lycoris.modules.locon import LoConModule
        from lycoris.modules.loha import LohaModule
    except Exception as error:  # ImportError, or a broken install
        print(json.dumps({"available": False, "reason": f"{type(error).__name__}: {error}"}), flush=True)
        return

    try:
        from importlib.metadata import version

        lycoris_version = version("lycoris_lora")
    except Exception:
        lycoris_version = getattr(lycoris, "__version__", "?")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(json.dumps({"available": True, "torch": torch.__version__, "lycoris": lycoris_version,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        if case["kind"] == "linear":
            base = nn.Linear(case["in_features"], case["out_features"])
        else:
            base = nn.Conv2d(case["in_channels"], case["out_channels"], case["kernel_size"],
                             stride=case.get("stride", 1), padding=case.get("padding", 0))
        base.requires_grad_(False)
        cls = LoConModule if case["algo"] == "lora" else LohaModule
        module = cls(case["key"].replace(".", "_"), base, multiplier=1.0,
                     lora_dim=case["rank"], alpha=case["alpha"])
        module.train()
        x = torch.randn(*case["shape"], requires_grad=True)
        with torch.no_grad():
            y_shape = base(x).shape
        g = torch.randn(*y_shape)
        weight_shape = tuple(base.weight.shape)
        op = module.op
        kw = module.kw_dict

        def step():
            if case["mode"] == "full":
                y = module(x)
            else:
                diff = module.get_diff_weight(multiplier=module.multiplier, shape=weight_shape)[0]
                y = op(x, diff, None, **kw)
            t_fwd = time.perf_counter()
            y.backward(g)
            return t_fwd

        fwd, total = [], []
        done = 0
        started = time.perf_counter()
        while True:
            x.grad = None
            module.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            t1 = step()
            t2 = time.perf_counter()
            done += 1
            if done > args.warmup:
                fwd.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
                if len(total) >= args.iters and time.perf_counter() - started >= args.min_seconds:
                    break
        print(json.dumps({"key": case["key"], "fwd_ms": fwd, "total_ms": total}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
