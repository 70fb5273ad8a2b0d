"""The CUDA staging path, i.e. the arena path with ``device="cpu"`` (a machine with a CUDA
device only; elsewhere these tests report themselves skipped with the reason): a model and
its adapters on the GPU give the CPU run's outputs and gradients through both transfers, the
arena is page-locked, and kohya's flow (fp16 autocast, optimizer step, save) works on the
device."""

from __future__ import annotations

import copy

import pytest
import torch

from _sl_oracle import assert_rel, base_model, inputs

import swift_lycoris as sl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA staging path runs where a GPU is lent")

RTOL = 1e-4  # cuDNN/cuBLAS against CPU float32


@pytest.fixture(autouse=True)
def staging_path(monkeypatch):
    """These tests are about the arena path: keep swift_lycoris off the device path it would
    pick by itself for a model on the GPU (test_cuda_device.py tests that one)."""
    monkeypatch.setenv("SWIFT_LYCORIS_DEVICE", "cpu")


def _run(model, network, x, upstream):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * upstream).sum().backward()
    return y.detach().cpu(), x.grad.detach().cpu(), {k: p.grad.detach().cpu() for k, p in network.named_parameters()}


@pytest.mark.parametrize("transfer", ["weights", "activations"])
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_gpu_run_equals_cpu_run(algo, transfer):
    base = base_model()
    runs = []
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(base).to(device)
        network = sl.create_lycoris(model, 0.8, 4, 2.0, algo=algo, threads=1, transfer=transfer)
        try:
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in network.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            network.to(device)
            network.apply_to()
            x, upstream = inputs()
            runs.append(_run(model, network, x.to(device), upstream.to(device)))
            if device == "cuda":
                assert network.arena._pinned, "the arena was not page-locked for CUDA copies"
                assert all(p.grad.is_cuda for p in network.parameters())
        finally:
            network.close()
    (y_cpu, gx_cpu, grads_cpu), (y_gpu, gx_gpu, grads_gpu) = runs
    assert_rel(y_gpu, y_cpu, RTOL, "output")
    assert_rel(gx_gpu, gx_cpu, RTOL, "∂x")
    for key, grad in grads_cpu.items():
        assert_rel(grads_gpu[key], grad, RTOL, f"∂{key}")


def kohya_fp16_steps(algo: str, tmp_path, steps: int = 3):
    """`steps` kohya training steps (AdamW) of a tiny UNet + text encoder on the GPU under
    fp16 autocast, then a save: the losses must be finite and go down. Returns the path the
    adapters took (the core's ``_device_path``: a DevicePath, or False for the arena path)."""
    from test_kohya import Models

    import swift_lycoris.kohya as sk

    te, unet = Models().copy()
    te, unet = te.cuda(), unet.cuda()
    network = sk.create_network(1.0, 4, 2.0, None, te, unet, algo=algo)
    network.apply_to(te, unet, True, True)
    network.cuda()
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = torch.optim.AdamW(groups)
    ids = torch.randint(3, 1000, (2, 7), device="cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    timesteps = torch.tensor([10, 500], device="cuda")
    losses = []
    try:
        for _ in range(steps):
            network.on_step_start(te, unet)
            with torch.autocast("cuda", dtype=torch.float16):
                out = unet(x, timesteps, te(ids).last_hidden_state).sample
                loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
        network.save_weights(str(tmp_path / "gpu.safetensors"), torch.float16, {})
        assert (tmp_path / "gpu.safetensors").stat().st_size > 0
        return network.core._device_path
    finally:
        network.core.close()


def test_kohya_step_on_gpu_with_fp16_autocast(tmp_path):
    assert kohya_fp16_steps("loha", tmp_path) is False, "the staging test took the device path"
