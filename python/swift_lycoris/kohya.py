"""A drop-in kohya sd-scripts ``--network_module``: LyCORIS adapters computed by lycoris-server.

Use it where ``lycoris.kohya`` is used::

    accelerate launch train_network.py ... \\
        --network_module swift_lycoris.kohya --network_dim 16 --network_alpha 8 \\
        --network_args "algo=loha" "preset=attn-mlp" "conv_dim=8" "conv_alpha=4"

The adapter math (ΔW, forward, backward, merging, norms of ΔW) runs in the Swift server;
this module picks the layers, hooks their forward into torch autograd, exposes the adapter
parameters as ``nn.Parameter`` for kohya's optimizer, and reads/writes kohya/LyCORIS files.

**network_args** (every value arrives as a string), with lycoris.kohya 4.1.3's names and
defaults: ``algo`` (lora; locon, loha, lokr, ia3, dylora, glora, full, diag-oft, boft and
tlora are computed), ``preset`` (full; see
:mod:`swift_lycoris.presets`, or a TOML file), ``conv_dim`` (= network_dim), ``conv_alpha``
(= network_alpha), ``dropout``, ``rank_dropout``, ``module_dropout`` (0), ``use_tucker``
(aliases ``use_cp``, ``use_conv_cp``; ``disable_conv_cp``), ``use_scalar``,
``block_size`` (4), ``train_norm``, ``constraint``/``constrain``, ``rescaled``,
``dora_wd``, ``wd_on_output`` (true), ``full_matrix``, ``bypass_mode``, ``rs_lora``,
``unbalanced_factorization``, ``factor`` (-1), ``decompose_both``, ``train_t5xxl``,
``train_llm_adapter``, ``loraplus_lr_ratio``, ``loraplus_unet_lr_ratio``,
``loraplus_text_encoder_lr_ratio``. Additions: ``rank_dropout_scale`` (a LyCORIS module
option lycoris.kohya does not pass on), ``seed`` (initialisation seed of the server; default
``torch.initial_seed()``, i.e. kohya's ``--seed``), ``server_threads`` (OpenBLAS threads),
``nan_policy`` (``error``, the default: a NaN or ±∞ in a layer's input, output gradient or
parameters raises :class:`~swift_lycoris.nonfinite.NonFiniteError` naming the module and the
pass; ``skip_step``: a warning, and the step leaves the adapters unchanged — see
:mod:`swift_lycoris.nonfinite`), and ``algo=auto`` with ``budget`` (``10MB`` at
``budget_dtype``, f16 by default, or a parameter count): every selected Linear/Conv layer
gets the algorithm (LoRA, LoHa or LoKr) and rank or Kronecker factor of ``lycoris
suggest``'s plan (:mod:`swift_lycoris.suggestion`), printed per block when the network is
created; network_alpha/conv_alpha still apply, network_dim/conv_dim only select layers.

**Booleans are parsed** (``true/false``, ``1/0``, ``yes/no``, ``on/off``, any case; anything
else is an error). LyCORIS counts every string but ``"false"`` as true (``"0"`` is true) and
passes ``decompose_both`` on unparsed, so there ``decompose_both=False`` enables it; here
``decompose_both=False`` means false.

Differences from lycoris.kohya 4.1.3 (see also :mod:`swift_lycoris.presets`):

- ``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding) and, with ``train_norm``, affine
  ``nn.LayerNorm``/``nn.GroupNorm`` layers are adapted (the server's layer kinds); other
  layers inside matched blocks are skipped with a warning. A norm layer gets LyCORIS's
  ``norm`` adapter (``w_norm``, ``b_norm``) whatever ``algo`` is, as in LyCORIS; its
  ``rank_dropout`` drops elements with probability p (LyCORIS 4.1.3 keeps them with
  probability p).
- ``algo=tlora``: the training loop sets the rank mask with
  :func:`swift_lycoris.set_timestep_mask` (where it calls ``lycoris.set_timestep_mask``); a
  convolution with a kernel larger than 1 (on which LyCORIS 4.1.3 crashes) keeps the kernel
  in ``q_layer.weight`` (r, in/g, k…).
- ``dora_wd=True`` (with ``wd_on_output``) decomposes lora/locon/loha/lokr modules (DoRA);
  their layers' weights go to the server once, as for IA3 and GLoRA. With ``bypass_mode``
  DoRA modules still rebuild W' (LyCORIS's bypass paths drop DoRA silently).
  ``constraint`` and ``rescaled`` only concern diag-oft/boft (ignored, with a note, for other
  algorithms).
- ``algo=full`` trains ``diff`` (and ``diff_b`` on layers with a bias) on the server; the
  layer keeps its own weight (LyCORIS moves it into the module and keeps a second copy).
- A layer matched twice (the default preset lists ``TimestepEmbedding`` and
  ``time_embedding.linear_1/2``) is adapted once instead of failing.
- ``apply_max_norm_regularization`` takes ‖ΔW‖ from the server and, like LyCORIS, rescales
  LoCon/LoHa/LoKr modules (IA3 and DyLoRA are left alone, as LyCORIS does; Diag-OFT, BOFT and
  T-LoRA modules too, which LyCORIS scales). LyCORIS
  multiplies a hidden ``scalar`` buffer; this scales the parameters themselves: ``scalar``
  when the module has one (``use_scalar``), else LoCon ``lora_up``, LoHa ``hada_w1_a`` and
  ``hada_w2_a`` by √ratio each, LoKr every factor by ratio^(1/n) (LyCORIS's own rule for
  LoKr). The adapter's output after the step is the same; later gradients differ as the
  parametrisation does.
- ``merge_to`` merges with the network's multiplier (kohya's ``--base_weights_multiplier``
  semantics; LyCORIS merges with 1) and with α/r applied once for LoHa/LoKr (LyCORIS 4.1.3
  applies it twice when merging).
- ``load_weights`` returns module names (``{"missing keys": [...], "unexpected keys": [...]}``),
  and a file may change a module's algorithm or rank (the server rebuilds it from the
  file's keys); LyCORIS copies tensors into the existing modules.
- DyLoRA, IA3 and LoHa/LoKr files follow the server's file conventions (DyLoRA: ``alpha``
  = α·block_size and a 4-D ``lora_up`` for convolutions, so files reload with the scale the
  network trained with; ``alpha`` is always stored as F32).
- The saved file gets kohya's ``sshs_model_hash`` and ``sshs_legacy_hash`` (computed as
  sd-scripts' ``train_util.precalculate_safetensors_hashes``), not LyCORIS's variant.
- IA3 files load (LyCORIS 4.1.3 cannot), and so do DoRA files saved with
  ``wd_on_output=False`` (LyCORIS 4.1.3 reads every ``dora_scale`` as (out, 1, …)).
- ``state_dict()`` keys are the file's keys (``<module>.lora_up.weight``, ``<module>.alpha``,
  IA3 ``<module>.on_input``), plus ``<module>.scalar`` with ``use_scalar`` (LyCORIS folds the
  scalar into a factor in its state dict as in its file; keeping it unfolded makes
  accelerate's save_state/resume exact). ``load_state_dict`` copies in place when the
  tensors fit the modules, and otherwise lets the server rebuild the modules from them.
- Extra: ``prepare_optimizer_params_with_multiple_te_lrs`` (kohya v0.10's per-text-encoder
  learning rates, as kohya's own networks have it), and gen_img.py's ``--network_pre_calc``
  (``backup_weights``, ``pre_calculation``, ``restore_weights``; LyCORIS has none of them).
  Regional prompting (``set_region``, ``set_current_generation``) is not implemented.

Autograd bookkeeping is the network's (:meth:`LycorisNetwork.adapter_delta`): the server
keeps a *tape* (a copy of the input) for every forward that may be back-propagated, for as
long as its autograd graph lives; forwards without gradient ask for none, and tapes of
freed graphs are released (``tapes.release``) at the next forward or ``on_step_start``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import os
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import suggestion
from .network import LycorisNetwork, is_norm_layer, layer_description
from .nonfinite import check_nan_policy
from .presets import resolve_preset
from .server import ServerError, describe_file

log = logging.getLogger("swift_lycoris.kohya")

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"

COMPUTED_ALGORITHMS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "glora", "full", "diag-oft", "boft", "tlora")

# Algorithms whose constraint/rescaled options the server takes.
OFT_ALGORITHMS = ("diag-oft", "boft")

# Adapter options the server takes per layer, by LyCORIS's keyword name.
_SERVER_OPTIONS = (
    "use_tucker", "use_scalar", "rs_lora", "decompose_both", "factor", "full_matrix",
    "unbalanced_factorization", "train_on_input", "block_size", "dropout", "rank_dropout",
    "module_dropout", "rank_dropout_scale", "bypass_mode", "constraint", "rescaled", "weight_decompose", "wd_on_out",
)
_BOOL_OPTIONS = {"use_tucker", "use_scalar", "rs_lora", "decompose_both", "full_matrix",
                 "unbalanced_factorization", "train_on_input", "rank_dropout_scale", "bypass_mode", "rescaled",
                 "weight_decompose", "wd_on_out"}
_OPTION_ALIASES = {"use_cp": "use_tucker", "use_conv_cp": "use_tucker", "constrain": "constraint",
                   "dora_wd": "weight_decompose", "wd_on_output": "wd_on_out"}

# Every network_arg of lycoris.kohya 4.1.3, plus this module's additions.
KNOWN_NETWORK_ARGS = {
    "algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout",
    "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "use_scalar", "block_size",
    "train_norm", "constraint", "constrain", "rescaled", "dora_wd", "wd_on_output", "full_matrix",
    "bypass_mode", "rs_lora", "unbalanced_factorization", "factor", "decompose_both",
    "train_t5xxl", "train_llm_adapter", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "warn_on_unmatched",
    "rank_dropout_scale", "seed", "server_threads", "nan_policy", "budget", "budget_dtype",
}

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f", "none", ""}


# MARK: argument parsing

def parse_bool(value: Any, name: str = "value") -> bool:
    """A kohya network_arg as a boolean: ``true/false``, ``1/0``, ``yes/no``, ``on/off``
    (any case), or a Python bool/number. Unlike LyCORIS's ``str_bool``, ``"0"`` and
    ``"False"`` are false; other strings are an error."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return value != 0
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"network_args: {name}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def _parse_float(value: Any, name: str, default: float | None) -> float | None:
    if _is_unset(value):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args: {name}={value!r} is not a number") from None


