#!/usr/bin/env python3
"""Golden-fixture generator for swift-lycoris.

The oracle is LyCORIS 4.1.3 (`pip install -r scripts/requirements-oracle.txt`).
Regenerate everything with:

    python scripts/generate_fixtures.py

Outputs (all safetensors, every metadata value a string):

  Tests/LycorisAlgorithmsTests/Fixtures/modules/<case>.safetensors
      One LyCORIS module wrapped around one nn.Linear / nn.Conv1d / nn.Conv2d /
      nn.Conv3d.  Inputs and
      parameters are stored as F32 (drawn in float32), every expected value is
      F64 (LyCORIS run in float64 on exactly those float32 values).
        base.weight, base.bias, input, grad_output      F32  (no base.bias on a bias-less layer)
        param.<name>                                     F32  (saved-key names)
        expected.output, expected.grad_input             F64
        expected.grad.<name>                             F64
        expected.delta_weight                            F64  (rebuild-semantics ΔW)
        expected.delta_bias                              F64  (norm on a layer with a bias, full
                                                              with diff_b: m·Δb)
        expected.saved.<key>                             F64 (ints keep their dtype)
      metadata: case, algo, layer, options, scale, saved_keys, description,
                bypass (effective mode), [dylora_block], [lycoris: whether
                LyCORIS's NormModule itself computed a norm case].

  Tests/LycorisAlgorithmsTests/Fixtures/networks/
      base.safetensors              state_dict of a tiny diffusers-like model
      <algo>.safetensors            LycorisNetwork.save_weights output (lycoris_ prefix)
      <algo>.expected.safetensors   per adapted layer K: x.K (F32) and y.K (F64)
                                    (lora, loha, lokr, ia3, dylora, norms, glora, full, dora and
                                    dora_loha_input)
      kohya_lora.safetensors        lora.safetensors renamed lycoris_ -> lora_unet_
      convnd_base.safetensors, convnd_<algo>[.expected].safetensors
                                    the same for a model of Conv1d and Conv3d layers

The script is deterministic (fixed seeds derived from the case names) and
deletes/rewrites only *.safetensors in those two folders.
"""

import os

# CPU only and the pure-torch reference bodies of LyCORIS (no compile/fused
# kernels), so the float64 oracle is exactly the eager math.
os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import json
import logging
import random
import sys
import zlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lycoris  # noqa: F401
from lycoris.modules import (
    ButterflyOFTModule,
    DiagOFTModule,
    DyLoraModule,
    IA3Module,
    LoConModule,
    LohaModule,
    LokrModule,
    NormModule,
    TLoraModule,
)
from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask
from lycoris.modules import FullModule, GLoRAModule
from lycoris.functional.general import _weight_decompose
from lycoris.wrapper import LycorisNetwork, create_lycoris, create_lycoris_from_weights

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "Tests" / "LycorisAlgorithmsTests" / "Fixtures"
MODULES_DIR = FIXTURES / "modules"
NETWORKS_DIR = FIXTURES / "networks"

ORACLE = "lycoris-lora 4.1.3"
PARAM_SCALE = 0.5  # randn * 0.5 stays exactly representable in float32
SCALAR_VALUE = 0.7  # use_scalar: the trainable scalar (stored as its f32 value)

ALGO_CLASSES = {
    "locon": LoConModule,
    "loha": LohaModule,
    "lokr": LokrModule,
    "ia3": IA3Module,
    "dylora": DyLoraModule,
    "diag-oft": DiagOFTModule,
    "boft": ButterflyOFTModule,
    "tlora": TLoraModule,
}
OFT_ALGOS = ("diag-oft", "boft")
ALGO_CLASSES.update(glora=GLoRAModule, full=FullModule)

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def seed_of(name: str) -> int:
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def randn(shape, gen, scale=PARAM_SCALE):
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * scale


def jdump(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def t_out(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


# --------------------------------------------------------------------------
# layers


def lin(i, o, bias=True):
    return {"kind": "linear", "in_features": i, "out_features": o, "bias": bias}


def conv(i, o, k=3, s=1, p=0, d=1, g=1, bias=True, dims=2):
    return {
        "kind": f"conv{dims}d",
        "in_channels": i,
        "out_channels": o,
        "kernel_size": [k] * dims,
        "stride": [s] * dims,
        "padding": [p] * dims,
        "dilation": [d] * dims,
        "groups": g,
        "bias": bias,
    }


def conv1(i, o, **kw):
    return conv(i, o, dims=1, **kw)


def conv3(i, o, **kw):
    return conv(i, o, dims=3, **kw)


CONV_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}
CONV_OPS = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def build_layer(spec, gen):
    if spec["kind"] == "linear":
        layer = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    else:
        layer = CONV_CLASSES[spec["kind"]](
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            stride=tuple(spec["stride"]),
            padding=tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]),
            groups=spec["groups"],
            bias=spec["bias"],
        )
    return randomize_layer(layer, gen)


def randomize_layer(layer, gen):
    """The layer with a random weight (and bias), drawn from `gen` in that order."""
    with torch.no_grad():
        layer.weight.copy_(randn(layer.weight.shape, gen))
        if layer.bias is not None:
            layer.bias.copy_(randn(layer.bias.shape, gen))
    return layer


def input_shape(spec):
    if spec["kind"] == "linear":
        return (2, 3, spec["in_features"])
    spatial = {"conv1d": (9,), "conv2d": (5, 6), "conv3d": (3, 4, 5)}[spec["kind"]]
    return (2, spec["in_channels"], *spatial)


def op_of(spec):
    if spec["kind"] == "linear":
        return lambda x, w, b: F.linear(x, w, b)
    kw = dict(
        stride=tuple(spec["stride"]),
        padding=tuple(spec["padding"]),
        dilation=tuple(spec["dilation"]),
        groups=spec["groups"],
    )
    op = CONV_OPS[spec["kind"]]
    return lambda x, w, b: op(x, w, b, **kw)


# --------------------------------------------------------------------------
# module cases

CASES = []


def case(name, algo, layer, options, description, dylora_block=None, timestep_mask=None):
    CASES.append(
        dict(
            name=name,
            algo=algo,
            layer=layer,
            options=options,
            description=description,
            dylora_block=dylora_block,
            timestep_mask=timestep_mask,
        )
    )


# LoCon / LoRA
L24_20 = lin(24, 20)
case("locon_linear", "locon", L24_20, dict(lora_dim=4, alpha=2.0), "LoRA on Linear(24->20), r=4, alpha=2")
case("locon_linear_alpha0", "locon", L24_20, dict(lora_dim=4, alpha=0), "alpha=0 means alpha=r (scale 1)")
case("locon_linear_rslora", "locon", L24_20, dict(lora_dim=4, alpha=3.0, rs_lora=True), "rs_lora: scale alpha/sqrt(r); saved alpha = alpha*r/sqrt(r)")
case("locon_linear_scalar", "locon", L24_20, dict(lora_dim=4, alpha=2.0, use_scalar=True), "use_scalar: trainable scalar (0.7) folded into lora_up on save")
case("locon_linear_mult0p6", "locon", L24_20, dict(multiplier=0.6, lora_dim=4, alpha=2.0), "multiplier 0.6")
case("locon_linear_bypass", "locon", L24_20, dict(lora_dim=4, alpha=2.0, bypass_mode=True), "bypass_mode: y = org(x) + scale*up(down(x))")
case("locon_conv1x1", "locon", conv(8, 12, k=1), dict(lora_dim=4, alpha=3.0), "Conv2d 1x1 8->12")
case("locon_conv3x3_pad1", "locon", conv(8, 12, p=1), dict(lora_dim=4, alpha=3.0), "Conv2d 3x3 8->12 padding 1")
case("locon_conv3x3_stride2", "locon", conv(8, 12, s=2, p=1), dict(lora_dim=4, alpha=3.0), "Conv2d 3x3 stride 2 padding 1")
case("locon_conv3x3_dilation2", "locon", conv(6, 10, p=2, d=2), dict(lora_dim=4, alpha=3.0), "Conv2d 3x3 dilation 2 padding 2 (lora_down built without dilation; rebuild uses the layer's)")
case("locon_conv3x3_groups2", "locon", conv(8, 12, p=1, g=2), dict(lora_dim=4, alpha=3.0), "Conv2d 3x3 groups 2: lora_down takes in/groups channels")
case("locon_conv3x3_tucker", "locon", conv(8, 12, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True), "Tucker: down 1x1, mid kxk, up 1x1")
case("locon_conv3x3_tucker_scalar", "locon", conv(8, 12, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True, use_scalar=True), "Tucker + use_scalar")

# LoHa
case("loha_linear", "loha", L24_20, dict(lora_dim=4, alpha=2.0), "LoHa Linear(24->20) r=4 alpha=2")
case("loha_linear_scalar", "loha", L24_20, dict(lora_dim=4, alpha=2.0, use_scalar=True), "use_scalar: scalar folded into hada_w1_a on save")
case("loha_linear_rslora", "loha", L24_20, dict(lora_dim=4, alpha=3.0, rs_lora=True), "rs_lora")
case("loha_linear_bypass", "loha", L24_20, dict(lora_dim=4, alpha=2.0, bypass_mode=True), "bypass_mode")
case("loha_conv3x3", "loha", conv(8, 12, p=1), dict(lora_dim=4, alpha=2.0), "Conv 3x3: hada_w*_b is (r, in*k*k)")
case("loha_conv3x3_tucker", "loha", conv(8, 12, p=1), dict(lora_dim=4, alpha=2.0, use_tucker=True), "Tucker: hada_w*_a (r,out), hada_w*_b (r,in), hada_t* (r,r,k,k)")
case("loha_conv1x1_tucker", "loha", conv(8, 12, k=1), dict(lora_dim=4, alpha=2.0, use_tucker=True), "use_tucker ignored for 1x1")
case("loha_conv3x3_stride2", "loha", conv(8, 12, s=2, p=1), dict(lora_dim=4, alpha=2.0), "Conv 3x3 stride 2 padding 1")

