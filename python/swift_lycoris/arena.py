"""The shared-memory arena, client side: the server creates the file (and unlinks it when
the session ends); this maps it and lays out each call's tensors in it.

Layout is per call: :meth:`Arena.begin` starts an empty layout, :meth:`Arena.put` copies a
tensor in and returns its descriptor, :meth:`Arena.reserve` sets aside room for an output.
The server reads inputs and writes outputs during the call; outputs are copied out right
after it, so the next call may reuse the space.

CUDA tensors: the first one to cross page-locks the mapping (``cudaHostRegister``), so the
shared memory itself is the pinned staging buffer: a device tensor is copied by DMA straight
into the arena (several at once are concatenated on the device first: one copy), and
outputs are copied by DMA straight from the arena to the device. Copies are synchronous:
the arena is reused by the next call. Where registering fails, copies still work, through
pageable memory (a warning says so).
"""

from __future__ import annotations

import logging
import math
import mmap
import os

import torch

log = logging.getLogger("swift_lycoris")

_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2)}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ALIGN = 64


def wire_dtype(dtype: torch.dtype) -> str:
    """The wire name of a torch float dtype (others travel as F32)."""
    return _DTYPES.get(dtype, ("F32", 4))[0]


class Arena:
    def __init__(self, server, size: int = 64 << 20):
        self._server = server
        self._pinned = False
        self._pinning_failed = False
        created = server.call("arena.create", {"size": size})
        self._map(created)
        self._used = 0

    def _map(self, described: dict) -> None:
        self.path = described["path"]
        self.size = described["size"]
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def ensure(self, size: int) -> None:
        """Grows the arena (server and mapping) to hold at least `size` bytes."""
        if size <= self.size:
            return
        new_size = max(size, self.size * 2)
        self._unpin()
        del self._bytes
        self._mmap.close()
        self._map(self._server.call("arena.resize", {"size": new_size}))

    def _pin_for(self, device: torch.device) -> None:
        """Page-locks the mapping the first time a CUDA tensor crosses (see the module doc)."""
        if device.type != "cuda" or self._pinned or self._pinning_failed:
            return
        try:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self._bytes.data_ptr(), self.size, 0))
            self._pinned = True
        except Exception as error:  # noqa: BLE001 — any failure leaves pageable copies, which work
            self._pinning_failed = True
            log.warning("swift_lycoris: could not page-lock the arena for CUDA copies (%s); copying through "
                        "pageable memory", error)

    def _unpin(self) -> None:
        if self._pinned:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self._bytes.data_ptr()))
            self._pinned = False

    def begin(self) -> None:
        self._used = 0

    def _allocate(self, nbytes: int) -> int:
        offset = (self._used + _ALIGN - 1) // _ALIGN * _ALIGN
        self._used = offset + nbytes
        return offset

    def plan(self, byte_counts: list[int]) -> None:
        """Grows the arena beforehand so one call's tensors all fit."""
        total = sum((n + _ALIGN - 1) // _ALIGN * _ALIGN for n in byte_counts)
        self.ensure(total)

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        itemsize = _DTYPES[dtype][1]
        count = math.prod(int(extent) for extent in shape)
        return self._bytes[offset: offset + count * itemsize].view(dtype).view(tuple(shape))

    def put(self, tensor: torch.Tensor) -> dict:
        """Copies `tensor` (any device; non-float dtypes as F32) into the arena."""
        if tensor.dtype not in _DTYPES:
            tensor = tensor.float()
        self._pin_for(tensor.device)
        name, itemsize = _DTYPES[tensor.dtype]
        offset = self._allocate(tensor.numel() * itemsize)
        self.view(offset, tuple(tensor.shape), tensor.dtype).copy_(tensor.detach())
        return {"dtype": name, "shape": list(tensor.shape), "offset": offset}

    def put_many(self, tensors: list[torch.Tensor]) -> list[dict]:
        """Copies `tensors` (any device and dtype) as F32, packed one after another, in one
        copy (many small parameters cost one torch call, not one each)."""
        counts = [t.numel() for t in tensors]
        start = self._allocate(4 * sum(counts))
        packed = self.view(start, (sum(counts),), torch.float32)
        devices = {t.device for t in tensors}
        if len(devices) == 1 and next(iter(devices)).type != "cpu":
            # Concatenated on the device, then one copy into the (pinned) arena.
            self._pin_for(next(iter(devices)))
            packed.copy_(torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]))
        else:
            torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors], out=packed)
        descriptors, offset = [], start
        for tensor, count in zip(tensors, counts):
            descriptors.append({"dtype": "F32", "shape": list(tensor.shape), "offset": offset})
            offset += 4 * count
        return descriptors

    def reserve(self, shape, dtype: torch.dtype) -> dict:
        """Room for an output of `shape` in `dtype`; returns the output spec."""
        name, itemsize = _DTYPES[dtype]
        count = math.prod(int(extent) for extent in shape)
        return {"offset": self._allocate(count * itemsize), "dtype": name}

    def take(self, descriptor: dict, device: torch.device | None = None) -> torch.Tensor:
        """A copy of the tensor the server described, on `device` (default CPU)."""
        return self._copy_out(self.view(descriptor["offset"], tuple(descriptor["shape"]), _TORCH[descriptor["dtype"]]),
                              device)

    def _copy_out(self, view: torch.Tensor, device: torch.device | None) -> torch.Tensor:
        if device is None or device.type == "cpu":
            return view.clone()
        self._pin_for(device)
        return torch.empty(view.shape, dtype=view.dtype, device=device).copy_(view)

    def take_many(self, descriptors: list[dict], device: torch.device | None = None) -> list[torch.Tensor]:
        """Copies of the tensors the server described, on `device` (default CPU), made with
        one copy of the span they lie in; each is a view of that copy."""
        if not descriptors:
            return []
        ends = [d["offset"] + math.prod(int(e) for e in d["shape"]) * _DTYPES[_TORCH[d["dtype"]]][1]
                for d in descriptors]
        low = min(d["offset"] for d in descriptors)
        span = self._copy_out(self._bytes[low: max(ends)], device)
        return [span[d["offset"] - low: end - low].view(_TORCH[d["dtype"]]).view(tuple(d["shape"]))
                for d, end in zip(descriptors, ends)]

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
            self._unpin()
            del self._bytes
            self._mmap.close()
            self._mmap = None

    def remove_if_left(self) -> None:
        """Unlinks the arena file once its server has ended: a server that shut down removed
        it already; one killed outright (SIGKILL, a crash) could not (the name carries the
        server's pid and a random tag, so it is no other server's)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