def _parse_int(value: Any, name: str, default: int | None) -> int | None:
    if _is_unset(value):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args: {name}={value!r} is not an integer") from None
    if number != int(number):
        raise ValueError(f"network_args: {name}={value!r} is not an integer")
    return int(number)


def _check_algorithm(algo: str, where: str) -> str:
    algo = str(algo).strip().lower()
    if algo in COMPUTED_ALGORITHMS:
        return algo
    if algo in ("norm", "norms"):
        raise ValueError(f"{where}: the norm adapter is for LayerNorm/GroupNorm layers only: keep your algo and "
                         "set train_norm=True")
    raise ValueError(f"{where}: unknown algorithm {algo!r} (computed: {', '.join(COMPUTED_ALGORITHMS)})")


def _layer_options(config: dict, where: str) -> dict:
    """Server options from a preset's per-module table (LyCORIS keyword names)."""
    options = {}
    for key, value in config.items():
        key = _OPTION_ALIASES.get(key, key)
        if key in ("algo", "dim", "alpha"):
            continue
        if key not in _SERVER_OPTIONS:
            log.warning("swift_lycoris.kohya: %s: option %r is not used by lycoris-server; ignored", where, key)
            continue
        if key in _BOOL_OPTIONS:
            options[key] = parse_bool(value, key)
        elif key in ("factor", "block_size"):
            options[key] = _parse_int(value, key, None)
        else:
            options[key] = _parse_float(value, key, None)
    return {k: v for k, v in options.items() if v is not None}


