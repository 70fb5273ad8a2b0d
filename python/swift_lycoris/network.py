"""The torch side of a network of adapters computed by lycoris-server.

:class:`LycorisNetwork` is an ``nn.Module`` whose Parameters mirror the server's adapter
parameters (same names and shapes as LyCORIS's: ``<module>.lora_up.weight``, …), so any
torch optimizer, gradient clipping, accumulation or DDP works on them unchanged. Each
adapted layer's forward takes, per call, the cheaper of two transfers:

- activations: ``org_forward(x) + AdapterFunction(x, params)``; the autograd Function sends x
  to the server through the shared-memory arena and returns the adapter's contribution
  m·Δ(x); its backward returns ∂x and the parameters' gradients;
- weights: ``op(x, W0 + m·ΔW, b + m·Δb)`` in torch with m·ΔW (and a norm's m·Δb) from the
  server through :class:`DeltaWeightFunction`, which in a training step carries a whole
  group of weight-path modules (one call each way per group, see ``weight_delta``);
- elementwise (IA3 in training, with ``transfer="auto"``): the server scales the base output
  y = org_forward(x) (or, for ``train_on_input``, x before org_forward) in one elementwise
  pass and returns the adapted tensor, through the same autograd Function; DoRA with the
  norm per output row (side ``output_with_input``) sends x along with y and gets
  op(x, W') + b back from y and the low-rank chain (:class:`LayerInputFunction`).

Parameter values reach the server only when their version counter changed. NaN and ±∞
are named by module and pass, and handled by ``nan_policy`` (see :mod:`.nonfinite`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from typing import Iterable, Iterator

import torch
from torch import nn

from . import calibration, call_record, timestep
from . import device as devices
from .arena import Arena, wire_dtype
from .nonfinite import NonFiniteError, SkipCall, check_nan_policy, count_non_finite, describe_server_error
from .server import AdapterFileError, RequestTemplate, Server, ServerDied, ServerError, Slot

log = logging.getLogger("swift_lycoris")

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}

# ΔWs are fetched in groups of at most this many bytes (training steps, merging, max-norm):
# bounded arena and host memory at any model size, a handful of round trips per step.
_DELTA_GROUP_BYTES = 256 << 20


# Per-call requests kept encoded (RequestTemplate), per module, shape and kind.
_TEMPLATES = 4096

# Activation-path calls of a module (per input shape) observed before their time replaces the
# calibrated estimate in the transfer choice (the first pays one-time costs).
_OBSERVED_CALLS = 2
# (module, input shape) pairs observed at most (inputs of ever new shapes start afresh).
_OBSERVED_KEYS = 4096

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
# Algorithms whose math needs the layer's base weight on the server.
def layer_description(name: str, module: nn.Module) -> dict | None:
    """The server's description of a torch layer, or None for kinds it does not adapt:
    Linear, Conv1d/2d/3d with zero padding, and LayerNorm/GroupNorm with an affine weight."""
    if isinstance(module, nn.Linear):
        return {"name": name, "kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, _CONVOLUTIONS) and module.padding_mode == "zeros":
        padding = _explicit_padding(module)
        if padding is None:
            return None
        return {
            "name": name, "kind": f"conv{len(module.kernel_size)}d", "in_channels": module.in_channels,
            "out_channels": module.out_channels, "kernel_size": list(module.kernel_size), "stride": list(module.stride),
            "padding": padding, "dilation": list(module.dilation), "groups": module.groups,
        }
    if isinstance(module, nn.LayerNorm) and module.weight is not None:
        return {"name": name, "kind": "layer_norm", "normalized_shape": list(module.normalized_shape),
                "eps": float(module.eps), "has_bias": module.bias is not None}
    if isinstance(module, nn.GroupNorm) and module.weight is not None:
        return {"name": name, "kind": "group_norm", "num_groups": module.num_groups, "num_channels": module.num_channels,
                "eps": float(module.eps), "has_bias": module.bias is not None}
    return None


# File-key suffixes of modules whose ΔW reads the layer's base weight: IA3, GLoRA, DoRA.
BASE_WEIGHT_SUFFIXES = ("on_input", "a1.weight", "dora_scale", "oft_blocks", "lambda_layer")


def needs_base_weight(algo: str, options: dict) -> bool:
    """Whether the server needs a layer's base weight for `algo` with `options`: IA3, GLoRA,
    Diag-OFT, BOFT and T-LoRA read W0, and so does DoRA (``weight_decompose`` on
    lora/locon/loha/lokr)."""
    algo = str(algo).lower()
    return algo in ("ia3", "glora", "diag-oft", "boft", "tlora") or (bool(options.get("weight_decompose")) and algo in ("lora", "locon", "loha", "lokr"))


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm and GroupNorm: the layers only the ``norm`` algorithm adapts."""
    return isinstance(module, _NORMS)


