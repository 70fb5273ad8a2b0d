#!/usr/bin/env python3
"""Benchmarks of lycoris-server (see bench/README.md). Run through bench/run.sh.

Prints one table; every row is "server number | baseline number | ratio (server/baseline)".
Sections:
  1 rtt    empty-call round trip (network.info on a 1-layer network), Python client with
           buffered pipes, unpinned / both on one core / client and server on different
           cores; baseline: `cat` as the echo server (the pipe + Python floor).
  2 xport  tensor transport through the shared-memory arena vs numpy memcpy.
  3 train  forward+backward of LoRA / LoHa rank 16 at SD1.5 shapes vs LyCORIS 4.1.3 on
           torch CPU in-process, same thread count.
  4 codec  jansson codec (LycorisRPC) vs Foundation JSONSerialization (bench/Codec).
"""

import argparse
import json
import mmap
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20
PAGE = 4096


# --------------------------------------------------------------------------- client


class RPCFailure(RuntimeError):
    pass


class Server:
    """lycoris-server over pipes (NDJSON framing), optionally pinned with taskset."""

    def __init__(self, exe, threads=1, cpus=None, log=None):
        cmd = [exe, "--threads", str(threads), "--log-level", "warning"]
        # For profiling: LYCORIS_BENCH_SERVER_WRAP="perf record -e cpu-clock -g -o x.data"
        # (or "valgrind --tool=callgrind") runs the server under that command.
        cmd = shlex.split(os.environ.get("LYCORIS_BENCH_SERVER_WRAP", "")) + cmd
        if cpus is not None:
            cmd = ["taskset", "-c", cpus] + cmd
        self.log = log or tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, bufsize=1 << 16)
        self.next_id = 0
        self.arena = None
        self.arena_map = None

    def send(self, message):
        self.proc.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RPCFailure("server exited; stderr:\n" + self.log.read().decode(errors="replace")[-2000:])
        return json.loads(line)

    def call(self, method, params=None):
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        response = self.send(message)
        if "error" in response:
            raise RPCFailure(f"{method}: {response['error']}")
        return response["result"]

    def batch(self, calls):
        messages = []
        for method, params in calls:
            self.next_id += 1
            messages.append({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        responses = self.send(messages)
        for response in responses:
            if "error" in response:
                raise RPCFailure(str(response["error"]))
        return [r["result"] for r in sorted(responses, key=lambda r: r["id"])]

    def initialize(self):
        return self.call("initialize", {"protocol_version": "1.0", "client": "bench.py"})

    def create_arena(self, size):
        result = self.call("arena.create", {"size": size})
        with open(result["path"], "r+b") as f:
            self.arena_map = mmap.mmap(f.fileno(), result["size"])
        self.arena = np.frombuffer(self.arena_map, dtype=np.uint8)
        return result

    def view(self, offset, shape):
        """A float32 numpy view of the arena at `offset`."""
        count = int(np.prod(shape))
        return self.arena[offset:offset + 4 * count].view(np.float32).reshape(shape)

    def close(self):
        try:
            if self.proc.poll() is None:
                self.call("shutdown")
        except Exception:
            pass
        self.arena = None
        if self.arena_map is not None:
            try:
                self.arena_map.close()
            except BufferError:
                pass
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def desc(offset, shape):
    return {"dtype": "F32", "shape": list(shape), "offset": offset}


class Bump:
    """Page-aligned offsets in the arena."""

    def __init__(self):
        self.top = 0

    def take(self, nbytes):
        offset = self.top
        self.top += (nbytes + PAGE - 1) // PAGE * PAGE
        return offset


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[index]


def set_affinity(cpus):
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


# --------------------------------------------------------------------------- table

ROWS = []


def row(section, case, server, baseline, ratio, note=""):
    ROWS.append((section, case, server, baseline, ratio, note))
    # Progress on stderr so that stdout holds only the final table.
    print(f"  [{section}] {case}: {server} | {baseline} | {ratio} {note}", file=sys.stderr, flush=True)


def fmt_ratio(value):
    return "-" if value is None or value != value else f"{value:.2f}x"


def fmt_us(ns):
    return f"{ns / 1e3:.1f}"


def print_table(header_lines):
    cols = ("section", "case", "server (what is measured)", "baseline", "ratio")
    rows = [(s, c, v, b, r) for s, c, v, b, r, _ in ROWS]
    widths = [max(len(cols[i]), *(len(r[i]) for r in rows)) if rows else len(cols[i]) for i in range(5)]
    out = []
    out.extend(header_lines)
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out.append(line)
    out.append("-" * len(line))
    last = None
    for r in rows:
        if last is not None and r[0] != last:
            out.append("")
        last = r[0]
        out.append("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    notes = [(s, c, n) for s, c, _, _, _, n in ROWS if n]
    if notes:
        out.append("")
        out.extend(f"note [{s}] {c}: {n}" for s, c, n in notes)
    print("\n".join(out))


# --------------------------------------------------------------------------- 1 rtt


def rtt_run(cmd, make_request, count, warmup, client_cpus):
    """Median/p90 of write+flush+readline over `count` requests to a process on pipes."""
    all_cpus = set(range(os.cpu_count() or 1))
    set_affinity(client_cpus or all_cpus)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=1 << 16)
    try:
        return rtt_loop(proc, make_request, count, warmup)
    finally:
        try:
            proc.stdin.close()
        except Exception:
            pass
        proc.wait(timeout=10)
        set_affinity(all_cpus)


def rtt_loop(proc, make_request, count, warmup, setup=None):
    w, r = proc.stdin, proc.stdout
    if setup:
        for message in setup:
            w.write(message)
            w.flush()
            reply = r.readline()
            if b'"error"' in reply:
                raise RPCFailure(reply.decode())
    requests = [make_request(i) for i in range(warmup + count)]
    times = []
    clock = time.perf_counter_ns
    last = b""
    for i, request in enumerate(requests):
        t0 = clock()
        w.write(request)
        w.flush()
        last = r.readline()
        t1 = clock()
        if i >= warmup:
            times.append(t1 - t0)
    if not last.strip():
        raise RPCFailure("no reply")
    return times, last


def bench_rtt(exe, count):
    ncpu = os.cpu_count() or 1
    setup = [
        b'{"jsonrpc":"2.0","id":"i","method":"initialize","params":{"protocol_version":"1.0"}}\n',
        b'{"jsonrpc":"2.0","id":"n","method":"network.create","params":{"algo":"lora","options":'
        b'{"lora_dim":4,"alpha":1},"layers":[{"name":"l0","kind":"linear","in_features":8,"out_features":8}]}}\n',
    ]

    def info(i):
        return b'{"jsonrpc":"2.0","id":%d,"method":"network.info"}\n' % i

    def echo(i):
        return b'{"jsonrpc":"2.0","id":%d,"method":"network.info"}\n' % i

    modes = [("unpinned", None, None)]
    modes.append(("pinned, both on cpu 0", "0", {0}))
    if ncpu >= 2:
        modes.append(("pinned, client cpu 0 / server cpu 1", "1", {0}))
    results = {}
    for name, server_cpus, client_cpus in modes:
        prefix = ["taskset", "-c", server_cpus] if server_cpus is not None else []
        # Floor: `cat` echoes each line back (read/write, no stdio buffering).
        floor, _ = rtt_run(prefix + ["cat"], echo, count, 200, client_cpus)
        # The server (1 BLAS thread).
        all_cpus = set(range(ncpu))
        set_affinity(client_cpus or all_cpus)
        proc = subprocess.Popen(prefix + [exe, "--threads", "1", "--log-level", "warning"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, bufsize=1 << 16)
        try:
            times, last = rtt_loop(proc, info, count, 200, setup=setup)
            reply = json.loads(last)
            assert "result" in reply and reply["result"]["modules"][0]["name"] == "l0", reply
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)
            set_affinity(all_cpus)
        results[name] = (times, floor)
        med, p90 = pct(times, 0.5), pct(times, 0.9)
        fmed, fp90 = pct(floor, 0.5), pct(floor, 0.9)
        row("1 rtt", f"network.info x{count}, {name}",
            f"p50 {fmt_us(med)} us, p90 {fmt_us(p90)} us",
            f"cat echo p50 {fmt_us(fmed)} us, p90 {fmt_us(fp90)} us",
            fmt_ratio(med / fmed))
    return results


# --------------------------------------------------------------------------- 2 transport


def time_it(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        out.append(time.perf_counter_ns() - t0)
    return out


def bench_transport(exe, sizes_mib, reps):
    sizes = [s * MiB for s in sizes_mib]
    largest = max(sizes)
    server = Server(exe, threads=1)
    try:
        server.initialize()
        # Arena: [input region | output region], each the largest size.
        in_off, out_off = 0, (largest + PAGE - 1) // PAGE * PAGE
        server.create_arena(out_off * 2)
        # One layer per size whose lora_down.weight (1, n) carries the payload for
        # parameters.set/get, and one 1→1 linear for forward with input (n, 1).
        # (Each extent must stay ≤ 2^20: lora_down is (rank, in) = (n / 2^18, 2^18).)
        width = 1 << 18
        layers = [{"name": f"p{s // MiB}", "kind": "linear", "in_features": min(s // 4, width), "out_features": 1,
                   "options": {"lora_dim": max(1, (s // 4) // width)}} for s in sizes]
        layers.append({"name": "fwd", "kind": "linear", "in_features": 1, "out_features": 1})
        server.call("network.create", {"algo": "lora", "options": {"lora_dim": 1, "alpha": 1}, "layers": layers})
        rng = np.random.default_rng(0)
        for size in sizes:
            n = size // 4
            src = rng.standard_normal(n, dtype=np.float32)
            dst = np.empty_like(src)
            arena_in = server.view(in_off, (n,))
            arena_out = server.view(out_off, (n,))
            dst[:] = 0
            arena_in[:] = 0
            arena_out[:] = 0  # fault every page in on the client side

            # Baselines: numpy memcpy into a preallocated, already-touched buffer, and into a
            # fresh allocation each time (page faults included, as the server's decode has).
            t_memcpy = pct(time_it(lambda: np.copyto(dst, src), reps * 3), 0.5)
            t_fresh = pct(time_it(lambda: src.copy(), reps * 3), 0.5)
            t_client = pct(time_it(lambda: np.copyto(arena_in, src), reps * 3), 0.5)

            key = f"p{size // MiB}.lora_down.weight"
            pshape = (max(1, n // width), min(n, width))
            assert pshape[0] * pshape[1] == n, "sizes must be a power of two ≥ 1 MiB"
            xshape = (max(1, n // width), min(n, width), 1)
            set_get = [("parameters.set", {"parameters": {key: desc(in_off, pshape)}}),
                       ("parameters.get", {"keys": [key], "outputs": {key: {"offset": out_off}}})]

            def cycle_params():
                np.copyto(arena_in, src)
                server.batch(set_get)

            def rpc_params():
                server.batch(set_get)

            fwd_params = {"calls": [{"module": "fwd", "input": desc(in_off, xshape), "output": {"offset": out_off}}],
                          "grad": False}

            def cycle_forward():
                np.copyto(arena_in, src)
                server.call("forward", fwd_params)

            def rpc_forward():
                server.call("forward", fwd_params)

            t_cycle_p = pct(time_it(cycle_params, reps), 0.5)
            t_rpc_p = pct(time_it(rpc_params, reps), 0.5)
            assert np.array_equal(arena_out, src), "parameters.get did not return what parameters.set sent"
            t_cycle_f = pct(time_it(cycle_forward, reps), 0.5)
            t_rpc_f = pct(time_it(rpc_forward, reps), 0.5)

            gbs = lambda t: size / t  # bytes per ns == GB/s
            label = f"{size // MiB} MiB"
            row("2 xport", f"{label}: numpy memcpy (baseline)",
                f"client copy into arena {gbs(t_client):.2f} GB/s",
                f"memcpy {gbs(t_memcpy):.2f} GB/s ({t_memcpy / 1e6:.2f} ms); fresh dst {gbs(t_fresh):.2f} GB/s",
                fmt_ratio(t_memcpy / t_client))
            for what, t_cycle, t_rpc in (("set+get", t_cycle_p, t_rpc_p), ("forward linear 1->1 r1", t_cycle_f, t_rpc_f)):
                # Efficiency: (number of unavoidable copies x memcpy time) / measured time.
                # cycle = client copy-in + server decode + server encode = 3 copies;
                # rpc   = server decode + encode = 2 copies.
                row("2 xport", f"{label}: {what}, cycle (client copy-in + rpc)",
                    f"{t_cycle / 1e6:.2f} ms = {gbs(t_cycle):.2f} GB/s payload",
                    f"3 x memcpy = {3 * t_memcpy / 1e6:.2f} ms",
                    fmt_ratio(3 * t_memcpy / t_cycle))
                row("2 xport", f"{label}: {what}, rpc only (server read+write)",
                    f"{t_rpc / 1e6:.2f} ms = {gbs(t_rpc):.2f} GB/s payload",
                    f"2 x memcpy = {2 * t_memcpy / 1e6:.2f} ms",
                    fmt_ratio(2 * t_memcpy / t_rpc))
    finally:
        server.close()


# --------------------------------------------------------------------------- 3 train


def train_cases(quick, batch2, modes):
    lin = {"kind": "linear", "in_features": 320, "out_features": 320}
    conv = {"kind": "conv2d", "in_channels": 320, "out_channels": 320, "kernel_size": 3, "stride": 1, "padding": 1}
    shapes = [("linear 320->320", lin, [1, 4096, 320])]
    if batch2:
        shapes.append(("linear 320->320", lin, [2, 4096, 320]))
    shapes.append(("conv3x3 320->320 p1", conv, [1, 320, 64, 64]))
    cases = []
    for mode in modes:
        for name, geometry, shape in shapes:
            for algo in ("lora", "loha"):
                key = f"{algo}|{name}|{'x'.join(map(str, shape))}|{mode}"
                cases.append(dict(geometry, key=key, algo=algo, shape=shape, mode=mode, rank=16, alpha=8,
                                  label=f"{'LoRA' if algo == 'lora' else 'LoHa'} r16 {name} x{tuple(shape)} {mode}"))
    return cases


def server_layer(case):
    layer = {"name": case["key"].split("|")[0] + ("_lin" if case["kind"] == "linear" else "_conv"),
             "kind": case["kind"], "algo": case["algo"]}
    for k in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding"):
        if k in case:
            layer[k] = case[k]
    return layer


class TrainServer:
    """One lycoris-server with every section-3 layer (weights and biases for "full" mode) and
    an arena region for each case's x, y, ∂y and ∂x."""

    def __init__(self, exe, threads, cases):
        self.server = server = Server(exe, threads=threads)
        try:
            self.blas_threads = server.initialize()["capabilities"]["blas_threads"]
            layers = {}
            for case in cases:
                layer = server_layer(case)
                layers.setdefault(layer["name"], layer)
            bump = Bump()
            plan = {}
            for name, layer in layers.items():
                if layer["kind"] == "linear":
                    wshape = [layer["out_features"], layer["in_features"]]
                else:
                    k = layer["kernel_size"]
                    wshape = [layer["out_channels"], layer["in_channels"], k, k]
                plan[name] = (bump.take(4 * int(np.prod(wshape))), wshape, bump.take(4 * wshape[0]))
            self.io = {}
            for case in cases:
                shape = case["shape"]
                if case["kind"] == "linear":
                    yshape = shape[:-1] + [case["out_features"]]
                else:
                    yshape = [shape[0], case["out_channels"], shape[2], shape[3]]  # stride 1, same padding
                count, ycount = int(np.prod(shape)), int(np.prod(yshape))
                self.io[case["key"]] = (shape, yshape, bump.take(4 * count), bump.take(4 * ycount),
                                        bump.take(4 * ycount), bump.take(4 * count))
            server.create_arena(bump.top)
            self.rng = np.random.default_rng(0)
            for name, (woff, wshape, boff) in plan.items():
                server.view(woff, wshape)[...] = self.rng.standard_normal(wshape, dtype=np.float32) * 0.02
                server.view(boff, [wshape[0]])[...] = 0.01
                layers[name]["weight"] = desc(woff, wshape)
                layers[name]["bias"] = desc(boff, [wshape[0]])
            server.call("network.create", {"options": {"lora_dim": 16, "alpha": 8},
                                           "layers": list(layers.values()), "seed": 0})
            server.call("network.set_training", {"training": True})
        except Exception:
            server.close()
            raise

    def measure(self, case, iters, warmup, min_seconds):
        """Client-observed wall time of `forward` (grad: true) + `backward` with every tensor
        already in the arena and every output written into it."""
        server = self.server
        shape, yshape, xo, yo, go, gxo = self.io[case["key"]]
        server.view(xo, shape)[...] = self.rng.standard_normal(shape, dtype=np.float32)
        server.view(go, yshape)[...] = self.rng.standard_normal(yshape, dtype=np.float32)
        module = server_layer(case)["name"]
        fwd = {"calls": [{"module": module, "input": desc(xo, shape), "output": {"offset": yo},
                          "full": case["mode"] == "full"}], "grad": True}
        fwd_ms, total_ms = [], []
        done = 0
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            result = server.call("forward", fwd)
            t1 = time.perf_counter()
            tape = result["results"][0]["tape"]
            server.call("backward", {"calls": [{"tape": tape, "grad_output": desc(go, yshape),
                                                "grad_input": {"offset": gxo}}]})
            t2 = time.perf_counter()
            done += 1
            if done > warmup:
                fwd_ms.append((t1 - t0) * 1e3)
                total_ms.append((t2 - t0) * 1e3)
                if len(total_ms) >= iters and time.perf_counter() - started >= min_seconds:
                    break
        server.call("gradients.zero")
        return {"fwd_ms": fwd_ms, "total_ms": total_ms}

    def close(self):
        self.server.close()


class Oracle:
    """torch_oracle.py in a child process: one case per line."""

    def __init__(self, python, threads, iters, warmup, min_seconds):
        self.proc = None
        self.info = {"available": False, "reason": "no Python interpreter given (--python / LYCORIS_BENCH_PYTHON)"}
        if not python or python == "none":
            return
        cmd = [python, os.path.join(HERE, "torch_oracle.py"), "--threads", str(threads), "--iters", str(iters),
               "--warmup", str(warmup), "--min-seconds", str(min_seconds)]
        self.err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                         text=True, bufsize=1)
        except OSError as error:
            self.info = {"available": False, "reason": f"{python}: {error}"}
            return
        line = self.proc.stdout.readline()
        try:
            self.info = json.loads(line)
        except ValueError:
            self.info = {"available": False, "reason": f"{python} did not start the oracle: {self.stderr()}"}
        if not self.info.get("available"):
            self.close()

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace").strip()[-500:]

    def measure(self, case):
        if self.proc is None:
            return None
        self.proc.stdin.write(json.dumps({k: v for k, v in case.items() if k != "label"}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch oracle exited: {self.stderr()}")
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
            self.proc = None


def bench_train(exe, python, threads_list, quick, batch2, modes, iters, warmup, min_seconds, only=None):
    cases = train_cases(quick, batch2, modes)
    if only:
        cases = [c for c in cases if only in c["label"]]
    torch_note = None
    for threads in threads_list:
        server = TrainServer(exe, threads, cases)
        oracle = Oracle(python, threads, iters, warmup, min_seconds)
        try:
            if oracle.info.get("available"):
                torch_note = f"LyCORIS {oracle.info['lycoris']} on torch {oracle.info['torch']} (CPU)"
            else:
                torch_note = f"torch/LyCORIS UNAVAILABLE ({oracle.info.get('reason')}): server-only numbers"
            for case in cases:
                # Server then torch on the same case, back to back, so both see the same load.
                s = server.measure(case, iters, warmup, min_seconds)
                t = oracle.measure(case)
                s_tot, s_fwd = pct(s["total_ms"], 0.5), pct(s["fwd_ms"], 0.5)
                server_text = f"{s_tot:.1f} ms (fwd {s_fwd:.1f}), n={len(s['total_ms'])}"
                if t is not None:
                    t_tot, t_fwd = pct(t["total_ms"], 0.5), pct(t["fwd_ms"], 0.5)
                    base_text = f"LyCORIS {t_tot:.1f} ms (fwd {t_fwd:.1f}), n={len(t['total_ms'])}"
                    ratio = fmt_ratio(s_tot / t_tot)
                else:
                    base_text, ratio = "torch/LyCORIS unavailable", "-"
                row("3 train", f"{case['label']}, N={threads} (server BLAS {server.blas_threads})",
                    server_text, base_text, ratio)
        finally:
            oracle.close()
            server.close()
    return torch_note


# --------------------------------------------------------------------------- 4 codec


def bench_codec(binary, rounds, scale):
    proc = subprocess.run([binary, "--rounds", str(rounds), "--scale", str(scale)], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1000:])
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[(r["case"], r["codec"])] = r
    labels = {
        "request_decode": "(a) ~200 B request: decode + field access",
        "floats_build": "(b) 262,144 floats: build tree from [Float]",
        "floats_encode": "(b) 262,144 floats: encode tree -> bytes",
        "floats_decode": "(b) 262,144 floats: decode + read back [Float]",
    }
    for case, label in labels.items():
        j, f = results.get((case, "jansson")), results.get((case, "foundation"))
        if not j or not f:
            continue

        def show(r):
            ns = r["ns_per_op"]
            text = f"{ns / 1e3:.2f} us" if ns < 1e6 else f"{ns / 1e6:.2f} ms"
            return text + (f" ({r['bytes']} B)" if r["bytes"] else "")

        row("4 codec", label, "jansson " + show(j), "Foundation " + show(f), fmt_ratio(j["ns_per_op"] / f["ns_per_op"]))


# --------------------------------------------------------------------------- main


def machine_summary():
    """One line: architecture, core count, CPU model, load average now (also used by
    train_step.py)."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"machine: {platform.machine()}, nproc {os.cpu_count()}, CPU \"{model}\", "
            f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def machine_lines():
    env = {k: os.environ.get(k, "(unset)") for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")}
    return [
        machine_summary(),
        "env: " + ", ".join(f"{k}={v}" for k, v in env.items()),
        f"python (client): {sys.executable} {platform.python_version()}, numpy {np.__version__}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="lycoris-server binary")
    parser.add_argument("--codec-bench", help="codec-bench binary (section 4; skipped when absent)")
    parser.add_argument("--python", default=os.environ.get("LYCORIS_BENCH_PYTHON"),
                        help="interpreter with torch + lycoris-lora 4.1.3 for section 3")
    parser.add_argument("--sections", default="1,2,3,4")
    parser.add_argument("--quick", action="store_true", help="fewer calls/iterations (smoke test)")
    parser.add_argument("--rtt-calls", type=int, default=None)
    parser.add_argument("--sizes", default="1,4,16,64", help="transport sizes in MiB")
    parser.add_argument("--threads", default="1,2", help="thread counts for section 3")
    parser.add_argument("--modes", default="full,delta", help="section 3 modes: full (whole layer), delta (adapter only)")
    parser.add_argument("--no-batch2", action="store_true", help="skip the (2,4096,320) linear case")
    parser.add_argument("--iters", type=int, default=None, help="section 3 timed iterations (after warm-up)")
    parser.add_argument("--only", default=None, help="section 3: only cases whose label contains this text")
    args = parser.parse_args()

    sections = set(args.sections.split(","))
    rtt_calls = args.rtt_calls or (500 if args.quick else 3000)
    xport_reps = 5 if args.quick else 15
    iters = args.iters or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    min_seconds = 0.0 if args.quick else 1.0
    header = ["lycoris-server benchmarks (ratios are server / baseline: < 1 means the server is faster, "
              "except 2 xport where the ratio is an efficiency: > 1 would beat memcpy)"]
    header += machine_lines()
    header.append(f"server: {args.server}")
    footer = []
    t_start = time.time()

    if "1" in sections:
        print("section 1: round trips", file=sys.stderr, flush=True)
        bench_rtt(args.server, rtt_calls)
    if "2" in sections:
        print("section 2: transport", file=sys.stderr, flush=True)
        bench_transport(args.server, [int(s) for s in args.sizes.split(",")], xport_reps)
    if "3" in sections:
        print("section 3: forward+backward", file=sys.stderr, flush=True)
        note = bench_train(args.server, args.python, [int(t) for t in args.threads.split(",")], args.quick,
                           not args.no_batch2, args.modes.split(","), iters, warmup, min_seconds, args.only)
        if note:
            header.append("section 3 baseline: " + note)
    if "4" in sections:
        if args.codec_bench and os.path.exists(args.codec_bench):
            print("section 4: codec", file=sys.stderr, flush=True)
            bench_codec(args.codec_bench, 5 if args.quick else 15, 0.25 if args.quick else 1.0)
        else:
            header.append("section 4 skipped: no codec-bench binary")
    footer.append(f"total wall time {time.time() - t_start:.0f} s")
    print_table(header)
    print("\n".join(footer))


if __name__ == "__main__":
    main()