@dataclass
class NetworkArgs:
    """kohya's ``create_network`` arguments and ``--network_args``, parsed."""

    network_dim: int = 4
    network_alpha: float | None = 1.0
    conv_dim: int = 4
    conv_alpha: float | None = 1.0
    algo: str = "lora"
    preset: Any = "full"
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_tucker: bool = False
    use_scalar: bool = False
    block_size: int = 4
    train_norm: bool = False
    constraint: float = 0.0
    rescaled: bool = False
    dora_wd: bool = False
    wd_on_output: bool = True
    full_matrix: bool = False
    bypass_mode: bool = False
    rs_lora: bool = False
    unbalanced_factorization: bool = False
    factor: int = -1
    decompose_both: bool = False
    rank_dropout_scale: bool = False
    train_t5xxl: bool = False
    train_llm_adapter: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    seed: int = 0
    server_threads: int | None = None
    nan_policy: str = "error"
    budget: str | None = None
    budget_dtype: str = "f16"
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, network_dim=None, network_alpha=None, neuron_dropout=None,
              kwargs: dict | None = None) -> "NetworkArgs":
        kw = dict(kwargs or {})
        unknown = sorted(k for k in kw if k not in KNOWN_NETWORK_ARGS)
        if unknown:
            log.warning("swift_lycoris.kohya: unknown network_args ignored: %s", ", ".join(unknown))
        args = cls()
        args.extra = {k: kw[k] for k in unknown}
        dim = _parse_int(network_dim, "network_dim", None)
        args.network_dim = dim if dim else 4
        args.network_alpha = _parse_float(network_alpha, "network_alpha", None)
        conv_dim = _parse_int(kw.get("conv_dim"), "conv_dim", None)
        args.conv_dim = args.network_dim if conv_dim is None else conv_dim
        conv_alpha = _parse_float(kw.get("conv_alpha"), "conv_alpha", None)
        # As LyCORIS: conv_alpha=0 is kept (a layer alpha of 0 means α = r), unset means network_alpha.
        args.conv_alpha = args.network_alpha if conv_alpha is None else conv_alpha
        algo = str(kw.get("algo") or "lora").strip().lower()
        args.algo = "auto" if algo == "auto" else _check_algorithm(algo, "network_args algo")
        args.budget = None if _is_unset(kw.get("budget")) else str(kw["budget"]).strip()
        args.budget_dtype = str(kw.get("budget_dtype") or "f16").strip().lower()
        args.preset = kw.get("preset") or "full"
        dropout = _parse_float(kw.get("dropout"), "dropout", None)
        if dropout is None:
            dropout = _parse_float(neuron_dropout, "neuron_dropout", None)
        args.dropout = dropout or 0.0
        args.rank_dropout = _parse_float(kw.get("rank_dropout"), "rank_dropout", 0.0) or 0.0
        args.module_dropout = _parse_float(kw.get("module_dropout"), "module_dropout", 0.0) or 0.0
        tucker = any(parse_bool(kw.get(k, False), k) for k in ("use_tucker", "use_cp", "use_conv_cp"))
        if "disable_conv_cp" in kw:
            # LyCORIS aliases disable_conv_cp to use_tucker (so "disable_conv_cp=True" turns Tucker
            # on); here it keeps its meaning: true disables Tucker, false enables it.
            tucker = tucker or not parse_bool(kw["disable_conv_cp"], "disable_conv_cp")
        args.use_tucker = tucker
        for name in ("use_scalar", "train_norm", "rescaled", "dora_wd", "full_matrix", "bypass_mode", "rs_lora",
                     "unbalanced_factorization", "decompose_both", "rank_dropout_scale", "train_t5xxl",
                     "train_llm_adapter"):
            setattr(args, name, parse_bool(kw.get(name, False), name))
        args.wd_on_output = parse_bool(kw.get("wd_on_output", True), "wd_on_output")
        args.block_size = _parse_int(kw.get("block_size"), "block_size", None) or 4
        args.constraint = _parse_float(kw.get("constraint", kw.get("constrain")), "constraint", 0.0) or 0.0
        args.factor = _parse_int(kw.get("factor"), "factor", -1)
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            setattr(args, name, _parse_float(kw.get(name), name, None))
        seed = _parse_int(kw.get("seed"), "seed", None)
        args.seed = (torch.initial_seed() if seed is None else seed) & ((1 << 63) - 1)
        args.server_threads = _parse_int(kw.get("server_threads"), "server_threads", None)
        args.nan_policy = check_nan_policy(str(kw.get("nan_policy") or "error").strip().lower())
        if (args.constraint or args.rescaled) and args.algo not in OFT_ALGORITHMS:
            log.info("swift_lycoris.kohya: constraint/rescaled only concern diag-oft and boft; ignored for %s",
                     args.algo)
        return args

    def server_options(self) -> dict:
        """The options every layer shares (rank and alpha are set per layer)."""
        options = {
            "dropout": self.dropout, "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
            "use_tucker": self.use_tucker, "use_scalar": self.use_scalar, "rs_lora": self.rs_lora,
            "decompose_both": self.decompose_both, "factor": self.factor, "full_matrix": self.full_matrix,
            "unbalanced_factorization": self.unbalanced_factorization, "block_size": self.block_size,
            "rank_dropout_scale": self.rank_dropout_scale,
        }
        if self.algo in OFT_ALGORITHMS:
            options.update(constraint=self.constraint, rescaled=self.rescaled)
        if self.dora_wd:
            options.update(weight_decompose=True, wd_on_out=self.wd_on_output)
        if self.bypass_mode:
            # Unset means rebuild semantics (LyCORIS's bypass_mode=False), which the server may
            # compute through the factors when that is the same function and cheaper.
            options["bypass_mode"] = True
        return options

    def runtime_options(self) -> dict:
        """The options a loaded file does not decide (dropouts, bypass)."""
        options = {"dropout": self.dropout, "rank_dropout": self.rank_dropout, "module_dropout": self.module_dropout,
                   "rank_dropout_scale": self.rank_dropout_scale}
        if self.bypass_mode:
            options["bypass_mode"] = True
        return options


# MARK: choosing layers

@dataclass
class _Target:
    name: str
    module: nn.Module
    group: str  # "te" or "unet"
    algo: str
    options: dict


