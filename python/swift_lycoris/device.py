"""The device path (issue 8): adapters on a GPU computed by the server on that GPU, with no
tensor element crossing host memory (protocol/README.md §5.3 and §9.7).

torch owns every tensor: the adapter Parameters (its optimizer, clipping, DDP unchanged),
one flat buffer for every module's m·ΔW, one for every ∂(m·ΔW) and one for every
∂parameter. The server maps them once (``network.bind``; CUDA IPC handles of torch's
allocations, or files standing in for them on the emulated test device) and reads and
writes them in place. A training step is two calls for the whole network:

- forward: :class:`DeviceDeltaFunction` (inputs: every adapter Parameter; outputs: every
  module's m·ΔW, views of the ΔW buffer) makes one ``network.delta_weights`` call; each
  layer then runs op(x, W0 + m·ΔW) in torch. The ΔWs are computed again only when a
  Parameter's version counter moved (an optimizer step), after a backward consumed them, or
  when the multiplier or mode changed;
- backward: the Function receives every ∂ΔW at once, packs them into the ∂ΔW buffer (one
  fused copy) and makes one ``network.delta_weights_backward`` call, which writes every
  ∂parameter; autograd accumulates them into ``.grad``.

Stream ordering: before each call the client synchronizes torch's current stream (its
queued work on the buffers is done); the server synchronizes its own before answering.

:func:`choose` decides, at a network's first adapted forward, whether it takes this path:
``device="auto"`` (default) takes it when the layers are on a CUDA device and the server
computes there, and otherwise keeps the arena path — with one INFO line saying why when a
CUDA device was refused. ``SWIFT_LYCORIS_DEVICE`` (``cpu``, ``auto``, ``cuda``,
``cuda:N``, ``emulated``) overrides the argument.

On the device path the server does not look for NaN or ±∞ (that would cost a pass over
every buffer); ``nan_policy`` applies to the arena path only. DDP: each rank's network has
its own server and takes the device its layers are on (``cuda:<rank's index>``).

NOT YET RUN ON A GPU: the CUDA half (:class:`CUDAIPCMemory`) follows torch's and NVIDIA's
documentation; the emulated device runs everything else in CI
(python/tests/test_device_emulated.py).
"""

from __future__ import annotations

import base64
import logging
import math
import mmap
import os
import secrets

import torch

from .server import ServerError

log = logging.getLogger("swift_lycoris")

ENVIRONMENT = "SWIFT_LYCORIS_DEVICE"
_CHOICES = ("auto", "cpu", "emulated")


def requested_device(argument: str) -> str:
    """The device a network asks for: ``$SWIFT_LYCORIS_DEVICE`` when set, else `argument`;
    ``auto``, ``cpu``, ``emulated``, ``cuda`` or ``cuda:N`` (ValueError otherwise)."""
    value = os.environ.get(ENVIRONMENT) or argument
    if value in _CHOICES or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"device must be auto, cpu, cuda, cuda:N or emulated, not {value!r}"
                     + (f" (from ${ENVIRONMENT})" if os.environ.get(ENVIRONMENT) else ""))


def _encode_handle(raw: bytes) -> str:
    if len(raw) != 64:
        raise ValueError(f"a device handle has 64 bytes, not {len(raw)}")
    return base64.b64encode(raw).decode()


