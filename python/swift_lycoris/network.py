"""The torch side of a network of adapters computed by lycoris-server.

:class:`LycorisNetwork` is an ``nn.Module`` whose Parameters mirror the server's adapter
parameters (same names and shapes as LyCORIS's: ``<module>.lora_up.weight``, …), so any
torch optimizer, gradient clipping, accumulation or DDP works on them unchanged. Each
adapted layer's forward becomes ``org_forward(x) + AdapterFunction(x, params)``: the
autograd Function sends x to the server through the shared-memory arena and returns the
adapter's contribution m·Δ(x); its backward returns ∂x and the parameters' gradients.
Parameter values reach the server only when their version counter changed.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .arena import Arena, wire_dtype
from .server import Server

log = logging.getLogger("swift_lycoris")

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def layer_description(name: str, module: nn.Module) -> dict | None:
    """The server's description of a torch layer, or None for kinds it does not adapt."""
    if isinstance(module, nn.Linear):
        return {"name": name, "kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.Conv2d) and isinstance(module.padding, tuple):
        return {
            "name": name, "kind": "conv2d", "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
            "dilation": list(module.dilation), "groups": module.groups,
        }
    return None


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


class AdapterFunction(torch.autograd.Function):
    """m·Δ(x) of one adapter, computed by the server; backward returns ∂x and ∂params."""

    @staticmethod
    def forward(ctx, network: "LycorisNetwork", name: str, output_shape: torch.Size, x: torch.Tensor, *params):
        keep_tape = any(ctx.needs_input_grad[3:])
        delta, tape = network._server_forward(name, x, output_shape, keep_tape)
        ctx.network, ctx.name, ctx.tape = network, name, tape
        ctx.input_meta = (x.shape, x.dtype, x.device)
        ctx.param_meta = [(p.dtype, p.device) for p in params]
        return delta

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.tape is None:
            raise RuntimeError(f"swift_lycoris: {ctx.name} was run without a tape; backward is not possible")
        grad_input, grads = ctx.network._server_backward(ctx.name, ctx.tape, grad_output, ctx.input_meta)
        ctx.tape = None
        param_grads = [g.to(dtype=dtype, device=device) for g, (dtype, device) in zip(grads, ctx.param_meta)]
        return (None, None, None, grad_input, *param_grads)


class LycorisNetwork(nn.Module):
    """Adapters on a set of torch layers, computed by one lycoris-server process."""

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
    ):
        super().__init__()
        self.server = server or Server(threads=threads)
        self.arena = Arena(self.server)
        self.multiplier = float(multiplier)
        self._targets: dict[str, nn.Module] = {}
        descriptions = []
        for name, layer in layers.items():
            description = layer_description(name, layer)
            if description is None:
                log.warning("swift_lycoris: %s (%s) is not a layer kind the server adapts; skipped", name, type(layer).__name__)
                continue
            if algo == "ia3" or (layer_options or {}).get(name, {}).get("algo") == "ia3":
                description["weight"] = self._inline(layer.weight)
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
        self._synced_versions: dict[str, int] = {}
        self._rebuild_parameters(info)
        self.applied = False

    # MARK: parameters

    @staticmethod
    def _inline(tensor: torch.Tensor) -> dict:
        import base64

        data = tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return {"dtype": "F32", "shape": list(tensor.shape), "data": base64.b64encode(data).decode()}

    def _rebuild_parameters(self, info: dict) -> None:
        """Creates the torch Parameters from the server's current values."""
        self.modules_info = {m["name"]: m for m in info["modules"]}
        for name in [n for n in self.adapters.keys() if n not in self.modules_info]:
            del self.adapters[name]
        keys = [p["key"] for m in info["modules"] for p in m["parameters"]]
        values = self._fetch("parameters.get", keys)
        for module in info["modules"]:
            holder = _ParameterHolder()
            names = []
            for parameter in module["parameters"]:
                suffix = parameter["key"][len(module["name"]) + 1:]
                holder.set(suffix, nn.Parameter(values[parameter["key"]]))
                names.append(suffix)
            self.adapters[module["name"]] = holder
            self._keys[module["name"]] = names
        self._synced_versions = {key: self._parameter(key)._version for key in keys}

    def _parameter(self, key: str) -> nn.Parameter:
        module, suffix = key.split(".", 1)
        return self.adapters[module].get(suffix)

    def _module_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.adapters[name].get(suffix) for suffix in self._keys[name]]

    def _fetch(self, method: str, keys: list[str]) -> dict[str, torch.Tensor]:
        """Parameters or gradients by key, through the arena."""
        if not keys:
            return {}
        shapes = {p["key"]: p["shape"] for m in self.modules_info.values() for p in m["parameters"]}
        self.arena.begin()
        self.arena.plan([4 * max(1, _numel(shapes[k])) for k in keys])
        outputs = {key: self.arena.reserve(shapes[key], torch.float32) for key in keys}
        result = self.server.call(method, {"keys": keys, "outputs": outputs})
        return {key: self.arena.take(descriptor) for key, descriptor in result["parameters"].items()}

    def sync(self) -> None:
        """Sends the parameters whose values changed since the last sync (version counters)."""
        changed = [key for key, version in self._synced_versions.items() if self._parameter(key)._version != version]
        if not changed:
            return
        self.arena.begin()
        self.arena.plan([self._parameter(k).numel() * 4 for k in changed])
        params = {key: self.arena.put(self._parameter(key).detach().to("cpu", torch.float32)) for key in changed}
        self.server.call("parameters.set", {"parameters": params})
        for key in changed:
            self._synced_versions[key] = self._parameter(key)._version

    # MARK: forward / backward through the server

    def _server_forward(self, name: str, x: torch.Tensor, output_shape, keep_tape: bool):
        self.sync()
        dtype = x.dtype if x.dtype in _ITEMSIZE else torch.float32
        self.arena.begin()
        self.arena.plan([x.numel() * _ITEMSIZE[dtype], _numel(output_shape) * _ITEMSIZE[dtype]])
        call = {"module": name, "input": self.arena.put(x.to(dtype)), "output": self.arena.reserve(output_shape, dtype)}
        result = self.server.call("forward", {"calls": [call], "grad": keep_tape})["results"][0]
        delta = self.arena.take(result["output"]).to(x.device)
        return delta, result.get("tape")

    def _server_backward(self, name: str, tape: int, grad_output: torch.Tensor, input_meta):
        shape, dtype, device = input_meta
        dtype = dtype if dtype in _ITEMSIZE else torch.float32
        grad_output = grad_output.to(dtype)
        keys = [f"{name}.{suffix}" for suffix in self._keys[name]]
        shapes = [p.shape for p in self._module_parameters(name)]
        self.arena.begin()
        self.arena.plan([grad_output.numel() * _ITEMSIZE[dtype], _numel(shape) * _ITEMSIZE[dtype]] + [_numel(s) * 4 for s in shapes])
        call = {
            "tape": tape,
            "grad_output": self.arena.put(grad_output.contiguous()),
            "grad_input": self.arena.reserve(shape, dtype),
            "parameter_grads": {key: self.arena.reserve(s, torch.float32) for key, s in zip(keys, shapes)},
        }
        result = self.server.call("backward", {"calls": [call], "return_parameter_grads": True, "accumulate": False})["results"][0]
        grad_input = self.arena.take(result["grad_input"]).to(device)
        grads = [self.arena.take(result["parameter_grads"][key]) for key in keys]
        return grad_input, grads

    # MARK: attaching to the model

    def apply_to(self) -> None:
        """Routes each target layer's forward through its adapter."""
        for name, layer in self._targets.items():
            if name not in self.modules_info or getattr(layer, "_swift_lycoris_original", None) is not None:
                continue
            original = layer.forward
            layer._swift_lycoris_original = original

            def forward(x, *args, _name=name, _original=original, **kwargs):
                base = _original(x, *args, **kwargs)
                return base + AdapterFunction.apply(self, _name, base.shape, x, *self._module_parameters(_name))

            layer.forward = forward
        self.applied = True

    def restore(self) -> None:
        """Gives every target layer its original forward back."""
        for layer in self._targets.values():
            original = getattr(layer, "_swift_lycoris_original", None)
            if original is not None:
                layer.forward = original
                layer._swift_lycoris_original = None
        self.applied = False

    @torch.no_grad()
    def merge_to(self, multiplier: float | None = None) -> None:
        """Adds m·ΔW (the forward's ΔW) into every target layer's weight, and restores the
        layers' own forward."""
        self.sync()
        if multiplier is not None:
            self.set_multiplier(multiplier)
        names = list(self.modules_info)
        self.arena.begin()
        self.arena.plan([self._targets[n].weight.numel() * 4 for n in names])
        outputs = {n: self.arena.reserve(list(self._targets[n].weight.shape), torch.float32) for n in names}
        result = self.server.call("delta_weight", {"modules": names, "outputs": outputs, "grad": False})
        for item in result["results"]:
            weight = self._targets[item["module"]].weight
            weight.add_(self.arena.take(item["delta_weight"]).to(weight.device, weight.dtype))
        self.restore()

    # MARK: state

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        self.server.call("network.set_multiplier", {"multiplier": self.multiplier})

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "server"):
            self.server.call("network.set_training", {"training": bool(mode)})
        return self

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        """Writes the adapters as a LyCORIS/kohya safetensors file (atomically)."""
        self.sync()
        names = {torch.float16: "F16", torch.bfloat16: "BF16"}
        self.server.call("network.save", {"path": str(file), "dtype": names.get(dtype, "F32"),
                                          "metadata": {str(k): str(v) for k, v in (metadata or {}).items()}})

    def load_weights(self, file: str) -> dict:
        """Loads a LyCORIS/kohya file's modules onto this network's layers."""
        result = self.server.call("network.load", {"path": str(file)})
        self._rebuild_parameters(self.server.call("network.info"))
        return result

    def close(self) -> None:
        """Ends the server (the arena file is unlinked by it)."""
        self.restore()
        self.arena.close()
        self.server.close()

    def parameters_info(self) -> Iterable[tuple[str, nn.Parameter]]:
        for name in self.modules_info:
            for suffix in self._keys[name]:
                yield f"{name}.{suffix}", self.adapters[name].get(suffix)


def _numel(shape) -> int:
    count = 1
    for extent in shape:
        count *= int(extent)
    return count
