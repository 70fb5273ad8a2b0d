#!/usr/bin/env python3
"""The fixed cost of one delegated layer (bench/README.md §6, "Binary call record"): a 16→16
linear with LoRA r1 on one token, transfer "activations" (one forward and one backward call
per step), timed in several configurations whose rounds alternate in one process, so a loaded
machine slows each alike:

  json      this server, the calls as JSON-RPC texts (SWIFT_LYCORIS_JSON_CALLS=1)
  record    this server, the calls as binary call records (the default)
  base      another server binary (--base-server, e.g. main's), whatever it offers

Per configuration: the step (median of the round medians, µs), the adapter share (step minus
the base linear alone), the time inside the step's two server calls (write → answer read;
median of the round medians), and the server's CPU per call (utime + stime from /proc, over
all rounds).

    python bench/call_overhead.py [--server PATH] [--base-server PATH] [--rounds 6]
                                  [--steps 2000] [--threads 1]
"""

import argparse
import os
import statistics
import sys
import time


def server_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_case(torch, sl, name, server, json_calls, threads):
    os.environ["LYCORIS_SERVER"] = server
    os.environ["SWIFT_LYCORIS_JSON_CALLS"] = "1" if json_calls else "0"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    network = sl.create_lycoris(model, 1.0, 1, 1.0, threads=threads, transfer="activations")
    network.apply_to()
    network.train()
    inside = [0]
    for method in ("call_record", "call_encoded"):
        wrapped = getattr(network.server, method)

        def timed(*args, _wrapped=wrapped):
            start = time.perf_counter_ns()
            try:
                return _wrapped(*args)
            finally:
                inside[0] += time.perf_counter_ns() - start

        setattr(network.server, method, timed)
    return {"name": name, "model": model, "network": network, "inside": inside, "steps": [], "in_calls": [],
            "calls": 0, "cpu": 0.0, "records": network.server.call_records}


def run_round(torch, case, x, g, steps):
    model, server = case["model"], case["network"].server
    times, inside = [], []
    cpu0 = server_cpu_seconds(server.pid) if server else 0.0
    for _ in range(steps):
        before = case["inside"][0] if server else 0
        start = time.perf_counter_ns()
        model(x).backward(g)
        times.append(time.perf_counter_ns() - start)
        inside.append(case["inside"][0] - before if server else 0)
    if server:
        case["cpu"] += server_cpu_seconds(server.pid) - cpu0
        case["calls"] += 2 * steps
    case["steps"].append(statistics.median(times) / 1e3)
    case["in_calls"].append(statistics.median(inside) / 1e3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=".build/release/lycoris-server")
    parser.add_argument("--base-server", help="another lycoris-server binary (e.g. main's) as a column")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch
    import swift_lycoris as sl

    torch.set_num_threads(args.threads)
    cases = [make_case(torch, sl, "json", args.server, True, args.threads),
             make_case(torch, sl, "record", args.server, False, args.threads)]
    if args.base_server:
        cases.append(make_case(torch, sl, "base", args.base_server, False, args.threads))
    torch.manual_seed(1)
    base = torch.nn.Linear(16, 16)
    plain = {"name": "base linear", "model": base, "network": None, "steps": [], "in_calls": []}
    plain["network"] = type("NoServer", (), {"server": None})()
    x = torch.randn(1, 1, 16, requires_grad=True)
    g = torch.randn(1, 1, 16)
    for case in cases + [plain]:
        run_round(torch, case, x, g, 200)  # warm up: templates, arena blocks, the allocator
        case["steps"].clear()
        case["in_calls"].clear()
        if case is not plain:
            case["cpu"], case["calls"] = 0.0, 0
    for round_index in range(args.rounds):
        order = cases + [plain] if round_index % 2 == 0 else [plain] + cases[::-1]
        for case in order:
            run_round(torch, case, x, g, args.steps)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(f"{c['name']} {c['steps'][-1]:.0f}" for c in cases + [plain]),
              file=sys.stderr, flush=True)
    base_step = statistics.median(plain["steps"])
    load = os.getloadavg()[0]
    print(f"call overhead: LoRA r1 16→16 @1 token, transfer activations, {args.threads} thread(s), "
          f"{args.rounds} rounds × {args.steps} steps, load average {load:.1f}")
    print(f"| configuration | step µs | adapter share µs | in the 2 calls µs | server CPU µs/call |")
    print("|---|---:|---:|---:|---:|")
    for case in cases:
        step = statistics.median(case["steps"])
        inside = statistics.median(case["in_calls"])
        cpu = case["cpu"] / case["calls"] * 1e6
        kind = "records" if case["records"] else "JSON"
        print(f"| {case['name']} ({kind}) | {step:.0f} | {step - base_step:.0f} | {inside:.0f} | {cpu:.1f} |")
    print(f"| base linear alone | {base_step:.0f} | | | |")
    for case in cases:
        case["network"].close()


if __name__ == "__main__":
    main()
