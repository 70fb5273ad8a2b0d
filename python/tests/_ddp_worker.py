"""One rank of test_distributed (also imported by it for the single-process reference).

    python _ddp_worker.py RANK WORLD PORT OUT_FILE

Runs every mode in MODES, in order, within one gloo process group on 127.0.0.1, and saves
{mode: {"grads": [per step {key: grad}], "params": {key: value}, "losses": [...]}} to OUT_FILE.
Each mode builds the same model and a `create_lycoris` network (its own server process),
trains STEPS SGD steps on this rank's half of a fixed global batch, and records the
gradients every rank ends up with (after the all-reduce) and the final adapter values.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import swift_lycoris as sl  # noqa: E402

MODES = ("ddp", "allreduce", "ddp_broadcast")
STEPS = 3
GLOBAL_BATCH = 8


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.silu(self.conv(x))
        h = F.silu(self.pool(h)).mean((2, 3))
        return self.head(h)


class Container(nn.Module):
    """Model + network in one module, so DDP sees the adapter Parameters and its forward
    runs the adapted model (as kohya's accelerator-wrapped training does)."""

    def __init__(self, model, network):
        super().__init__()
        self.model = model
        self.network = network

    def forward(self, x):
        return self.model(x)


def data():
    g = torch.Generator().manual_seed(2024)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)
    y = torch.randn(GLOBAL_BATCH, 5, generator=g)
    return x, y


def build(param_seed: int):
    torch.manual_seed(0)
    model = Net().requires_grad_(False)
    network = sl.create_lycoris(model, 1.0, 4, 2.0, algo="loha", seed=0, threads=1)
    g = torch.Generator().manual_seed(param_seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    network.apply_to()
    return model, network


def train(mode: str, rank: int, world: int) -> dict:
    # ddp_broadcast: the other ranks start from different adapter values; DDP's initial
    # broadcast from rank 0 must replace them (and the new values must reach their servers).
    param_seed = 5 if (mode != "ddp_broadcast" or rank == 0) else 6
    model, network = build(param_seed)
    try:
        if mode.startswith("ddp") and world > 1:
            driver = torch.nn.parallel.DistributedDataParallel(Container(model, network))
        else:
            driver = model
        opt = torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9)
        x, y = data()
        per = GLOBAL_BATCH // world
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        out = {"grads": [], "losses": [], "initial": {k: v.detach().clone() for k, v in network.named_parameters()}}
        for _ in range(STEPS):
            opt.zero_grad()
            loss = F.mse_loss(driver(x), y)
            loss.backward()
            if mode == "allreduce" and world > 1:
                for p in network.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            out["grads"].append({k: p.grad.detach().clone() for k, p in network.named_parameters()})
            out["losses"].append(loss.item())
            opt.step()
        out["params"] = {k: v.detach().clone() for k, v in network.named_parameters()}
        # what the server computes with: an eval forward after training
        with torch.no_grad():
            out["final_output"] = model(data()[0]).clone()
        out["device_path"] = bool(network._device_path)  # (test_distributed runs both paths)
        return out
    finally:
        network.close()


def main(argv):
    rank, world, port, out_file = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        results = {mode: train(mode, rank, world) for mode in MODES}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, out_file)


if __name__ == "__main__":
    main(sys.argv)
