"""LyCORIS's generic wrapper for any torch model: ``create_lycoris`` adapts every Linear and
Conv1d/2d/3d, and with ``train_norm`` every LayerNorm/GroupNorm (names
``lycoris_<path with _>``), like ``lycoris.create_lycoris``."""

from __future__ import annotations

import logging

from torch import nn

from . import suggestion
from .network import BASE_WEIGHT_SUFFIXES, LycorisNetwork, is_norm_layer, layer_description
from .server import Server, describe_file

PREFIX = "lycoris_"
log = logging.getLogger("swift_lycoris")


def _targets(model: nn.Module, norms, prefix: str = PREFIX) -> dict[str, nn.Module]:
    """The layers the server adapts, by module name; norm layers only where `norms` says
    (True: all, or a set of module names)."""
    return {
        name: module
        for path, module in model.named_modules()
        if path and layer_description("x", module) is not None
        for name in [prefix + path.replace(".", "_")]
        if not is_norm_layer(module) or norms is True or (norms and name in norms)
    }


def create_lycoris(model: nn.Module, multiplier: float = 1.0, linear_dim: int = 4, linear_alpha: float = 1.0,
                   algo: str = "lora", conv_dim: int | None = None, conv_alpha: float | None = None,
                   seed: int = 0, threads: int | None = None, transfer: str = "auto", nan_policy: str = "error",
                   budget: int | str | None = None, budget_dtype: str = "f16", device: str = "auto",
                   **kwargs) -> LycorisNetwork:
    """Adapters of `algo` on every Linear (rank `linear_dim`, alpha `linear_alpha`) and
    Conv1d/2d/3d (kernels whose first extent is not 1: `conv_dim`/`conv_alpha`, defaulting to
    the linear ones) of `model`; with `train_norm=True` also LyCORIS's `norm` adapter
    (`w_norm`, `b_norm`) on every affine LayerNorm/GroupNorm. Other keyword arguments are
    LyCORIS's module options (use_tucker, use_scalar, factor, decompose_both, block_size,
    dropout, rank_dropout, module_dropout, bypass_mode, …); DoRA is ``weight_decompose=True``
    (or LyCORIS's wrapper names ``dora_wd=True``, with ``wd_on_output`` for ``wd_on_out``).
    `transfer`: "auto" (per call, whichever of activations and ΔW costs less, by costs
    measured on this machine at the first choice — see :mod:`swift_lycoris.calibration` — and
    then by what each layer's calls observed; IA3
    in training scales the base output on the server in one elementwise pass), "activations"
    or "weights". The choice is in ``network.modules_info[name]["transfer"]`` and logged
    (debug, logger ``swift_lycoris``) when it changes. `nan_policy`: "error" (a NaN or ±∞ in a layer's
    input, output gradient or parameters raises NonFiniteError naming the module and the
    pass) or "skip_step" (a warning, and the step leaves the adapters unchanged; see
    :mod:`swift_lycoris.nonfinite`). `device`: "auto" (layers on a CUDA device compute there
    through the device path when the server can, see :mod:`swift_lycoris.device`), "cpu",
    "cuda", "cuda:N" or the test device "emulated"; ``$SWIFT_LYCORIS_DEVICE`` overrides it.
    ``algo="auto"`` with ``budget`` (a size such as ``"10MB"`` at `budget_dtype`, or a
    parameter count): each Linear/Conv layer gets the algorithm (LoRA, LoHa or LoKr) and rank
    or Kronecker factor of ``lycoris suggest``'s plan (:mod:`swift_lycoris.suggestion`),
    logged per block at info; `linear_alpha`/`conv_alpha` still apply, `linear_dim`/`conv_dim`
    do not (``conv_dim=0`` still leaves k×k convolutions out)."""
    train_norm = kwargs.pop("train_norm", False)
    if not isinstance(train_norm, bool):
        raise TypeError(f"train_norm must be a bool, not {train_norm!r}")
    for alias, name in (("dora_wd", "weight_decompose"), ("wd_on_output", "wd_on_out")):
        if alias in kwargs:
            kwargs[name] = bool(kwargs.pop(alias))
    options = {"lora_dim": int(linear_dim), "alpha": float(linear_alpha), **kwargs}
    if conv_dim is not None:
        options["conv_dim"] = int(conv_dim)
    if conv_alpha is not None:
        options["conv_alpha"] = float(conv_alpha)
    targets = _targets(model, train_norm)
    layer_options = None
    if str(algo).lower() == "auto":
        planned = {name: layer for name, layer in targets.items()
                   if not (conv_dim == 0 and isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.kernel_size[0] != 1)}
        result = suggestion.plan(planned, budget, budget_dtype)
        for line in suggestion.plan_lines(result, budget_dtype):
            log.info("swift_lycoris algo=auto: %s", line)
        algo, layer_options = "lora", suggestion.layer_options(result)
    return LycorisNetwork(targets, algo=algo, options=options, layer_options=layer_options, multiplier=multiplier,
                          seed=seed, threads=threads, transfer=transfer, nan_policy=nan_policy,
                          device=device)


def create_lycoris_from_weights(multiplier: float, file: str, module: nn.Module, algo: str = "lora",
                                threads: int | None = None) -> LycorisNetwork:
    """A network on `module`'s layers with the adapters of `file` (any LyCORIS algorithm
    this server computes, detected per module from the file's keys). A file that is
    missing, truncated, hostile or not safetensors raises :class:`AdapterFileError` naming
    the file and the rule. Modules with IA3's `on_input`, GLoRA's `a1.weight` or DoRA's
    `dora_scale` need their layers' base weights on the server; modules with `w_norm` are norm
    adapters (their layers are included)."""
    server = Server(threads=threads)
    try:
        keys = [t["key"] for t in describe_file(file, server)["tensors"]]
    except BaseException:
        server.close()
        raise
    network = LycorisNetwork(_targets(module, {k.split(".", 1)[0] for k in keys if k.endswith(".w_norm")}), algo=algo,
                             multiplier=multiplier, server=server,
                             base_weights_for={k.split(".", 1)[0] for k in keys
                                               if k.split(".", 1)[-1] in BASE_WEIGHT_SUFFIXES})
    network.load_weights(file)
    return network
