"""LyCORIS's generic wrapper for any torch model: ``create_lycoris`` adapts every Linear
and Conv2d (names ``lycoris_<path with _>``), like ``lycoris.create_lycoris``."""

from __future__ import annotations

import json
import struct

from torch import nn

from .network import LycorisNetwork, layer_description

PREFIX = "lycoris_"


def _targets(model: nn.Module, prefix: str = PREFIX) -> dict[str, nn.Module]:
    return {
        prefix + path.replace(".", "_"): module
        for path, module in model.named_modules()
        if path and layer_description("x", module) is not None
    }


def create_lycoris(model: nn.Module, multiplier: float = 1.0, linear_dim: int = 4, linear_alpha: float = 1.0,
                   algo: str = "lora", conv_dim: int | None = None, conv_alpha: float | None = None,
                   seed: int = 0, threads: int | None = None, transfer: str = "auto", **kwargs) -> LycorisNetwork:
    """Adapters of `algo` on every Linear (rank `linear_dim`, alpha `linear_alpha`) and Conv2d
    (k×k kernels: `conv_dim`/`conv_alpha`, defaulting to the linear ones) of `model`.
    Other keyword arguments are LyCORIS's module options (use_tucker, use_scalar, factor,
    decompose_both, block_size, dropout, rank_dropout, module_dropout, bypass_mode, …).
    `transfer`: "auto" (per call, whichever of activations and ΔW is smaller crosses to the
    server), "activations" or "weights"."""
    options = {"lora_dim": int(linear_dim), "alpha": float(linear_alpha), **kwargs}
    if conv_dim is not None:
        options["conv_dim"] = int(conv_dim)
    if conv_alpha is not None:
        options["conv_alpha"] = float(conv_alpha)
    return LycorisNetwork(_targets(model), algo=algo, options=options, multiplier=multiplier, seed=seed, threads=threads,
                          transfer=transfer)


def create_lycoris_from_weights(multiplier: float, file: str, module: nn.Module, algo: str = "lora",
                                threads: int | None = None) -> LycorisNetwork:
    """A network on `module`'s layers with the adapters of `file` (any LyCORIS algorithm
    this server computes, detected per module from the file's keys)."""
    network = LycorisNetwork(_targets(module), algo=algo, multiplier=multiplier, threads=threads,
                             base_weights_for=_ia3_modules(file))
    network.load_weights(file)
    return network


def _ia3_modules(file: str) -> set[str]:
    """Modules of a safetensors file that carry IA3's `on_input` key (read from the header
    only): their layers' base weights must reach the server."""
    with open(file, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    return {key.split(".", 1)[0] for key in header if key.endswith(".on_input")}
