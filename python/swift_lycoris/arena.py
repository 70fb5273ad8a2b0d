"""The shared-memory arena, client side: the server creates the file (and unlinks it when
the session ends); this maps it and lays out each call's tensors in it.

Layout is per call: :meth:`Arena.begin` starts an empty layout, :meth:`Arena.put` copies a
tensor in and returns its descriptor, :meth:`Arena.reserve` sets aside room for an output.
The server reads inputs and writes outputs during the call; outputs are copied out right
after it, so the next call may reuse the space.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2)}
_TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ALIGN = 64


def wire_dtype(dtype: torch.dtype) -> str:
    """The wire name of a torch float dtype (others travel as F32)."""
    return _DTYPES.get(dtype, ("F32", 4))[0]


class Arena:
    def __init__(self, server, size: int = 64 << 20):
        self._server = server
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
        del self._bytes
        self._mmap.close()
        self._map(self._server.call("arena.resize", {"size": new_size}))

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

    def take(self, descriptor: dict) -> torch.Tensor:
        """A copy (CPU) of the tensor the server described."""
        return self.view(descriptor["offset"], tuple(descriptor["shape"]), _TORCH[descriptor["dtype"]]).clone()

    def take_many(self, descriptors: list[dict]) -> list[torch.Tensor]:
        """Copies (CPU) of the tensors the server described, made with one copy of the span
        they lie in; each is a view of that copy."""
        if not descriptors:
            return []
        ends = [d["offset"] + math.prod(int(e) for e in d["shape"]) * _DTYPES[_TORCH[d["dtype"]]][1]
                for d in descriptors]
        low = min(d["offset"] for d in descriptors)
        span = self._bytes[low: max(ends)].clone()
        return [span[d["offset"] - low: end - low].view(_TORCH[d["dtype"]]).view(tuple(d["shape"]))
                for d, end in zip(descriptors, ends)]

    def close(self) -> None:
        if getattr(self, "_mmap", None) is not None:
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
