"""A long soak through swift_lycoris: N training steps (default 10,000) of a small model with
Linear and Conv2d layers of both transfers (activations and ΔW), gradient accumulation every
other step, an evaluation forward and a few NaN batches skipped by nan_policy=skip_step, an
atomic save now and then — while sampling the resident memory (VmRSS) of the client (this
Python process) and of the server. Memory must be flat once warm: after the first
`--warmup` steps neither side may grow by more than `--allowed-growth-mib`.

    python bench/soak.py [--steps 10000] [--samples 20] [--warmup 1000] [--allowed-growth-mib 16]

Prints one row per sample and a verdict; exits 1 when memory grew. The last result is
recorded in bench/README.md ("Soak").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
import swift_lycoris as sl  # noqa: E402


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Model(nn.Module):
    """Convolutions with large activations and small weights (ΔW moves), and Linear layers
    with small activations (activations move), as a UNet block has both."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3, padding=1)
        self.conv_out = nn.Conv2d(32, 4, 3, padding=1)
        self.proj = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))

    def forward(self, x):
        h = self.conv_in(x)
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.mlp(self.proj(tokens))
        return self.conv_out(tokens.transpose(1, 2).reshape(h.shape))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=20, help="RSS samples over the run")
    parser.add_argument("--warmup", type=int, default=1000, help="steps before the baseline sample")
    parser.add_argument("--allowed-growth-mib", type=float, default=16.0)
    parser.add_argument("--algo", default="loha")
    args = parser.parse_args(argv)
    logging.getLogger("swift_lycoris").setLevel(logging.ERROR)  # the skipped NaN batches warn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Model()
    model.requires_grad_(False)
    network = sl.create_lycoris(model, linear_dim=8, linear_alpha=4.0, algo=args.algo, nan_policy="skip_step", threads=1)
    network.apply_to()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(2, 4, 8, 8, generator=generator) for _ in range(8)]
    server_pid = network.server.pid
    every = max(1, args.steps // args.samples)
    rows, baseline = [], None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for step in range(1, args.steps + 1):
            x = data[step % len(data)]
            if step % 997 == 0:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")  # skipped by nan_policy=skip_step
            loss = (model(x) - x).square().mean()
            loss.backward()
            loss = loss.item()
            if step % 2 == 0:  # gradient accumulation over two micro-batches
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0:
                network.eval()
                with torch.no_grad():
                    model(data[0])
                network.train()
            if step % 2500 == 0:
                network.save_weights(os.path.join(tmp, "soak.safetensors"))
            if step == args.warmup:
                baseline = (rss_mib(), rss_mib(server_pid))
            if step % every == 0 or step == args.steps:
                client, server = rss_mib(), rss_mib(server_pid)
                rows.append((step, client, server, loss, time.perf_counter() - start))
                print(f"step {step:6d}  client RSS {client:8.1f} MiB  server RSS {server:7.1f} MiB  "
                      f"loss {loss:.5f}  {time.perf_counter() - start:7.1f} s", flush=True)
        network.release_orphaned_tapes()
        pending = network.server.call("network.info")["pending_tapes"]
    network.close()
    if baseline is None:
        print("fewer steps than --warmup: no verdict")
        return 1
    after = [(c, s) for step, c, s, _, _ in rows if step >= args.warmup]
    client_growth = max(c for c, _ in after) - baseline[0]
    server_growth = max(s for _, s in after) - baseline[1]
    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {elapsed:.0f} s ({args.steps / elapsed:.0f} steps/s); after step {args.warmup}: "
          f"client {baseline[0]:.1f} MiB, largest growth {client_growth:+.1f} MiB; server {baseline[1]:.1f} MiB, "
          f"largest growth {server_growth:+.1f} MiB; pending tapes at the end {pending}")
    flat = client_growth <= args.allowed_growth_mib and server_growth <= args.allowed_growth_mib and pending == 0
    print("flat" if flat else f"GREW (allowed {args.allowed_growth_mib} MiB, no pending tapes)")
    return 0 if flat else 1


if __name__ == "__main__":
    raise SystemExit(main())
