"""Module-selection presets of the kohya entry point (:mod:`swift_lycoris.kohya`).

The built-in presets carry LyCORIS 4.1.3's names and class lists (``lycoris/config.py``):
``full``, ``full-lin``, ``attn-mlp``, ``attn-only``, ``unet-only``,
``unet-transformer-only``, ``unet-convblock-only`` and ``ia3``. A preset can also be a
TOML file with LyCORIS's keys (``lycoris/utils/preset.py``, ``config_sdk.PresetConfig``):

==============================  ===========================================================
key                             meaning
==============================  ===========================================================
``enable_conv``                 false: k×k convolutions are not adapted (1×1 ones still are)
``unet_target_module``          class names of U-Net blocks whose Linear/Conv layers are adapted
``unet_target_name``            module paths (regular expressions, ``re.match``) adapted one by one
``text_encoder_target_module``  as ``unet_target_module``, for the text encoder(s)
``text_encoder_target_name``    as ``unet_target_name``, for the text encoder(s)
``module_algo_map``             class name → ``{algo = …, <option> = …}`` for layers inside that class
``name_algo_map``               module path (or pattern) → ``{algo = …, <option> = …}``
``use_fnmatch``                 patterns are shell globs (``fnmatch``) instead of regular expressions
``exclude_name``                module paths (or patterns) never adapted
``target_module``, ``target_name``, ``lora_prefix``  LyCORIS generic-wrapper keys; accepted and ignored here
==============================  ===========================================================

Differences from LyCORIS 4.1.3, on purpose:

- ``ia3`` matches layers: LyCORIS lists the bare names ``to_k``, ``to_v``, ``ff.net.2``,
  ``k_proj``, ``v_proj``, ``mlp.fc2``, which ``re.match`` only finds at the start of a
  module path, so its preset adapts nothing. Here they are patterns that match those
  layers at any depth (``(.*[.])?to_k$`` …; ``[.]`` rather than ``\\.`` because the
  ``toml`` package LyCORIS reads presets with mis-decodes backslashes in table keys),
  ``ff.net.2``/``mlp.fc2`` with ``train_on_input``.
- ``full`` and ``full-lin`` list both the class ``TimestepEmbedding`` and the names
  ``time_embedding.linear_1/2``; LyCORIS then creates those layers twice and fails
  (``duplicated lora name``). The lists are kept as LyCORIS has them; the kohya module
  adapts a layer once (the first match wins), so the default preset works.
"""

from __future__ import annotations

import copy
import os
from typing import Any

FULL_UNET_MODULES = [
    "Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D",
    "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock",
    "MMDoubleStreamBlock", "MMSingleStreamBlock", "WanAttentionBlock",
    "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock", "JointTransformerBlock",
    "FinalLayer", "QwenImageTransformerBlock", "LensTransformerBlock", "Ideogram4TransformerBlock",
    "ZImageTransformerBlock", "AceStepEncoderLayer", "AceStepDiTLayer", "TextFusionBlock",
    "Block", "PatchEmbed", "TimestepEmbedding", "LLMAdapterTransformerBlock",
]

FULL_UNET_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]

FULL_TEXT_ENCODER_MODULES = [
    "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "MT5Block", "BertLayer",
    "Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP",
    "Qwen3Attention", "Qwen3FlashAttention2", "Qwen3SdpaAttention", "Qwen3MLP",
]

# The transformer blocks (FULL_UNET_MODULES without the convolution blocks).
_TRANSFORMER_UNET_MODULES = [m for m in FULL_UNET_MODULES if m not in ("ResnetBlock2D", "Downsample2D", "Upsample2D")]

BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "enable_conv": True,
        "unet_target_module": FULL_UNET_MODULES,
        "unet_target_name": FULL_UNET_NAMES,
        "text_encoder_target_module": FULL_TEXT_ENCODER_MODULES,
        "text_encoder_target_name": [],
    },
    "full-lin": {
        "enable_conv": False,
        "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"] + _TRANSFORMER_UNET_MODULES[1:],
        "unet_target_name": ["time_embedding.linear_1", "time_embedding.linear_2"],
        "text_encoder_target_module": FULL_TEXT_ENCODER_MODULES,
        "text_encoder_target_name": [],
    },
    "attn-mlp": {
        "enable_conv": False,
        "unet_target_module": _TRANSFORMER_UNET_MODULES,
        "unet_target_name": [],
        "text_encoder_target_module": FULL_TEXT_ENCODER_MODULES,
        "text_encoder_target_name": [],
    },
    "attn-only": {
        "enable_conv": False,
        "unet_target_module": ["CrossAttention", "SelfAttention"],
        "unet_target_name": [],
        "text_encoder_target_module": [
            "CLIPAttention", "CLIPSdpaAttention", "BertAttention", "MT5LayerSelfAttention",
            "Gemma2Attention", "Gemma2FlashAttention2", "Gemma2SdpaAttention",
        ],
        "text_encoder_target_name": [],
    },
    "unet-only": {
        "enable_conv": True,
        "unet_target_module": FULL_UNET_MODULES,
        "unet_target_name": FULL_UNET_NAMES,
        "text_encoder_target_module": [],
        "text_encoder_target_name": [],
    },
    "unet-transformer-only": {
        "enable_conv": False,
        "unet_target_module": _TRANSFORMER_UNET_MODULES,
        "unet_target_name": [],
        "text_encoder_target_module": [],
        "text_encoder_target_name": [],
    },
    "unet-convblock-only": {
        "enable_conv": True,
        "unet_target_module": ["ResnetBlock2D", "Downsample2D", "Upsample2D"],
        "unet_target_name": ["conv_in", "conv_out"],
        "text_encoder_target_module": [],
        "text_encoder_target_name": [],
    },
    "ia3": {
        "enable_conv": False,
        "unet_target_module": [],
        "unet_target_name": ["(.*[.])?to_k$", "(.*[.])?to_v$", "(.*[.])?ff[.]net[.]2$"],
        "text_encoder_target_module": [],
        "text_encoder_target_name": ["(.*[.])?k_proj$", "(.*[.])?v_proj$", "(.*[.])?mlp[.]fc2$"],
        "name_algo_map": {
            "(.*[.])?ff[.]net[.]2$": {"train_on_input": True},
            "(.*[.])?mlp[.]fc2$": {"train_on_input": True},
        },
    },
}

VALID_PRESET_KEYS = (
    "enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
    "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
    "text_encoder_target_name", "exclude_name",
)

_LIST_KEYS = ("target_module", "target_name", "unet_target_module", "unet_target_name",
              "text_encoder_target_module", "text_encoder_target_name", "exclude_name")


class PresetError(ValueError):
    """A preset name that is neither built in nor a readable file, or invalid preset content."""


def validate_preset(data: dict, source: str = "preset") -> dict[str, Any]:
    """A normalised copy of a preset mapping (LyCORIS's keys; unknown keys are an error)."""
    if not isinstance(data, dict):
        raise PresetError(f"{source}: a preset is a table of keys, got {type(data).__name__}")
    unknown = sorted(k for k in data if k not in VALID_PRESET_KEYS)
    if unknown:
        raise PresetError(f"{source}: unknown preset keys {', '.join(unknown)} (valid: {', '.join(VALID_PRESET_KEYS)})")
    preset: dict[str, Any] = {}
    for key, value in data.items():
        if key in _LIST_KEYS:
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise PresetError(f"{source}: {key} must be a list of strings")
            preset[key] = list(value)
        elif key in ("module_algo_map", "name_algo_map"):
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise PresetError(f"{source}: {key} must map names to tables ({{algo = …, option = …}})")
            preset[key] = {str(k): dict(v) for k, v in value.items()}
        elif key in ("enable_conv", "use_fnmatch"):
            if not isinstance(value, bool):
                raise PresetError(f"{source}: {key} must be true or false")
            preset[key] = value
        else:
            preset[key] = copy.deepcopy(value)
    return preset


def read_preset(path: str) -> dict[str, Any]:
    """A TOML preset file with LyCORIS's keys, validated."""
    try:
        import tomllib

        with open(path, "rb") as f:
            data = tomllib.load(f)
    except ModuleNotFoundError:  # Python < 3.11
        import toml

        data = toml.load(path)
    except OSError as error:
        raise PresetError(f"cannot read preset file {path}: {error}") from error
    except Exception as error:  # tomllib.TOMLDecodeError
        raise PresetError(f"preset file {path} is not valid TOML: {error}") from error
    return validate_preset(data, source=path)


def resolve_preset(preset: str | dict | None) -> dict[str, Any]:
    """A built-in preset by name, a TOML file by path, or a mapping (validated)."""
    if preset is None:
        preset = "full"
    if isinstance(preset, dict):
        return validate_preset(preset)
    if preset in BUILTIN_PRESETS:
        return copy.deepcopy(BUILTIN_PRESETS[preset])
    if os.path.isfile(preset):
        return read_preset(preset)
    raise PresetError(
        f"preset {preset!r} is neither a built-in preset ({', '.join(BUILTIN_PRESETS)}) nor a TOML file"
    )


def preset_to_toml(preset: dict[str, Any]) -> str:
    """TOML text of a preset (for LyCORIS or for a file the user edits)."""
    import json

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines, tables = [], []
    for key, v in preset.items():
        if isinstance(v, dict):
            for name, options in v.items():
                tables.append(f"[{key}.{json.dumps(name)}]")
                tables.extend(f"{k} = {value(x)}" for k, x in options.items())
        else:
            lines.append(f"{key} = {value(v)}")
    return "\n".join(lines + tables) + "\n"
