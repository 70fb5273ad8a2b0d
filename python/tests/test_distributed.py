"""torch.distributed (gloo, 2 processes on CPU, loopback only): each rank runs its own
lycoris-server; data-parallel training of the adapters on half a batch per rank must equal
a single-process run on the whole batch.

Modes (see _ddp_worker.py): DistributedDataParallel over model + network; a hand-written
all-reduce of `network.parameters()` gradients (what kohya does with accelerate); and DDP
when the ranks start from different adapter values (DDP's initial broadcast must reach
every rank's server). Each runs on the arena path and on the device path (the emulated
device: one server per rank computing on its rank's device, as on a GPU host).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import _ddp_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PATHS = {"arena": {"SWIFT_LYCORIS_DEVICE": "cpu"},
         "device": {"SWIFT_LYCORIS_DEVICE": "emulated", "LYCORIS_EMULATED_DEVICE": "1"}}


@pytest.fixture(scope="module", params=list(PATHS))
def results(request, tmp_path_factory):
    """{rank: {mode: result}} of a 2-process run, and the 1-process reference, on the arena
    path or on the (emulated) device path."""
    tmp = tmp_path_factory.mktemp("ddp")
    path_env = PATHS[request.param]
    env = {**os.environ, **path_env}
    env.update({"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])})
    port = _free_port()
    procs, outs = [], []
    for rank in range(2):
        out = tmp / f"rank{rank}.pt"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_ddp_worker.py"), str(rank), "2", str(port), str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE))
    logs = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=TIMEOUT_S)
            logs.append(stdout.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed (exit {proc.returncode}):\n{logs[rank][-4000:]}"
    ranks = {rank: torch.load(out, weights_only=False) for rank, out in enumerate(outs)}
    saved = {key: os.environ.get(key) for key in path_env}
    os.environ.update(path_env)
    try:
        reference = worker.train("ddp", 0, 1)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    on_device = request.param == "device"
    for by_mode in [*ranks.values(), {"reference": reference}]:
        for mode, result in by_mode.items():
            assert result["device_path"] == on_device, f"{mode} did not take the {request.param} path"
    return ranks, reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    assert scale > 0, "the reference is all zeros: the comparison could not fail"
    return (a - b).abs().max().item() / scale


@pytest.mark.parametrize("mode", worker.MODES)
def test_data_parallel_equals_single_process(results, mode):
    ranks, reference = results
    assert len(reference["grads"]) == worker.STEPS
    for rank, by_mode in ranks.items():
        got = by_mode[mode]
        for step, (grads, ref_grads) in enumerate(zip(got["grads"], reference["grads"])):
            assert set(grads) == set(ref_grads)
            for key, ref in ref_grads.items():
                rel = _rel(grads[key], ref)
                assert rel <= 1e-6, f"{mode} rank {rank} step {step} ∂{key}: relative error {rel:.2e}"
        for key, ref in reference["params"].items():
            assert not torch.equal(ref, reference["initial"][key]), f"{key} did not train"
            rel = _rel(got["params"][key], ref)
            assert rel <= 1e-5, f"{mode} rank {rank} {key}: relative error {rel:.2e} after {worker.STEPS} steps"
        rel = _rel(got["final_output"], reference["final_output"])
        assert rel <= 1e-5, f"{mode} rank {rank}: the server's output after training is off by {rel:.2e}"


@pytest.mark.parametrize("mode", worker.MODES)
def test_ranks_agree_exactly(results, mode):
    ranks, _ = results
    for key, value in ranks[0][mode]["params"].items():
        assert torch.equal(value, ranks[1][mode]["params"][key]), f"{mode}: ranks disagree on {key}"


def test_ranks_saw_different_data(results):
    """Each rank trained on its own half: their local losses differ (the test would not
    catch a rank that used the whole batch otherwise)."""
    ranks, reference = results
    assert ranks[0]["allreduce"]["losses"][0] != ranks[1]["allreduce"]["losses"][0]
    mean = (ranks[0]["allreduce"]["losses"][0] + ranks[1]["allreduce"]["losses"][0]) / 2
    assert abs(mean - reference["losses"][0]) <= 1e-6 * abs(reference["losses"][0])
