"""The device path on a real GPU (issue 8 parts 3 and 4): the emulated-device checks of
test_device_emulated.py again with torch's CUDA tensors shared by CUDA IPC, plus what only a
GPU shows — the stream-ordering rule on real streams, and a kohya step under fp16
autocast. Without a CUDA device these tests report themselves skipped with the reason.

NOT YET RUN: written without a GPU; scripts/gpu-check.sh runs this file where one is lent.
"""

from __future__ import annotations

import logging

import pytest
import torch

from _sl_oracle import assert_grads_match, assert_rel, inputs, make_pair, run, sgd_step
from test_cuda import kohya_fp16_steps

from swift_lycoris import device as devices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the CUDA device path runs where a GPU is lent")

RTOL = 1e-4  # cuBLAS (TF32 off) against the CPU's float32


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    """TF32 off in torch too (cuDNN's convolutions use it by default), so both sides are float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.delenv(devices.ENVIRONMENT, raising=False)


def _on_gpu(algo, **options):
    base, ref_model, lyco, our_model, ours = make_pair(algo, apply=False, **options)
    our_model.cuda()
    ours.cuda()
    lyco.apply_to()
    ours.apply_to()
    return base, ref_model, lyco, our_model, ours


@pytest.mark.parametrize("algo,options", [("lora", {}), ("loha", {}), ("lokr", {"linear_dim": 2}),
                                          ("lora", {"use_tucker": True, "conv_dim": 3})])
def test_two_steps_on_the_gpu_match_lycoris_on_the_cpu(algo, options):
    base, ref_model, lyco, our_model, ours = _on_gpu(algo, **options)
    try:
        methods = []
        original, encoded, record = ours.server.call, ours.server.call_encoded, ours.server.call_record
        ours.server.call = lambda method, params=None: (methods.append(method), original(method, params))[1]
        ours.server.call_encoded = lambda method, template, *values: (methods.append(method),
                                                                      encoded(method, template, *values))[1]
        ours.server.call_record = lambda method, template, *values: (methods.append(method),
                                                                    record(method, template, *values))[1]
        x, upstream = inputs()
        for step in range(2):
            methods.clear()
            y_ref, gx_ref = run(ref_model, x, upstream)
            y_our, gx_our = run(our_model, x.cuda(), upstream.cuda())
            assert isinstance(ours._device_path, devices.DevicePath), "the CUDA device path was not taken"
            assert isinstance(ours._device_path.memory, devices.CUDAIPCMemory)
            assert_rel(y_our.cpu(), y_ref, RTOL, f"step {step}: output")
            assert_rel(gx_our.cpu(), gx_ref, RTOL, f"step {step}: ∂x")
            for p in ours.parameters():
                assert p.grad.is_cuda
            assert_grads_match(lyco, _CPUView(ours), RTOL, f"step {step}: ")
            assert methods == ["network.delta_weights", "network.delta_weights_backward"], methods
            sgd_step(lyco, ours)
    finally:
        ours.close()


class _CPUView:
    """`network.adapters` with every Parameter's gradient on the CPU, for assert_grads_match."""

    def __init__(self, network):
        self.adapters = {name: _Holder(holder) for name, holder in network.adapters.items()}


class _Holder:
    def __init__(self, holder):
        self._parameters = {key: _Grad(p) for key, p in holder.named_parameters()}

    def named_parameters(self):
        return self._parameters.items()


class _Grad:
    def __init__(self, parameter):
        self.grad = None if parameter.grad is None else parameter.grad.cpu()


def test_stream_ordering_a_late_update_is_seen():
    """An update queued behind ~50 ms of GPU work on torch's stream is what the server reads:
    the client synchronizes its stream before the call (without that the server would read
    the old values)."""
    base, ref_model, lyco, our_model, ours = _on_gpu("lora")
    try:
        x, _ = inputs()
        with torch.no_grad():
            run(our_model, x.cuda())
            torch.cuda._sleep(50_000_000)  # cycles: tens of milliseconds on the current stream
            for p in ours.parameters():
                p.mul_(2.0)
            for p in lyco.parameters():
                p.mul_(2.0)
            y_our, _ = run(our_model, x.cuda())
        assert_rel(y_our.cpu(), run(ref_model, x)[0], RTOL, "output after the queued update")
    finally:
        ours.close()


def test_an_unported_algorithm_falls_back_to_the_arena_path(caplog):
    base, ref_model, lyco, our_model, ours = _on_gpu("lora", rank_dropout=0.1)
    try:
        ours.eval()
        lyco.eval()
        with caplog.at_level(logging.INFO, logger="swift_lycoris"):
            y_our, _ = run(our_model, inputs()[0].cuda())
        assert ours._device_path is False
        assert any("arena path" in r.getMessage() and "rank_dropout" in r.getMessage() for r in caplog.records)
        assert_rel(y_our.cpu(), run(ref_model, inputs()[0])[0], RTOL, "arena-path output on the GPU")
    finally:
        ours.close()


def test_kohya_step_on_the_device_path_with_fp16_autocast(tmp_path):
    path = kohya_fp16_steps("lokr", tmp_path)
    assert isinstance(path, devices.DevicePath), "kohya's network did not take the device path"
