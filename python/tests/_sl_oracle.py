"""Shared pieces of the swift_lycoris tests (test_wrapper, test_server_process,
test_distributed): a small model with Linear and Conv2d layers, the LyCORIS 4.1.3 oracle
side by side with ours, parameter copying, and comparisons with explicit tolerances.

The oracle is imported unconditionally: without lycoris-lora (or torch) the tests that
need it fail at collection with an ImportError, they are never skipped.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

_PYTHON_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)

import lycoris  # noqa: E402  (the oracle: LyCORIS 4.1.3; a missing package is an error, not a skip)
from lycoris.modules.dylora import DyLoraModule  # noqa: E402

import swift_lycoris as sl  # noqa: E402

import importlib.metadata  # noqa: E402

LYCORIS_VERSION = importlib.metadata.version("lycoris-lora")
assert LYCORIS_VERSION == "4.1.3", f"the oracle must be lycoris-lora 4.1.3, found {LYCORIS_VERSION}"


class TinyBlock(nn.Module):
    """A residual block: 3×3 conv (padding 1), then a 1×1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, h):
        return h + self.proj(F.silu(self.conv(h)))


class TinyNet(nn.Module):
    """stem (3×3, pad 1) → blocks.{0,1}.{conv 3×3, proj 1×1} → down (3×3, stride 2) →
    tokens (N, H, W, C) → head.0 (Linear) → GELU → head.2 (Linear). Eight adapted layers,
    module names like LyCORIS's ``lycoris_blocks_0_proj``."""

    def __init__(self, channels: int = 16, hidden: int = 32, out: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList([TinyBlock(channels), TinyBlock(channels)])
        self.down = nn.Conv2d(channels, 24, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(24, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x):
        h = F.silu(self.stem(x))
        for block in self.blocks:
            h = block(h)
        h = F.silu(self.down(h))
        return self.head(h.permute(0, 2, 3, 1))


MODULE_NAMES = {
    "lycoris_stem", "lycoris_blocks_0_conv", "lycoris_blocks_0_proj", "lycoris_blocks_1_conv",
    "lycoris_blocks_1_proj", "lycoris_down", "lycoris_head_0", "lycoris_head_2",
}


def base_model(seed: int = 1234) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def inputs(seed: int = 7, batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    upstream = torch.randn(batch, size // 2, size // 2, 12, generator=g)
    return x, upstream


# MARK: LyCORIS ⇄ ours


def lycoris_parameters(lyco_net) -> dict[str, dict[str, torch.Tensor]]:
    """LyCORIS's adapter parameters as {module: {our key suffix: Parameter-like}}.
    DyLoRA keeps per-block lists; ours keeps LyCORIS's *file* layout (one lora_up /
    lora_down), so its blocks are concatenated the way ``DyLoraModule.custom_state_dict`` does."""
    out = {}
    for lora in lyco_net.loras:
        if isinstance(lora, DyLoraModule):
            out[lora.lora_name] = {
                "lora_up.weight": torch.cat(list(lora.up_list), dim=1),
                "lora_down.weight": torch.cat(list(lora.down_list)).reshape(lora.lora_dim, -1, *lora.shape[2:]),
            }
        else:
            out[lora.lora_name] = dict(lora.named_parameters())
    return out


def lycoris_gradients(lyco_net) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for lora in lyco_net.loras:
        if isinstance(lora, DyLoraModule):
            def grads(plist):
                return [p.grad if p.grad is not None else torch.zeros_like(p) for p in plist]
            out[lora.lora_name] = {
                "lora_up.weight": torch.cat(grads(lora.up_list), dim=1),
                "lora_down.weight": torch.cat(grads(lora.down_list)).reshape(lora.lora_dim, -1, *lora.shape[2:]),
            }
        else:
            out[lora.lora_name] = {
                name: (p.grad if p.grad is not None else None) for name, p in lora.named_parameters()
            }
    return out


def our_parameters(network) -> dict[str, dict[str, nn.Parameter]]:
    return {name: dict(holder.named_parameters()) for name, holder in network.adapters.items()}


@torch.no_grad()
def randomize_lycoris(lyco_net, seed: int = 99, std: float = 0.3) -> None:
    """Every LyCORIS adapter parameter random (scalars in [0.5, 1.5))."""
    g = torch.Generator().manual_seed(seed)
    for lora in lyco_net.loras:
        for name, p in lora.named_parameters():
            if name == "scalar":
                p.copy_(0.5 + torch.rand((), generator=g))
            elif name == "weight":  # IA3
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def randomize_ours(network, seed: int = 5, std: float = 0.3) -> None:
    """Every adapter parameter of one of our networks random, N(0, std²)."""
    g = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)


@torch.no_grad()
def copy_lycoris_into_ours(lyco_net, network) -> None:
    """Copies LyCORIS's parameter values into ours, name by name (in place, through torch,
    so the version counters move and the values reach the server)."""
    theirs = lycoris_parameters(lyco_net)
    ours = our_parameters(network)
    assert set(theirs) == set(ours), f"module names differ: LyCORIS {sorted(theirs)} vs ours {sorted(ours)}"
    for module, params in theirs.items():
        assert set(params) == set(ours[module]), (
            f"{module}: parameter names differ: LyCORIS {sorted(params)} vs ours {sorted(ours[module])}")
        for key, value in params.items():
            target = ours[module][key]
            assert tuple(target.shape) == tuple(value.shape), (
                f"{module}.{key}: shape {tuple(target.shape)} vs LyCORIS {tuple(value.shape)}")
            target.copy_(value.detach())


# Module options that `lycoris.create_lycoris` does not forward to the modules (it passes a
# fixed list of keyword arguments); LyCORIS's modules take them, so with these options the
# oracle network is built with `lycoris.wrapper.LycorisNetwork` directly, as create_lycoris
# would build it.
_NOT_FORWARDED_BY_CREATE_LYCORIS = {"rs_lora", "train_on_input", "rank_dropout_scale"}


def lycoris_network(model, multiplier, linear_dim, linear_alpha, algo, conv: dict, options: dict):
    if not _NOT_FORWARDED_BY_CREATE_LYCORIS & set(options):
        return lycoris.create_lycoris(model, multiplier, linear_dim, linear_alpha, algo=algo, **conv, **options)
    from lycoris.wrapper import LycorisNetwork

    options = dict(options)
    named = {k: options.pop(k) for k in ("use_tucker", "dropout", "rank_dropout", "module_dropout") if k in options}
    LycorisNetwork.apply_preset(lycoris.wrapper.PRESET["full"])
    return LycorisNetwork(
        model, multiplier=multiplier, lora_dim=linear_dim, conv_lora_dim=conv.get("conv_dim", linear_dim),
        alpha=linear_alpha, conv_alpha=conv.get("conv_alpha", linear_alpha), network_module=algo, **named, **options)


def make_pair(algo: str, linear_dim: int = 4, linear_alpha: float = 2.0, conv_dim=None, conv_alpha=None,
              multiplier: float = 0.8, model_seed: int = 1234, param_seed: int = 99, std: float = 0.3,
              randomize: bool = True, apply: bool = True, transfer: str = "auto", **options):
    """(base model, LyCORIS model, LyCORIS network, our model, our network), the two networks
    with equal random parameters and applied."""
    base = base_model(model_seed)
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    conv = {}
    if conv_dim is not None:
        conv["conv_dim"] = conv_dim
    if conv_alpha is not None:
        conv["conv_alpha"] = conv_alpha
    lyco = lycoris_network(ref_model, multiplier, linear_dim, linear_alpha, algo, conv, options)
    ours = sl.create_lycoris(our_model, multiplier, linear_dim, linear_alpha, algo=algo, threads=1, transfer=transfer,
                             **conv, **options)
    if randomize:
        randomize_lycoris(lyco, seed=param_seed, std=std)
    copy_lycoris_into_ours(lyco, ours)
    if apply:
        lyco.apply_to()
        ours.apply_to()
    return base, ref_model, lyco, our_model, ours


def run(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor | None = None):
    """Output, and (with `upstream`) ∂⟨upstream, y⟩/∂x."""
    x = x.detach().clone().requires_grad_(upstream is not None)
    y = model(x)
    if upstream is None:
        return y.detach(), None
    (y.float() * upstream).sum().backward()
    return y.detach(), x.grad.detach()


# MARK: comparisons


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """max |actual − expected| ≤ rtol · max |expected|, with a non-zero oracle."""
    assert actual is not None, f"{what}: no value (None)"
    assert expected is not None, f"{what}: the oracle has no value (None)"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a = actual.detach().double()
    e = expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    scale = e.abs().max().item()
    assert scale > 0, f"{what}: the oracle is all zeros, the comparison could not fail"
    err = (a - e).abs().max().item()
    assert err <= rtol * scale, f"{what}: max |Δ| = {err:.3e} > {rtol:g} · max |ref| = {rtol * scale:.3e}"


def assert_grads_match(lyco_net, network, rtol: float, what: str = "") -> None:
    theirs = lycoris_gradients(lyco_net)
    ours = our_parameters(network)
    for module, grads in theirs.items():
        for key, grad in grads.items():
            ours_grad = ours[module][key].grad
            assert_rel(ours_grad, grad, rtol, f"{what}∂{module}.{key}")


def significant_delta(adapted: torch.Tensor, base: torch.Tensor, low: float = 1e-2) -> None:
    """The adapter changes the output visibly (so a comparison of outputs is not a
    comparison of base models)."""
    ratio = (adapted - base).abs().max().item() / base.abs().max().item()
    assert ratio > low, f"the adapter barely changes the output (max |Δy| / max |y0| = {ratio:.2e})"


def assert_step_matches(ref_model, our_model, lyco_net, network, x, upstream, y0, rtol: float, what: str = ""):
    """One forward + backward of LyCORIS's adapted model and ours on (x, upstream): the
    adapter changes the output visibly against the base model's `y0`, and the outputs, ∂x
    and every parameter gradient agree within `rtol`. Returns our output."""
    y_ref, gx_ref = run(ref_model, x, upstream)
    y_our, gx_our = run(our_model, x, upstream)
    significant_delta(y_ref, y0)
    assert_rel(y_our, y_ref, rtol, f"{what}output")
    assert_rel(gx_our, gx_ref, rtol, f"{what}∂x")
    assert_grads_match(lyco_net, network, rtol, what)
    return y_our


def sgd_step(*networks, lr: float = 0.05) -> None:
    """p ← p − lr·∂p on every parameter of each network that has a gradient (in place:
    version counters move); gradients set to None."""
    with torch.no_grad():
        for network in networks:
            for p in network.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
                    p.grad = None


def assert_checkpointing_matches(model: nn.Module, network, reentrant: bool = False) -> None:
    """∂x and every ∂parameter of `model` run under torch.utils.checkpoint equal a plain run's
    (kohya's gradient_checkpointing: the first pass builds no graph, the recomputation inside
    backward does)."""
    x, upstream = inputs()
    _, gx_plain = run(model, x, upstream)
    plain = {n: p.grad.clone() for n, p in network.named_parameters()}
    network.zero_grad()
    xr = x.clone().requires_grad_(True)
    y = torch.utils.checkpoint.checkpoint(model, xr, use_reentrant=reentrant)
    (y * upstream).sum().backward()
    assert_rel(xr.grad, gx_plain, 1e-5, "checkpointed ∂x")
    for n, p in network.named_parameters():
        assert_rel(p.grad, plain[n], 1e-5, f"checkpointed ∂{n}")