def _text_encoders(text_encoder) -> list[tuple[str, nn.Module]]:
    """(prefix, model) per text encoder: ``lora_te`` for one, ``lora_te1``/``lora_te2``… for a list."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [(f"{LORA_PREFIX_TEXT_ENCODER}{i + 1}", te) for i, te in enumerate(text_encoder) if te is not None]
    return [(LORA_PREFIX_TEXT_ENCODER, text_encoder)]


class _Selector:
    """LyCORIS's module walk (``LycorisNetworkKohya.__init__``), producing layer targets."""

    def __init__(self, preset: dict, args: NetworkArgs):
        self.preset = preset
        self.args = args
        self.use_fnmatch = bool(preset.get("use_fnmatch", False))
        self.exclude = list(preset.get("exclude_name") or [])
        self.module_algo_map = dict(preset.get("module_algo_map") or {})
        self.name_algo_map = dict(preset.get("name_algo_map") or {})
        self.conv_dim = args.conv_dim if preset.get("enable_conv", True) else 0
        for where, table in (("module_algo_map", self.module_algo_map), ("name_algo_map", self.name_algo_map)):
            for key, config in table.items():
                if "algo" in config:
                    _check_algorithm(config["algo"], f"preset {where}[{key!r}]")
                _layer_options(config, f"preset {where}[{key!r}]")  # checks the options early
        self.targets: "OrderedDict[str, _Target]" = OrderedDict()
        self.skipped: list[str] = []

    def match(self, pattern: str, name: str) -> bool:
        if self.use_fnmatch:
            return fnmatch.fnmatch(name, pattern)
        return re.match(pattern, name) is not None

    def excluded(self, name: str) -> bool:
        if not name or not self.exclude:
            return False
        return name in self.exclude or any(self.match(t, name) for t in self.exclude)

    def conf_for_name(self, name: str) -> dict | None:
        if name in self.name_algo_map:
            return self.name_algo_map[name]
        for key, value in self.name_algo_map.items():
            if self.match(key, name):
                return value
        return None

    def walk(self, prefix: str, root: nn.Module, group: str, target_modules: list[str],
             target_names: list[str]) -> None:
        for name, module in root.named_modules():
            if self.excluded(name):
                continue
            cls = type(module).__name__
            if cls in target_modules and not any(self.match(t, name) for t in target_names):
                config = self.module_algo_map.get(cls, {})
                algo = config.get("algo", self.args.algo)
                block_prefix = f"{prefix}_{name}" if name else prefix
                self.walk_block(block_prefix, module, group, algo, config, name)
            elif name in target_names or any(self.match(t, name) for t in target_names):
                config = self.conf_for_name(name)
                if config is None:
                    config = self.module_algo_map.get(cls, {})
                algo = config.get("algo", self.args.algo)
                self.add(f"{prefix}.{name}".replace(".", "_"), module, group, algo, config)

    def walk_block(self, prefix: str, block: nn.Module, group: str, algo: str, config: dict, path: str) -> None:
        created: set[str] = set()
        for name, module in block.named_modules():
            full_name = ".".join(part for part in (path, name) if part)
            if self.excluded(full_name):
                continue
            cls = type(module).__name__
            if cls in self.module_algo_map and module is not block:
                nested = self.module_algo_map[cls]
                before = set(self.targets)
                self.walk_block(f"{prefix}_{name}", module, group, nested.get("algo", algo), nested, full_name)
                created |= set(self.targets) - before
                continue
            lora_name = (f"{prefix}.{name}" if name else prefix).replace(".", "_")
            if lora_name in created:
                continue
            if self.add(lora_name, module, group, algo, config):
                created.add(lora_name)

    def add(self, lora_name: str, module: nn.Module, group: str, algo: str, config: dict) -> bool:
        """LyCORIS's ``create_single_module``: rank and alpha by layer kind; False when the
        layer gets no adapter."""
        args = self.args
        dim = _parse_int(config.get("dim"), "dim", None)
        alpha = _parse_float(config.get("alpha"), "alpha", None)
        if "Norm" in type(module).__name__ and args.train_norm:
            algo = "norm"  # LyCORIS's train_norm: the norm adapter, whatever the algorithm
        elif isinstance(module, nn.Linear) and args.network_dim > 0:
            dim, alpha = dim or args.network_dim, alpha or args.network_alpha
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.kernel_size[0] == 1 and args.network_dim > 0:
                dim, alpha = dim or args.network_dim, alpha or args.network_alpha
            elif self.conv_dim > 0 or dim:
                dim, alpha = dim or self.conv_dim, alpha or args.conv_alpha
            else:
                return False
        else:
            return False
        if layer_description(lora_name, module) is None:
            self.skipped.append(f"{lora_name} ({type(module).__name__})")
            return False
        if lora_name in self.targets:
            # Matched twice (LyCORIS's default preset names time_embedding.linear_1/2 inside a
            # target class): the first match stands.
            return True
        options = _layer_options(config, lora_name)
        if algo == "norm":
            self.targets[lora_name] = _Target(lora_name, module, group, algo, options)
            return True
        options["lora_dim"] = int(dim)
        options["alpha"] = None if alpha is None else float(alpha)
        self.targets[lora_name] = _Target(lora_name, module, group, _check_algorithm(algo, lora_name), options)
        return True


def select_targets(text_encoder, unet, preset: dict, args: NetworkArgs) -> "OrderedDict[str, _Target]":
    """The layers lycoris.kohya would adapt, in its order (text encoders, then the U-Net)."""
    selector = _Selector(preset, args)
    for prefix, te in _text_encoders(text_encoder):
        selector.walk(prefix, te, "te", list(preset.get("text_encoder_target_module") or []),
                      list(preset.get("text_encoder_target_name") or []))
    if unet is not None:
        modules = list(preset.get("unet_target_module") or [])
        if not args.train_llm_adapter and "LLMAdapterTransformerBlock" in modules:
            modules.remove("LLMAdapterTransformerBlock")
        selector.walk(LORA_PREFIX_UNET, unet, "unet", modules, list(preset.get("unet_target_name") or []))
    if selector.skipped:
        log.warning("swift_lycoris.kohya: %d layers are not adapted (lycoris-server adapts Linear, Conv1d/2d/3d with "
                    "zero padding, and affine LayerNorm/GroupNorm): %s", len(selector.skipped),
                    ", ".join(selector.skipped[:20]))
    if not selector.targets:
        log.warning("swift_lycoris.kohya: no layers matched the preset; check the preset against the model")
    return selector.targets


# MARK: kohya's hashes