# LoKr
case("lokr_linear", "lokr", L24_20, dict(lora_dim=2, alpha=1.0), "factor=-1: in 24=(4,6), out 20=(4,5); w1 (4,4), w2 = w2_a (5,2) @ w2_b (2,6)")
case("lokr_linear_factor4", "lokr", lin(16, 36), dict(lora_dim=2, alpha=1.0, factor=4), "factor=4 on Linear(16->36): out (4,9), in (4,4)")
case("lokr_linear_factor8", "lokr", L24_20, dict(lora_dim=2, alpha=1.0, factor=8), "factor=8: 24 -> (3,8) direct, 20 (not divisible) -> search with m<=8 -> (4,5)")
case("lokr_linear_decompose_both", "lokr", lin(64, 48), dict(lora_dim=2, alpha=1.0, decompose_both=True), "decompose_both: w1 = w1_a (6,2) @ w1_b (2,8), w2 factorised")
case("lokr_linear_full_matrix", "lokr", L24_20, dict(lora_dim=2, alpha=1.0, full_matrix=True), "full_matrix: w1, w2 full -> alpha forced to r, scale 1")
case("lokr_linear_large_dim", "lokr", L24_20, dict(lora_dim=4, alpha=1.0), "r >= max(out_k,in_n)/2 -> w2 full automatically; both full -> scale 1")
case("lokr_linear_large_dim_rslora", "lokr", L24_20, dict(lora_dim=4, alpha=1.0, rs_lora=True), "both halves full + rs_lora: alpha forced to r, then scale = r/sqrt(r) = 2 (not 1); saved alpha = r*r/sqrt(r) = 8")
case("lokr_linear_unbalanced", "lokr", L24_20, dict(lora_dim=2, alpha=1.0, unbalanced_factorization=True), "unbalanced_factorization swaps out_l/out_k: w1 (5,4), w2 (4,6)")
case("lokr_linear_scalar", "lokr", L24_20, dict(lora_dim=2, alpha=1.0, use_scalar=True), "use_scalar: scalar folded into lokr_w1 on save")
case("lokr_linear_rslora", "lokr", L24_20, dict(lora_dim=2, alpha=3.0, rs_lora=True), "rs_lora (r=2: scale 3/sqrt2)")
case("lokr_linear_bypass", "lokr", L24_20, dict(multiplier=0.8, lora_dim=2, alpha=1.0, bypass_mode=True), "bypass_mode, multiplier 0.8")
case("lokr_conv3x3", "lokr", conv(16, 24, p=1), dict(lora_dim=2, alpha=1.0), "Conv 3x3 16->24: w1 (4,4), w2_a (6,2), w2_b (2, 4*3*3) flattened")
case("lokr_conv3x3_tucker", "lokr", conv(16, 24, p=1), dict(lora_dim=2, alpha=1.0, use_tucker=True), "Tucker: lokr_t2 (2,2,3,3), w2_a (2,6), w2_b (2,4)")
case("lokr_conv3x3_decompose_both", "lokr", conv(16, 24, p=1), dict(lora_dim=1, alpha=2.0, decompose_both=True), "decompose_both on conv (needs r < max(out_l,in_m)/2 = 2 -> r=1)")
case("lokr_conv1x1", "lokr", conv(16, 24, k=1), dict(lora_dim=2, alpha=1.0), "Conv 1x1: w2_b (2, 4)")
case("lokr_conv3x3_full_matrix", "lokr", conv(8, 12, p=1), dict(lora_dim=2, alpha=1.0, full_matrix=True), "full_matrix conv: w1 (3,2), w2 (4,4,3,3), scale 1")

# IA3
case("ia3_linear", "ia3", L24_20, dict(), "IA3 on output: W' = W * (1 + w) per output row")
case("ia3_linear_input", "ia3", L24_20, dict(train_on_input=True), "IA3 train_on_input: per input column")
case("ia3_conv3x3", "ia3", conv(8, 12, p=1), dict(), "IA3 conv on output: weight (1,out,1,1)")
case("ia3_conv3x3_input", "ia3", conv(8, 12, p=1), dict(train_on_input=True), "IA3 conv train_on_input: weight (1,in,1,1)")
case("ia3_linear_bypass", "ia3", L24_20, dict(bypass_mode=True), "bypass: y = org(x) * (1 + w*mult) -- the bias is scaled too; delta_weight is rebuild semantics")
case("ia3_linear_mult0p5", "ia3", L24_20, dict(multiplier=0.5), "multiplier 0.5")

# DyLoRA
case("dylora_linear_b1", "dylora", L24_20, dict(lora_dim=8, alpha=3.0, block_size=4), "r=8 block_size 4, block b=1: block 0 detached, block 1 trainable, scale alpha/(b+1)", dylora_block=1)
case("dylora_linear_b0", "dylora", L24_20, dict(lora_dim=8, alpha=3.0, block_size=4), "r=8 block_size 4, block b=0: only block 0 used", dylora_block=0)
case("dylora_conv3x3_b1", "dylora", conv(8, 12, p=1), dict(lora_dim=4, alpha=3.0, block_size=2), "Conv 3x3 r=4 block_size 2, b=1", dylora_block=1)
case("dylora_linear_mult0p7", "dylora", L24_20, dict(multiplier=0.7, lora_dim=8, alpha=3.0, block_size=4), "multiplier 0.7, b=1", dylora_block=1)

# Conv1d (input (2, C, 9)) and Conv3d (input (2, C, 3, 4, 5))
case("locon_conv1d_k1", "locon", conv1(8, 12, k=1), dict(lora_dim=4, alpha=3.0), "Conv1d k=1 8->12: lora_down (4,8,1), lora_up (12,4,1)")
case("locon_conv1d_k3_stride2", "locon", conv1(8, 12, s=2, p=1), dict(lora_dim=4, alpha=3.0), "Conv1d k=3 stride 2 padding 1")
case("locon_conv1d_k3_dilation2", "locon", conv1(6, 10, p=2, d=2), dict(lora_dim=4, alpha=3.0), "Conv1d k=3 dilation 2 padding 2 (rebuild uses the layer's dilation)")
case("locon_conv1d_k3_groups2", "locon", conv1(8, 12, p=1, g=2), dict(lora_dim=4, alpha=3.0), "Conv1d k=3 groups 2: lora_down takes in/groups channels")
case("locon_conv1d_k3_tucker", "locon", conv1(8, 12, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True), "Conv1d Tucker: down (4,8,1), mid (4,4,3), up (12,4,1)")
case("locon_conv1d_k3_bypass", "locon", conv1(8, 12, s=2, p=1), dict(lora_dim=4, alpha=3.0, bypass_mode=True), "Conv1d bypass_mode: up(down(x)) with stride 2 padding 1")
case("locon_conv3d_k1", "locon", conv3(8, 12, k=1), dict(lora_dim=4, alpha=3.0), "Conv3d 1x1x1 8->12")
case("locon_conv3d_k3_pad1", "locon", conv3(8, 12, p=1), dict(lora_dim=4, alpha=3.0), "Conv3d 3x3x3 padding 1: lora_down (4,8,3,3,3)")
case("locon_conv3d_k3_stride2", "locon", conv3(8, 12, s=2, p=1), dict(lora_dim=4, alpha=3.0), "Conv3d 3x3x3 stride 2 padding 1")
case("locon_conv3d_k3_groups2", "locon", conv3(8, 12, p=1, g=2), dict(lora_dim=4, alpha=3.0), "Conv3d groups 2")
case("locon_conv3d_k3_tucker_scalar_rslora", "locon", conv3(8, 12, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True, use_scalar=True, rs_lora=True), "Conv3d Tucker (mid (4,4,3,3,3)) + use_scalar + rs_lora")
case("locon_conv3d_k3_tucker_bypass", "locon", conv3(8, 12, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True, bypass_mode=True), "Conv3d Tucker bypass_mode: up(mid(down(x)))")
case("loha_conv1d_k1", "loha", conv1(8, 12, k=1), dict(lora_dim=4, alpha=2.0), "LoHa Conv1d k=1: hada_w*_b (4, 8)")
case("loha_conv1d_k3_stride2", "loha", conv1(8, 12, s=2, p=1), dict(lora_dim=4, alpha=2.0), "LoHa Conv1d k=3 stride 2: hada_w*_b (4, 8*3)")
case("loha_conv1d_k3_tucker", "loha", conv1(8, 12, p=1), dict(lora_dim=4, alpha=2.0, use_tucker=True), "LoHa Conv1d Tucker: hada_t* (4,4,3)")
case("loha_conv1d_k3_bypass", "loha", conv1(8, 12, s=2, p=1), dict(lora_dim=4, alpha=2.0, bypass_mode=True), "LoHa Conv1d bypass_mode (op(x, ΔW) with the layer's stride/padding)")
case("loha_conv3d_k3", "loha", conv3(8, 12, p=1), dict(lora_dim=4, alpha=2.0), "LoHa Conv3d: hada_w*_b (4, 8*27)")
case("loha_conv3d_k3_groups2", "loha", conv3(8, 12, s=2, p=1, g=2), dict(lora_dim=4, alpha=2.0), "LoHa Conv3d groups 2 stride 2")
case("loha_conv3d_k3_tucker_scalar", "loha", conv3(8, 12, p=1), dict(lora_dim=4, alpha=2.0, use_tucker=True, use_scalar=True), "LoHa Conv3d Tucker (hada_t* (4,4,3,3,3)) + use_scalar")
case("loha_conv3d_k1_tucker", "loha", conv3(8, 12, k=1), dict(lora_dim=4, alpha=2.0, use_tucker=True), "use_tucker ignored for 1x1x1")
case("lokr_conv1d_k1", "lokr", conv1(16, 24, k=1), dict(lora_dim=2, alpha=1.0), "LoKr Conv1d k=1: w2_b (2, 4)")
case("lokr_conv1d_k3", "lokr", conv1(16, 24, p=1), dict(lora_dim=2, alpha=1.0), "LoKr Conv1d k=3: w1 (4,4), w2_a (6,2), w2_b (2, 4*3)")
case("lokr_conv1d_k3_tucker", "lokr", conv1(16, 24, p=1), dict(lora_dim=2, alpha=1.0, use_tucker=True), "LoKr Conv1d Tucker: lokr_t2 (2,2,3)")
case("lokr_conv1d_k3_groups2", "lokr", conv1(16, 24, s=2, p=1, g=2), dict(lora_dim=2, alpha=1.0), "LoKr Conv1d groups 2 (in/groups 8 = (2,4)) stride 2")
case("lokr_conv1d_k3_bypass", "lokr", conv1(16, 24, s=2, p=1), dict(lora_dim=2, alpha=1.0, bypass_mode=True), "LoKr Conv1d bypass_mode (LyCORIS's grouped conv path)")
case("lokr_conv3d_k3", "lokr", conv3(16, 24, p=1), dict(lora_dim=2, alpha=1.0), "LoKr Conv3d: w2_b (2, 4*27)")
case("lokr_conv3d_k3_tucker", "lokr", conv3(16, 24, p=1), dict(lora_dim=2, alpha=1.0, use_tucker=True), "LoKr Conv3d Tucker: lokr_t2 (2,2,3,3,3)")
case("lokr_conv3d_k3_decompose_both", "lokr", conv3(16, 24, p=1), dict(lora_dim=1, alpha=2.0, decompose_both=True), "LoKr Conv3d decompose_both (r=1)")
case("lokr_conv3d_k3_full_matrix", "lokr", conv3(8, 12, s=2, p=1), dict(lora_dim=2, alpha=1.0, full_matrix=True), "LoKr Conv3d full_matrix: w2 (4,4,3,3,3), scale 1")
case("lokr_conv3d_k3_tucker_bypass", "lokr", conv3(16, 24, s=2, p=1), dict(lora_dim=2, alpha=1.0, use_tucker=True, bypass_mode=True), "LoKr Conv3d Tucker bypass_mode, stride 2")
case("ia3_conv1d", "ia3", conv1(8, 12, p=1), dict(), "IA3 Conv1d on output: weight (1,12,1)")
case("ia3_conv1d_input", "ia3", conv1(8, 12, s=2, p=1), dict(train_on_input=True), "IA3 Conv1d train_on_input: weight (1,8,1)")
case("ia3_conv1d_groups2", "ia3", conv1(8, 12, p=1, g=2), dict(), "IA3 Conv1d groups 2 on output")
case("ia3_conv3d", "ia3", conv3(8, 12, p=1), dict(), "IA3 Conv3d on output: weight (1,12,1,1,1)")
case("ia3_conv3d_input", "ia3", conv3(8, 12, p=1), dict(train_on_input=True), "IA3 Conv3d train_on_input: weight (1,8,1,1,1)")
case("ia3_conv3d_bypass", "ia3", conv3(8, 12, k=1), dict(bypass_mode=True), "IA3 Conv3d bypass: the bias is scaled too")
case("dylora_conv1d_k3_b1", "dylora", conv1(8, 12, p=1), dict(lora_dim=4, alpha=3.0, block_size=2), "DyLoRA Conv1d k=3 r=4 block_size 2, b=1", dylora_block=1)
case("dylora_conv3d_k3_b0", "dylora", conv3(8, 12, s=2, p=1), dict(lora_dim=4, alpha=3.0, block_size=2), "DyLoRA Conv3d k=3 stride 2, b=0", dylora_block=0)

