"""The device backend's self-check, ``lycoris-server --device-check DEVICE``: for every ported
algorithm × layer kind × option set, the backend's m·ΔW and ∂parameters against the host
engine's, within 1e-5 relative. On the emulated device (the CUDA kernels compiled as C, the
GEMMs column-major as cuBLAS takes them) it runs everywhere; on ``cuda:0`` only where torch
sees a GPU, with torch's CUDA library folders — scripts/gpu-check.sh runs this file there."""

from __future__ import annotations

import subprocess

import pytest
import torch

from swift_lycoris.cuda_libraries import torch_library_dirs
from swift_lycoris.server import find_server


def device_check(device: str, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_server(), "--device-check", device, *arguments], capture_output=True, text=True,
                          timeout=120)


def assert_every_case_passed(result: subprocess.CompletedProcess) -> None:
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [line for line in lines[1:-1]]
    assert len(cases) >= 28 and all(line.endswith(" ok") for line in cases), result.stdout
    assert lines[-1].startswith(f"device check: {len(cases)} of {len(cases)} cases passed"), result.stdout


def test_the_emulated_device_matches_the_host_engine():
    result = device_check("emulated")
    assert result.stdout.startswith("device check on emulated: ")
    assert_every_case_passed(result)


def test_a_device_that_cannot_start_fails_the_check_with_the_reason():
    if torch.cuda.is_available():
        pytest.skip("this host has a CUDA driver: cuda:0 starts")
    result = device_check("cuda:0", "--cuda-library-dir", "/nonexistent")
    assert result.returncode == 1
    assert result.stdout.startswith("device check: cuda:0 cannot start: libcuda (the CUDA driver) not found"), result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_matches_the_host_engine():
    arguments = [argument for directory in torch_library_dirs() for argument in ("--cuda-library-dir", directory)]
    result = device_check("cuda:0", *arguments)
    print(result.stdout)
    assert result.stdout.startswith("device check on cuda:0 "), result.stdout + result.stderr
    assert_every_case_passed(result)