def _explicit_padding(conv: nn.Module) -> list[int] | None:
    """The padding as one integer per spatial axis; torch's "valid" is 0 and "same" (stride
    1) is dilation·(k−1)/2 when that is symmetric (None when it is not)."""
    if isinstance(conv.padding, tuple):
        return list(conv.padding)
    if conv.padding == "valid":
        return [0] * len(conv.kernel_size)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    return [t // 2 for t in total] if all(t % 2 == 0 for t in total) else None


def _keep_fastest(observed: dict, key, seconds: float) -> None:
    """observed[key] = (count + 1, the fastest of the seconds seen) (see _weights_cheaper)."""
    if key not in observed and len(observed) >= _OBSERVED_KEYS:
        observed.clear()
    count, fastest = observed.get(key, (0, seconds))
    observed[key] = (count + 1, min(seconds, fastest))


def _forward_with(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's own operation with another weight and bias."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, bias)
    if isinstance(layer, nn.LayerNorm):
        return nn.functional.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    if isinstance(layer, nn.GroupNorm):
        return nn.functional.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    return layer._conv_forward(x, weight, bias)


class _ParameterHolder(nn.Module):
    """One adapter's Parameters, nested like LyCORIS's (``lora_up.weight`` → ``lora_up``
    submodule with a ``weight``), so state-dict keys match LyCORIS's."""

    def set(self, key: str, parameter: nn.Parameter) -> None:
        owner = self
        *path, leaf = key.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, parameter)

    def get(self, key: str) -> nn.Parameter:
        owner = self
        for part in key.split("."):
            owner = getattr(owner, part)
        return owner


def _keep_tape(ctx, network: "LycorisNetwork", name: str, tape: int, params) -> None:
    """Keeps a forward's tape on the autograd context, released when the graph is freed."""
    ctx.network, ctx.name, ctx.tape = network, name, tape
    ctx.parameter_count = len(params)
    ctx.param_meta = [(p.dtype, p.device) for p in params]
    weakref.finalize(ctx, network._orphaned_tapes.append, tape)


def _parameter_grads(ctx, grads) -> list[torch.Tensor]:
    """The server's parameter gradients in each parameter's dtype and device."""
    return [g.to(dtype=dtype, device=device) for g, (dtype, device) in zip(grads, ctx.param_meta)]


class AdapterFunction(torch.autograd.Function):
    """m·Δ(x) of one adapter (with `elementwise`, the elementwise transfer's adapted tensor),
    computed by the server; backward returns ∂x (∂ of the tensor sent) and ∂params.

    The server keeps a tape (the step's input and random choices) for as long as the autograd
    graph holding this call lives: backward uses it without consuming it (so
    ``retain_graph`` works), and when the graph is freed — after backward, or dropped
    without one (a loss never back-propagated, a segment that gradient checkpointing
    recomputes) — a finalizer queues the id, released with the next server call."""

    @staticmethod
    def forward(ctx, network: "LycorisNetwork", name: str, output_shape: torch.Size, elementwise: bool, x: torch.Tensor,
                *params):
        start = time.perf_counter()
        delta, tape = network._server_forward(name, x, output_shape, True, elementwise)
        ctx.forward_seconds = None if elementwise else time.perf_counter() - start
        _keep_tape(ctx, network, name, tape, params)
        ctx.input_meta = (x.shape, x.dtype, x.device)
        return delta

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        start = time.perf_counter()
        try:
            grad_input, grads, _ = ctx.network._server_backward(ctx.name, ctx.tape, grad_output, ctx.input_meta)
        except SkipCall:
            return (None, None, None, None, None) + (None,) * ctx.parameter_count
        if ctx.forward_seconds is not None:
            ctx.network._observe_activations(ctx.name, ctx.input_meta[0], ctx.forward_seconds + time.perf_counter() - start)
        return (None, None, None, None, grad_input, *_parameter_grads(ctx, grads))


class LayerInputFunction(torch.autograd.Function):
    """The elementwise transfer of a module that also reads the layer input x (side
    ``output_with_input``: DoRA): y' from the base output y and x; backward returns ∂y (torch
    carries it through the base layer), the adapter's part of ∂x, and ∂params. Tapes as in
    :class:`AdapterFunction`."""

    @staticmethod
    def forward(ctx, network: "LycorisNetwork", name: str, y: torch.Tensor, x: torch.Tensor, *params):
        adapted, tape = network._server_forward(name, y, y.shape, True, True, layer_input=x)
        _keep_tape(ctx, network, name, tape, params)
        ctx.metas = (y.shape, y.dtype, y.device), (x.shape, x.dtype, x.device)
        return adapted

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        try:
            grad_y, grads, grad_x = ctx.network._server_backward(ctx.name, ctx.tape, grad_output, *ctx.metas)
        except SkipCall:
            return (None, None, None, None) + (None,) * ctx.parameter_count
        return (None, None, grad_y, grad_x, *_parameter_grads(ctx, grads))


class DeltaWeightFunction(torch.autograd.Function):
    """m·ΔW of one or more adapters, computed by the server in one call (rebuild transfer:
    torch then applies op(x, W0 + m·ΔW, b + m·Δb) itself); per module, in order, ΔW and — for
    a norm module on a layer with a bias — Δb. Backward sends every ∂ΔW (and ∂Δb) that arrived
    (outputs no forward used get none) in one ``delta_weight_backward`` call and returns the
    parameters' gradients. The tapes live as long as the graph, as in
    :class:`AdapterFunction`."""

    @staticmethod
    def forward(ctx, network: "LycorisNetwork", names: list[str], step_group: bool, *params):
        fetched = network._fetch_delta_weights(names, keep_tapes=True)
        ctx.network, ctx.names, ctx.step_group = network, names, step_group
        ctx.tapes = [fetched[name][1] for name in names]
        ctx.counts = [len(fetched[name][0]) for name in names]
        ctx.param_meta = [(p.dtype, p.device) for p in params]
        ctx.set_materialize_grads(False)
        weakref.finalize(ctx, network._orphaned_tapes.extend, list(ctx.tapes))
        return tuple(delta for name in names for delta in fetched[name][0])

    @staticmethod
    def backward(ctx, *grad_deltas):
        network = ctx.network
        used, entries, position = [], [], 0
        for index, (name, count) in enumerate(zip(ctx.names, ctx.counts)):
            grad_weight, *grad_bias = grad_deltas[position: position + count]
            position += count
            if grad_weight is None and all(g is None for g in grad_bias):
                continue
            if grad_weight is None:
                grad_weight = torch.zeros(network._targets[name].weight.shape)
            used.append(index)
            entries.append((name, ctx.tapes[index], grad_weight, grad_bias[0] if grad_bias else None))
        try:
            module_grads = network._server_delta_weight_backward(entries)
        except SkipCall:
            used, module_grads = [], []
        if ctx.step_group:
            # The step is being back-propagated: the next forward (gradient accumulation's
            # next micro-batch) fetches groups of its own.
            network.end_step_groups()
        param_grads: list[torch.Tensor | None] = [None] * len(ctx.param_meta)
        offsets = network._parameter_offsets(ctx.names)
        for index, grads in zip(used, module_grads):
            for position, grad in enumerate(grads, start=offsets[index]):
                dtype, device = ctx.param_meta[position]
                param_grads[position] = grad.to(dtype=dtype, device=device)
        return (None, None, None, *param_grads)


class SkippedCall(torch.autograd.Function):
    """The zero contribution of a call that ``nan_policy="skip_step"`` skipped, tied to the
    module's parameters so that its backward runs: that backward drops the step's adapter
    gradients when the backward pass ends (:meth:`LycorisNetwork.skip_step_gradients`)."""

    @staticmethod
    def forward(ctx, network: "LycorisNetwork", like: torch.Tensor, *params):
        ctx.network, ctx.parameter_count = network, len(params)
        return torch.zeros_like(like)

    @staticmethod
    def backward(ctx, grad):
        ctx.network.skip_step_gradients()
        return (None, None) + (None,) * ctx.parameter_count


class LycorisNetwork(nn.Module):
    """Adapters on a set of torch layers, computed by one lycoris-server process.

    Per call, each adapted layer moves whichever is smaller through the arena (unless
    `transfer` fixes it): the activations (x in, m·Δ(x) out; the server computes the
    adapter's contribution) or the weight delta (m·ΔW out; torch computes op(x, W0 + m·ΔW)).
    A layer with LyCORIS's bypass semantics (`bypass_mode=True`, in `options` or its
    `layer_options`) always moves activations, whatever `transfer` says: its Δ(x) is not
    op(x, ΔW) for every algorithm (Diag-OFT/BOFT rotate the base output with its bias)."""

    def __init__(
        self,
        layers: dict[str, nn.Module],
        algo: str = "lora",
        options: dict | None = None,
        layer_options: dict[str, dict] | None = None,
        multiplier: float = 1.0,
        seed: int = 0,
        threads: int | None = None,
        server: Server | None = None,
        base_weights_for: Iterable[str] | None = None,
        transfer: str = "auto",
        nan_policy: str = "error",
        device: str = "auto",
    ):
        """`base_weights_for`: layers whose base weight and bias the server must hold
        although their algorithm does not read W0 yet (a file loaded later may make them
        IA3, GLoRA or DoRA).
        `nan_policy`: ``"error"`` or ``"skip_step"`` (see :mod:`.nonfinite`).
        `device`: ``"auto"`` (layers on a CUDA device take the device path where the server
        computes there, see :mod:`.device`), ``"cpu"`` (always the arena path), ``"cuda"``,
        ``"cuda:N"`` or the test device ``"emulated"``; ``$SWIFT_LYCORIS_DEVICE`` overrides it."""
        super().__init__()
        self.device_request = devices.requested_device(device)
        # The device path (a devices.DevicePath), False once the arena path is chosen, None
        # until the first adapted forward decides.
        self._device_path: devices.DevicePath | bool | None = None
        self.nan_policy = check_nan_policy(nan_policy)
        self._gradient_drop_queued = False
        self.server = server or Server(threads=threads)
        self.arena = Arena(self.server)
        self.multiplier = float(multiplier)
        if transfer not in ("auto", "activations", "weights"):
            raise ValueError(f"transfer must be auto, activations or weights, not {transfer!r}")
        self.transfer = transfer
        self._bypass_layers = {name for name in layers
                               if {**(options or {}), **(layer_options or {}).get(name, {})}.get("bypass_mode") is True}
        # What each transfer costs here (calibration.TransferCosts), measured at the first
        # choice transfer="auto" makes; assign one to override the measurement.
        self.transfer_costs: calibration.TransferCosts | None = None
        # What the transfer choice observes per (module, input shape), as (count, fastest
        # seconds): the activation path's two server calls with their copies
        # (AdapterFunction), and the layer's own forward op(x, W) on either path (CPU). From
        # the second observation on (the first pays one-time costs: templates, first-touched
        # pages, oneDNN's primitives) the fastest replaces the calibrated estimate.
        self._observed_activations: dict[tuple[str, tuple[int, ...]], tuple[int, float]] = {}
        self._observed_operations: dict[tuple[str, tuple[int, ...]], tuple[int, float]] = {}
        self._orphaned_tapes: list[int] = []
        # Requests of the per-call path, encoded once per module, shape and kind.
        self._templates: dict[tuple, RequestTemplate | call_record.RecordTemplate] = {}
        # Weight-path modules in the order of their first use; the ΔWs fetched with tapes for
        # this step, not used yet; the modules fetched this step (see weight_delta).
        self._weight_order: dict[str, None] = {}
        self._prefetched: dict[str, tuple[torch.Tensor, ...]] = {}
        self._step_fetched: set[str] = set()
        self._evaluation_deltas: dict[str, tuple[torch.Tensor, ...]] = {}
        self._originals: dict[str, object] = {}
        self._targets: dict[str, nn.Module] = {}
        self._kept_layer_tensors: dict[str, list[torch.Tensor | None]] | None = None
        descriptions = []
        for name, layer in layers.items():
            description = layer_description(name, layer)
            if description is None:
                log.warning("swift_lycoris: %s (%s) is not a layer kind the server adapts; skipped", name, type(layer).__name__)
                continue
            if is_norm_layer(layer):
                # LyCORIS's train_norm: a norm layer's only algorithm, whatever the network's.
                description["algo"] = "norm"
            else:
                own = (layer_options or {}).get(name, {})
                layer_algo = own.get("algo", algo)
                if needs_base_weight(layer_algo, {**(options or {}), **own.get("options", {})}) or name in (base_weights_for or ()):
                    # IA3 scales the base weight (and, in bypass mode, the bias too); GLoRA and
                    # DoRA read it; Diag-OFT/BOFT rotate it (in bypass mode, the output with its
                    # bias); T-LoRA starts from its SVD.
                    description["weight"] = self._inline(layer.weight)
                    if layer.bias is not None:
                        description["bias"] = self._inline(layer.bias)
                if str(layer_algo).lower() == "full":
                    description["has_bias"] = layer.bias is not None
            for key, value in (layer_options or {}).get(name, {}).items():
                description[key] = value
            descriptions.append(description)
            self._targets[name] = layer
        info = self.server.call("network.create", {
            "algo": algo, "options": dict(options or {}), "layers": descriptions,
            "multiplier": self.multiplier, "seed": int(seed),
        })
        self.adapters = nn.ModuleDict()
        self._keys: dict[str, list[str]] = {}
        self._synced_versions: dict[str, tuple[int, int]] = {}
        self._rebuild_parameters(info)
        self.applied = False
        # A new module is in training mode (torch's default); the server starts in eval.
        self.server.call("network.set_training", {"training": self.training})

    # MARK: parameters

    @staticmethod
    def _inline(tensor: torch.Tensor) -> dict:
        import base64

        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return {"dtype": "F32", "shape": list(tensor.shape), "data": base64.b64encode(data).decode()}

    def _rebuild_parameters(self, info: dict, reuse_parameters: bool = True) -> None:
        """Creates the torch Parameters from the server's current values. With
        `reuse_parameters`, a Parameter that already exists under the same key with the same
        shape is kept and receives the new value in place (its dtype and device stay), so an
        optimizer that holds it stays valid."""
        self.modules_info = {m["name"]: m for m in info["modules"]}
        self._templates.clear()  # (binary call records name modules by handle, which this info gives)
        self._mask_version = -1  # (a loaded file may bring T-LoRA modules: send the mask again)
        self._bias_deltas = {m["name"] for m in info["modules"]
                             if (m["algorithm"] == "norms" and m["layer"].get("has_bias", False))
                             or any(p["key"].endswith(".diff_b") for p in m["parameters"])}
        previous = {}
        if reuse_parameters:
            for name in self.adapters.keys():
                for suffix in self._keys.get(name, []):
                    previous[f"{name}.{suffix}"] = self.adapters[name].get(suffix)
        for name in [n for n in self.adapters.keys() if n not in self.modules_info]:
            del self.adapters[name]
        keys = [p["key"] for m in info["modules"] for p in m["parameters"]]
        values = self._fetch("parameters.get", keys)
        for module in info["modules"]:
            holder = _ParameterHolder()
            names = []
            for parameter in module["parameters"]:
                suffix = parameter["key"][len(module["name"]) + 1:]
                value = values[parameter["key"]]
                old = previous.get(parameter["key"])
                if old is not None and tuple(old.shape) == tuple(value.shape):
                    with torch.no_grad():
                        old.copy_(value)
                    holder.set(suffix, old)
                else:
                    holder.set(suffix, nn.Parameter(value))
                names.append(suffix)
            self.adapters[module["name"]] = holder
            self._keys[module["name"]] = names
        self._index_parameters()
        self._synced_versions = {key: self._state(self._parameter(key)) for key in keys}

    def _index_parameters(self) -> None:
        """The lookups of the per-call path (each forward checks its module's version
        counters): key → Parameter, module → keys, module → Parameters."""
        self._by_key = {f"{name}.{suffix}": self.adapters[name].get(suffix)
                        for name, suffixes in self._keys.items() for suffix in suffixes}
        self._keys_of = {name: [f"{name}.{suffix}" for suffix in suffixes] for name, suffixes in self._keys.items()}
        self._parameters_of = {name: [self._by_key[key] for key in keys] for name, keys in self._keys_of.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's, then the lookups again (``assign=True`` replaces the Parameters; their new
        storage makes the next sync send them)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._index_parameters()
        return result

    def parameter_suffixes(self, name: str) -> list[str]:
        """Module `name`'s parameter key suffixes (``lora_up.weight``, …), in the server's order."""
        return self._keys[name]

    def _parameter(self, key: str) -> nn.Parameter:
        return self._by_key[key]

    def _module_parameters(self, name: str) -> list[nn.Parameter]:
        return self._parameters_of[name]

    def _fetch(self, method: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """Parameters or gradients by key, through the arena."""
        if not keys:
            return {}
        shapes = {p["key"]: p["shape"] for m in self.modules_info.values() for p in m["parameters"]}
        self.arena.begin()
        self.arena.plan([4 * max(1, _numel(shapes[k])) for k in keys])
        outputs = {key: self.arena.reserve(shapes[key], torch.float32) for key in keys}
        result = self.server.call(method, {"keys": keys, "outputs": outputs})
        # Each its own storage: these become Parameters and state-dict entries.
        return {key: self.arena.take(descriptor) for key, descriptor in result["parameters"].items()}

    def sync(self, force: bool = False, module: str | None = None) -> None:
        """Sends the parameters whose values changed since the last sync, as torch's version
        counters tell (every in-place op and optimizer step bumps them); only `module`'s when
        given and nothing of it changed (each adapter's forward checks its own; the first one
        after a change sends every changed parameter at once). Writes through ``.data`` bypass
        the counters: call ``sync(force=True)`` after those."""
        keys = self._synced_versions if module is None else self._keys_of[module]
        changed = [key for key in keys if force or self._state(self._by_key[key]) != self._synced_versions[key]]
        if changed and module is not None:
            # One changed (typically an optimizer step changed them all): send every changed
            # parameter in this one call rather than one call per module.
            return self.sync(force=force)
        if not changed:
            return
        self.arena.begin()
        self.arena.plan([4 * sum(self._by_key[k].numel() for k in changed)])
        params = dict(zip(changed, self.arena.put_many([self._by_key[k] for k in changed])))
        try:
            self.server.call("parameters.set", {"parameters": params})
        except ServerError as error:
            if error.code != -32004:
                raise
            self._non_finite_from(error)  # raises under nan_policy="error"
            # skip_step: nothing was set; the Parameters go back to the server's (finite) values.
            with torch.no_grad():
                for key, value in self._fetch("parameters.get", changed).items():
                    self._by_key[key].copy_(value)
        for key in changed:
            self._synced_versions[key] = self._state(self._parameter(key))
        self.drop_prefetched()

    @staticmethod
    def _state(parameter: torch.Tensor) -> tuple[int, int]:
        """What tells a changed value: the version counter, and the storage (rebinding
        ``.data`` swaps it without touching the counter)."""
        return parameter._version, parameter.data_ptr()

    # MARK: forward / backward through the server

    def release_orphaned_tapes(self) -> None:
        """Tells the server to drop the tapes whose autograd graphs are gone: a notification,
        sent in the same write as the next request (no round trip, no write of its own)."""
        if self._orphaned_tapes:
            tapes, self._orphaned_tapes[:] = list(self._orphaned_tapes), []
            if self.server.call_records:
                self.server.queue_encoded(call_record.tapes_release(tapes))
                return
            # (Encoded by hand: a list of integers, once per call of the per-call path.)
            self.server.queue_encoded(b'{"jsonrpc":"2.0","method":"tapes.release","params":{"tapes":[%s]}}\n'
                                      % ",".join(map(str, tapes)).encode())

    def adapted_forward(self, name: str, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The adapted layer's output: op(x, W0 + m·ΔW) + b in torch with ΔW from the server
        when moving ΔW is cheaper (and the layer's own forward is the plain one), else the
        layer's forward plus the server's m·Δ(x)."""
        layer = self._targets[name]
        try:
            return self._adapted_forward(name, layer, original, x, *args, **kwargs)
        except SkipCall:
            base = original(x, *args, **kwargs)
            if torch.is_grad_enabled():
                return base + SkippedCall.apply(self, base, *self._module_parameters(name))
            return base

    def _adapted_forward(self, name: str, layer: nn.Module, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._sync_timestep_mask()
        if self._device_path is None:
            self._device_path = devices.choose(self, layer) or False
        if (self._device_path and not args and not kwargs and name not in self._bypass_layers
                and getattr(original, "__func__", None) is type(layer).forward):
            self._chose(name, "device")
            delta_weight, *delta_bias = self._device_path.delta(name)
            bias = layer.bias
            if delta_bias:
                delta = delta_bias[0].to(layer.weight.dtype)
                bias = delta if bias is None else bias + delta.to(bias.dtype)
            return _forward_with(layer, x, layer.weight + delta_weight.to(layer.weight.dtype), bias)
        side = None if args or kwargs else self._elementwise_side(name, layer, original)
        if side is not None:
            self._chose(name, "elementwise")
        if side == "input":
            return original(self._server_elementwise(name, x))
        if side == "output":
            return self._server_elementwise(name, original(x))
        if side == "output_with_input":
            return self._server_elementwise(name, original(x), x)
        if not args and not kwargs and self._moves_weights(name, layer, original, x):
            # The server never sees x on this path: check it here, as the server does.
            count = count_non_finite(x)
            if count:
                self._non_finite(name, "forward", f"its input has {count} NaN or infinite elements")
            self.release_orphaned_tapes()
            delta_weight, *delta_bias = self.weight_delta(name)
            weight = layer.weight + delta_weight.to(layer.weight.device, layer.weight.dtype)
            bias = layer.bias
            if delta_bias:
                # A Full file's diff_b on a layer without a bias is the bias (as in LyCORIS).
                delta = delta_bias[0].to(weight.device, weight.dtype)
                bias = delta if bias is None else bias + delta.to(bias.dtype)
            return self._timed_operation(name, x, lambda: _forward_with(layer, x, weight, bias))
        if args or kwargs:
            base = original(x, *args, **kwargs)
        else:
            base = self._timed_operation(name, x, lambda: original(x))
        return base + self.adapter_delta(name, x, base)

    def _elementwise_side(self, name: str, layer: nn.Module, original) -> str | None:
        """"output" or "input" when this call takes the elementwise transfer: with transfer
        "auto", a module that has one (the server's ``elementwise``: IA3 without dropout and
        rank_dropout), the layer's own forward, and a graph to build (without one, the kept
        evaluation ΔW costs less)."""
        side = self.modules_info[name].get("elementwise")
        if side is None or self.transfer != "auto" or getattr(original, "__func__", None) is not type(layer).forward:
            return None
        return side if self.training or torch.is_grad_enabled() else None

    def _server_elementwise(self, name: str, t: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The elementwise transfer's adapted tensor for `t` (the base output, or the input
        on the input side; with `x`, the layer input, for side ``output_with_input``);
        unbatched conv tensors (C, …) are accepted."""
        self.release_orphaned_tapes()
        params = self._module_parameters(name)
        layer = self.modules_info[name]["layer"]
        unbatched = layer["kind"].startswith("conv") and t.dim() == len(layer["kernel_size"]) + 1
        if unbatched:
            t, x = t.unsqueeze(0), None if x is None else x.unsqueeze(0)
        graph = torch.is_grad_enabled() and any(v.requires_grad for v in (t, x, *params) if v is not None)
        if x is not None and graph:
            adapted = LayerInputFunction.apply(self, name, t, x.to(t.dtype), *params)
        elif graph:
            adapted = AdapterFunction.apply(self, name, t.shape, True, t, *params)
        else:
            adapted, _ = self._server_forward(name, t, t.shape, False, True, layer_input=None if x is None else x.to(t.dtype))
        if unbatched:
            adapted = adapted.squeeze(0)
        return adapted if adapted.dtype == t.dtype else adapted.to(t.dtype)

    def _moves_weights(self, name: str, layer: nn.Module, original, x: torch.Tensor) -> bool:
        """Whether this call takes the weight path; records the choice in
        ``modules_info[name]["transfer"]`` (see :meth:`_chose`). A forward inside backward
        (gradient checkpointing's recomputation) takes the path the module's last forward
        took: what was observed since must not change the graph being recomputed."""
        last = self.modules_info[name].get("transfer")
        if last in ("weights", "activations") and torch._C._current_graph_task_id() != -1:
            return last == "weights"
        moves = self._weights_cheaper(name, layer, original, x)
        self._chose(name, "weights" if moves else "activations")
        return moves

    def _chose(self, name: str, transfer: str) -> None:
        """Records `transfer` as module `name`'s current choice, logged (debug) when it changes."""
        info = self.modules_info[name]
        if info.get("transfer") != transfer:
            log.debug("swift_lycoris: %s takes the %s transfer (%s)", name, transfer,
                      ", ".join(f"{k} {v:.3g}" for k, v in info.get("transfer_costs_ms", {}).items()) or self.transfer)
            info["transfer"] = transfer

    def _weights_cheaper(self, name: str, layer: nn.Module, original, x: torch.Tensor) -> bool:
        """Whether moving ΔW costs less than moving activations, by the costs measured on this
        machine (:mod:`.calibration`): activations two round trips, 3·(|x| + |y|) element
        copies and the server's adapter math — 3 passes of the factor path
        (``factor_multiply_adds`` per position) or, without one, of op(x, ΔW), or, once this
        module has run the activation path on inputs of this shape, the fastest such call
        observed; weights 3·|W| copies and the ∂W torch then computes (|W| multiply-adds per
        position at the calibrated GEMM rate, or the layer's fastest observed forward; the
        observations in training mode only)."""
        if (self.transfer == "activations" or name in self._bypass_layers
                or getattr(original, "__func__", None) is not type(layer).forward):
            return False
        if self.transfer == "weights":
            return True
        if not self.training and not torch.is_grad_enabled():
            return True  # inference: the evaluation ΔW is kept (weight_delta), one fetch per module
        if self.transfer_costs is None:
            self.transfer_costs = calibration.measure(self.server, self.arena)
            log.debug("swift_lycoris: transfer costs measured: %s", self.transfer_costs.describe())
        if isinstance(layer, nn.Linear):
            inputs, outputs = layer.in_features, layer.out_features
        elif is_norm_layer(layer):
            inputs = outputs = layer.weight.numel()
        else:
            inputs, outputs = layer.in_channels, layer.out_channels
        # Output positions: rows of a Linear's input (|W| multiply-adds each for op(x, W)),
        # and as many for a convolution ('same' geometry: |y|/out ≈ |x|/in).
        positions = x.numel() / inputs
        key = (name, tuple(x.shape))
        # Observations steer training steps only: an evaluation forward with a graph keeps
        # the estimate's path, so evaluation outputs stay bit-identical however many
        # training steps ran in between.
        count, observed = self._observed_activations.get(key, (0, None)) if self.training else (0, None)
        if count >= _OBSERVED_CALLS:
            activations = observed
        else:
            # The server's math at torch's GEMM rate: a lower bound (the engine's small
            # factor GEMMs run slower), so an activation path the estimate picks wrongly is
            # put right by its first observed call, and one it rejects would lose anyway.
            per_position = self.modules_info[name].get("factor_multiply_adds") or layer.weight.numel()
            activations = self.transfer_costs.activations(x.numel(), positions * outputs, 3 * positions * per_position)
        # ∂W costs what the layer's forward costs (P·|W| multiply-adds, torch's kernels for
        # this layer: a convolution's run faster than the calibration's GEMM).
        operations, operation = self._observed_operations.get(key, (0, None)) if self.training else (0, None)
        if operations < _OBSERVED_CALLS:
            operation = positions * layer.weight.numel() * self.transfer_costs.multiply_add
        weights = self.transfer_costs.weights(layer.weight.numel(), operation)
        self.modules_info[name]["transfer_costs_ms"] = {"activations": activations * 1e3, "weights": weights * 1e3}
        self.modules_info[name]["activations_observed"] = count >= _OBSERVED_CALLS
        self.modules_info[name]["gradient_observed"] = operations >= _OBSERVED_CALLS
        return weights < activations

    def _observe_activations(self, name: str, shape: torch.Size, seconds: float) -> None:
        """Keeps the fastest activation-path forward + backward of module `name` on inputs of
        `shape` (see :meth:`_weights_cheaper`)."""
        _keep_fastest(self._observed_activations, (name, tuple(shape)), seconds)

    def _timed_operation(self, name: str, x: torch.Tensor, forward):
        """forward() — the layer's own op(x, W) on either path — timed for the transfer
        choice when it makes one (``transfer="auto"``, a CPU input)."""
        if self.transfer != "auto" or x.device.type != "cpu":
            return forward()
        start = time.perf_counter()
        y = forward()
        _keep_fastest(self._observed_operations, (name, tuple(x.shape)), time.perf_counter() - start)
        return y

    def adapter_delta(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """m·Δ(x) of module `name` for input `x` whose base output is `base`: through the
        autograd Function when a graph will be built, else a plain call without a tape; in
        the base output's dtype (autocast). Unbatched conv inputs (C, L), (C, H, W) and
        (C, D, H, W) are accepted."""
        self.release_orphaned_tapes()
        params = self._module_parameters(name)
        layer = self.modules_info[name]["layer"]
        unbatched = layer["kind"].startswith("conv") and x.dim() == len(layer["kernel_size"]) + 1
        if unbatched:
            x, output_shape = x.unsqueeze(0), (1, *base.shape)
        else:
            output_shape = base.shape
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            delta = AdapterFunction.apply(self, name, output_shape, False, x, *params)
        else:
            delta, _ = self._server_forward(name, x, output_shape, False)
        if unbatched:
            delta = delta.squeeze(0)
        return delta if delta.dtype == base.dtype else delta.to(base.dtype)

    def _server_forward(self, name: str, x: torch.Tensor, output_shape, keep_tape: bool, elementwise: bool = False,
                        layer_input: torch.Tensor | None = None):
        """(output, tape) of one ``forward`` call (`layer_input`: the layer input of an
        ``output_with_input`` elementwise call); on the CPU the server writes the output
        straight into the tensor returned (an arena block, no copy out)."""
        self.sync(module=name)
        dtype = x.dtype if x.dtype in _ITEMSIZE else torch.float32
        extra = [] if layer_input is None else [layer_input.numel() * _ITEMSIZE[dtype]]
        self.arena.begin()
        self.arena.plan([x.numel() * _ITEMSIZE[dtype], _numel(output_shape) * _ITEMSIZE[dtype]] + extra)
        source = self.arena.put(x.to(dtype))
        sources = [] if layer_input is None else [self.arena.put(layer_input.to(dtype).contiguous())]
        output, delta = self._output(output_shape, dtype, x.device)
        key = ("forward", name, tuple(x.shape), dtype, tuple(output_shape), keep_tape, elementwise,
               None if layer_input is None else tuple(layer_input.shape))
        template = self._templates.get(key)
        # A call with a layer input (DoRA) goes as JSON: call records have no such field.
        if template is None and self.server.call_records and layer_input is None:
            flags = (call_record.FORWARD_GRAD if keep_tape else 0) | (call_record.FORWARD_ELEMENTWISE if elementwise else 0)
            template = self._template(key, call_record.forward_template(
                self.modules_info[name]["handle"], flags, source["dtype"], source["shape"], output["dtype"]))
        elif template is None:
            call = {"module": name, "input": {**source, "offset": Slot(0)}, "output": {**output, "offset": Slot(1)}}
            if elementwise:
                call["elementwise"] = True
            if sources:
                call["layer_input"] = {**sources[0], "offset": Slot(2)}
            template = self._template(key, RequestTemplate("forward", {"calls": [call], "grad": keep_tape}))
        result = self._checked_call("forward", template, source["offset"], output["offset"],
                                    *[spec["offset"] for spec in sources])
        if isinstance(template, call_record.RecordTemplate):
            tape = call_record.FORWARD_RESULT.unpack_from(result)[0] or None
            result = {"output": {**output, "shape": list(output_shape)}, "tape": tape}
        else:
            result = result["results"][0]
        if delta is None:
            delta = self.arena.take(result["output"], x.device)
        return delta, result.get("tape")

    def _template(self, key: tuple, template):
        """Keeps a per-call request encoded once (a JSON :class:`RequestTemplate` or a
        binary :class:`call_record.RecordTemplate`; at most :data:`_TEMPLATES` of them:
        inputs of ever new shapes start the cache afresh)."""
        if len(self._templates) >= _TEMPLATES:
            self._templates.clear()
        self._templates[key] = template
        return template

    def _output(self, shape, dtype: torch.dtype, device: torch.device | None) -> tuple[dict, torch.Tensor | None]:
        """(output spec, tensor the server writes into) for a CPU result; (spec, None) for one
        on another device, copied there after the call (:meth:`Arena.take`)."""
        if device is None or device.type == "cpu":
            return self.arena.output(shape, dtype)
        return self.arena.reserve(shape, dtype), None

    def _server_backward(self, name: str, tape: int, grad_output: torch.Tensor, input_meta, layer_input_meta=None):
        """(∂x, ∂parameters, ∂layer input or None) of one ``backward`` call, written by the
        server into the tensors returned (CPU) or copied to the device; `layer_input_meta`
        for a tape of an ``output_with_input`` elementwise call."""
        shape, dtype, device = input_meta
        dtype = dtype if dtype in _ITEMSIZE else torch.float32
        grad_output = grad_output.to(dtype)
        keys = self._keys_of[name]
        params = self._module_parameters(name)
        extra = [] if layer_input_meta is None else [_numel(layer_input_meta[0]) * _ITEMSIZE[dtype]]
        self.arena.begin()
        self.arena.plan([grad_output.numel() * _ITEMSIZE[dtype], _numel(shape) * _ITEMSIZE[dtype]] + [p.numel() * 4 for p in params] + extra)
        source = self.arena.put(grad_output.contiguous())
        input_spec, grad_input = self._output(shape, dtype, device)
        grads_device = _common_device(params)
        grad_outputs = [self._output(p.shape, torch.float32, grads_device) for p in params]
        layer_outputs = [] if layer_input_meta is None else [self._output(layer_input_meta[0], dtype, layer_input_meta[2])]
        key = ("backward", name, tuple(grad_output.shape), dtype, tuple(shape),
               None if layer_input_meta is None else tuple(layer_input_meta[0]))
        template = self._templates.get(key)
        if template is None and self.server.call_records and not layer_outputs:
            template = self._template(key, call_record.backward_template(
                call_record.BACKWARD_KEEP | call_record.BACKWARD_PARAMETER_GRADS, source["dtype"], source["shape"],
                input_spec["dtype"], len(keys)))
        elif template is None:
            call = {
                "tape": Slot(0), "keep": True,
                "grad_output": {**source, "offset": Slot(1)},
                "grad_input": {**input_spec, "offset": Slot(2)},
                "parameter_grads": {k: {**spec, "offset": Slot(3 + i)} for i, (k, (spec, _)) in enumerate(zip(keys, grad_outputs))},
            }
            if layer_outputs:
                call["grad_layer_input"] = {**layer_outputs[0][0], "offset": Slot(3 + len(keys))}
            template = self._template(key, RequestTemplate("backward", {"calls": [call], "return_parameter_grads": True,
                                                                        "accumulate": False}))
        result = self._checked_call("backward", template, tape, source["offset"], input_spec["offset"],
                                    *[spec["offset"] for spec, _ in grad_outputs + layer_outputs])
        if isinstance(template, call_record.RecordTemplate):
            # The outputs lie where the record put them.
            result = {"grad_input": {**input_spec, "shape": list(shape)},
                      "parameter_grads": {k: {**spec, "shape": list(p.shape)} for k, (spec, _), p in zip(keys, grad_outputs, params)}}
        else:
            result = result["results"][0]
        if grad_input is None:
            grad_input = self.arena.take(result["grad_input"], device)
        if any(tensor is None for _, tensor in grad_outputs):
            grads = self.arena.take_many([result["parameter_grads"][key] for key in keys], grads_device)
        else:
            grads = [tensor for _, tensor in grad_outputs]
        grad_layer_input = None
        if layer_outputs:
            grad_layer_input = layer_outputs[0][1]
            if grad_layer_input is None:
                grad_layer_input = self.arena.take(result["grad_layer_input"], layer_input_meta[2])
        return grad_input, grads, grad_layer_input

    # MARK: non-finite values

    def _checked_call(self, method: str, params, *values: int):
        """A compute call (`params` a dict, or a :class:`RequestTemplate` or binary
        :class:`call_record.RecordTemplate` that `values` fill) whose -32004 (a non-finite input or gradient) becomes :class:`NonFiniteError`
        or, under skip_step, :class:`SkipCall`."""
        try:
            if isinstance(params, call_record.RecordTemplate):
                return self.server.call_record(method, params, *values)
            if isinstance(params, RequestTemplate):
                return self.server.call_encoded(method, params, *values)
            return self.server.call(method, params)
        except ServerError as error:
            if error.code != -32004:
                raise
            self._non_finite_from(error)

    def _non_finite_from(self, error: ServerError) -> None:
        self._non_finite(*describe_server_error(error.data or {}))

    def _non_finite(self, module: str, stage: str, what: str) -> None:
        """Raises :class:`NonFiniteError`; under skip_step logs it and, for a forward
        input or an output gradient, raises :class:`SkipCall` (a parameter is put back by
        :meth:`sync`, which calls this with ``what`` naming it)."""
        error = NonFiniteError(module, stage, what)
        if self.nan_policy == "error":
            raise error
        log.warning("%s — skipping this step (nan_policy=skip_step)", str(error).split(" (nan_policy=")[0])
        if stage == "backward":
            self.skip_step_gradients()
        if not what.startswith("parameter "):
            raise SkipCall()

    def skip_step_gradients(self) -> None:
        """Drops every adapter parameter's ``.grad`` when the running backward pass ends
        (at once outside one), so that the optimizer step leaves the adapters unchanged."""
        if self._gradient_drop_queued:
            return
        self._gradient_drop_queued = True
        if torch._C._current_graph_task_id() != -1:
            torch.autograd.Variable._execution_engine.queue_callback(self._drop_gradients)
        else:
            self._drop_gradients()

    def _drop_gradients(self) -> None:
        self._gradient_drop_queued = False
        for parameter in self.parameters():
            parameter.grad = None

    def drop_prefetched(self) -> None:
        """Drops prefetched and evaluation ΔWs (parameters, multiplier or mode changed); the
        tapes of a group go when its graph does (see :class:`DeltaWeightFunction`)."""
        self.end_step_groups()
        self._evaluation_deltas.clear()

    def end_step_groups(self) -> None:
        """Ends this step's ΔW groups: the next request starts a new group."""
        self._prefetched.clear()
        self._step_fetched.clear()

    def _fetch_delta_weights(self, names: list[str], keep_tapes: bool) -> dict[str, tuple[tuple[torch.Tensor, ...], int | None]]:
        """m·ΔW (and m·Δb of norm modules on layers with a bias) of `names` in one
        `delta_weight` call through the arena, with their tapes when kept:
        name → ((ΔW,) or (ΔW, Δb), tape or None). A training step's ΔWs on the CPU are
        written by the server straight into the tensors returned (they live until their
        layer's forward used them); others (evaluation ΔWs, kept until the parameters change;
        other devices) are copied out."""
        shapes = {n: list(self._targets[n].weight.shape) for n in names}
        biased = [n for n in names if n in self._bias_deltas]
        # Δb: the norm's has W0's shape, Full's diff_b is (out,).
        bias_shapes = {n: shapes[n] if is_norm_layer(self._targets[n]) else shapes[n][:1] for n in biased}
        device = _common_device([self._targets[n].weight for n in names])
        in_place = keep_tapes and (device is None or device.type == "cpu")
        self.arena.begin()
        self.arena.plan([_numel(shape) * 4 for shape in shapes.values()] + [_numel(shape) * 4 for shape in bias_shapes.values()])

        def outputs(shapes_of: dict[str, list[int]]) -> dict[str, tuple[dict, torch.Tensor | None]]:
            if in_place:
                return {n: self.arena.output(shape, torch.float32) for n, shape in shapes_of.items()}
            return {n: (self.arena.reserve(shape, torch.float32), None) for n, shape in shapes_of.items()}

        weight_outputs, bias_outputs = outputs(shapes), outputs(bias_shapes)
        params = {"modules": names, "grad": keep_tapes, "outputs": {n: spec for n, (spec, _) in weight_outputs.items()}}
        if biased:
            params["bias_outputs"] = {n: spec for n, (spec, _) in bias_outputs.items()}
        results = self.server.call("delta_weight", params)["results"]
        if in_place:
            return {item["module"]: ((weight_outputs[item["module"]][1],)
                                     + ((bias_outputs[item["module"]][1],) if "delta_bias" in item else ()), item.get("tape"))
                    for item in results}
        parts = [[item["delta_weight"]] + ([item["delta_bias"]] if "delta_bias" in item else []) for item in results]
        taken = iter(self.arena.take_many([d for descriptors in parts for d in descriptors], device))
        return {item["module"]: (tuple(next(taken) for _ in descriptors), item.get("tape"))
                for item, descriptors in zip(results, parts)}

    def weight_delta(self, name: str) -> tuple[torch.Tensor, ...]:
        """(m·ΔW,) or (m·ΔW, m·Δb) of module `name` for one call: through
        :class:`DeltaWeightFunction` when a graph will be built, else a plain fetch without a
        tape.

        In a plain forward (not a recomputation inside backward), a request for a module not
        fetched yet this step fetches it together with the weight-path modules that followed
        it in earlier steps, up to :data:`_DELTA_GROUP_BYTES` of ΔW, through one
        DeltaWeightFunction (each with its own tape and random choices): a training step costs
        one ``delta_weight`` and one ``delta_weight_backward`` call per group (one group on a
        small model). Later requests of the step take their output; a module called again,
        or any request inside backward, gets a call of its own. The step ends with a
        parameter change or when a group is back-propagated, so each micro-batch of gradient
        accumulation fetches its own groups."""
        params = self._module_parameters(name)
        self.sync(module=name)
        if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            if self.training:  # the dropouts draw anew for every call
                return self._fetch_delta_weights([name], keep_tapes=False)[name][0]
            # Evaluation: ΔW depends on the parameters, multiplier and mode only, so it is
            # kept until one of them changes (drop_prefetched).
            if name not in self._evaluation_deltas:
                self._evaluation_deltas[name] = self._fetch_delta_weights([name], keep_tapes=False)[name][0]
            return self._evaluation_deltas[name]
        self._weight_order.setdefault(name, None)
        in_backward = torch._C._current_graph_task_id() != -1
        if name not in self._prefetched and name not in self._step_fetched and not in_backward:
            # Every changed parameter first: a later module's change found by its own sync
            # would drop this group and fetch another.
            self.sync()
            names = self._next_group(name)
            outputs = iter(DeltaWeightFunction.apply(self, names, True,
                                                     *[p for n in names for p in self._module_parameters(n)]))
            for n in names:
                self._prefetched[n] = tuple(next(outputs) for _ in range(self._delta_count(n)))
            self._step_fetched.update(names)
        if name in self._prefetched:
            return self._prefetched.pop(name)
        return tuple(DeltaWeightFunction.apply(self, [name], False, *params))

    def _next_group(self, name: str) -> list[str]:
        """`name` and the modules that followed it in first-use order, not fetched yet this
        step, up to :data:`_DELTA_GROUP_BYTES` of ΔW (at least `name`)."""
        order = list(self._weight_order)
        return next(self._byte_groups([n for n in order[order.index(name):] if n not in self._step_fetched]))

    def _byte_groups(self, names: list[str]) -> Iterator[list[str]]:
        """`names` split, in order, into runs of at most :data:`_DELTA_GROUP_BYTES` of ΔW
        (a module larger than that alone)."""
        group, size = [], 0
        for name in names:
            nbytes = self._delta_bytes(name)
            if group and size + nbytes > _DELTA_GROUP_BYTES:
                yield group
                group, size = [], 0
            group.append(name)
            size += nbytes
        if group:
            yield group

    def _delta_bytes(self, name: str) -> int:
        """Bytes of a module's F32 weight delta (ΔW, and Δb for a norm with a bias)."""
        return self._delta_count(name) * self._targets[name].weight.numel() * 4

    def _delta_count(self, name: str) -> int:
        """Outputs of a module's weight delta: ΔW, and Δb for a norm module with a bias."""
        return 2 if name in self._bias_deltas else 1

    def _parameter_offsets(self, names: list[str]) -> list[int]:
        """Where each module's parameters start in the concatenation of `names`' parameters."""
        offsets, position = [], 0
        for name in names:
            offsets.append(position)
            position += len(self._keys[name])
        return offsets

    def _server_delta_weight_backward(self, entries: list[tuple[str, int, torch.Tensor, torch.Tensor | None]]) -> list[list[torch.Tensor]]:
        """∂parameters of each (module, tape, ∂(m·ΔW), ∂(m·Δb) or None) entry, in one call; per
        entry, the gradients in the module's key order."""
        if not entries:
            return []
        keys = [self._keys_of[name] for name, *_ in entries]
        shapes = [[p.shape for p in self._module_parameters(name)] for name, *_ in entries]
        grads = [g for _, _, grad_weight, grad_bias in entries for g in (grad_weight, grad_bias) if g is not None]
        self.arena.begin()
        self.arena.plan([4 * sum(g.numel() for g in grads)] + [_numel(s) * 4 for group in shapes for s in group])
        put = iter(self.arena.put_many(grads))
        calls = []
        for (_, tape, _, grad_bias), group_keys, group_shapes in zip(entries, keys, shapes):
            call = {"tape": tape, "keep": True, "grad": next(put),
                    "parameter_grads": {key: self.arena.reserve(s, torch.float32) for key, s in zip(group_keys, group_shapes)}}
            if grad_bias is not None:
                call["grad_bias"] = next(put)
            calls.append(call)
        results = self._checked_call("delta_weight_backward", {"calls": calls, "return_parameter_grads": True,
                                                             "accumulate": False})["results"]
        device = _common_device([p for name, *_ in entries for p in self._module_parameters(name)])
        taken = iter(self.arena.take_many([result["parameter_grads"][key] for result, group_keys in zip(results, keys)
                                           for key in group_keys], device))
        return [[next(taken) for _ in group_keys] for group_keys in keys]

    # MARK: attaching to the model

    def apply_to(self) -> None:
        """Routes each target layer's forward through its adapter. Networks stack: a second
        network on the same layers wraps the first one's forward."""
        for name, layer in self._targets.items():
            if name not in self.modules_info or name in self._originals:
                continue
            original = layer.forward
            self._originals[name] = (original, "forward" in layer.__dict__)

            def forward(x, *args, _name=name, _original=original, **kwargs):
                return self.adapted_forward(_name, _original, x, *args, **kwargs)

            layer.forward = forward
        self.applied = True

    def restore(self) -> None:
        """Gives every target layer the forward it had before :meth:`apply_to`."""
        for name, (original, was_instance_attribute) in self._originals.items():
            layer = self._targets[name]
            if was_instance_attribute:
                layer.forward = original
            else:
                layer.__dict__.pop("forward", None)
        self._originals.clear()
        self.applied = False

    @contextlib.contextmanager
    def server_evaluation(self, multiplier: float | None = None):
        """The server in evaluation mode (no dropout, every DyLoRA block) and, when given, at
        another multiplier, for the duration; this network's own mode and multiplier (and the
        ΔWs kept for them) are untouched."""
        training = self.training
        other = multiplier is not None and float(multiplier) != self.multiplier
        if training:
            self.server.call("network.set_training", {"training": False})
        if other:
            self.server.call("network.set_multiplier", {"multiplier": float(multiplier)})
        try:
            yield
        finally:
            if other:
                self.server.call("network.set_multiplier", {"multiplier": self.multiplier})
            if training:
                self.server.call("network.set_training", {"training": True})

    def delta_weights(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
        """(name, (m·ΔW,) or (m·ΔW, m·Δb)) of `names` (default: every module) as the server
        computes them now, without tapes, fetched in groups of bounded arena size."""
        self.sync()
        for group in self._byte_groups(list(self.modules_info if names is None else names)):
            for name, (deltas, _) in self._fetch_delta_weights(group, keep_tapes=False).items():
                yield name, deltas

    @torch.no_grad()
    def add_deltas_to_layers(self, multiplier: float | None = None, names: Iterable[str] | None = None) -> None:
        """W ← W + m·ΔW in every target layer of `names` (default: all), and b ← b + m·Δb for
        norm modules; evaluation-mode ΔWs, with `multiplier` (default: the network's)."""
        with self.server_evaluation(multiplier):
            for name, deltas in self.delta_weights(names):
                layer = self._targets[name]
                for target, delta in zip((layer.weight, layer.bias), deltas):
                    target.copy_((target.float() + delta.to(target.device)).to(target.dtype))

    def merge_to(self, multiplier: float | None = None) -> None:
        """Adds m·ΔW (the forward's ΔW in evaluation mode) into every target layer's weight
        (and a norm module's m·Δb into its layer's bias), and restores the layers' own
        forward."""
        self.add_deltas_to_layers(multiplier)
        self.restore()

    def onfly_merge(self, multiplier: float | None = None) -> None:
        """:meth:`merge_to`, keeping copies of the layers' weights and biases so that
        :meth:`onfly_restore` undoes it (inference without a server call per layer)."""
        if self.layer_tensors_kept:
            raise RuntimeError("the adapters are already merged on the fly; call onfly_restore() first")
        self.keep_layer_tensors()
        self.merge_to(multiplier)

    def onfly_restore(self) -> None:
        """Puts back the weights :meth:`onfly_merge` changed and routes the layers through
        their adapters again."""
        if self.layer_tensors_kept:
            self.put_back_layer_tensors(discard=True)
            self.apply_to()

    @property
    def layer_tensors_kept(self) -> bool:
        """Whether :meth:`keep_layer_tensors` holds copies."""
        return self._kept_layer_tensors is not None

    @torch.no_grad()
    def keep_layer_tensors(self) -> None:
        """Copies of every adapted layer's weight and bias, for :meth:`put_back_layer_tensors`."""
        self._kept_layer_tensors = {
            name: [t.detach().clone() if t is not None else None for t in (layer.weight, layer.bias)]
            for name, layer in self._targets.items() if name in self.modules_info}

    @torch.no_grad()
    def put_back_layer_tensors(self, discard: bool) -> None:
        """Writes the copies :meth:`keep_layer_tensors` made back into the layers; keeps them
        for another time unless `discard`."""
        for name, kept in (self._kept_layer_tensors or {}).items():
            layer = self._targets[name]
            for target, value in zip((layer.weight, layer.bias), kept):
                if value is not None:
                    target.copy_(value)
        if discard:
            self._kept_layer_tensors = None

    # MARK: state

    def _sync_timestep_mask(self) -> None:
        """Sends the mask of :func:`swift_lycoris.set_timestep_mask` when it changed since
        the last call (T-LoRA networks only); ΔWs fetched with the old mask are dropped."""
        version = timestep.mask_version()
        if version == self._mask_version:
            return
        self._mask_version = version
        if not any(m["algorithm"] == "tlora" for m in self.modules_info.values()):
            return
        self.drop_prefetched()
        mask = timestep.get_timestep_mask()
        self.server.call("network.set_timestep_mask", {"mask": None if mask is None else mask[0].tolist()})

    def set_multiplier(self, multiplier: float) -> None:
        self.drop_prefetched()
        if self._device_path:
            self._device_path.invalidate()
        self.multiplier = float(multiplier)
        self.server.call("network.set_multiplier", {"multiplier": self.multiplier})

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "_prefetched"):
            self.drop_prefetched()
        if hasattr(self, "server"):
            self.server.call("network.set_training", {"training": bool(mode)})
        return self

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        """Writes the adapters as a LyCORIS/kohya safetensors file (atomically)."""
        self.sync()
        names = {torch.float16: "F16", torch.bfloat16: "BF16"}
        self.server.call("network.save", {"path": str(file), "dtype": names.get(dtype, "F32"),
                                          "metadata": {str(k): str(v) for k, v in (metadata or {}).items()}})

    def load_weights(self, file: str, reuse_parameters: bool = True) -> dict:
        """Loads a LyCORIS/kohya file's modules onto this network's layers. With
        `reuse_parameters`, Parameters whose shape is unchanged are updated in place
        instead of replaced (see :meth:`_rebuild_parameters`). A file the checked reader
        refuses raises :class:`AdapterFileError` naming the file and the rule."""
        self.drop_prefetched()
        path = os.path.abspath(os.fspath(file))
        try:
            result = self.server.call("network.load", {"path": path})
        except ServerError as error:
            if error.code == -32005:
                raise AdapterFileError.from_server_error(path, error) from None
            raise
        self._rebuild_parameters(self.server.call("network.info"), reuse_parameters=reuse_parameters)
        if self._device_path:
            # The file may bring other modules and Parameters: bind anew at the next forward.
            self._device_path.release()
            self._device_path = None
        return result

    def close(self) -> None:
        """Ends the server (which unlinks the arena file; if it had died, this does)."""
        self.restore()
        if self._device_path:
            path, self._device_path = self._device_path, False
            with contextlib.suppress(ServerError, ServerDied):  # a dead server has closed its mappings
                path.release()
        self.arena.close()
        self.server.close()
        self.arena.remove_if_left()

    def parameters_info(self) -> Iterable[tuple[str, nn.Parameter]]:
        for name in self.modules_info:
            for suffix in self._keys[name]:
                yield f"{name}.{suffix}", self.adapters[name].get(suffix)


def _numel(shape) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count


def _common_device(tensors: Iterable[torch.Tensor]) -> torch.device | None:
    """The device all `tensors` are on, where copies out of the arena should land; None
    (CPU, each moved later) when they are on several."""
    devices = {t.device for t in tensors}
    return next(iter(devices)) if len(devices) == 1 else None
