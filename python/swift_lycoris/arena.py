"""The shared-memory arena, client side: the server creates the file (and unlinks it when
the session ends); this maps it and lays out each call's tensors in it.

Space is handed out in blocks (64-byte aligned; first fit, freed blocks merged with their
free neighbours, so the arena stays about as large as what is alive at once plus one call):

- a call's scratch: :meth:`Arena.begin` gives back the previous call's, :meth:`Arena.put`
  copies a tensor in (a CPU tensor that already lies in the arena is not copied: its own
  offset is sent) and :meth:`Arena.reserve` sets aside room for an output copied out after
  the call (:meth:`Arena.take`);
- outputs the server writes straight into the tensor torch gets (:meth:`Arena.output`): the
  tensor is a view of its block, which returns to the free list when the tensor's storage
  is freed (the last view gone) — no copy out.

The arena grows (server ``arena.resize``, mapped again) when a block does not fit; tensors
on an earlier mapping stay valid (the file only grows; an old mapping is unmapped when its
last tensor goes).

CUDA tensors: the first one to cross page-locks the mapping (``cudaHostRegister``), so the
shared memory itself is the pinned staging buffer: a device tensor is copied by DMA straight
into the arena (several at once are concatenated on the device first: one copy), and
outputs are copied by DMA straight from the arena to the device. Copies are synchronous:
the arena is reused by the next call. Where registering fails, copies still work, through
pageable memory (a warning says so).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import mmap
import os
import weakref

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
        self._top = 0  # end of the blocks handed out so far
        self._free: list[tuple[int, int]] = []  # free (offset, size) below _top, by offset, merged
        self._scratch: list[tuple[int, int]] = []  # this call's scratch blocks
        self._returned: list[tuple[int, int]] = []  # output blocks whose storage was freed

    def _map(self, described: dict) -> None:
        self.path = described["path"]
        self.size = described["size"]
        fd = os.open(self.path, os.O_RDWR)
        try:
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self._bytes = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._base = self._bytes.data_ptr()

    def ensure(self, size: int) -> None:
        """Grows the arena (server and mapping) to hold at least `size` bytes."""
        if size <= self.size:
            return
        new_size = max(size, self.size * 2)
        self._unpin()
        # The old mapping is not closed: tensors may view it (outputs, views of _bytes); it is
        # unmapped when the last of them goes.
        self._bytes = self._mmap = None
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
        """Starts a call's layout: the previous call's scratch blocks are free again."""
        for offset, size in self._scratch:
            self._give_back(offset, size)
        self._scratch.clear()

    def _block(self, nbytes: int) -> tuple[int, int]:
        """(offset, size) of the first free block that holds `nbytes` (first fit by offset),
        else from the top, growing the arena if needed."""
        while self._returned:
            self._give_back(*self._returned.pop())
        size = (max(nbytes, 1) + _ALIGN - 1) // _ALIGN * _ALIGN
        for index, (offset, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, length - size)
                return offset, size
        offset = self._top
        self.ensure(offset + size)
        self._top = offset + size
        return offset, size

    def _give_back(self, offset: int, size: int) -> None:
        """Frees a block, merged with free neighbours; a free run that reaches the top lowers
        it (so with nothing alive the layout starts again at 0)."""
        free = self._free
        index = bisect.bisect_left(free, (offset, 0))
        if index > 0 and free[index - 1][0] + free[index - 1][1] == offset:
            index -= 1
            offset, size = free[index][0], free[index][1] + size
            del free[index]
        if index < len(free) and offset + size == free[index][0]:
            size += free[index][1]
            del free[index]
        if offset + size == self._top:
            self._top = offset
        else:
            free.insert(index, (offset, size))

    def _allocate(self, nbytes: int) -> int:
        offset, size = self._block(nbytes)
        self._scratch.append((offset, size))
        return offset

    def plan(self, byte_counts: list[int]) -> None:
        """Grows the arena beforehand so one call's new blocks fit without a remap midway."""
        total = sum((n + _ALIGN - 1) // _ALIGN * _ALIGN for n in byte_counts)
        self.ensure(self._top + total)

    def locate(self, tensor: torch.Tensor) -> dict | None:
        """The descriptor of a contiguous CPU tensor that lies in the current mapping (an
        output of an earlier call, still alive, so its block is not handed out): sent as it
        is, not copied. None for any other tensor."""
        if tensor.device.type != "cpu" or tensor.dtype not in _DTYPES or not tensor.is_contiguous():
            return None
        name, itemsize = _DTYPES[tensor.dtype]
        offset = tensor.data_ptr() - self._base
        if offset < 0 or offset + tensor.numel() * itemsize > self.size or tensor.numel() == 0:
            return None
        return {"dtype": name, "shape": list(tensor.shape), "offset": offset}

    def output(self, shape, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
        """(output spec, tensor): a block for an output the server writes, and the CPU tensor
        that views it — the call's result, with no copy out. The block is reused only once
        the tensor's storage is freed."""
        name, itemsize = _DTYPES[dtype]
        count = math.prod(shape)
        if count == 0:
            return self.reserve(shape, dtype), torch.empty(tuple(shape), dtype=dtype)
        offset, size = self._block(count * itemsize)
        block = (ctypes.c_char * size).from_buffer(self._mmap, offset)
        # Queued, not freed here: a finalizer may run (garbage collection) inside _block.
        weakref.finalize(block, self._returned.append, (offset, size))
        tensor = torch.frombuffer(block, dtype=dtype, count=count).view(tuple(shape))
        return {"offset": offset, "dtype": name}, tensor

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        itemsize = _DTYPES[dtype][1]
        count = math.prod(int(extent) for extent in shape)
        return self._bytes[offset: offset + count * itemsize].view(dtype).view(tuple(shape))

    def put(self, tensor: torch.Tensor) -> dict:
        """Copies `tensor` (any device; non-float dtypes as F32) into the arena."""
        if tensor.dtype not in _DTYPES:
            tensor = tensor.float()
        located = self.locate(tensor)
        if located is not None:
            return located
        name, itemsize = _DTYPES[tensor.dtype]
        nbytes = tensor.numel() * itemsize
        offset = self._allocate(nbytes)
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            # One memmove on this thread, whatever the size (tens of GB/s: 0.1 ms for 5 MB).
            # torch's copy_ would split a large one over its OpenMP team, whose workers then
            # spin for milliseconds — taking the cores the server is about to compute on —
            # and which waits for a worker to get a core when the machine is busy.
            ctypes.memmove(self._base + offset, tensor.data_ptr(), nbytes)
        else:
            self._pin_for(tensor.device)
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
            # One memmove, as in put (views of the arena's bytes are contiguous).
            copy = torch.empty(view.shape, dtype=view.dtype)
            ctypes.memmove(copy.data_ptr(), view.data_ptr(), view.numel() * view.element_size())
            return copy
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
            self._bytes = None
            try:
                self._mmap.close()
            except BufferError:
                pass  # output tensors still view it: unmapped when the last one goes
            self._mmap = None

    def remove_if_left(self) -> None:
        """Unlinks the arena file once its server has ended: a server that shut down removed
        it already; one killed outright (SIGKILL, a crash) could not (the name carries the
        server's pid and a random tag, so it is no other server's)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
