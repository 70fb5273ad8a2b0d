"""The CUDA backend's kernels (Sources/LycorisCUDA/Kernels/lycoris_kernels.cu) on a real GPU,
the way the server will run them: compiled by NVRTC (from torch's wheel folders) for the
device's compute capability, loaded with the driver API (cuModuleLoadData), launched with
cuLaunchKernel on torch's current stream over torch's CUDA tensors, and compared with torch's
own operations. The CPU emulation of the same source is checked in
Tests/LycorisCUDATests/KernelTests.swift; this is the GPU half (a machine with a CUDA device
only; elsewhere these tests report themselves skipped with the reason)."""

from __future__ import annotations

import ctypes
import os
import pathlib

import pytest
import torch

from swift_lycoris.cuda_libraries import torch_library_dirs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device here: the kernels run on a GPU where one is lent")

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "Sources" / "LycorisCUDA" / "Kernels" / "lycoris_kernels.cu"
F, U64, DOUBLE = ctypes.c_float, ctypes.c_uint64, ctypes.c_double


def _load(names):
    for directory in torch_library_dirs() + [""]:
        for name in names:
            path = os.path.join(directory, name) if directory else name
            if directory and not os.path.exists(path):
                continue
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    raise OSError(f"none of {names} loads from {torch_library_dirs()} or the system")


def _check(library, name, *args):
    status = getattr(library, name)(*args)
    assert status == 0, f"{name} returned {status}"