# Diag-OFT (constraint passed as a float, as LyCORIS's wrapper does: alpha is then F32)
OFT0 = dict(lora_dim=4, constraint=0.0)
case("oft_linear", "diag-oft", L24_20, OFT0, "Diag-OFT Linear(24->20), lora_dim 4: factorization(20, 4) = (4, 5): oft_blocks (5, 4, 4)")
case("oft_linear_constraint", "diag-oft", L24_20, dict(lora_dim=4, constraint=0.01), "constraint 0.01: bound 0.01*20 = 0.2 < ||Q||, Q rescaled to norm 0.2")
case("oft_linear_constraint_loose", "diag-oft", L24_20, dict(lora_dim=4, constraint=1.0), "constraint 1.0: bound 20 > ||Q||, Q unchanged")
case("oft_linear_rescaled", "diag-oft", L24_20, dict(OFT0, rescaled=True), "rescaled: rescale (20, 1)")
case("oft_linear_mult0p6", "diag-oft", L24_20, dict(OFT0, multiplier=0.6), "multiplier 0.6: W' = W + 0.6*(R^T - I)W (LyCORIS crashes with rescaled here)")
case("oft_linear_bypass", "diag-oft", L24_20, dict(OFT0, bypass_mode=True), "bypass_mode: (R^T - I) applied to org_out (bias included)")
case("oft_linear_bypass_rescaled_constraint", "diag-oft", L24_20, dict(lora_dim=4, constraint=0.01, rescaled=True, bypass_mode=True), "bypass_mode + rescale + constraint")
case("oft_linear_lora_dim3", "diag-oft", L24_20, dict(lora_dim=3, constraint=0.0), "lora_dim 3 does not divide 20: factorization(20, 3) = (2, 10)")
case("oft_conv3x3", "diag-oft", conv(8, 12, p=1), OFT0, "Conv 3x3 8->12: factorization(12, 4) = (3, 4): oft_blocks (4, 3, 3)")
case("oft_conv3x3_constraint_mult0p7", "diag-oft", conv(8, 12, s=2, p=1), dict(lora_dim=4, constraint=0.02, multiplier=0.7), "Conv 3x3 stride 2, constraint, multiplier 0.7")
case("oft_conv3x3_rescaled", "diag-oft", conv(8, 12, p=1), dict(OFT0, rescaled=True), "Conv 3x3, rescale (12,1,1,1)")
case("oft_conv3x3_groups2_bypass", "diag-oft", conv(8, 12, p=1, g=2), dict(OFT0, bypass_mode=True, rescaled=True), "Conv 3x3 groups 2, bypass_mode + rescale (channels of org_out)")
case("oft_conv1d_k3", "diag-oft", conv1(8, 12, p=1), dict(OFT0, rescaled=True), "Conv1d k=3, rescale (12,1,1)")
case("oft_conv3d_k3_bypass", "diag-oft", conv3(8, 12, s=2, p=1), dict(OFT0, bypass_mode=True), "Conv3d k=3 stride 2 bypass_mode")

# BOFT
BOFT0 = dict(lora_dim=4, constraint=0.0)
L24_16 = lin(24, 16)
case("boft_linear", "boft", L24_16, BOFT0, "BOFT Linear(24->16), lora_dim 4: power2factorization(16, 4) = (4, 4), 3 stages: oft_blocks (3, 4, 4, 4)")
case("boft_linear_lora2", "boft", L24_16, dict(lora_dim=2, constraint=0.0), "lora_dim 2: blocks of 2, 8 blocks, 4 stages")
case("boft_linear_constraint", "boft", L24_16, dict(lora_dim=4, constraint=0.01), "constraint 0.01: one norm over every stage, bound 0.16")
case("boft_linear_rescaled", "boft", L24_16, dict(BOFT0, rescaled=True), "rescaled: rescale (16, 1)")
case("boft_linear_mult0p6", "boft", L24_16, dict(BOFT0, multiplier=0.6, rescaled=True), "multiplier 0.6 blends every stage: m*R + (1-m)*I; rescale")
case("boft_linear_bypass", "boft", L24_16, dict(BOFT0, bypass_mode=True), "bypass_mode: the butterfly on org_out (bias included)")
case("boft_linear_bypass_rescaled_mult0p8", "boft", L24_16, dict(BOFT0, bypass_mode=True, rescaled=True, multiplier=0.8), "bypass_mode + rescale, multiplier 0.8")
case("boft_conv3x3_b6", "boft", conv(8, 12, p=1), dict(lora_dim=6, constraint=0.0), "Conv 3x3 8->12, lora_dim 6: (6, 2) blocks of 6, 2 stages")
case("boft_conv3x3_stride2_rescaled_constraint", "boft", conv(8, 16, s=2, p=1), dict(lora_dim=4, constraint=0.02, rescaled=True), "Conv 3x3 8->16 stride 2, rescale, constraint")
case("boft_conv1d_k3_bypass", "boft", conv1(8, 16, p=1), dict(BOFT0, bypass_mode=True, rescaled=True), "Conv1d k=3 bypass_mode + rescale")
case("boft_conv3d_k3", "boft", conv3(8, 16, p=1, g=2), dict(lora_dim=8, constraint=0.0), "Conv3d k=3 groups 2, lora_dim 8: (8, 2), 2 stages")