def precalculate_safetensors_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts computes them: the file bytes
    ``safetensors.torch.save(tensors, metadata restricted to ss_* keys)``; the model hash is
    the SHA-256 of everything after the header, the legacy hash the first 8 hex digits of
    the SHA-256 of bytes 0x100000–0x10FFFF."""
    import safetensors.torch

    training_metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, training_metadata)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


# MARK: the network

class LycorisNetworkKohya(nn.Module):
    """kohya's network object: adapters on the chosen text-encoder and U-Net layers.

    The server-side network is created by :meth:`apply_to` (or by the first call that needs
    it) on the layers kohya asks for. Each adapter module is a submodule named like its file
    keys, so ``state_dict()`` keys are the saved file's keys (``<name>.lora_up.weight``,
    ``<name>.alpha``, …; plus ``<name>.scalar`` with ``use_scalar``, which files fold into a
    factor).
    """

    LORA_PREFIX_UNET = LORA_PREFIX_UNET
    LORA_PREFIX_TEXT_ENCODER = LORA_PREFIX_TEXT_ENCODER

    def __init__(self, targets: "OrderedDict[str, _Target]", args: NetworkArgs, multiplier: float = 1.0,
                 options: dict | None = None):
        super().__init__()
        self.multiplier = float(multiplier)
        self.args = args
        self.algo = args.algo
        self.server_options = dict(args.server_options() if options is None else options)
        self._targets = targets
        self.loraplus_lr_ratio = args.loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = args.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = args.loraplus_text_encoder_lr_ratio
        self._pending_weights: Any = None
        self._hooks: dict[str, tuple[nn.Module, Any, bool]] = {}
        self.__dict__["_core"] = None

    # MARK: layers and the server network

    @property
    def core(self) -> LycorisNetwork | None:
        """The :class:`LycorisNetwork` that talks to the server (None before :meth:`apply_to`)."""
        return self.__dict__["_core"]

    @property
    def target_names(self) -> list[str]:
        """Every layer this network can adapt (before apply_to's choice)."""
        return list(self._targets)

    @property
    def lora_names(self) -> list[str]:
        """The adapted modules (after apply_to), text encoders first."""
        return list(self.core.modules_info) if self.core is not None else []

    @property
    def text_encoder_lora_names(self) -> list[str]:
        return [n for n in self.lora_names if self._targets[n].group == "te"]

    @property
    def unet_lora_names(self) -> list[str]:
        return [n for n in self.lora_names if self._targets[n].group == "unet"]

    def _names_for(self, apply_text_encoder: bool, apply_unet: bool) -> list[str]:
        return [n for n, t in self._targets.items()
                if (t.group == "te" and apply_text_encoder) or (t.group == "unet" and apply_unet)]

    def _create_core(self, names: list[str]) -> LycorisNetwork:
        layers = {n: self._targets[n].module for n in names}
        layer_options = {}
        for n in names:
            target = self._targets[n]
            entry = {"options": dict(target.options)}
            if target.algo != self.algo:
                entry["algo"] = target.algo
            layer_options[n] = entry
        try:
            core = LycorisNetwork(layers, algo=self.algo, options=self.server_options, layer_options=layer_options,
                                  multiplier=self.multiplier, seed=self.args.seed, threads=self.args.server_threads,
                                  nan_policy=self.args.nan_policy)
        except ServerError as error:
            raise ValueError(f"swift_lycoris.kohya: lycoris-server refused the network: {error}") from error
        self.__dict__["_core"] = core
        core.train(self.training)
        pending, self._pending_weights = self._pending_weights, None
        if pending is not None:
            self._load(pending)
        else:
            self._register()
        return core

    def _ensure_core(self) -> LycorisNetwork:
        if self.core is None:
            self._create_core(list(self._targets))
        return self.core

    def _rebuild_core(self, names: list[str]) -> None:
        """A new server network on `names`, carrying over the current adapters: values are
        copied where the new module has the same algorithm and shapes, other modules (loaded
        from a file with another algorithm or rank) are carried through a file."""
        import safetensors.torch

        old = self.core
        self._unhook()
        pending, self._pending_weights = self._pending_weights, None
        self.__dict__["_core"] = None
        new = self._create_core(names)
        by_file = []
        with torch.no_grad():
            for name in names:
                if name not in old.modules_info:
                    continue
                before, after = old.modules_info[name], new.modules_info[name]
                if not all(before[k] == after[k] for k in ("algorithm", "scale", "parameters")):
                    by_file.append(name)
                    continue
                for suffix in new.parameter_suffixes(name):
                    new.adapters[name].get(suffix).copy_(old.adapters[name].get(suffix))
        if by_file:
            with tempfile.TemporaryDirectory(prefix="swift_lycoris_") as tmp:
                staged = os.path.join(tmp, "carry.safetensors")
                old.save_weights(staged)
                keep = set(by_file)
                carried = safetensors.torch.load_file(staged)
                self._load({k: v for k, v in carried.items() if k.partition(".")[0] in keep})
        old.close()
        if pending is not None:
            self._load(pending)

    def _register(self) -> None:
        """Makes each adapter holder a submodule named like its file keys, and gives it the
        file's non-parameter tensors (``alpha``, ``on_input``) as buffers."""
        core = self.core
        for name in list(self._modules):
            del self._modules[name]
        for name in core.modules_info:
            self.add_module(name, core.adapters[name])
        self._refresh_buffers()

    def _refresh_buffers(self) -> None:
        from safetensors import safe_open

        core = self.core
        if not core.modules_info:
            return
        with tempfile.TemporaryDirectory(prefix="swift_lycoris_") as tmp:
            staged = os.path.join(tmp, "buffers.safetensors")
            core.save_weights(staged)
            with safe_open(staged, framework="pt") as f:
                for key in f.keys():
                    name, _, suffix = key.partition(".")
                    if name not in core.modules_info or suffix in core.parameter_suffixes(name) or "." in suffix:
                        continue
                    holder = core.adapters[name]
                    reference = next(iter(holder.parameters()), None)
                    value = f.get_tensor(key)
                    if reference is not None:
                        value = value.to(reference.device)
                    holder.register_buffer(suffix, value)

    def _load(self, source) -> dict:
        """Loads a file path or a state dict into the server network (the server detects each
        module's algorithm and rank from its keys); Parameters whose shape is unchanged are
        updated in place."""
        core = self.core
        with tempfile.TemporaryDirectory(prefix="swift_lycoris_") as tmp:
            path = _as_safetensors_file(source, os.path.join(tmp, "load.safetensors"), core.server)
            try:
                result = core.load_weights(path, reuse_parameters=True)
            except ServerError as error:
                what = source if isinstance(source, str) else "the state dict"
                raise ValueError(f"swift_lycoris.kohya: cannot load {what}: {error}") from error
        self._register()
        return result

    # MARK: kohya's calls

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        """Creates the adapters on the text-encoder and/or U-Net layers and routes those
        layers' forward through them. Weights given to :meth:`load_weights` before this
        call are loaded at its end (as LyCORIS does)."""
        if apply_text_encoder is None:
            apply_text_encoder = True
        if apply_unet is None:
            apply_unet = True
        names = self._names_for(bool(apply_text_encoder), bool(apply_unet))
        te_count = sum(self._targets[n].group == "te" for n in names)
        log.info("swift_lycoris.kohya: %d text-encoder and %d U-Net modules (%s)", te_count, len(names) - te_count,
                 self.algo)
        if self.core is None:
            self._create_core(names)
        elif list(self.core.modules_info) != names:
            self._rebuild_core(names)
        elif self._pending_weights is not None:
            pending, self._pending_weights = self._pending_weights, None
            self._load(pending)
        self._hook()

    def _hook(self) -> None:
        for name in self.core.modules_info:
            if name in self._hooks:
                continue
            layer = self._targets[name].module
            had_instance_forward = "forward" in layer.__dict__
            original = layer.forward
            self._hooks[name] = (layer, original, had_instance_forward)
            layer.forward = self._make_forward(name, original)

    def _make_forward(self, name: str, original):
        network = self  # the layer keeps the network alive while it is hooked, as in LyCORIS

        def forward(x, *args, **kwargs):
            if network.core is None:
                return original(x, *args, **kwargs)
            return network.core.adapted_forward(name, original, x, *args, **kwargs)

        return forward

    def _unhook(self) -> None:
        for layer, original, had_instance_forward in self._hooks.values():
            if had_instance_forward:
                layer.forward = original
            else:
                layer.__dict__.pop("forward", None)
        self._hooks.clear()

    def restore(self) -> None:
        """Gives every adapted layer its own forward back (the adapters stay)."""
        self._unhook()

    def load_weights(self, file) -> dict:
        """Loads a kohya/LyCORIS file (safetensors, or a torch pickle of a state dict). Before
        :meth:`apply_to` the file is kept and loaded at its end. Returns
        ``{"missing keys": [module names], "unexpected keys": [module names]}`` (empty when
        everything matched)."""
        if self.core is None:
            self._pending_weights = os.fspath(file) if not isinstance(file, dict) else file
            return {}
        result = self._load(os.fspath(file))
        state = {}
        if result.get("modules_not_in_file"):
            state["missing keys"] = result["modules_not_in_file"]
        if result.get("unmatched_file_modules"):
            state["unexpected keys"] = result["unmatched_file_modules"]
        return state

    def save_weights(self, file, dtype=None, metadata=None) -> None:
        """Writes the adapters as a kohya/LyCORIS file. For ``.safetensors`` the metadata is
        kept and ``sshs_model_hash``/``sshs_legacy_hash`` are added as kohya does (the given
        metadata dict receives them too, as kohya's does); other extensions get
        ``torch.save`` of the state dict."""
        import safetensors.torch

        core = self._ensure_core()
        if metadata is not None and len(metadata) == 0:
            metadata = None
        file = os.path.abspath(os.fspath(file))
        with tempfile.TemporaryDirectory(prefix="swift_lycoris_") as tmp:
            staged = os.path.join(tmp, "staged.safetensors")
            if os.path.splitext(file)[1] == ".safetensors":
                if metadata is None:
                    metadata = {}
                text = {str(k): str(v) for k, v in metadata.items()}
                core.save_weights(staged, dtype, text)
                model_hash, legacy_hash = precalculate_safetensors_hashes(safetensors.torch.load_file(staged), text)
                metadata["sshs_model_hash"] = text["sshs_model_hash"] = model_hash
                metadata["sshs_legacy_hash"] = text["sshs_legacy_hash"] = legacy_hash
                core.save_weights(file, dtype, text)
            else:
                core.save_weights(staged, dtype)
                _save_torch_atomically(safetensors.torch.load_file(staged), file)

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=1e-4, learning_rate=None):
        """``(param_groups, descriptions)``: text-encoder groups (``text_encoder_lr``, else
        ``learning_rate``), then U-Net groups (``unet_lr``, else ``learning_rate``). With a
        LoRA+ ratio, ``lora_up`` parameters get their own group at lr·ratio ("… plus"), as
        in LyCORIS; groups whose lr is 0 or None are left out. A list of text-encoder lrs is
        handled as by :meth:`prepare_optimizer_params_with_multiple_te_lrs`."""
        if isinstance(text_encoder_lr, (list, tuple)):
            return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, learning_rate)
        self._ensure_core()
        self.requires_grad_(True)
        groups, descriptions = [], []
        te_names = self.text_encoder_lora_names
        if te_names:
            lr = text_encoder_lr if text_encoder_lr is not None else learning_rate
            self._assemble(te_names, lr, self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio,
                           "textencoder", groups, descriptions)
        unet_names = self.unet_lora_names
        if unet_names:
            lr = unet_lr if unet_lr is not None else learning_rate
            self._assemble(unet_names, lr, self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet", groups,
                           descriptions)
        return groups, descriptions

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """kohya v0.10's variant: one lr per text encoder (``lora_te``/``lora_te1`` use the
        first, ``lora_te2`` the second; a single lr applies to all)."""
        if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
            lrs = [default_lr]
        elif isinstance(text_encoder_lr, (int, float)):
            lrs = [float(text_encoder_lr)]
        else:
            lrs = list(text_encoder_lr)
        self._ensure_core()
        self.requires_grad_(True)
        groups, descriptions = [], []
        by_index: "OrderedDict[int, list[str]]" = OrderedDict()
        for name in self.text_encoder_lora_names:
            match = re.match(rf"{LORA_PREFIX_TEXT_ENCODER}(\d+)_", name)
            by_index.setdefault(int(match.group(1)) - 1 if match else 0, []).append(name)
        ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        for index, names in by_index.items():
            lr = lrs[index] if index < len(lrs) else lrs[0]
            label = "textencoder" if len(by_index) == 1 else f"textencoder {index + 1}"
            self._assemble(names, lr, ratio, label, groups, descriptions)
        unet_names = self.unet_lora_names
        if unet_names:
            self._assemble(unet_names, unet_lr if unet_lr is not None else default_lr,
                           self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet", groups, descriptions)
        return groups, descriptions

    def _assemble(self, names, lr, ratio, label, groups, descriptions) -> None:
        core = self.core
        plain, plus = [], []
        for name in names:
            for suffix in core.parameter_suffixes(name):
                param = core.adapters[name].get(suffix)
                (plus if ratio is not None and "lora_up" in suffix else plain).append(param)
        for params, is_plus in ((plain, False), (plus, True)):
            if not params:
                continue
            group_lr = None if lr is None else (lr * ratio if is_plus else lr)
            if not group_lr:
                log.info("swift_lycoris.kohya: no lr for the %s%s parameters; they are not trained", label,
                         " plus" if is_plus else "")
                continue
            groups.append({"params": params, "lr": group_lr})
            descriptions.append(label + (" plus" if is_plus else ""))

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do (the adapters keep no activations of their own in torch)."""

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        """Hands back the tapes of the last step's freed graphs and of ΔWs it did not use."""
        if self.core is not None:
            self.core.drop_prefetched()
            self.core.release_orphaned_tapes()

    def get_trainable_params(self):
        return self.parameters()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        if self.core is not None:
            self.core.set_multiplier(self.multiplier)

    def is_mergeable(self) -> bool:
        return True

    # MARK: gen_img.py's --network_pre_calc

    def backup_weights(self) -> None:
        """Keeps copies of the adapted layers' weights (and biases) for :meth:`restore_weights`."""
        if self.core is not None:
            self.core.keep_layer_tensors()

    def pre_calculation(self) -> None:
        """Merges m·ΔW (evaluation mode, the current multiplier) into the layers' weights and
        gives the layers their own forward: generation then makes no server calls.
        :meth:`restore_weights` undoes it (weights kept by :meth:`backup_weights`, or now)."""
        if self.core is None:
            return
        if not self.core.layer_tensors_kept:
            self.core.keep_layer_tensors()
        self.core.add_deltas_to_layers(self.multiplier)
        self._unhook()

    def restore_weights(self) -> None:
        """The weights :meth:`backup_weights` kept, back in the layers, and the adapters
        hooked again (a later :meth:`pre_calculation` merges anew)."""
        if self.core is not None and self.core.layer_tensors_kept:
            self.core.put_back_layer_tensors(discard=False)
            self._hook()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.core is not None:
            self.core.train(mode)
        return self

    # MARK: ΔW from the server

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device=None):
        """LyCORIS's max-norm rule per LoCon/LoHa/LoKr module (with or without DoRA): n = ‖ΔW‖
        (server, no dropout), n' = max(n, max_norm/2), ratio = min(n', max_norm)/n'; a module with
        ratio ≠ 1 is scaled. Returns ``(modules scaled, mean norm, max norm)`` of the norms
        after scaling, or ``(0, 0, 0)`` when nothing was scaled."""
        core = self.core
        if core is None:
            return 0, 0, 0
        names = [n for n, info in core.modules_info.items() if info["algorithm"] in ("locon", "loha", "lokr")]
        # A DoRA module's W'(m) − W0 at m = 0 is its adapter's ΔW (the magnitude enters with
        # the multiplier only), the norm LyCORIS bounds; the others give m·ΔW at m = 1.
        dora = {n for n in names if "dora_scale" in core.parameter_suffixes(n)}
        groups = [(1.0, [n for n in names if n not in dora]), (0.0, [n for n in names if n in dora])]
        max_norm = torch.tensor(float(max_norm_value), dtype=torch.float32)
        scaled_count, norms = 0, []
        for multiplier, group in groups:
            if not group:
                continue
            with core.server_evaluation(multiplier):
                # One group of ΔWs at a time (scaling a module's parameters changes the server's
                # copy only at the next sync, after the loop).
                for name, (delta, *_) in core.delta_weights(group):
                    original = torch.linalg.vector_norm(delta.float())
                    norm = torch.clamp(original, min=max_norm / 2)
                    desired = torch.clamp(norm, max=max_norm)
                    ratio = desired / norm
                    if bool(norm != desired):
                        scaled_count += 1
                        self._scale_module(name, float(ratio))
                    norms.append(float(original * ratio))
        if scaled_count == 0:
            return 0, 0, 0
        return scaled_count, sum(norms) / len(norms), max(norms)

    def _scale_module(self, name: str, ratio: float) -> None:
        """Multiplies a module's ΔW by `ratio` through its parameters (a parameter update)."""
        core = self.core
        params = {suffix: core.adapters[name].get(suffix) for suffix in core.parameter_suffixes(name)}
        algorithm = core.modules_info[name]["algorithm"]
        if "scalar" in params:
            params["scalar"].mul_(ratio)
        elif algorithm == "locon":
            params["lora_up.weight"].mul_(ratio)
        elif algorithm == "loha":
            params["hada_w1_a"].mul_(math.sqrt(ratio))
            params["hada_w2_a"].mul_(math.sqrt(ratio))
        elif algorithm == "lokr":
            factors = [params[s] for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                           "lokr_t2") if s in params]
            for factor in factors:
                factor.mul_(ratio ** (1.0 / len(factors)))

    @torch.no_grad()
    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Adds m·ΔW (server) into the layers' weights, for the text encoder and/or U-Net
        modules that `weights_sd` has (all when it is None), and unhooks the layers."""
        apply_te = apply_unet = True
        if weights_sd is not None:
            keys = list(weights_sd.keys())
            apply_te = any(k.startswith(LORA_PREFIX_TEXT_ENCODER) for k in keys)
            apply_unet = any(k.startswith(LORA_PREFIX_UNET) for k in keys)
        names = self._names_for(apply_te, apply_unet)
        if self.core is None:
            self._create_core(names)
        elif self._pending_weights is not None:
            pending, self._pending_weights = self._pending_weights, None
            self._load(pending)
        merged = [n for n in self.core.modules_info if n in set(names)]
        self.core.add_deltas_to_layers(names=merged)
        log.info("swift_lycoris.kohya: merged %d modules", len(merged))
        self._unhook()

    # MARK: state dict

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads tensors with the file's keys. Tensors that fit the current modules (same
        parameter shapes, same ``alpha``) are copied into the Parameters in place; otherwise
        the modules are rebuilt from the tensors by the server (algorithm and rank from the
        keys). A module given without ``scalar`` (a file: the scalar is folded into a
        factor) gets scalar = 1, as in LyCORIS. Before :meth:`apply_to` the tensors are kept
        and loaded at its end."""
        from torch.nn.modules.module import _IncompatibleKeys

        core = self.core
        if core is None:
            self._pending_weights = OrderedDict(state_dict)
            return _IncompatibleKeys([], [])
        by_module: dict[str, dict[str, torch.Tensor]] = OrderedDict()
        unexpected = []
        for key, value in state_dict.items():
            name, _, suffix = key.partition(".")
            if name in core.modules_info and suffix:
                by_module.setdefault(name, {})[suffix] = value
            else:
                unexpected.append(key)
        fits = all(self._fits(name, tensors) for name, tensors in by_module.items())
        if strict and (unexpected or fits):
            missing = self._missing(state_dict)
            if missing or unexpected:
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                                   f"missing keys {missing}, unexpected keys {unexpected}")
        if fits:
            with torch.no_grad():
                for name, tensors in by_module.items():
                    holder = core.adapters[name]
                    for suffix in core.parameter_suffixes(name):
                        if suffix in tensors:
                            holder.get(suffix).copy_(tensors[suffix])
                        elif suffix == "scalar":
                            holder.get(suffix).fill_(1.0)
        elif by_module:
            self._load({f"{name}.{suffix}": value
                        for name, tensors in by_module.items() for suffix, value in tensors.items()})
        missing = self._missing(state_dict)
        if strict and missing:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}")
        return _IncompatibleKeys(missing, unexpected)

    def _missing(self, state_dict) -> list[str]:
        # A module given without `scalar` gets scalar = 1 (files fold it into a factor).
        return [k for k in self.state_dict(keep_vars=True) if k not in state_dict and not k.endswith(".scalar")]

    def _fits(self, name: str, tensors: dict) -> bool:
        core = self.core
        holder = core.adapters[name]
        params = {suffix: holder.get(suffix) for suffix in core.parameter_suffixes(name)}
        buffers = dict(holder.named_buffers())
        for suffix, value in tensors.items():
            if suffix in params:
                if tuple(params[suffix].shape) != tuple(value.shape):
                    return False
            elif suffix in buffers:
                if not torch.equal(buffers[suffix].detach().cpu().double(), value.detach().cpu().double()):
                    return False
            else:
                return False
        return True

    def close(self) -> None:
        """Unhooks the layers and ends the server."""
        self._unhook()
        if self.core is not None:
            self.core.close()
            self.__dict__["_core"] = None