def _check_tensor(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype != torch.float32 or not tensor.is_contiguous():
        raise ValueError(f"{what} must be a contiguous float32 tensor for the device path, "
                         f"not {tensor.dtype}{'' if tensor.is_contiguous() else ' (non-contiguous)'}")


class CUDAIPCMemory:
    """torch's CUDA memory shared with the server by CUDA IPC. Each storage is shared once
    (``untyped_storage()._share_cuda_()``: the 64-byte handle of the allocation holding it
    and its offset there) and kept alive, with torch's IPC reference count held, until
    :meth:`release` — after the server closed its mappings (``device.release``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.name = f"cuda:{device.index}"
        # storage data_ptr → (handle, storage offset in the allocation, ref counter, storage)
        self._shared: dict[int, tuple[str, int, bytes, int, torch.UntypedStorage]] = {}

    def allocate(self, count: int) -> torch.Tensor:
        return torch.empty(max(1, count), dtype=torch.float32, device=self.device)

    def reference(self, tensor: torch.Tensor, what: str) -> dict:
        _check_tensor(tensor, what)
        if tensor.device != self.device:
            raise ValueError(f"{what} is on {tensor.device}, not {self.device}")
        storage = tensor.untyped_storage()
        shared = self._shared.get(storage.data_ptr())
        if shared is None:
            _, handle, _, offset, counter, counter_offset, _, _ = storage._share_cuda_()
            shared = (_encode_handle(handle), offset, counter, counter_offset, storage)
            self._shared[storage.data_ptr()] = shared
        return {"dtype": "F32", "shape": list(tensor.shape),
                "cuda_ipc": {"handle": shared[0], "offset": shared[1] + tensor.storage_offset() * 4}}

    def synchronize(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()

    def release(self, server) -> None:
        """Closes the server's mappings, then gives torch back its IPC reference counts."""
        handles = sorted({shared[0] for shared in self._shared.values()})
        try:
            if handles:
                server.call("device.release", {"handles": handles})
        finally:  # a dead server holds nothing open any more
            for _, _, counter, counter_offset, _ in self._shared.values():
                torch.UntypedStorage._release_ipc_counter(counter, counter_offset, device=self.device)
            self._shared.clear()


class EmulatedMemory:
    """The emulated device's memory (a test device, protocol/README.md §5.3): each
    allocation is a file ``lycoris-emulated-…`` in the server's arena directory, mapped here
    and by the server; its handle is the file name, zero-padded to 64 bytes."""

    name = "emulated"

    def __init__(self, directory: str):
        self.directory = directory
        # (base address, bytes, handle, path, flat float32 view)
        self._allocations: list[tuple[int, int, str, str, torch.Tensor]] = []

    def allocate(self, count: int) -> torch.Tensor:
        name = f"lycoris-emulated-{os.getpid()}-{len(self._allocations)}-{secrets.token_hex(4)}"
        path = os.path.join(self.directory, name)
        size = 4 * max(1, count)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        flat = torch.frombuffer(mapping, dtype=torch.float32)
        self._allocations.append((flat.data_ptr(), size, _encode_handle(name.encode().ljust(64, b"\0")), path, flat))
        return flat

    def contains(self, tensor: torch.Tensor) -> bool:
        return any(base <= tensor.data_ptr() < base + size for base, size, *_ in self._allocations)

    def reference(self, tensor: torch.Tensor, what: str) -> dict:
        _check_tensor(tensor, what)
        address = tensor.data_ptr()
        for base, size, handle, _, _ in self._allocations:
            if base <= address < base + size:
                return {"dtype": "F32", "shape": list(tensor.shape), "cuda_ipc": {"handle": handle, "offset": address - base}}
        raise ValueError(f"{what} is not in emulated device memory")

    def synchronize(self) -> None:
        pass

    def release(self, server) -> None:
        """Closes the server's mappings and removes the files (the memory lives on while a
        tensor still views it)."""
        try:
            if self._allocations:
                server.call("device.release", {"handles": [handle for _, _, handle, _, _ in self._allocations]})
        finally:
            for *_, path, _ in self._allocations:
                os.unlink(path)
            self._allocations.clear()


class DevicePath:
    """One network's device state: the buffers, the binding and the step's ΔWs.

    Per adapted call only the called module's Parameters are looked at (their version
    counters and storages: a handful of attributes, not the whole network's), so the
    bookkeeping of a step stays O(parameters); an optimizer step changes every Parameter,
    and the first module called after it notices. The references of the fixed buffers are
    built once, at bind."""

    def __init__(self, network, memory):
        from .network import is_norm_layer, needs_base_weight  # (network imports this module)

        self.network, self.memory = network, memory
        self.names = list(network.modules_info)
        self.parameters = [p for name in self.names for p in network._module_parameters(name)]
        self.keys = [key for name in self.names for key in network._keys_of[name]]
        counts = [len(network._keys_of[name]) for name in self.names]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        # Per module: its position among the outputs, and its Parameters' positions.
        self.index = {name: i for i, name in enumerate(self.names)}
        self.positions = {name: range(start, start + count) for name, start, count in zip(self.names, starts, counts)}
        shapes = [tuple(network._targets[name].weight.shape) for name in self.names]
        # Modules that adapt the bias too (norm on a layer with a bias, Full's diff_b): their
        # m·Δb are outputs after every ΔW; a norm's has W0's shape, Full's (out,).
        self.biased = [name for name in self.names if name in network._bias_deltas]
        bias_shapes = [shapes[self.index[n]] if is_norm_layer(network._targets[n]) else shapes[self.index[n]][:1]
                       for n in self.biased]
        self.bias_index = {name: len(self.names) + i for i, name in enumerate(self.biased)}
        self.deltas = _views(memory.allocate(sum(math.prod(s) for s in shapes + bias_shapes)), shapes + bias_shapes)
        self.grad_deltas = _views(memory.allocate(sum(math.prod(s) for s in shapes + bias_shapes)), shapes + bias_shapes)
        # Modules whose ΔW reads the layer's weight (of those the device computes: IA3, GLoRA) bind it.
        self.base_weight_modules = [n for n in self.names if needs_base_weight(network.modules_info[n]["algorithm"], {})]
        self._grad_flat = memory.allocate(sum(p.numel() for p in self.parameters))
        self._parameter_shapes = [tuple(p.shape) for p in self.parameters]
        self.grads = _views(self._grad_flat, self._parameter_shapes)
        names = self.names + self.biased
        self._delta_refs = [memory.reference(d, f"Δ of {name}") for name, d in zip(names, self.deltas)]
        self._grad_delta_refs = [memory.reference(g, f"∂Δ of {name}") for name, g in zip(names, self.grad_deltas)]
        self._bound: list[int] | None = None
        # The Function's outputs of this step (None once a backward consumed them), and the
        # Parameters' versions the ΔW buffer was computed from (None: stale).
        self.outputs: tuple[torch.Tensor, ...] | None = None
        self._versions: list[int] | None = None

    def bind(self) -> None:
        """Binds every Parameter and gradient buffer (again when a Parameter's storage
        changed, e.g. ``load_state_dict(assign=True)``). On the emulated device the
        Parameters move into its memory first, as ``.to("cuda")`` would move them."""
        weights = [self.network._targets[n].weight for n in self.base_weight_modules]
        if isinstance(self.memory, EmulatedMemory):
            for group in (self.parameters, weights):
                if not all(self.memory.contains(p) for p in group):
                    flat = self.memory.allocate(sum(p.numel() for p in group))
                    for tensor, view in zip(group, _views(flat, [tuple(p.shape) for p in group])):
                        view.copy_(tensor.detach())
                        tensor.data = view
        self.network.server.call("network.bind", {
            "device": self.memory.name,
            "parameters": {key: self.memory.reference(p.detach(), f"parameter {key}") for key, p in zip(self.keys, self.parameters)},
            "gradients": {key: self.memory.reference(g, f"gradient buffer of {key}") for key, g in zip(self.keys, self.grads)},
            "base_weights": {n: self.memory.reference(w.detach(), f"the weight of layer {n}")
                             for n, w in zip(self.base_weight_modules, weights)},
        })
        self._bound = [p.data_ptr() for p in self.parameters]
        self.invalidate()

    def invalidate(self) -> None:
        """The next request computes the ΔWs again (multiplier or values changed)."""
        self.outputs = None
        self._versions = None

    def delta(self, name: str) -> tuple[torch.Tensor, ...]:
        """(m·ΔW,) or (m·ΔW, m·Δb) of module `name` for this call: outputs of the network's
        :class:`DeviceDeltaFunction` when a graph will be built, else a plain computation;
        either is shared by every module until the parameters change or a backward
        consumed it."""
        own = self.positions[name]
        parameters = self.parameters
        if any(parameters[i].data_ptr() != self._bound[i] for i in own):
            self.bind()
        if self._versions is not None and any(parameters[i]._version != self._versions[i] for i in own):
            self.invalidate()
        if torch.is_grad_enabled() and any(parameters[i].requires_grad for i in own):
            if self.outputs is None:
                self.outputs = DeviceDeltaFunction.apply(self, *parameters)
                self._versions = [p._version for p in parameters]
            return self._of(self.outputs, name)
        # No graph (evaluation, or a gradient-checkpointed segment's first pass): the
        # buffer's values, computed once for these parameter values.
        if self._versions is None:
            self.compute()
            self._versions = [p._version for p in parameters]
        return self._of(self.deltas, name)

    def _of(self, outputs, name: str) -> tuple[torch.Tensor, ...]:
        if name in self.bias_index:
            return outputs[self.index[name]], outputs[self.bias_index[name]]
        return (outputs[self.index[name]],)

    def compute(self) -> None:
        """Every module's m·ΔW into the ΔW buffer (one call)."""
        self.memory.synchronize()
        count = len(self.names)
        self.network.server.call("network.delta_weights", {
            "outputs": dict(zip(self.names, self._delta_refs[:count])),
            "bias_outputs": dict(zip(self.biased, self._delta_refs[count:]))})

    def backward(self, grad_deltas: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        """Every ∂parameter from the ∂ΔWs that arrived (one call); None for the Parameters
        of modules whose ΔW received no gradient."""
        count = len(self.names)
        arrived = [i for i, g in enumerate(grad_deltas) if g is not None]
        used = sorted({i if i < count else self.index[self.biased[i - count]] for i in arrived})
        result: list[torch.Tensor | None] = [None] * len(self.parameters)
        if not used:
            return result
        torch._foreach_copy_([self.grad_deltas[i] for i in arrived], [grad_deltas[i].float() for i in arrived])
        for i in used:
            if grad_deltas[i] is None:  # only its Δb was used
                self.grad_deltas[i].zero_()
        self.memory.synchronize()
        self.network.server.call("network.delta_weights_backward", {
            "grads": {self.names[i]: self._grad_delta_refs[i] for i in used},
            "bias_grads": {self.biased[i - count]: self._grad_delta_refs[i] for i in arrived if i >= count}})
        # A copy: the buffer is overwritten by the next backward, .grad must not be.
        grads = _views(self._grad_flat.clone(), self._parameter_shapes)
        for i in used:
            for position in self.positions[self.names[i]]:
                result[position] = grads[position].to(self.parameters[position].dtype)
        return result

    def release(self) -> None:
        self.outputs = None
        self.memory.release(self.network.server)


class DeviceDeltaFunction(torch.autograd.Function):
    """Every module's m·ΔW from every adapter Parameter, in one server call each way (see
    the module doc). Outputs are views of the network's ΔW buffer; the backward reads no
    output (the server reads the bound Parameters)."""

    @staticmethod
    def forward(ctx, path: DevicePath, *parameters):
        path.compute()
        ctx.path = path
        ctx.set_materialize_grads(False)
        # Fresh view objects: autograd attaches this node to the outputs it is given.
        return tuple(d.view(d.shape) for d in path.deltas)

    @staticmethod
    def backward(ctx, *grad_deltas):
        path = ctx.path
        grads = path.backward(grad_deltas)
        # Consumed: the next forward (the next micro-batch) computes and records anew.
        path.outputs = None
        return (None, *grads)


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    views, start = [], 0
    for shape in shapes:
        count = math.prod(shape)
        views.append(flat[start: start + count].view(shape))
        start += count
    return views


def choose(network, layer: torch.nn.Module) -> DevicePath | None:
    """The device path for `network`, or None for the arena path: see the module doc.
    Decided once, at the network's first adapted forward."""
    request = network.device_request
    if request == "cpu":
        return None
    if request == "emulated":
        memory = EmulatedMemory(network.server.info["capabilities"]["arena"]["directory"])
    else:
        weight = layer.weight
        if request == "auto" and weight.device.type != "cuda":
            return None
        target = torch.device(request if request != "auto" else f"cuda:{weight.device.index or 0}")
        if target.index is None:
            target = torch.device("cuda", 0)
        reason = _cuda_refusal(network, target)
        if reason is not None:
            log.info("swift_lycoris: the adapters stay on the arena path: %s", reason)
            return None
        memory = CUDAIPCMemory(target)
    try:
        path = DevicePath(network, memory)
        path.bind()
    except (ServerError, ValueError, RuntimeError) as error:
        # RuntimeError: torch could not share a storage by CUDA IPC (e.g. memory from
        # expandable segments, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True).
        message = str(error).split(": ", 1)[-1] if isinstance(error, ServerError) else str(error)
        log.info("swift_lycoris: the adapters stay on the arena path: %s", message)
        try:
            memory.release(network.server)
        except ServerError:
            pass
        return None
    log.info("swift_lycoris: the adapters compute on %s (device path: two server calls per step)", memory.name)
    return path


def _cuda_refusal(network, target: torch.device) -> str | None:
    """Why `target` cannot take the device path before anything is allocated, or None:
    the server's CUDA probe (run now if it was not), the Parameters' device and dtype."""
    from .cuda_libraries import torch_library_dirs

    capabilities = network.server.info["capabilities"]
    if "cuda" not in capabilities:
        network.server.info = network.server.call("initialize", {
            "client": "swift_lycoris", "protocol_version": "1.0", "cuda": {"library_dirs": torch_library_dirs()}})
        capabilities = network.server.info["capabilities"]
    report = capabilities["cuda"]
    if report["state"] != "available":
        return f"the server's CUDA is unavailable: {report.get('reason')}"
    for parameter in network.parameters():
        if parameter.device != target:
            return f"the adapter parameters are on {parameter.device}, the layers on {target} (move the network there)"
        if parameter.dtype != torch.float32:
            return f"the adapter parameters are {parameter.dtype}; the device path computes float32"
    return None