# T-LoRA (conv layers with 1x1 kernels only: LyCORIS 4.1.3 crashes on larger kernels)
TL = dict(lora_dim=4, alpha=2.0)
case("tlora_linear", "tlora", L24_20, TL, "T-LoRA Linear(24->20) r=4 alpha 2, principal singular vectors of W0")
case("tlora_linear_last_mask", "tlora", L24_20, dict(TL, sig_type="last"), "sig_type last, timestep mask 1 1 0 0", timestep_mask=[1, 1, 0, 0])
case("tlora_linear_middle_mult0p6", "tlora", L24_20, dict(TL, sig_type="middle", multiplier=0.6), "sig_type middle, multiplier 0.6, a short mask padded with 1s", timestep_mask=[0, 1])
case("tlora_linear_r7_middle", "tlora", lin(8, 5), dict(lora_dim=7, alpha=0.0, sig_type="middle"), "r=7 > min(out, in)=5, middle: slice [-1:6] keeps one component, the rest zeros with lambda 1e-6; alpha 0 = r")
case("tlora_linear_bypass", "tlora", L24_20, dict(TL, bypass_mode=True), "bypass_mode (factor path), a long mask cut to r", timestep_mask=[1, 0, 1, 0, 1, 1])
case("tlora_conv1x1", "tlora", conv(8, 12, k=1), dict(lora_dim=3, alpha=1.0), "Conv 1x1 8->12, r=3")
case("tlora_conv1x1_stride2_bypass", "tlora", conv(8, 12, k=1, s=2), dict(lora_dim=3, alpha=1.0, bypass_mode=True), "Conv 1x1 stride 2, bypass_mode", timestep_mask=[1, 1, 0])
case("tlora_conv1d_k1", "tlora", conv1(8, 12, k=1), dict(lora_dim=4, alpha=4.0, sig_type="last"), "Conv1d k=1, sig_type last")
case("tlora_conv3d_k1_mask", "tlora", conv3(8, 12, k=1), dict(lora_dim=4, alpha=2.0), "Conv3d k=1, timestep mask", timestep_mask=[0, 1, 1, 0])
# DoRA (weight_decompose) on LoCon, LoHa and LoKr: dora_scale randomised like every parameter
L12_10 = lin(12, 10)
DORA = dict(weight_decompose=True)
DORA_IN = dict(weight_decompose=True, wd_on_out=False)
case("dora_locon_linear", "locon", L12_10, dict(lora_dim=4, alpha=2.0, **DORA), "DoRA on LoRA Linear(12->10): dora_scale (10,1) per output row")
case("dora_locon_linear_input", "locon", L12_10, dict(lora_dim=4, alpha=2.0, **DORA_IN), "DoRA wd_on_out=False: dora_scale (1,12) per input column")
case("dora_locon_linear_mult0p6", "locon", L12_10, dict(multiplier=0.6, lora_dim=4, alpha=2.0, **DORA), "DoRA multiplier 0.6: W' = V*(0.6*(m/|V| - 1) + 1)")
case("dora_locon_linear_input_mult1p5", "locon", L12_10, dict(multiplier=1.5, lora_dim=4, alpha=2.0, **DORA_IN), "DoRA on input columns, multiplier 1.5")
case("dora_locon_linear_scalar_rslora", "locon", L12_10, dict(lora_dim=4, alpha=3.0, use_scalar=True, rs_lora=True, **DORA), "DoRA + use_scalar + rs_lora")
case("dora_locon_conv3x3", "locon", conv(4, 6, p=1), dict(lora_dim=4, alpha=3.0, **DORA), "DoRA LoCon Conv 3x3: dora_scale (6,1,1,1)")
case("dora_locon_conv3x3_input_tucker", "locon", conv(4, 6, s=2, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True, **DORA_IN), "DoRA LoCon Conv 3x3 Tucker stride 2 on input channels: dora_scale (1,4,1,1), norm over (out, k, k)")
case("dora_locon_conv3x3_groups2_input", "locon", conv(4, 6, p=1, g=2), dict(lora_dim=4, alpha=3.0, **DORA_IN), "DoRA LoCon Conv groups 2 on input channels: dora_scale (1,2,1,1)")
case("dora_locon_conv1d_k3", "locon", conv1(4, 6, p=1), dict(lora_dim=4, alpha=3.0, **DORA), "DoRA LoCon Conv1d: dora_scale (6,1,1)")
case("dora_loha_linear", "loha", L12_10, dict(lora_dim=4, alpha=2.0, **DORA), "DoRA on LoHa Linear")
case("dora_loha_linear_input_mult0p7", "loha", L12_10, dict(multiplier=0.7, lora_dim=4, alpha=2.0, **DORA_IN), "DoRA LoHa on input columns, multiplier 0.7")
case("dora_loha_conv3x3_tucker", "loha", conv(4, 6, p=1), dict(lora_dim=4, alpha=2.0, use_tucker=True, **DORA), "DoRA LoHa Conv Tucker")
case("dora_loha_conv3d_k3_input", "loha", conv3(4, 6, p=1), dict(lora_dim=4, alpha=2.0, **DORA_IN), "DoRA LoHa Conv3d on input channels: dora_scale (1,4,1,1,1)")
case("dora_lokr_linear", "lokr", L12_10, dict(lora_dim=2, alpha=1.0, **DORA), "DoRA on LoKr Linear")
case("dora_lokr_linear_input_full", "lokr", L12_10, dict(lora_dim=2, alpha=1.0, full_matrix=True, **DORA_IN), "DoRA LoKr full_matrix on input columns")
case("dora_lokr_conv3x3_mult0p8", "lokr", conv(8, 12, p=1), dict(multiplier=0.8, lora_dim=1, alpha=1.0, **DORA), "DoRA LoKr Conv 3x3, multiplier 0.8")
case("dora_lokr_conv3x3_tucker_input", "lokr", conv(8, 12, p=1), dict(lora_dim=1, alpha=1.0, use_tucker=True, **DORA_IN), "DoRA LoKr Conv Tucker on input channels")

# GLoRA: dW = scale*(W0 a1 a2 + b1 b2)
case("glora_linear", "glora", L12_10, dict(lora_dim=4, alpha=2.0), "GLoRA Linear(12->10) r=4 alpha=2: a1 (12,4), a2 (4,12), b1 (10,4), b2 (4,12)")
case("glora_linear_scalar", "glora", L12_10, dict(lora_dim=4, alpha=2.0, use_scalar=True), "GLoRA use_scalar: scalar folded into a2 and b2 on save")
case("glora_linear_rslora", "glora", L12_10, dict(lora_dim=4, alpha=3.0, rs_lora=True), "GLoRA rs_lora: scale alpha/sqrt(r); LyCORIS saves the raw alpha")
case("glora_linear_mult0p6", "glora", L12_10, dict(multiplier=0.6, lora_dim=4, alpha=2.0), "GLoRA multiplier 0.6")
case("glora_linear_bypass", "glora", L12_10, dict(lora_dim=4, alpha=2.0, bypass_mode=True), "GLoRA bypass_mode: W0(x + a1(a2(x))) + b1(b2(x)) - W0 x")
case("glora_conv1x1", "glora", conv(4, 6, k=1), dict(lora_dim=4, alpha=3.0), "GLoRA Conv 1x1")
case("glora_conv3x3_stride2", "glora", conv(4, 6, s=2, p=1), dict(lora_dim=4, alpha=3.0), "GLoRA Conv 3x3 stride 2: a1 (4,4,1,1), a2 (4,4,1,1), b2 (4,4,3,3); W0 a1 a2 on the input axis")
case("glora_conv3x3_tucker", "glora", conv(4, 6, p=1), dict(lora_dim=4, alpha=3.0, use_tucker=True), "GLoRA use_tucker: never takes effect in LyCORIS 4.1.3 (no bm)")
case("glora_conv1d_k3", "glora", conv1(4, 6, p=1), dict(lora_dim=4, alpha=3.0), "GLoRA Conv1d k=3")
case("glora_conv3d_k3_scalar", "glora", conv3(4, 6, p=1), dict(lora_dim=4, alpha=3.0, use_scalar=True), "GLoRA Conv3d + use_scalar")

# Full: diff, diff_b
case("full_linear", "full", L12_10, dict(), "Full Linear(12->10): diff (10,12), diff_b (10,)")
case("full_linear_no_bias", "full", lin(12, 10, bias=False), dict(), "Full Linear without bias: diff only")
case("full_linear_mult0p6", "full", L12_10, dict(multiplier=0.6), "Full multiplier 0.6: W0 + 0.6 diff, b + 0.6 diff_b")
case("full_conv3x3_stride2", "full", conv(4, 6, s=2, p=1), dict(), "Full Conv 3x3 stride 2")
case("full_conv3x3_groups2", "full", conv(4, 6, p=1, g=2), dict(multiplier=1.3), "Full Conv groups 2, multiplier 1.3")
case("full_conv1d_no_bias", "full", conv1(4, 6, p=1, bias=False), dict(), "Full Conv1d without bias")
case("full_conv3d_k3", "full", conv3(4, 6, p=1), dict(), "Full Conv3d")


# Norm (NormModule on LayerNorm / GroupNorm; make_norm_fixture)


def layer_norm(shape, eps=1e-5, bias=True):
    return {"kind": "layer_norm", "normalized_shape": list(shape), "eps": eps, "has_bias": bias}


def group_norm(groups, channels, eps=1e-5):
    return {"kind": "group_norm", "num_groups": groups, "num_channels": channels, "eps": eps, "has_bias": True}


def norm_case(name, layer, shape, multiplier, description):
    case(name, "norms", dict(layer, input_shape=list(shape)), dict(multiplier=multiplier), description)


norm_case("norm_layer_norm", layer_norm([12]), (2, 3, 12), 0.7, "LayerNorm(12), multiplier 0.7")
norm_case("norm_layer_norm_2d", layer_norm([4, 6]), (2, 3, 4, 6), 1.3, "LayerNorm((4, 6)), multiplier 1.3: w_norm/b_norm have numel(W0) = 24 elements")
norm_case("norm_layer_norm_no_bias", layer_norm([12], eps=1e-3, bias=False), (5, 12), 0.6, "LayerNorm(12, eps=1e-3, bias=False), multiplier 0.6: b_norm exists but is not applied")
norm_case("norm_group_norm", group_norm(3, 12), (2, 12, 5, 6), 0.8, "GroupNorm(3, 12) on (N, C, H, W), multiplier 0.8")
norm_case("norm_group_norm_1d", group_norm(2, 6, eps=1e-3), (2, 6, 7), 1.5, "GroupNorm(2, 6, eps=1e-3) on (N, C, L), multiplier 1.5")
norm_case("norm_group_norm_nc", group_norm(4, 8), (5, 8), 0.5, "GroupNorm(4, 8) on a 2-D (N, C) input, multiplier 0.5")


def dylora_concat(module, spec, which):
    """DyLoRA blocks -> (lora_up.weight, lora_down.weight) in the Swift layout."""
    ups, downs = [], []
    for p in module.up_list:
        t = p.grad if which == "grad" else p
        ups.append(torch.zeros_like(p) if t is None else t.detach())
    for p in module.down_list:
        t = p.grad if which == "grad" else p
        downs.append(torch.zeros_like(p) if t is None else t.detach())
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    if spec["kind"] != "linear":
        in_g = spec["in_channels"] // spec["groups"]
        down = down.reshape(down.shape[0], in_g, *spec["kernel_size"])
    return {"lora_up.weight": up, "lora_down.weight": down}