def _save_torch_atomically(state: dict, file: str) -> None:
    """``torch.save`` as the server saves: into ``.<name>.tmp-<pid>-<hex>`` beside `file`,
    flushed to disk, then renamed over it, so a reader (or a crash) never meets half a file;
    on failure the temporary file is removed (and a later save removes one whose process
    was killed)."""
    directory, name = os.path.split(file)
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{os.urandom(8).hex()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, file)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _as_safetensors_file(source, path: str, server) -> str:
    """`source` (a safetensors path, another torch file, or a state dict) as a safetensors path;
    a safetensors file is checked by `server`'s reader (:class:`AdapterFileError` naming the
    file and the rule), a torch file is loaded with ``weights_only`` (tensors, no code)."""
    import safetensors.torch

    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if os.path.splitext(source)[1] == ".safetensors":
            describe_file(source, server)
            return os.path.abspath(source)
        source = torch.load(source, map_location="cpu", weights_only=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in source.items() if isinstance(v, torch.Tensor)}
    safetensors.torch.save_file(tensors, path)
    return path


# MARK: entry points

def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """kohya's entry point: a :class:`LycorisNetworkKohya` on the layers the preset selects.
    `text_encoder` is one model, a list of them (SDXL: ``lora_te1``/``lora_te2``) or None.
    Every network_arg arrives as a string (see the module docstring)."""
    kwargs.pop("warn_on_unmatched", None)
    args = NetworkArgs.parse(network_dim, network_alpha, neuron_dropout, kwargs)
    preset = resolve_preset(args.preset)
    if args.algo == "ia3" and args.preset != "ia3":
        log.warning("swift_lycoris.kohya: preset ia3 is recommended for the ia3 algorithm")
    auto = args.algo == "auto"
    if auto:
        args.algo = "lora"  # the selection's placeholder; the plan sets each layer's algorithm
    targets = select_targets(text_encoder, unet, preset, args)
    if auto:
        _apply_plan(targets, args)
    log.info("swift_lycoris.kohya: algo %s, preset %s, dim %d alpha %s, conv dim %d alpha %s: %d layers",
             args.algo, args.preset, args.network_dim, args.network_alpha, args.conv_dim, args.conv_alpha, len(targets))
    return LycorisNetworkKohya(targets, args, multiplier=multiplier)