def compile_ptx(major, minor):
    """lycoris_kernels.cu as PTX for compute capability major.minor, by NVRTC."""
    nvrtc = _load(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"])
    program = ctypes.c_void_p()
    _check(nvrtc, "nvrtcCreateProgram", ctypes.byref(program), SOURCE.read_bytes(), b"lycoris_kernels.cu", 0, None, None)
    options = (ctypes.c_char_p * 1)(f"--gpu-architecture=compute_{major}{minor}".encode())
    status = nvrtc.nvrtcCompileProgram(program, 1, options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, f"NVRTC: {log.value.decode()}"
    _check(nvrtc, "nvrtcGetPTXSize", program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    _check(nvrtc, "nvrtcGetPTX", program, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return ptx


class Module:
    """lycoris_kernels.cu compiled and loaded into torch's primary context on device 0."""

    def __init__(self):
        torch.zeros(1, device="cuda")  # torch creates the primary context
        self.driver = _load(["libcuda.so.1"])
        ptx = compile_ptx(*torch.cuda.get_device_capability(0))
        context, device = ctypes.c_void_p(), ctypes.c_int()
        self._cu("cuDeviceGet", ctypes.byref(device), 0)
        self._cu("cuDevicePrimaryCtxRetain", ctypes.byref(context), device)
        self._cu("cuCtxSetCurrent", context)
        self.module = ctypes.c_void_p()
        self._cu("cuModuleLoadData", ctypes.byref(self.module), ptx)

    def _cu(self, name, *args):
        status = getattr(self.driver, name)(*args)
        if status != 0:
            text = ctypes.c_char_p()
            self.driver.cuGetErrorString(status, ctypes.byref(text))
            raise AssertionError(f"{name} returned {status}: {text.value.decode() if text.value else '?'}")

    def launch(self, kernel, count, *arguments, block=128):
        """kernel<<<⌈count/block⌉, block, 0, torch's current stream>>>(arguments); tensors are
        passed as device pointers, ctypes scalars as they are. Waits for the stream."""
        function = ctypes.c_void_p()
        self._cu("cuModuleGetFunction", ctypes.byref(function), self.module, kernel.encode())
        values = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in arguments]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        grid = (count + block - 1) // block
        self._cu("cuLaunchKernel", function, ctypes.c_uint(grid), ctypes.c_uint(1), ctypes.c_uint(1),
                 ctypes.c_uint(block), ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(0), stream, pointers, None)
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def module():
    return Module()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).cuda()


def empty_like(x):
    return torch.full_like(x, float("nan"))


def test_scale_hadamard_and_add(module):
    a, b = randn(1000, 3, seed=1), randn(1000, 3, seed=2)
    out = empty_like(a)
    module.launch("lycoris_scale", a.numel(), out, a, F(0.75), U64(a.numel()))
    torch.testing.assert_close(out, a * 0.75, rtol=0, atol=0)
    module.launch("lycoris_hadamard", a.numel(), out, a, b, F(0.5), U64(a.numel()), block=96)
    torch.testing.assert_close(out, 0.5 * a * b, rtol=1e-6, atol=0)
    module.launch("lycoris_add", a.numel(), out, a, b, F(-2), U64(a.numel()), block=96)
    torch.testing.assert_close(out, a - 2 * b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b_shape", [(4, 5, 3, 3), (4, 5)])
def test_kronecker(module, b_shape):
    a, b = randn(3, 2, seed=3), randn(*b_shape, seed=4)
    expected = 1.5 * torch.kron(a.view(3, 2, *([1] * (len(b_shape) - 2))), b)
    out = empty_like(expected)
    k = b[0, 0].numel()
    module.launch("lycoris_kronecker", out.numel(), out, a, b, F(1.5), U64(3), U64(2), U64(b_shape[0]),
                  U64(b_shape[1]), U64(k), block=32)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)


def test_channel_scale_rows_and_columns(module):
    w0, rows, columns = randn(4, 3, 2, 2, seed=5), randn(4, seed=6), randn(3, seed=7)
    out = empty_like(w0)
    module.launch("lycoris_channel_scale", w0.numel(), out, w0, rows, F(0), F(0.5), U64(12), U64(4), U64(w0.numel()))
    torch.testing.assert_close(out, w0 * (0.5 * rows.view(4, 1, 1, 1)), rtol=1e-6, atol=0)
    module.launch("lycoris_channel_scale", w0.numel(), out, w0, columns, F(1), F(0.25), U64(4), U64(3), U64(w0.numel()))
    torch.testing.assert_close(out, w0 * (1 + 0.25 * columns.view(1, 3, 1, 1)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("parts", [1, 3, 64])
def test_channel_dot_rows_columns_and_whole(module, parts):
    """The two-launch reduction: per-channel parts in double, then their sums times s."""
    a, b = randn(40, 30, 3, 3, seed=14), randn(40, 30, 3, 3, seed=15)
    product = (a.double() * b.double())

    def reduced(s, stride, channels):
        partials = torch.full((channels * parts,), float("nan"), dtype=torch.float64, device="cuda")
        module.launch("lycoris_channel_dot_parts", channels * parts, partials, a, b, U64(stride), U64(channels),
                      U64(a.numel()), U64(parts), block=64)
        out = torch.full((channels,), float("nan"), device="cuda")
        module.launch("lycoris_sum_parts", channels, out, partials, F(s), U64(channels), U64(parts), block=16)
        return out

    torch.testing.assert_close(reduced(2, 270, 40), (2 * product.sum((1, 2, 3))).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reduced(1, 9, 30), product.sum((0, 2, 3)).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reduced(0.5, 1, 1), (0.5 * product.sum()).float().view(1), rtol=1e-6, atol=1e-6)


def test_norm_affine_layer_and_group(module):
    x, w = randn(5, 2, 3, seed=8) * 3, randn(2, 3, seed=9)
    out = empty_like(x)
    module.launch("lycoris_norm_affine", 5, out, x, w, U64(5), U64(6), U64(1), U64(6), DOUBLE(1e-5), block=2)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (2, 3), eps=1e-5) * w, rtol=1e-4, atol=1e-6)
    y, v = randn(3, 4, 2, 3, seed=10), randn(4, seed=11)
    out = empty_like(y)
    module.launch("lycoris_norm_affine", 6, out, y, v, U64(6), U64(12), U64(6), U64(4), DOUBLE(1e-6), block=4)
    expected = torch.nn.functional.group_norm(y, 2, eps=1e-6) * v.view(1, 4, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def test_transpose_and_column_copy(module):
    x = randn(3, 40, 50, 2, seed=12)
    out = torch.empty(3, 50, 40, 2, device="cuda")
    module.launch("lycoris_transpose", x.numel(), out, x, U64(3), U64(40), U64(50), U64(2))
    assert torch.equal(out, x.transpose(1, 2))
    up = randn(6, 8, seed=13)
    out = torch.empty(6, 3, device="cuda")
    module.launch("lycoris_column_copy", out.numel(), out, up, U64(6), U64(3), U64(3), U64(0), U64(8), U64(2), block=7)
    assert torch.equal(out, up[:, 2:5])
    placed = torch.zeros(6, 8, device="cuda")
    module.launch("lycoris_column_copy", out.numel(), placed, out, U64(6), U64(3), U64(8), U64(2), U64(3), U64(0), block=7)
    expected = torch.zeros(6, 8, device="cuda")
    expected[:, 2:5] = up[:, 2:5]
    assert torch.equal(placed, expected)


def test_dropout_mask_from_philox(module):
    n, p = 100_000, 0.5
    mask = torch.empty(n, device="cuda")
    module.launch("lycoris_dropout_mask", n, mask, F(p), U64(n), U64(0), U64(0), block=256)
    # Elements 0-3 of seed 0 are Philox4x32-10's first known answer (Random123's kat_vectors):
    # uniforms 0.399, 0.881, 0.736, 0.606, so the mask starts 0, 2, 2, 2.
    words = torch.tensor([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], dtype=torch.float64) / 2**32
    expected = torch.where(words >= p, 1 / (1 - p), 0.0).float()
    torch.testing.assert_close(mask[:4].cpu(), expected, rtol=1e-6, atol=0)
    assert abs((mask == 0).float().mean().item() - p) < 0.01
    narrow = torch.empty(n, device="cuda")
    module.launch("lycoris_dropout_mask", n, narrow, F(p), U64(n), U64(0), U64(0), block=7)
    assert torch.equal(mask, narrow), "the mask depends on the launch shape"