def module_params(module, algo, spec, which="param"):
    if algo == "dylora":
        return dylora_concat(module, spec, which)
    if algo == "full":
        return full_params(module, which)
    out = {}
    for name, p in module.named_parameters():
        if which == "grad":
            out[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach()
        else:
            out[name] = p.detach()
    return out


def full_params(module, which):
    """FullModule's trainable state as its saved names: diff = weight − W0, diff_b = bias − b0
    (after apply_to the module holds the absolute weight)."""
    if which == "grad":
        out = {"diff": module.weight.grad}
        if module.bias is not None:
            out["diff_b"] = module.bias.grad
        return {k: v.detach() for k, v in out.items()}
    out = {"diff": module.weight.detach() - module.org_weight.to(module.weight)}
    if module.bias is not None:
        out["diff_b"] = module.bias.detach() - module.org_bias[0].to(module.bias)
    return out


@torch.no_grad()
def exact_full_weights(module, params32):
    """Float64 Full module whose diff is exactly the stored float32 diff."""
    module.weight.copy_(module.org_weight.double() + params32["diff"].double())
    if "diff_b" in params32:
        module.bias.copy_(module.org_bias[0].double() + params32["diff_b"].double())


@torch.no_grad()
def dora_glora_full_delta(module, algo):
    """W'(m) − W0 for DoRA, GLoRA and Full as LyCORIS's rebuild forward forms it; None for
    the other cases."""
    mult = module.multiplier
    if algo == "glora":
        return module.get_diff_weight(mult)[0]
    if algo == "full":
        return module.get_diff_weight(mult)[0]
    if not getattr(module, "wd", False):
        return None
    org = module.org_weight.to(torch.float64)
    if algo == "locon":
        diff = module.make_weight() * module.scale
    else:
        diff = module.get_weight(module.shape) * module.scalar
    return _weight_decompose(org + diff, module.dora_scale, mult, module.wd_on_out) - org


@torch.no_grad()
def rebuild_delta(module, algo, case_):
    """ΔW as the rebuild-mode forward forms it (shape of base.weight)."""
    mult = module.multiplier
    special = dora_glora_full_delta(module, algo)
    if special is not None:
        return special
    if algo == "locon":
        return module.make_weight() * module.scale * mult
    if algo in ("loha", "lokr"):
        # get_weight already carries the scale (get_diff_weight would apply it twice)
        return module.get_weight(module.shape) * module.scalar * mult
    if algo == "ia3":
        return module.get_merged_weight(mult)[0] - module.org_weight
    if algo in OFT_ALGOS:
        return oft_rebuild_delta(module)
    if algo == "tlora":
        return module.get_diff_weight(multiplier=mult)[0]
    if algo == "dylora":
        b = case_["dylora_block"]
        return (
            module.get_merged_weight(mult, rank=b * module.block_size)[0]
            - module.org_weight
        )
    raise ValueError(algo)


def _cayley_in_dtype(oft_blocks, I=None, constraint=0):
    """LyCORIS's `get_r` (skew part, norm constraint, (I+Q)(I-Q)^-1) with its one float32
    cast removed: the cast (there for half precision) breaks a float64 run."""
    eye = torch.eye(oft_blocks.shape[-1], dtype=oft_blocks.dtype)
    q = oft_blocks - oft_blocks.transpose(-1, -2)
    if constraint is not None and constraint > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > constraint:
            q = q * constraint / q_norm
    return (eye + q) @ (eye - q).inverse()


def oft_float64_oracle():
    """Route every LyCORIS Cayley transform through `_cayley_in_dtype`."""
    import lycoris.functional.boft as boft_functional
    import lycoris.functional.diag_oft as oft_functional

    oft_functional.get_r = _cayley_in_dtype
    boft_functional.get_r = _cayley_in_dtype
    DiagOFTModule.get_r = lambda self: _cayley_in_dtype(self.oft_blocks, constraint=self.constraint)
    ButterflyOFTModule.get_r = lambda self: _cayley_in_dtype(self.oft_blocks, constraint=self.constraint)


@torch.no_grad()
def oft_rebuild_delta(module):
    """Diag-OFT/BOFT: W'(m) - W0 as LyCORIS's rebuild forms it (multiplier inside)."""
    return module.get_diff_weight(multiplier=module.multiplier)[0]


@torch.no_grad()
def oft_bypass_reference(module, org_out, spec):
    """Diag-OFT/BOFT bypass at multiplier m, written out independently of LyCORIS's
    einsums: rescale * B_m(y) on the channel axis of y = org_out (bias included), with
    Diag-OFT's B_m = blockdiag(m R^T + (1-m) I) and BOFT's butterfly of blended stages."""
    m = module.multiplier
    y = org_out if spec["kind"] == "linear" else org_out.transpose(1, -1)
    rows = y.reshape(-1, y.shape[-1]).T  # (C, positions)
    blocks = module.oft_blocks.detach()
    b = blocks.shape[-1]
    eye = torch.eye(b, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    bound = module.constraint
    if bound > 0 and float(q.norm()) + 1e-8 > bound:
        q = q * bound / (q.norm() + 1e-8)
    r = torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)
    blend = m * r + (1 - m) * eye
    if blocks.ndim == 3:
        z = torch.block_diag(*blend.transpose(-1, -2)) @ rows
    else:
        z = rows
        for i in range(blocks.shape[0]):
            k = 2**i * b // 2
            perm = torch.arange(rows.shape[0]).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            out = torch.empty_like(z)
            out[perm] = torch.block_diag(*blend[i]) @ z[perm]
            z = out
    if module.rescaled:
        z = z * module.rescale.detach().reshape(-1, 1)
    delta = (z - rows).T.reshape(y.shape)
    if spec["kind"] != "linear":
        delta = delta.transpose(1, -1)
    return org_out + delta


@torch.no_grad()
def tlora_float64_base(module, w0):
    """The frozen T-LoRA factors from a float64 SVD of W0 (LyCORIS takes them from a float32
    SVD): the same selection of components, padded with zeros and lambda 1e-6."""
    u, s, vh = torch.linalg.svd(w0.double().reshape(w0.shape[0], -1), full_matrices=False)
    r, k = module.lora_dim, s.shape[0]
    start = {"principal": 0, "last": -r, "middle": (k - r) // 2}[module.sig_type]
    picked = slice(start, None if module.sig_type == "last" else start + r)
    q, p, lam = vh[picked], u[:, picked], s[picked]
    pad = r - q.shape[0]
    module.base_q.copy_(F.pad(q, (0, 0, 0, pad)).reshape(module.base_q.shape))
    module.base_p.copy_(F.pad(p, (0, pad)).reshape(module.base_p.shape))
    module.base_lambda.copy_(F.pad(lam, (0, pad), value=1e-6).reshape(1, r))


def independent_loha_check(module, spec, params64, delta):
    """LoHa has a hand-written backward: cross-check ΔW and its factor grads
    against plain autograd on the textbook formula (reported, not fatal)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params64.items()}
    s = torch.tensor(module.scale, dtype=torch.float64)
    if module.tucker:
        h1 = torch.einsum("ij...,ip,jr->pr...", leaves["hada_t1"], leaves["hada_w1_a"], leaves["hada_w1_b"])
        h2 = torch.einsum("ij...,ip,jr->pr...", leaves["hada_t2"], leaves["hada_w2_a"], leaves["hada_w2_b"])
    else:
        h1 = leaves["hada_w1_a"] @ leaves["hada_w1_b"]
        h2 = leaves["hada_w2_a"] @ leaves["hada_w2_b"]
    dw = (h1 * h2 * s).reshape(module.shape)
    if "scalar" in leaves:
        dw = dw * leaves["scalar"]
    dw = dw * module.multiplier
    gw = torch.randn(dw.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (dw * gw).sum().backward()
    # same probe through LyCORIS' own autograd function
    lyco_leaves = dict(module.named_parameters())
    for p in lyco_leaves.values():
        p.grad = None
    with torch.enable_grad():
        d2 = module.get_weight(module.shape) * module.scalar * module.multiplier
        (d2 * gw).sum().backward()
    issues = []
    if not torch.allclose(dw.detach(), delta, rtol=1e-12, atol=1e-12):
        issues.append("delta")
    for k, leaf in leaves.items():
        g_ref = leaf.grad
        g_lyc = lyco_leaves[k].grad
        g_lyc = torch.zeros_like(g_ref) if g_lyc is None else g_lyc
        if not torch.allclose(g_ref, g_lyc, rtol=1e-10, atol=1e-12):
            issues.append(f"grad {k} max|diff|={float((g_ref - g_lyc).abs().max()):.3e}")
    for p in lyco_leaves.values():
        p.grad = None
    return issues


SURPRISES = []


def make_module_fixture(case_):
    name, algo, spec, options = case_["name"], case_["algo"], case_["layer"], case_["options"]
    seed = seed_of(name)
    torch.manual_seed(seed)  # LyCORIS' own inits use the global RNG
    gen = torch.Generator().manual_seed(seed)

    layer = build_layer(spec, gen)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if layer.bias is not None else None

    module = ALGO_CLASSES[algo]("", layer, **options)
    module.apply_to()

    # randomise EVERY trainable parameter (incl. the zero-initialised ones)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if pname == "scalar":
                p.fill_(SCALAR_VALUE)
            else:
                p.copy_(randn(p.shape, gen))
    params32 = {k: t_out(v) for k, v in module_params(module, algo, spec).items()}
    saved_keys = [
        [k, list(v.shape), DTYPE_NAMES[v.dtype]] for k, v in module.state_dict().items()
    ]

    x32 = randn(input_shape(spec), gen)

    # float64 oracle run on exactly those float32 values
    layer.double()
    module.double()
    module.eval()
    if algo == "tlora":
        tlora_float64_base(module, w0)
        clear_timestep_mask()
        if case_["timestep_mask"] is not None:
            set_timestep_mask(torch.tensor([case_["timestep_mask"]], dtype=torch.float64))
    if algo == "full":
        exact_full_weights(module, params32)
    if algo == "dylora":
        b = case_["dylora_block"]
        module.get_random_rank_weight = lambda: module.get_weight(b * module.block_size)

    captured = []
    if not module.bypass_mode and algo != "full":  # Full calls op with keyword weights
        orig_op = module.op

        def recording_op(x, w=None, *a, **kw):
            if w is None:  # Diag-OFT/BOFT pass the weight by keyword
                w = kw.pop("weight")
            captured.append(w.detach().clone())
            return orig_op(x, w, *a, **kw)

        module.op = recording_op

    x = x32.double().requires_grad_(True)
    y = layer(x)
    g32 = randn(y.shape, gen, scale=1.0)
    loss = (y * g32.double()).sum()
    loss.backward()

    grads = module_params(module, algo, spec, which="grad")
    params64 = {k: v.detach().clone() for k, v in module_params(module, algo, spec).items()}
    delta = rebuild_delta(module, algo, case_)
    assert delta.shape == w0.shape, (name, delta.shape, w0.shape)
    delta_bias = module.get_diff_weight(module.multiplier)[1] if algo == "full" else None

    # ---- self-checks --------------------------------------------------
    if captured:
        assert len(captured) == 1, name
        assert torch.allclose(captured[0], delta, rtol=1e-12, atol=1e-13), (
            name,
            float((captured[0] - delta).abs().max()),
        )
    op = op_of(spec)
    with torch.no_grad():
        if algo == "ia3" and module.bypass_mode:
            w = params64["weight"] * module.multiplier + 1
            y_ref = op(x.detach(), w0.double(), b0.double()) * w
        elif algo in OFT_ALGOS and module.bypass_mode:
            y_ref = oft_bypass_reference(module, op(x.detach(), w0.double(), b0.double()), spec)
        else:
            b_ref = None if b0 is None else b0.double()
            if delta_bias is not None:
                b_ref = delta_bias if b_ref is None else b_ref + delta_bias
            y_ref = op(x.detach(), w0.double() + delta, b_ref)
        # LyCORIS blends BOFT stages with a float32 identity: (1 - m) carries ~1e-8
        tol = 1e-7 if algo in OFT_ALGOS else 1e-10
        assert torch.allclose(y.detach(), y_ref, rtol=tol, atol=tol), (
            name,
            float((y.detach() - y_ref).abs().max()),
        )
    if algo == "loha" and not module.wd:
        issues = independent_loha_check(module, spec, params64, delta)
        if issues:
            SURPRISES.append(f"{name}: LoHa backward differs from plain autograd: {issues}")

    saved = {}
    for k, v in module.state_dict().items():
        v = v.detach()
        saved[k] = v if not v.is_floating_point() else v.to(torch.float64)

    tensors = {
        "base.weight": t_out(w0),
        "input": t_out(x32),
        "grad_output": t_out(g32),
    }
    if b0 is not None:
        tensors["base.bias"] = t_out(b0)
    if delta_bias is not None:
        tensors["expected.delta_bias"] = t_out(delta_bias.to(torch.float64))
    for k, v in params32.items():
        tensors[f"param.{k}"] = v
    tensors["expected.output"] = t_out(y.to(torch.float64))
    tensors["expected.grad_input"] = t_out(x.grad.to(torch.float64))
    for k, v in grads.items():
        tensors[f"expected.grad.{k}"] = t_out(v.to(torch.float64))
    tensors["expected.delta_weight"] = t_out(delta.to(torch.float64))
    for k, v in saved.items():
        tensors[f"expected.saved.{k}"] = t_out(v)
    if case_["timestep_mask"] is not None:
        tensors["timestep_mask"] = torch.tensor(case_["timestep_mask"], dtype=torch.float32)
        clear_timestep_mask()

    if algo == "dylora":
        scale = float(module.alpha) / (case_["dylora_block"] + 1)
    else:
        scale = getattr(module, "scale", 1.0)  # IA3 has no scale
    metadata = {
        "case": name,
        "algo": algo,
        "layer": jdump(spec),
        "options": jdump(options),
        "scale": str(float(scale)),
        "saved_keys": jdump(saved_keys),
        "bypass": "true" if module.bypass_mode else "false",
        "description": case_["description"],
        "oracle": ORACLE,
    }
    if algo == "dylora":
        metadata["dylora_block"] = str(case_["dylora_block"])
    path = MODULES_DIR / f"{name}.safetensors"
    save_file(tensors, str(path), metadata)
    return path


def build_norm_layer(spec, gen):
    if spec["kind"] == "layer_norm":
        layer = nn.LayerNorm(tuple(spec["normalized_shape"]), eps=spec["eps"], bias=spec["has_bias"])
    else:
        assert spec["has_bias"], "torch's GroupNorm always has a bias"
        layer = nn.GroupNorm(spec["num_groups"], spec["num_channels"], eps=spec["eps"])
    return randomize_layer(layer, gen)


def norm_op(spec):
    """op(x, W, b) = x_hat * W + b of a norm layer description."""
    if spec["kind"] == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, tuple(spec["normalized_shape"]), w, b, spec["eps"])
    return lambda x, w, b: F.group_norm(x, spec["num_groups"], w, b, spec["eps"])


def make_norm_fixture(case_):
    """A NormModule case. The expected values come from the module's formula
    y = op(x, W0, b0) + m * op(x, w_norm.view(W0), b_norm.view(W0) if b0 exists)
    run through autograd in float64; wherever LyCORIS 4.1.3's NormModule runs on the
    layer (1-D normalized_shape or GroupNorm, with a bias) its output and gradients
    must agree to 1e-10, and LyCORIS's own values are stored. Where it cannot run,
    its failure is recorded in the metadata (`lycoris`)."""
    name, spec, options = case_["name"], dict(case_["layer"]), case_["options"]
    shape = spec.pop("input_shape")
    mult = options["multiplier"]
    seed = seed_of(name)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    layer = build_norm_layer(spec, gen)
    w0 = layer.weight.detach().clone()
    b0 = None if layer.bias is None else layer.bias.detach().clone()
    count = w0.numel()
    params32 = {"w_norm": randn((count,), gen), "b_norm": randn((count,), gen)}
    x32 = randn(shape, gen)
    g32 = randn(shape, gen, scale=1.0)

    op = norm_op(spec)
    leaves = {k: v.double().requires_grad_(True) for k, v in params32.items()}
    x = x32.double().requires_grad_(True)
    delta_b = None if b0 is None else leaves["b_norm"].view(w0.shape)
    y = op(x, w0.double(), None if b0 is None else b0.double()) + mult * op(x, leaves["w_norm"].view(w0.shape), delta_b)
    (y * g32.double()).sum().backward()
    expected = {"output": y.detach(), "grad_input": x.grad}
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}

    # LyCORIS's NormModule on the same layer, float64.
    try:
        module = NormModule("", layer, multiplier=mult)
        module.apply_to()
        lyco_saved = {k: list(v.shape) for k, v in module.state_dict().items()}
        assert lyco_saved == {k: [count] for k in params32}, f"LyCORIS sizes w_norm/b_norm {lyco_saved}"
        with torch.no_grad():
            for k, v in params32.items():
                getattr(module, k).copy_(v)
        layer.double()
        module.double()
        module.eval()
        xl = x32.double().requires_grad_(True)
        yl = layer(xl)
        (yl * g32.double()).sum().backward()
        for what, ours, theirs in [("output", expected["output"], yl.detach()), ("grad_input", x.grad, xl.grad)] + [
            (f"grad {k}", grads[k], torch.zeros_like(grads[k]) if getattr(module, k).grad is None else getattr(module, k).grad)
            for k in params32
        ]:
            assert torch.allclose(ours, theirs, rtol=1e-10, atol=1e-10), (name, what, float((ours - theirs).abs().max()))
        expected = {"output": yl.detach(), "grad_input": xl.grad}
        grads = {k: torch.zeros_like(grads[k]) if getattr(module, k).grad is None else getattr(module, k).grad for k in params32}
        lycoris_note = "LyCORIS 4.1.3 NormModule computes these values (cross-checked against the formula)"
    except Exception as e:
        lycoris_note = f"LyCORIS 4.1.3 NormModule cannot run this layer ({type(e).__name__}: {e}); values from the formula"

    tensors = {"base.weight": t_out(w0), "input": t_out(x32), "grad_output": t_out(g32)}
    if b0 is not None:
        tensors["base.bias"] = t_out(b0)
    for k, v in params32.items():
        tensors[f"param.{k}"] = t_out(v)
        tensors[f"expected.grad.{k}"] = t_out(grads[k].to(torch.float64))
        tensors[f"expected.saved.{k}"] = t_out(v.to(torch.float64))
    tensors["expected.output"] = t_out(expected["output"].to(torch.float64))
    tensors["expected.grad_input"] = t_out(expected["grad_input"].to(torch.float64))
    tensors["expected.delta_weight"] = t_out(params32["w_norm"].double().view(w0.shape) * mult)
    if b0 is not None:
        tensors["expected.delta_bias"] = t_out(params32["b_norm"].double().view(w0.shape) * mult)
    metadata = {
        "case": name,
        "algo": "norms",
        "layer": jdump(spec),
        "options": jdump(options),
        "scale": "1.0",
        "saved_keys": jdump([[k, [count], "F32"] for k in params32]),
        "bypass": "false",
        "description": case_["description"],
        "lycoris": lycoris_note,
        "oracle": ORACLE,
    }
    path = MODULES_DIR / f"{name}.safetensors"
    save_file(tensors, str(path), metadata)
    return path


# --------------------------------------------------------------------------
# network fixtures: a tiny model whose module names look like a diffusers UNet


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(24, 24, bias=False)


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = Attention()


class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(16, 24)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock()])


class ResnetBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1)
        self.time_emb_proj = nn.Linear(16, 12)


class CrossAttnDownBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer2DModel()])
        self.resnets = nn.ModuleList([ResnetBlock2D()])


class MidBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 12, 1)
        self.norm = nn.LayerNorm(12)


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([CrossAttnDownBlock2D()])
        self.mid_block = MidBlock()


NET_SEED = 20240601


def seeded_model(model_class, seed):
    """`model_class()` built under torch seed `seed`, every parameter then drawn from a
    generator seeded the same way."""
    torch.manual_seed(seed)
    model = model_class()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(randn(p.shape, gen))
    return model


def make_model():
    return seeded_model(TinyUNet, NET_SEED)


NET_COMMON = dict(linear_dim=4, linear_alpha=2.0, conv_dim=4, conv_alpha=3.0)
NET_ALGOS = [
    # file stem, create_lycoris kwargs, description
    ("lora", dict(algo="lora"), "LoRA/LoCon network"),
    ("loha", dict(algo="loha"), "LoHa network"),
    (
        "lokr",
        dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0),
        "LoKr network, r=2: proj_in and to_q get a factorised w2 (scale alpha/r); conv1, time_emb_proj and "
        "mid_block.conv end up with both halves full, so LyCORIS forces alpha=r (saved alpha 2.0, scale 1)",
    ),
    ("ia3", dict(algo="ia3"), "IA3 network (weight + on_input per module)"),
    ("dylora", dict(algo="dylora", block_size=2), "DyLoRA network (saved as LoRA keys; r=4 block_size 2)"),
    ("glora", dict(algo="glora"), "GLoRA network"),
    ("full", dict(algo="full"), "Full (diff/diff_b) network"),
    ("diag-oft", dict(algo="diag-oft"), "Diag-OFT network (constraint 0)"),
    ("boft", dict(algo="boft"), "BOFT network"),
    ("norms", dict(algo="lora", train_norm=True), "algo=lora with train_norm=True: LoRA on Linear/Conv plus NormModule (w_norm/b_norm) on the LayerNorm"),
    ("tlora", dict(algo="tlora"), "TLoRA network"),
]
NET_ALGOS += [
    ("dora", dict(algo="lora", dora_wd=True), "DoRA network: LoRA with dora_wd=True (dora_scale per output row)"),
    ("dora_loha_input", dict(algo="loha", dora_wd=True, wd_on_output=False), "DoRA network: LoHa with dora_wd=True, wd_on_output=False (dora_scale per input column)"),
]
# Networks with per-layer expected outputs besides CORE_NET and norms.
EXPECTED_NET = ("glora", "full", "dora", "dora_loha_input")
CORE_NET = ("lora", "loha", "lokr", "ia3", "dylora")
NET_NOTES = {}
NET_SKIPPED = {}


def names_of(model):
    return module_name_map(model)


def module_name_map(model):
    return {
        f"{LycorisNetwork.LORA_PREFIX}_{n}".replace(".", "_"): (n, m)
        for n, m in model.named_modules()
        if n
    }


def layer_input(module, gen):
    if isinstance(module, nn.Linear):
        return randn((2, 3, module.in_features), gen)
    if isinstance(module, nn.LayerNorm):
        return randn((2, 3, *module.normalized_shape), gen)
    return randn((2, module.in_channels, 5, 6), gen)


def smoke_forward(net, names, stem):
    """Run every adapted layer once (float32) and report the ones that fail."""
    failures = []
    gen = torch.Generator().manual_seed(seed_of("smoke:" + stem))
    with torch.no_grad():
        for lora in net.loras:
            path, layer = names[lora.lora_name]
            try:
                layer(layer_input(layer, gen))
            except Exception as e:
                failures.append(f"forward of {path} fails: {type(e).__name__}: {e}")
    return failures


def dtype_notes(net):
    """save_weights(path, torch.float32, ...) casts every tensor, ints included."""
    notes = []
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            notes.append(f"{k}: {DTYPE_NAMES[v.dtype]} in state_dict(), written as F32 by save_weights")
    return notes


def quiet():
    for n in ("LyCORIS", "lycoris"):
        logging.getLogger(n).setLevel(logging.ERROR)


def build_network(stem, kwargs):
    model = make_model()
    torch.manual_seed(seed_of("net:" + stem))
    args = dict(NET_COMMON)
    args.update(kwargs)
    lin_dim = args.pop("linear_dim")
    lin_alpha = args.pop("linear_alpha")
    net = create_lycoris(model, 1.0, lin_dim, lin_alpha, **args)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed_of("net-params:" + stem))
    with torch.no_grad():
        for lora in net.loras:
            for pname, p in lora.named_parameters():
                if pname == "scalar":
                    p.fill_(SCALAR_VALUE)
                elif type(lora).__name__ == "FullModule":
                    p.add_(randn(p.shape, gen))  # weight = W0 + random diff
                elif type(lora).__name__ in ("DiagOFTModule", "ButterflyOFTModule"):
                    p.copy_(randn(p.shape, gen, scale=0.125))
                else:
                    p.copy_(randn(p.shape, gen))
    call = dict(multiplier=1.0, linear_dim=lin_dim, linear_alpha=lin_alpha, **args)
    return model, net, call


def network_fixtures(model0):
    written = []
    names = module_name_map(model0)
    all_layers = [
        (n, type(m).__name__)
        for n, m in model0.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))
    ]
    for stem, kwargs, desc in NET_ALGOS:
        attempts = [kwargs]
        if stem == "boft":
            # r=4 cannot factor out=24/12 under BOFT's power-of-2 rule; r=6 can
            attempts.append(dict(kwargs, linear_dim=6, conv_dim=6))
        built = None
        errors = []
        for kw in attempts:
            try:
                built = build_network(stem, kw)
                break
            except Exception as e:  # record what LyCORIS cannot do
                errors.append(f"{jdump({k: v for k, v in kw.items()})}: {type(e).__name__}: {e}")
        if built is None:
            NET_SKIPPED[stem] = errors
            continue
        model, net, call = built
        mods = []
        adapted = set()
        for lora in net.loras:
            path, base = names[lora.lora_name]
            adapted.add(path)
            mods.append(
                {
                    "lora_name": lora.lora_name,
                    "base_key": path,
                    "base_class": type(base).__name__,
                    "lycoris_class": type(lora).__name__,
                }
            )
        not_adapted = [n for n, _ in all_layers if n not in adapted]
        notes = ["first attempt failed: " + s for s in errors]
        if stem not in CORE_NET:
            notes += smoke_forward(net, names_of(model), stem)
        notes += dtype_notes(net)
        if notes:
            NET_NOTES.setdefault(stem, []).extend(notes)
        meta = {
            "description": desc + f". create_lycoris(model, **create_lycoris_kwargs), apply_to(), "
            "every adapter parameter randomised, save_weights(path, torch.float32, metadata).",
            "algo": stem,
            "create_lycoris_kwargs": jdump(call),
            "modules": jdump(mods),
            "not_adapted": jdump(not_adapted),
            "oracle": ORACLE,
        }
        if notes:
            meta["notes"] = jdump(notes)
        path = NETWORKS_DIR / f"{stem}.safetensors"
        net.save_weights(str(path), torch.float32, meta)
        written.append(path)
        if stem in CORE_NET or stem in ("norms",) + OFT_ALGOS or stem in EXPECTED_NET:
            written.append(network_expected(stem, model, net, path, call))
        if stem == "lora":
            written.append(kohya_copy(path, call))
    return written


def eval_layers(net, model, names, keys, seed_name):
    """y = adapted layer forward in float64 (eval) for each base key in `keys`."""
    model.double()
    net.double()
    net.eval()
    model.eval()
    gen = torch.Generator().manual_seed(seed_of(seed_name))
    xs, ys = {}, {}
    by_path = {names[l.lora_name][0]: names[l.lora_name][1] for l in net.loras}
    with torch.no_grad():
        for key in keys:
            layer = by_path[key]
            x32 = layer_input(layer, gen)
            xs[key] = x32
            ys[key] = layer(x32.double()).to(torch.float64)
    return xs, ys


def network_expected(stem, model, net, path, call):
    names = module_name_map(model)
    keys = [
        names[l.lora_name][0]
        for l in net.loras
        if isinstance(names[l.lora_name][1], (nn.Linear, nn.Conv2d, nn.LayerNorm))
    ]
    notes = []
    source = "in-memory network (eval, float64)"
    if stem == "dylora":
        source = "create_lycoris_from_weights(1.0, dylora.safetensors, fresh_model) (loads as LoCon, scale alpha/r), float64"
        fresh = make_model()
        try:
            net2, _ = create_lycoris_from_weights(1.0, str(path), fresh)
        except Exception as e:
            notes.append(
                f"full reload failed ({type(e).__name__}: {e}); conv layers omitted "
                "(lora_up saved 2-D for conv), only linear layers reloaded"
            )
            sd = load_file(str(path))
            fnames = module_name_map(fresh)
            keep = {
                ln
                for ln, (_, m) in fnames.items()
                if isinstance(m, nn.Linear)
            }
            sd = {k: v for k, v in sd.items() if k.split(".")[0] in keep}
            fresh = make_model()
            net2, _ = create_lycoris_from_weights(1.0, str(path), fresh, weights_sd=sd)
        net2.apply_to()
        fnames = module_name_map(fresh)
        keys = [
            fnames[l.lora_name][0]
            for l in net2.loras
            if isinstance(fnames[l.lora_name][1], (nn.Linear, nn.Conv2d))
        ]
        xs, ys = eval_layers(net2, fresh, fnames, keys, "net-x:" + stem)
    else:
        xs, ys = eval_layers(net, model, names, keys, "net-x:" + stem)
        # cross-check: reloading the saved file must give the same outputs
        fresh = make_model()
        try:
            net2, _ = create_lycoris_from_weights(1.0, str(path), fresh)
            net2.apply_to()
            fnames = module_name_map(fresh)
            _, ys2 = eval_layers(net2, fresh, fnames, keys, "net-x:" + stem)
            for k in keys:
                if not torch.allclose(ys[k], ys2[k], rtol=1e-9, atol=1e-9):
                    SURPRISES.append(
                        f"networks/{stem}: reloaded file output differs at {k} "
                        f"(max |diff| {float((ys[k] - ys2[k]).abs().max()):.3e})"
                    )
            notes.append("cross-checked: create_lycoris_from_weights on the saved file reproduces y")
        except Exception as e:
            notes.append(f"create_lycoris_from_weights failed: {type(e).__name__}: {e}")
    NET_NOTES.setdefault(stem, []).extend(notes)
    tensors = {}
    for k in keys:
        tensors[f"x.{k}"] = t_out(xs[k])
        tensors[f"y.{k}"] = t_out(ys[k])
    meta = {
        "description": f"Per-layer expected outputs for {stem}.safetensors applied to base.safetensors: "
        "x.K is an F32 input for the layer with base key K.weight, y.K (F64) the adapted layer output. "
        f"Source: {source}.",
        "algo": stem,
        "multiplier": "1.0",
        "layers": jdump(keys),
        "source": source,
        "notes": jdump(notes),
        "oracle": ORACLE,
    }
    out = NETWORKS_DIR / f"{stem}.expected.safetensors"
    save_file(tensors, str(out), meta)
    return out


def kohya_copy(path, call):
    sd = load_file(str(path))
    prefix = LycorisNetwork.LORA_PREFIX + "_"
    renamed = {}
    for k, v in sd.items():
        assert k.startswith(prefix), k
        renamed["lora_unet_" + k[len(prefix):]] = v.contiguous()
    meta = {
        "description": "Same tensors as lora.safetensors with keys renamed lycoris_ -> lora_unet_ "
        "(kohya/A1111 naming) and kohya-style ss_* metadata.",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(call["linear_dim"]),
        "ss_network_alpha": str(call["linear_alpha"]),
        "ss_network_args": jdump(
            {"conv_dim": str(call["conv_dim"]), "conv_alpha": str(call["conv_alpha"])}
        ),
        "oracle": ORACLE,
    }
    out = NETWORKS_DIR / "kohya_lora.safetensors"
    save_file(renamed, str(out), meta)
    return out


def base_fixture(model):
    sd = {k: t_out(v) for k, v in model.state_dict().items()}
    layers = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            layers[n] = lin(m.in_features, m.out_features, m.bias is not None)
        elif isinstance(m, nn.Conv2d):
            layers[n] = {
                "kind": "conv2d",
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size),
                "stride": list(m.stride),
                "padding": list(m.padding),
                "dilation": list(m.dilation),
                "groups": m.groups,
                "bias": m.bias is not None,
            }
        elif isinstance(m, nn.LayerNorm):
            layers[n] = {"kind": "layernorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps}
    meta = {
        "description": "Tiny diffusers-UNet-like model (F32 state_dict) that every networks/*.safetensors "
        "adapter was created on. Network inputs: linear (2,3,in), conv (2,C,5,6).",
        "layers": jdump(layers),
        "oracle": ORACLE,
    }
    out = NETWORKS_DIR / "base.safetensors"
    save_file(sd, str(out), meta)
    return out


# --------------------------------------------------------------------------
# conv1d / conv3d network fixtures: create_lycoris on a model of Conv1d and Conv3d layers


class ConvNdModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Conv1d(4, 6, 3, padding=1)
        self.seq_pointwise = nn.Conv1d(6, 6, 1)
        self.volume = nn.Conv3d(4, 6, 3, padding=1)
        self.volume_strided = nn.Conv3d(6, 4, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1))


CONVND_SEED = 20261130
CONVND_ALGOS = [
    ("lora", dict(algo="lora", use_tucker=True)),
    ("loha", dict(algo="loha")),
    ("lokr", dict(algo="lokr", linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0)),
]


def convnd_input(layer, gen):
    spatial = (9,) if isinstance(layer, nn.Conv1d) else (3, 4, 5)
    return randn((2, layer.in_channels, *spatial), gen)


def convnd_fixtures():
    """LyCORIS networks on Conv1d/Conv3d layers: base weights, saved files, and the adapted
    layers' float64 outputs (cross-checked against create_lycoris_from_weights)."""
    def make():
        return seeded_model(ConvNdModel, CONVND_SEED)

    written = []
    base = NETWORKS_DIR / "convnd_base.safetensors"
    layers = {
        n: {"kind": f"conv{len(m.kernel_size)}d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None}
        for n, m in make().named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))
    }
    save_file({k: t_out(v) for k, v in make().state_dict().items()}, str(base), {
        "description": "Conv1d/Conv3d model (F32 state_dict) of the convnd_* adapters. Inputs: conv1d (2,C,9), conv3d (2,C,3,4,5).",
        "layers": jdump(layers), "oracle": ORACLE})
    written.append(base)
    for stem, kwargs in CONVND_ALGOS:
        model = make()
        torch.manual_seed(seed_of("convnd:" + stem))
        args = dict(NET_COMMON)
        args.update(kwargs)
        net = create_lycoris(model, 1.0, args.pop("linear_dim"), args.pop("linear_alpha"), **args)
        net.apply_to()
        gen = torch.Generator().manual_seed(seed_of("convnd-params:" + stem))
        with torch.no_grad():
            for lora in net.loras:
                for _, p in lora.named_parameters():
                    p.copy_(randn(p.shape, gen))
        path = NETWORKS_DIR / f"convnd_{stem}.safetensors"
        net.save_weights(str(path), torch.float32, {"algo": stem, "oracle": ORACLE, "create_lycoris_kwargs": jdump(kwargs)})
        written.append(path)
        names = module_name_map(model)
        keys = [names[l.lora_name][0] for l in net.loras]
        model.double(); net.double(); net.eval(); model.eval()
        gen = torch.Generator().manual_seed(seed_of("convnd-x:" + stem))
        tensors = {}
        with torch.no_grad():
            for key in keys:
                layer = dict(model.named_modules())[key]
                x32 = convnd_input(layer, gen)
                tensors[f"x.{key}"] = t_out(x32)
                tensors[f"y.{key}"] = t_out(layer(x32.double()).to(torch.float64))
        fresh = make()
        net2, _ = create_lycoris_from_weights(1.0, str(path), fresh)
        net2.apply_to()
        fresh.double(); net2.double(); net2.eval()
        with torch.no_grad():
            for key in keys:
                y2 = dict(fresh.named_modules())[key](tensors[f"x.{key}"].double())
                if not torch.allclose(y2, tensors[f"y.{key}"], rtol=1e-9, atol=1e-9):
                    SURPRISES.append(f"networks/convnd_{stem}: reloaded file output differs at {key}")
        out = NETWORKS_DIR / f"convnd_{stem}.expected.safetensors"
        save_file(tensors, str(out), {
            "description": f"Per-layer expected outputs for convnd_{stem}.safetensors on convnd_base.safetensors "
            "(x.K F32 input, y.K F64 adapted output; eval, float64; reloading the file reproduces them).",
            "algo": stem, "layers": jdump(keys), "oracle": ORACLE})
        written.append(out)
    return written


# --------------------------------------------------------------------------


def canonicalize(path):
    """Rewrite the safetensors header with sorted keys.

    The safetensors writer serialises its metadata map in hash order, so two
    runs give equal tensors but different header bytes; a sorted header makes
    regeneration byte-for-byte reproducible. The data section is untouched.
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("ascii")
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n :])


def verify(paths):
    rows = []
    for p in paths:
        tensors = load_file(str(p))
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            assert set(f.keys()) == set(tensors.keys())
        assert all(isinstance(v, str) for v in meta.values()), p
        if p.parent == MODULES_DIR:
            for key in ("case", "algo", "layer", "options", "scale", "saved_keys"):
                assert key in meta, (p, key)
            json.loads(meta["layer"]), json.loads(meta["options"])
            saved = json.loads(meta["saved_keys"])
            for k, shape, _ in saved:
                t = tensors[f"expected.saved.{k}"]
                assert list(t.shape) == shape, (p, k, t.shape, shape)
            for k, t in tensors.items():
                if k.startswith("expected.") and t.is_floating_point():
                    assert t.dtype == torch.float64, (p, k)
                if k.startswith("param.") or k in ("input", "grad_output", "base.weight", "base.bias"):
                    assert t.dtype == torch.float32, (p, k)
                if k.startswith("param."):
                    assert f"expected.grad.{k[6:]}" in tensors, (p, k)
            algo = meta["algo"]
        else:
            algo = meta.get("algo", "-")
        rows.append((p.relative_to(FIXTURES).as_posix(), algo, p.stat().st_size))
    return rows


def main():
    quiet()
    oft_float64_oracle()
    random.seed(0)  # DyLoRA's training forward draws its block with `random`
    torch.set_default_dtype(torch.float32)
    MODULES_DIR.mkdir(parents=True, exist_ok=True)
    NETWORKS_DIR.mkdir(parents=True, exist_ok=True)
    for d in (MODULES_DIR, NETWORKS_DIR):
        for old in d.glob("*.safetensors"):
            old.unlink()

    written = []
    for c in CASES:
        written.append(make_norm_fixture(c) if c["algo"] == "norms" else make_module_fixture(c))

    model0 = make_model()
    written.append(base_fixture(model0))
    written.extend(network_fixtures(model0))
    written.extend(convnd_fixtures())

    for d in (MODULES_DIR, NETWORKS_DIR):
        keep = d / ".keep"
        if keep.exists() and any(d.glob("*.safetensors")):
            keep.unlink()

    for p in written:
        canonicalize(p)
    rows = verify(written)
    w = max(len(r[0]) for r in rows)
    print(f"{'file':<{w}}  {'algo':<8}  {'bytes':>8}")
    for f, a, s in rows:
        print(f"{f:<{w}}  {a:<8}  {s:>8}")
    total = sum(r[2] for r in rows)
    print(f"{'TOTAL':<{w}}  {len(rows):<8}  {total:>8}  ({total / 1024 / 1024:.2f} MiB)")
    assert total < 6 * 1024 * 1024, "fixtures exceed 6 MB"

    if NET_SKIPPED:
        print("\nnetworks LyCORIS could not build (skipped):")
        for k, v in NET_SKIPPED.items():
            for e in v:
                print(f"  {k}: {e}")
    if NET_NOTES:
        print("\nnetwork notes:")
        for k, v in NET_NOTES.items():
            for e in v:
                print(f"  {k}: {e}")
    if SURPRISES:
        print("\nsurprises:")
        for s in SURPRISES:
            print("  " + s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