def _apply_plan(targets: "OrderedDict[str, _Target]", args: NetworkArgs) -> None:
    """algo=auto: the server's plan for the non-norm targets, each target's algorithm and
    options set from it (alpha kept), and the plan printed per block."""
    planned = {name: target.module for name, target in targets.items() if target.algo != "norm"}
    result = suggestion.plan(planned, args.budget, args.budget_dtype)
    for name, entry in suggestion.layer_options(result).items():
        targets[name].algo = entry["algo"]
        targets[name].options.update(entry["options"])
    print(f"swift_lycoris.kohya algo=auto, budget {args.budget} ({args.budget_dtype}):")
    for line in suggestion.plan_lines(result, args.budget_dtype):
        print("  " + line)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """kohya's entry point for existing weights: ``(network, weights_sd)``. The network is
    built on the model layers the file names (``lora_unet_…``, ``lora_te_…``,
    ``lora_te1_…``); the server reads each module's algorithm, rank and alpha from the
    file's keys. network_args that a file does not decide (dropouts, bypass_mode, LoRA+
    ratios) are honoured."""
    import safetensors.torch

    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or weights_sd")
        if os.path.splitext(os.fspath(file))[1] == ".safetensors":
            describe_file(file)  # the checked reader first: AdapterFileError naming the file and the rule
            weights_sd = safetensors.torch.load_file(os.fspath(file))
            source = os.fspath(file)
        else:
            weights_sd = torch.load(os.fspath(file), map_location="cpu", weights_only=True)
            source = weights_sd
    else:
        source = weights_sd
    kwargs.pop("warn_on_unmatched", None)
    args = NetworkArgs.parse(None, None, None, {k: v for k, v in kwargs.items() if k in KNOWN_NETWORK_ARGS})
    suffixes: dict[str, set[str]] = {}
    for key in weights_sd:
        if "." in key:
            name, _, suffix = key.partition(".")
            suffixes.setdefault(name, set()).add(suffix)

    targets: "OrderedDict[str, _Target]" = OrderedDict()
    roots = [(prefix, te, "te") for prefix, te in _text_encoders(text_encoder)]
    if unet is not None:
        roots.append((LORA_PREFIX_UNET, unet, "unet"))
    skipped = []
    for prefix, root, group in roots:
        for path, module in root.named_modules():
            name = f"{prefix}_{path}".replace(".", "_")
            if name not in suffixes or name in targets:
                continue
            if layer_description(name, module) is None:
                skipped.append(f"{name} ({type(module).__name__})")
                continue
            # IA3, GLoRA, DoRA, Diag-OFT/BOFT and T-LoRA adapters need the layer's weight on the
            # server (placeholders of their kind send it); a norm layer takes the norm adapter;
            # every other module starts as a placeholder LoRA that the file's module replaces (a
            # Diag-OFT one, which holds the weight, for OFT and T-LoRA modules).
            is_ia3 = "on_input" in suffixes[name] or suffixes[name] == {"weight"}
            rotates = "oft_blocks" in suffixes[name] or "lambda_layer" in suffixes[name]
            algo = "norm" if is_norm_layer(module) else "ia3" if is_ia3 else "glora" if "a1.weight" in suffixes[name] \
                else "diag-oft" if rotates else "lora"
            options = {"lora_dim": 1, "alpha": 1.0}
            if "dora_scale" in suffixes[name]:
                options["weight_decompose"] = True
            targets[name] = _Target(name, module, group, algo, options)
    if skipped:
        log.warning("swift_lycoris.kohya: file modules on layers lycoris-server does not adapt are ignored: %s",
                    ", ".join(skipped[:20]))
    unknown = sorted(set(suffixes) - set(targets) - {s.split(" ")[0] for s in skipped})
    if unknown:
        log.warning("swift_lycoris.kohya: %d file modules match no layer of the model: %s", len(unknown),
                    ", ".join(unknown[:20]))
    args.algo = "lora"
    network = LycorisNetworkKohya(targets, args, multiplier=multiplier, options=args.runtime_options())
    network._pending_weights = source
    # Build and load now, so that a file the server cannot compute fails here.
    network._create_core(list(targets))
    return network, weights_sd
