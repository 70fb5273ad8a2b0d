"""swift_lycoris.create_lycoris / create_lycoris_from_weights against LyCORIS 4.1.3.

Every comparison is against an oracle computed independently of the server: LyCORIS's own
modules (same parameter values, copied name by name), plain torch math, central finite
differences, or identities that hold for the exact function (Euler's theorem for functions
linear in a parameter).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _sl_oracle import (
    MODULE_NAMES, assert_checkpointing_matches, assert_grads_match, assert_rel, assert_step_matches, base_model,
    copy_lycoris_into_ours, inputs, lycoris, lycoris_gradients, make_pair, our_parameters, randomize_lycoris,
    randomize_ours, run, significant_delta, sl,
)

RTOL = 1e-4


def _close(*networks):
    for network in networks:
        network.close()


def _split(options: dict):
    options = dict(options)
    dims = {k: options.pop(k) for k in ("linear_dim", "linear_alpha", "conv_dim", "conv_alpha") if k in options}
    return dims, options


# MARK: parity with LyCORIS: outputs, input gradients, every parameter gradient

PARITY_CASES = [
    ("lora", {}),
    ("lora", {"conv_dim": 3, "conv_alpha": 1.5}),
    ("lora", {"use_tucker": True}),
    ("lora", {"use_scalar": True}),
    ("lora", {"rs_lora": True}),
    ("lora", {"bypass_mode": True}),
    ("lora", {"use_tucker": True, "bypass_mode": True}),
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("loha", {"use_scalar": True}),
    ("loha", {"rs_lora": True, "bypass_mode": True}),
    ("lokr", {}),
    ("lokr", {"decompose_both": True, "factor": 8, "linear_dim": 1}),
    ("lokr", {"use_tucker": True, "factor": 4, "linear_dim": 2}),
    ("lokr", {"use_scalar": True, "linear_dim": 2}),
    ("lokr", {"full_matrix": True}),
    ("lokr", {"unbalanced_factorization": True, "linear_dim": 2}),
    ("lokr", {"bypass_mode": True, "linear_dim": 2}),
    ("lokr", {"bypass_mode": True, "factor": 4, "linear_dim": 2, "use_tucker": True}),
    ("ia3", {}),
    ("ia3", {"train_on_input": True}),
    # bypass IA3 scales the layer's whole output, bias included (LyCORIS does; the server does
    # when the client gives it the bias)
    ("ia3", {"bypass_mode": True}),
    ("ia3", {"bypass_mode": True, "train_on_input": True}),
    # LyCORIS's DyLoRA draws a random block per forward: one block (block_size = rank) fixes it.
    ("dylora", {"linear_dim": 4, "conv_dim": 4, "block_size": 4}),
    # Diag-OFT and BOFT rotate the base weight (sent to the server); BOFT's blocks of at most
    # 6 fit every layer of TinyNet (16, 24, 32 and 12 outputs).
    ("diag-oft", {"constraint": 0.01, "rescaled": True}),
    ("boft", {"linear_dim": 6, "conv_dim": 6, "rescaled": True}),
    ("boft", {"linear_dim": 6, "conv_dim": 6, "bypass_mode": True}),
    # DoRA under LyCORIS's wrapper names (dora_wd, wd_on_output), at multiplier 0.8
    ("lora", {"dora_wd": True}),
    ("loha", {"dora_wd": True, "wd_on_output": False}),
    ("lokr", {"dora_wd": True, "linear_dim": 2}),
    ("glora", {}),
    ("glora", {"use_scalar": True, "conv_dim": 2}),
]


PARITY_IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, o in PARITY_CASES]


@pytest.mark.parametrize("transfer", ["activations", "weights"])
@pytest.mark.parametrize("algo,options", PARITY_CASES, ids=PARITY_IDS)
def test_parity_with_lycoris(algo, options, transfer):
    """Both transfers (m·Δ(x) from the server; or m·ΔW from the server applied by torch)
    reproduce LyCORIS; with bypass_mode the network always moves activations."""
    dims, options = _split(options)
    base, ref_model, lyco, our_model, ours = make_pair(algo, transfer=transfer, **dims, **options)
    try:
        assert set(ours.adapters.keys()) == MODULE_NAMES
        x, upstream = inputs()
        y0, _ = run(base, x)
        y_our = assert_step_matches(ref_model, our_model, lyco, ours, x, upstream, y0, RTOL)
        assert y_our.dtype == torch.float32
    finally:
        _close(ours)


def test_full_is_the_trained_difference():
    """algo=full: y = op(x, W0 + m·diff) + b + m·diff_b (plain torch), and ∂diff = m·∂W of
    that layer."""
    model = base_model(1234)
    reference = copy.deepcopy(model)
    ours = sl.create_lycoris(model, 0.8, algo="full", threads=1)
    try:
        g = torch.Generator().manual_seed(5)
        params = our_parameters(ours)
        layers = {"lycoris_" + name.replace(".", "_"): layer for name, layer in reference.named_modules()}
        assert set(params) == MODULE_NAMES
        with torch.no_grad():
            for module, tensors in params.items():
                assert set(tensors) == ({"diff", "diff_b"} if layers[module].bias is not None else {"diff"})
                for suffix, param in tensors.items():
                    param.copy_(torch.randn(param.shape, generator=g) * 0.1)
                    target = layers[module].weight if suffix == "diff" else layers[module].bias
                    target.add_(0.8 * param)
        ours.apply_to()
        reference.requires_grad_(True)
        x, upstream = inputs()
        y_ref, gx_ref = run(reference, x, upstream)
        y_our, gx_our = run(model, x, upstream)
        significant_delta(y_ref, run(base_model(1234), x)[0])
        assert_rel(y_our, y_ref, RTOL, "output")
        assert_rel(gx_our, gx_ref, RTOL, "∂x")
        for module, tensors in params.items():
            assert_rel(tensors["diff"].grad, 0.8 * layers[module].weight.grad, RTOL, f"∂{module}.diff")
            if "diff_b" in tensors:
                assert_rel(tensors["diff_b"].grad, 0.8 * layers[module].bias.grad, RTOL, f"∂{module}.diff_b")
    finally:
        _close(ours)


def test_dora_on_a_transformers_causal_lm_matches_lycoris():
    """create_lycoris(..., dora_wd=True) on the Linear layers of a tiny random Llama: the
    same logits and gradients as LyCORIS's create_lycoris with the same values."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval().requires_grad_(False)
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 0.7, 4, 2.0, algo="lora", dora_wd=True)
    ours = sl.create_lycoris(our_model, 0.7, 4, 2.0, algo="lora", dora_wd=True, threads=1)
    try:
        randomize_lycoris(lyco, seed=3, std=0.2)
        copy_lycoris_into_ours(lyco, ours)
        lyco.apply_to()
        ours.apply_to()
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        logits = {}
        for label, model in (("lycoris", ref_model), ("ours", our_model)):
            out = model(ids).logits
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
            logits[label] = out.detach()
        significant_delta(logits["lycoris"], base(ids).logits)
        assert_rel(logits["ours"], logits["lycoris"], RTOL, "logits")
        assert_grads_match(lyco, ours, RTOL)
    finally:
        _close(ours)


def test_frozen_network_still_gives_input_gradients():
    """Adapters frozen (requires_grad False), the input still needs its gradient: ∂x
    matches LyCORIS and no adapter parameter receives a gradient."""
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        lyco.requires_grad_(False)
        ours.requires_grad_(False)
        x, upstream = inputs()
        _, gx_ref = run(ref_model, x, upstream)
        _, gx_our = run(our_model, x, upstream)
        assert_rel(gx_our, gx_ref, RTOL, "∂x")
        assert all(p.grad is None for p in ours.parameters())
    finally:
        _close(ours)


# MARK: merge, restore, multiplier


MERGE_CASES = [("lora", {}), ("lora", {"use_tucker": True}), ("loha", {}), ("lokr", {"linear_dim": 2}),
               ("ia3", {}), ("dylora", {"linear_dim": 4, "conv_dim": 4, "block_size": 4}),
               ("lora", {"bypass_mode": True}), ("lora", {"dora_wd": True}), ("loha", {"dora_wd": True, "wd_on_output": False}),
               ("glora", {})]


@pytest.mark.parametrize("algo,options", MERGE_CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, o in MERGE_CASES])
def test_merge_to_then_plain_model_equals_adapted(algo, options):
    dims, options = _split(options)
    base, ref_model, lyco, our_model, ours = make_pair(algo, **dims, **options)
    try:
        x, _ = inputs()
        y0, _ = run(base, x)
        y_ref, _ = run(ref_model, x)
        y_adapted, _ = run(our_model, x)
        significant_delta(y_ref, y0)
        ours.merge_to()
        # the layers' own forwards are back, their weights hold W0 + m·ΔW
        for name, module in our_model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                assert getattr(module.forward, "__func__", None) is type(module).forward, (
                    f"{name} still routed through the adapter after merge_to")
        y_merged, _ = run(our_model, x)
        assert_rel(y_merged, y_ref, RTOL, "merged model vs LyCORIS's adapted model")
        assert_rel(y_merged, y_adapted, RTOL, "merged model vs our adapted model")
        # every adapted layer's weight now holds W0 + m·ΔW (≠ W0)
        weight_changed = [not torch.equal(m1.weight, m0.weight) for m1, m0 in zip(
            (m for m in our_model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))),
            (m for m in base.modules() if isinstance(m, (nn.Linear, nn.Conv2d))))]
        assert all(weight_changed), "merge_to left some layer weight unchanged"
    finally:
        _close(ours)


def test_merge_to_with_multiplier_matches_lycoris_at_that_multiplier():
    base, ref_model, lyco, our_model, ours = make_pair("loha", multiplier=1.0)
    try:
        x, _ = inputs()
        lyco.set_multiplier(0.4)
        y_ref, _ = run(ref_model, x)
        ours.merge_to(0.4)
        y_merged, _ = run(our_model, x)
        assert_rel(y_merged, y_ref, RTOL, "merge_to(0.4)")
    finally:
        _close(ours)


def test_merge_to_plain_torch_lora_weights():
    """ΔW merged by the server equals the plain-torch LoRA rebuild m·(α/r)·up·down."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 7), nn.Conv2d(4, 6, 3, padding=1))
    w_lin, w_conv = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    net = sl.create_lycoris(model, 0.7, 3, 1.5, algo="lora", conv_dim=2, conv_alpha=4.0, threads=1)
    try:
        randomize_ours(net, seed=5, std=1.0)
        params = our_parameters(net)
        up0, down0 = params["lycoris_0"]["lora_up.weight"], params["lycoris_0"]["lora_down.weight"]
        up1, down1 = params["lycoris_1"]["lora_up.weight"], params["lycoris_1"]["lora_down.weight"]
        expected_lin = w_lin + 0.7 * (1.5 / 3) * up0 @ down0
        expected_conv = w_conv + 0.7 * (4.0 / 2) * (up1.flatten(1) @ down1.flatten(1)).reshape(w_conv.shape)
        net.apply_to()
        net.merge_to()
        assert_rel(model[0].weight, expected_lin, 1e-5, "merged linear weight")
        assert_rel(model[1].weight, expected_conv, 1e-5, "merged conv weight")
    finally:
        net.close()


def test_restore_gives_base_model_back_and_apply_again():
    base, ref_model, lyco, our_model, ours = make_pair("lokr", linear_dim=2)
    try:
        x, _ = inputs()
        y0, _ = run(base, x)
        y1, _ = run(our_model, x)
        significant_delta(y1, y0)
        ours.restore()
        assert not ours.applied
        y_restored, _ = run(our_model, x)
        assert torch.equal(y_restored, y0), "restore() did not give the base model back"
        ours.apply_to()
        y2, _ = run(our_model, x)
        assert_rel(y2, y1, 1e-6, "re-applied")
    finally:
        _close(ours)


def test_apply_to_twice_does_not_stack_adapters():
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, _ = inputs()
        y_ref, _ = run(ref_model, x)
        ours.apply_to()
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, "output after apply_to() twice")
    finally:
        _close(ours)


@pytest.mark.parametrize("algo", ["lora", "loha", "ia3"])
def test_set_multiplier_matches_lycoris(algo):
    base, ref_model, lyco, our_model, ours = make_pair(algo)
    try:
        x, upstream = inputs()
        y0, _ = run(base, x)
        for m in (0.3, -1.2, 0.0):
            lyco.set_multiplier(m)
            ours.set_multiplier(m)
            assert ours.multiplier == m
            y_ref, gx_ref = run(ref_model, x, upstream)
            y_our, gx_our = run(our_model, x, upstream)
            if m == 0.0:
                assert_rel(y_our, y0, 1e-6, "multiplier 0 gives the base model")
            else:
                assert_rel(y_our, y_ref, RTOL, f"output at multiplier {m}")
                assert_rel(gx_our, gx_ref, RTOL, f"∂x at multiplier {m}")
    finally:
        _close(ours)


def test_set_multiplier_scales_the_delta_linearly_plain_torch():
    """One Linear layer, LoRA: y − W0·x = m·(α/r)·x·downᵀ·upᵀ (plain torch), for several m."""
    torch.manual_seed(11)
    layer = nn.Linear(9, 5)
    model = nn.Sequential(layer)
    x = torch.randn(4, 3, 9)
    y0 = model(x).detach()
    net = sl.create_lycoris(model, 1.0, 2, 1.0, threads=1)
    try:
        randomize_ours(net, seed=2, std=1.0)
        params = our_parameters(net)["lycoris_0"]
        plain = (x @ params["lora_down.weight"].T @ params["lora_up.weight"].T * 0.5).detach()
        net.apply_to()
        for m in (1.0, 0.25, -2.0):
            net.set_multiplier(m)
            assert_rel(model(x).detach() - y0, m * plain, 1e-5, f"delta at multiplier {m}")
    finally:
        net.close()


# MARK: training / evaluation modes and dropouts


def test_fresh_network_mode_agrees_with_server():
    """torch's `training` flag of a fresh network and the server's mode are the same
    (otherwise dropouts silently do not run although `network.training` is True)."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", dropout=0.5)
    try:
        server_training = ours.server.call("network.info")["training"]
        assert ours.training == server_training, (
            f"LycorisNetwork.training is {ours.training} but the server is in "
            f"{'training' if server_training else 'evaluation'} mode")
    finally:
        _close(ours)


@pytest.mark.parametrize("algo,options", [
    ("lora", {"dropout": 0.4, "rank_dropout": 0.4}),
    ("lora", {"rank_dropout": 0.5, "bypass_mode": True, "dropout": 0.3}),
    ("loha", {"rank_dropout": 0.5, "module_dropout": 0.3}),
    ("lokr", {"rank_dropout": 0.5, "linear_dim": 2}),
])
def test_train_eval_with_dropouts(algo, options):
    dims, options = _split(options)
    base, ref_model, lyco, our_model, ours = make_pair(algo, **dims, **options)
    try:
        x, upstream = inputs()
        lyco.eval()
        ours.eval()
        assert not ours.training
        assert ours.server.call("network.info")["training"] is False
        # evaluation: deterministic, and LyCORIS in evaluation applies no dropout either
        y_ref, gx_ref = run(ref_model, x, upstream)
        y_a, gx_a = run(our_model, x, upstream)
        y_b, _ = run(our_model, x)
        assert torch.equal(y_a, y_b), "evaluation mode is not deterministic"
        assert_rel(y_a, y_ref, RTOL, "eval output")
        assert_rel(gx_a, gx_ref, RTOL, "eval ∂x")
        # training: the dropouts draw (some of several forwards differ)
        ours.train()
        assert ours.training
        assert ours.server.call("network.info")["training"] is True
        outs = [run(our_model, x)[0] for _ in range(6)]
        assert any(not torch.equal(outs[0], o) for o in outs[1:]), "training mode: dropouts drew nothing"
        # back to evaluation: the same deterministic output as before
        ours.eval()
        y_c, _ = run(our_model, x)
        assert torch.equal(y_c, y_a)
    finally:
        _close(ours)


@pytest.mark.parametrize("algo,options", [
    ("lora", {"dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.2}),
    ("lora", {"dropout": 0.5, "rank_dropout": 0.5, "bypass_mode": True}),
    ("loha", {"rank_dropout": 0.5, "rank_dropout_scale": True}),
    ("lokr", {"rank_dropout": 0.5}),
])
def test_training_mode_gradients_follow_the_drawn_dropout(algo, options):
    """In training mode each forward draws its own masks; the backward must use the same
    ones. One bias-free Linear layer: y = W0·x + m·Δ(x) is linear in x, and Δ is linear in
    each of lora_up / hada_w2_a / lokr_w1 (the others fixed), so Euler's theorem gives
    ⟨x, ∂x⟩ = ⟨g, y⟩ and ⟨θ, ∂θ⟩ = ⟨g, y − W0·x⟩ for the draws of that very forward."""
    torch.manual_seed(21)
    layer = nn.Linear(24, 16, bias=False)
    model = nn.Sequential(layer)
    net = sl.create_lycoris(model, 0.9, 4, 2.0, algo=algo, **options, threads=1)
    linear_param = {"lora": "lora_up.weight", "loha": "hada_w2_a", "lokr": "lokr_w1"}[algo]
    try:
        g = torch.Generator().manual_seed(8)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        net.apply_to()
        net.train()
        param = our_parameters(net)["lycoris_0"][linear_param]
        seen = set()
        for step in range(8):
            x = torch.randn(6, 24, generator=g).requires_grad_(True)
            upstream = torch.randn(6, 16, generator=g)
            net.zero_grad()
            y = model(x)
            (y * upstream).sum().backward()
            delta = (y - x @ layer.weight.T).detach()
            seen.add(round(delta.abs().sum().item(), 4))
            lhs_x = (x.detach() * x.grad).sum().item()
            rhs_x = (upstream * y.detach()).sum().item()
            assert abs(lhs_x - rhs_x) <= 1e-4 * max(1.0, abs(rhs_x)), f"step {step}: ⟨x,∂x⟩={lhs_x} ≠ ⟨g,y⟩={rhs_x}"
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            lhs_p = (param.detach() * grad).sum().item()
            rhs_p = (upstream * delta).sum().item()
            assert abs(lhs_p - rhs_p) <= 1e-4 * max(1.0, abs(rhs_p)), f"step {step}: ⟨θ,∂θ⟩={lhs_p} ≠ ⟨g,Δ⟩={rhs_p}"
        assert len(seen) > 1, "the dropouts drew the same masks every step"
    finally:
        net.close()


# MARK: files


@pytest.mark.parametrize("algo,options", [
    ("lora", {}), ("lora", {"use_tucker": True}), ("loha", {}), ("loha", {"use_tucker": True}),
    ("lokr", {"linear_dim": 2}), ("lokr", {"decompose_both": True, "factor": 8, "linear_dim": 1}),
])
def test_our_file_loads_in_lycoris(tmp_path, algo, options):
    dims, options = _split(options)
    base, ref_model, lyco, our_model, ours = make_pair(algo, **dims, **options)
    try:
        x, _ = inputs()
        y0, _ = run(base, x)
        y_our, _ = run(our_model, x)
        significant_delta(y_our, y0)
        path = tmp_path / "ours.safetensors"
        ours.save_weights(str(path), metadata={"ss_network_module": "lycoris.kohya"})
        model = copy.deepcopy(base)
        loaded, weights = lycoris.create_lycoris_from_weights(ours.multiplier, str(path), model)
        assert {lora.lora_name for lora in loaded.loras} == MODULE_NAMES
        loaded.apply_to()
        y_loaded, _ = run(model, x)
        assert_rel(y_loaded, y_our, RTOL, "LyCORIS on our file vs ours")
    finally:
        _close(ours)


@pytest.mark.parametrize("algo,options", [
    ("lora", {}), ("lora", {"use_tucker": True}), ("lora", {"use_scalar": True}), ("lora", {"conv_dim": 2, "conv_alpha": 3.0}),
    ("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {"linear_dim": 2}),
    ("lokr", {"decompose_both": True, "factor": 8, "linear_dim": 1}), ("ia3", {}),
])
def test_lycoris_file_loads_in_ours(tmp_path, algo, options):
    dims, options = _split(options)
    base = base_model()
    ref_model = copy.deepcopy(base)
    conv = {k: dims.pop(k) for k in ("conv_dim", "conv_alpha") if k in dims}
    lyco = lycoris.create_lycoris(ref_model, 1.0, dims.get("linear_dim", 4), dims.get("linear_alpha", 2.0),
                                  algo=algo, **conv, **options)
    randomize_lycoris(lyco, seed=41)
    lyco.apply_to()
    x, upstream = inputs()
    y0, _ = run(base, x)
    y_ref, gx_ref = run(ref_model, x, upstream)
    significant_delta(y_ref, y0)
    path = tmp_path / "lycoris.safetensors"
    lyco.save_weights(str(path), torch.float32, {})
    model = copy.deepcopy(base)
    ours = sl.create_lycoris_from_weights(1.0, str(path), model, threads=1)
    try:
        assert set(ours.adapters.keys()) == MODULE_NAMES
        ours.apply_to()
        y_our, gx_our = run(model, x, upstream)
        assert_rel(y_our, y_ref, RTOL, "ours on LyCORIS's file vs LyCORIS")
        assert_rel(gx_our, gx_ref, RTOL, "∂x, ours on LyCORIS's file vs LyCORIS")
    finally:
        _close(ours)


# MARK: dtypes


def test_bf16_autocast_keeps_dtype_and_values():
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, upstream = inputs()
        y32, gx32 = run(our_model, x, upstream)
        grads32 = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_plain = base(x)
            y_ref = ref_model(x)
            y16, gx16 = run(our_model, x, upstream)
        assert y_plain.dtype == torch.bfloat16 and y_ref.dtype == torch.bfloat16
        assert_rel(y16.float(), y32, 5e-2, "bf16 autocast output vs float32")
        assert_rel(gx16.float(), gx32, 5e-2, "bf16 autocast ∂x vs float32")
        for name, p in ours.named_parameters():
            assert p.grad.dtype == torch.float32
            assert_rel(p.grad, grads32[name], 1e-1, f"bf16 autocast ∂{name}")
        assert y16.dtype == y_ref.dtype, (
            f"under autocast(bfloat16) the adapted model returns {y16.dtype}; the plain model and "
            f"LyCORIS return {y_ref.dtype}")
    finally:
        _close(ours)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_and_inputs(dtype):
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        x, upstream = inputs()
        y32, gx32 = run(our_model, x, upstream)
        y_ref, _ = run(ref_model, x)
        assert_rel(y32, y_ref, RTOL, "float32 output")
        grads32 = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        our_model.to(dtype)
        y16, gx16 = run(our_model, x.to(dtype), upstream.to(dtype))
        assert y16.dtype == dtype, f"{dtype} model and input gave a {y16.dtype} output"
        assert gx16.dtype == dtype
        tol = 2e-2 if dtype == torch.float16 else 6e-2
        assert_rel(y16.float(), y32, tol, f"{dtype} output vs float32")
        assert_rel(gx16.float(), gx32, 3 * tol, f"{dtype} ∂x vs float32")
        for name, p in ours.named_parameters():
            assert p.grad.dtype == torch.float32
            assert_rel(p.grad, grads32[name], 3 * tol, f"{dtype} ∂{name}")
    finally:
        _close(ours)


# MARK: torch training machinery


def test_adamw_training_loop_matches_lycoris_and_reduces_loss():
    """AdamW on network.parameters() for a toy regression; LyCORIS with the same initial
    values and the same optimizer is the oracle of every step's loss and the final values
    (so each optimizer update must reach the server)."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", randomize=False, multiplier=1.0)
    try:
        g = torch.Generator().manual_seed(17)
        x = torch.randn(8, 3, 8, 8, generator=g)
        with torch.no_grad():
            target = base(x) + 0.3 * torch.randn(8, 4, 4, 12, generator=g)
        opt_ref = torch.optim.AdamW(lyco.parameters(), lr=2e-2, weight_decay=0.01)
        opt_our = torch.optim.AdamW(ours.parameters(), lr=2e-2, weight_decay=0.01)
        losses_ref, losses_our = [], []
        for _ in range(25):
            for model, opt, losses in ((ref_model, opt_ref, losses_ref), (our_model, opt_our, losses_our)):
                opt.zero_grad()
                loss = F.mse_loss(model(x), target)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        assert losses_our[-1] < 0.7 * losses_our[0], f"loss did not go down: {losses_our[0]} → {losses_our[-1]}"
        for i, (a, b) in enumerate(zip(losses_our, losses_ref)):
            assert abs(a - b) <= 1e-4 * abs(b), f"step {i}: loss {a} vs LyCORIS {b}"
        theirs = {m: {k: v.detach() for k, v in d.items()} for m, d in
                  ((l.lora_name, dict(l.named_parameters())) for l in lyco.loras)}
        for module, params in our_parameters(ours).items():
            for key, p in params.items():
                assert_rel(p, theirs[module][key], 1e-3, f"{module}.{key} after 25 AdamW steps")
    finally:
        _close(ours)


def test_gradient_accumulation_equals_one_big_batch():
    base, ref_model, lyco, our_model, ours = make_pair("lokr", linear_dim=2)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, 8, 8, generator=g)
        upstream = torch.randn(4, 4, 4, 12, generator=g)
        (our_model(x) * upstream).sum().backward()
        big = {n: p.grad.clone() for n, p in ours.named_parameters()}
        (ref_model(x) * upstream).sum().backward()
        assert_grads_match(lyco, ours, RTOL, "big batch: ")
        ours.zero_grad()
        for part in (slice(0, 2), slice(2, 4)):
            (our_model(x[part]) * upstream[part]).sum().backward()
        for name, p in ours.named_parameters():
            assert_rel(p.grad, big[name], 1e-5, f"accumulated ∂{name}")
    finally:
        _close(ours)


def test_clip_grad_norm_on_network_parameters():
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        x, upstream = inputs()
        run(ref_model, x, upstream)
        run(our_model, x, upstream)
        ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for d in lycoris_gradients(lyco).values() for g in d.values()))
        max_norm = 0.25 * ref_norm.item()
        total = torch.nn.utils.clip_grad_norm_(list(ours.parameters()), max_norm)
        ref_total = torch.nn.utils.clip_grad_norm_(list(lyco.parameters()), max_norm)
        assert abs(total.item() - ref_norm.item()) <= 1e-4 * ref_norm.item()
        assert abs(ref_total.item() - ref_norm.item()) <= 1e-4 * ref_norm.item()
        clipped = math.sqrt(sum((p.grad.double() ** 2).sum().item() for p in ours.parameters()))
        assert abs(clipped - max_norm) <= 1e-3 * max_norm
        # one SGD step with the clipped gradients: the next forward matches LyCORIS's
        torch.optim.SGD(ours.parameters(), lr=0.5).step()
        torch.optim.SGD(lyco.parameters(), lr=0.5).step()
        y_ref, _ = run(ref_model, x)
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, "output after a clipped SGD step")
    finally:
        _close(ours)


def test_state_dict_round_trip_into_fresh_network():
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    fresh = None
    try:
        x, _ = inputs()
        y0, _ = run(base, x)
        y_our, _ = run(our_model, x)
        state = ours.state_dict()
        expected_keys = {f"adapters.{m}.{k}" for m, d in our_parameters(ours).items() for k in d}
        assert set(state) == expected_keys
        assert "adapters.lycoris_blocks_0_proj.hada_w1_a" in state
        model = copy.deepcopy(base)
        fresh = sl.create_lycoris(model, 0.8, 4, 2.0, algo="loha", seed=5, threads=1)
        fresh.apply_to()
        y_fresh, _ = run(model, x)
        assert torch.equal(y_fresh, y0), "a fresh LoHa must start with ΔW = 0"
        result = fresh.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        y_loaded, _ = run(model, x)
        significant_delta(y_loaded, y0)
        assert_rel(y_loaded, y_our, 1e-6, "fresh network after load_state_dict")
    finally:
        _close(ours, *([fresh] if fresh is not None else []))


def test_in_place_update_reaches_server():
    """An in-place change through torch (no_grad mul_) reaches the server before the next forward."""
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, _ = inputs()
        run(our_model, x)  # synced once
        theirs = {l.lora_name: dict(l.named_parameters()) for l in lyco.loras}
        with torch.no_grad():
            for module, params in our_parameters(ours).items():
                for key, p in params.items():
                    theirs[module][key].mul_(-1.5)
                    p.mul_(-1.5)
        y_ref, _ = run(ref_model, x)
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, "output after an in-place update")
    finally:
        _close(ours)


@pytest.mark.parametrize("how", ["data.copy_", "data ="])
def test_update_through_data_reaches_server(how):
    """Code that writes a Parameter through `.data` (LyCORIS's own loaders, many
    training scripts, EMA) changes the value torch sees; the server must see it too:
    rebinding `.data` is detected (new storage); an in-place write through `.data` bypasses
    torch's version counter, so such code calls `sync(force=True)` (the documented
    contract), after which the outputs match."""
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, _ = inputs()
        run(our_model, x)  # synced once
        randomize_lycoris(lyco, seed=1234)
        theirs = {l.lora_name: dict(l.named_parameters()) for l in lyco.loras}
        for module, params in our_parameters(ours).items():
            for key, p in params.items():
                if how == "data.copy_":
                    p.data.copy_(theirs[module][key].detach())
                else:
                    p.data = theirs[module][key].detach().clone()
        if how == "data.copy_":
            ours.sync(force=True)
        y_ref, _ = run(ref_model, x)
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, f"output after updating the parameters through `{how}`")
    finally:
        _close(ours)


def test_gradient_checkpointing_gives_the_same_gradients():
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        assert_checkpointing_matches(our_model, ours)
    finally:
        _close(ours)


# MARK: layer geometry and inputs beyond the toy model


class GeometryNet(nn.Module):
    """Grouped, dilated and rectangular-kernel convolutions, a bias-free Linear on a 2-D input."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.dilated = nn.Conv2d(12, 8, 3, padding=2, dilation=2)
        self.rect = nn.Conv2d(8, 8, (1, 3), stride=(2, 1), padding=(0, 1), bias=False)
        self.fc = nn.Linear(8, 6, bias=False)

    def forward(self, x):
        h = self.grouped(x)
        h = self.dilated(F.silu(h))
        h = self.rect(h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_parity_grouped_dilated_and_rectangular_convs(algo):
    torch.manual_seed(5)
    base = GeometryNet()
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 1.0, 2, 1.0, algo=algo)
    ours = sl.create_lycoris(our_model, 1.0, 2, 1.0, algo=algo, threads=1)
    try:
        assert set(ours.adapters.keys()) == {l.lora_name for l in lyco.loras} == {
            "lycoris_grouped", "lycoris_dilated", "lycoris_rect", "lycoris_fc"}
        randomize_lycoris(lyco, seed=3)
        copy_lycoris_into_ours(lyco, ours)
        lyco.apply_to()
        ours.apply_to()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 8, 7, 6, generator=g)
        upstream = torch.randn(2, 6, generator=g)
        y_ref, gx_ref = run(ref_model, x, upstream)
        y_our, gx_our = run(our_model, x, upstream)
        significant_delta(y_ref, run(base, x)[0])
        assert_rel(y_our, y_ref, RTOL, "output")
        assert_rel(gx_our, gx_ref, RTOL, "∂x")
        assert_grads_match(lyco, ours, RTOL)
    finally:
        ours.close()


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding_convs_are_adapted(padding):
    """nn.Conv2d(padding="same"/"valid") is an ordinary Conv2d: LyCORIS adapts it, so must we."""
    torch.manual_seed(7)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=padding), nn.Conv2d(6, 6, (3, 1), padding=padding))
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 1.0, 2, 1.0)
    ours = sl.create_lycoris(our_model, 1.0, 2, 1.0, threads=1)
    try:
        assert set(ours.adapters.keys()) == {l.lora_name for l in lyco.loras} == {"lycoris_0", "lycoris_1"}
        randomize_lycoris(lyco, seed=3)
        copy_lycoris_into_ours(lyco, ours)
        lyco.apply_to()
        ours.apply_to()
        x = torch.randn(2, 4, 7, 5)
        assert_rel(run(our_model, x)[0], run(ref_model, x)[0], RTOL, f"padding={padding!r}")
    finally:
        ours.close()


def test_unbatched_inputs():
    """torch layers take unbatched inputs: Conv2d (C, H, W), Linear (in,)."""
    torch.manual_seed(6)
    base = nn.ModuleDict({"conv": nn.Conv2d(3, 4, 3, padding=1), "fc": nn.Linear(5, 4)})
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 1.0, 2, 1.0)
    ours = sl.create_lycoris(our_model, 1.0, 2, 1.0, threads=1)
    try:
        randomize_lycoris(lyco, seed=4)
        copy_lycoris_into_ours(lyco, ours)
        lyco.apply_to()
        ours.apply_to()
        v = torch.randn(5)
        assert_rel(our_model["fc"](v).detach(), ref_model["fc"](v).detach(), RTOL, "Linear on a 1-D input")
        img = torch.randn(3, 6, 6)
        assert_rel(our_model["conv"](img).detach(), ref_model["conv"](img).detach(), RTOL, "Conv2d on a (C, H, W) input")
    finally:
        ours.close()


def test_large_input_grows_the_arena():
    """An activation larger than the initial 64 MiB arena: forward and backward still match
    plain torch (the arena grows and is mapped again)."""
    torch.manual_seed(8)
    layer = nn.Linear(256, 256, bias=False)
    model = nn.Sequential(layer)
    network = sl.create_lycoris(model, 1.0, 2, 2.0, threads=1, transfer="activations")
    try:
        initial_size = network.arena.size
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        params = our_parameters(network)["lycoris_0"]
        up, down = params["lora_up.weight"].detach().clone(), params["lora_down.weight"].detach().clone()
        network.apply_to()
        rows = (initial_size // (256 * 4)) // 2 + 1000  # input + output > the initial arena
        x = torch.randn(rows, 256, generator=g).requires_grad_(True)
        y = model(x)
        upstream = torch.randn(rows, 256, generator=g)
        (y * upstream).sum().backward()
        assert network.arena.size > initial_size
        expected = x.detach() @ (layer.weight.detach() + up @ down).T
        assert_rel(y.detach(), expected, 1e-5, "large-input output")
        assert_rel(x.grad, upstream @ (layer.weight.detach() + up @ down), 1e-5, "large-input ∂x")
        assert_rel(params["lora_up.weight"].grad, upstream.T @ (x.detach() @ down.T), 1e-4, "large-input ∂up")
    finally:
        network.close()


# MARK: our own files


@pytest.mark.parametrize("algo,options", [
    ("lora", {"use_tucker": True}), ("loha", {}), ("lokr", {"linear_dim": 2}),
    ("dylora", {"linear_dim": 4, "conv_dim": 4, "block_size": 2}), ("ia3", {}),
])
def test_our_file_round_trip_into_ours(tmp_path, algo, options):
    """save_weights → create_lycoris_from_weights on a fresh copy of the model reproduces
    the outputs and input gradients (DyLoRA with two blocks: the evaluation forward uses all
    of them, and the file is a LoRA file whose α/r gives the same scale)."""
    dims, options = _split(options)
    base = base_model()
    model = copy.deepcopy(base)
    ours = sl.create_lycoris(model, 0.8, dims.get("linear_dim", 4), 2.0, algo=algo, threads=1,
                             **{k: v for k, v in dims.items() if k.startswith("conv")}, **options)
    loaded = None
    try:
        g = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ours.apply_to()
        ours.eval()
        x, upstream = inputs()
        y_our, gx_our = run(model, x, upstream)
        significant_delta(y_our, run(base, x)[0])
        path = tmp_path / "ours.safetensors"
        ours.save_weights(str(path))
        other = copy.deepcopy(base)
        loaded = sl.create_lycoris_from_weights(0.8, str(path), other, threads=1)
        loaded.apply_to()
        y_loaded, gx_loaded = run(other, x, upstream)
        assert_rel(y_loaded, y_our, 1e-5, "reloaded output")
        assert_rel(gx_loaded, gx_our, 1e-5, "reloaded ∂x")
    finally:
        _close(ours, *([loaded] if loaded is not None else []))


@pytest.mark.parametrize("dtype,name", [(torch.float16, "F16"), (torch.bfloat16, "BF16"), (None, "F32")])
def test_save_weights_dtype_and_metadata(tmp_path, dtype, name):
    from safetensors import safe_open

    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        path = tmp_path / "w.safetensors"
        ours.save_weights(str(path), dtype=dtype, metadata={"ss_network_dim": 4, "note": "x"})
        values = {f"{m}.{k}": p.detach() for m, d in our_parameters(ours).items() for k, p in d.items()}
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["note"] == "x"
            keys = set(f.keys())
            assert keys == set(values) | {f"{m}.alpha" for m in MODULE_NAMES}
            for key, value in values.items():
                stored = f.get_tensor(key)
                assert stored.dtype == (dtype or torch.float32), f"{key} stored as {stored.dtype}"
                assert torch.equal(stored, value.to(dtype or torch.float32)), f"{key}: stored values differ"
            for m in MODULE_NAMES:
                alpha = f.get_tensor(f"{m}.alpha")
                assert alpha.dtype == torch.float32 and alpha.dim() == 0 and alpha.item() == 2.0
    finally:
        _close(ours)


def test_load_weights_keeps_training_with_the_existing_optimizer(tmp_path):
    """LyCORIS's load_weights copies values into the existing Parameters, so an optimizer
    made before it keeps training the network. The same sequence on ours: make the
    optimizer, load a file, take a step — the result must match LyCORIS's."""
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        other = lycoris.create_lycoris(copy.deepcopy(base), 0.8, 4, 2.0)
        randomize_lycoris(other, seed=77)
        other.apply_to()  # registers LyCORIS's modules, so its state dict (the file) has them
        path = tmp_path / "other.safetensors"
        other.save_weights(str(path), torch.float32, {})
        opt_ref = torch.optim.SGD(lyco.parameters(), lr=0.5)
        opt_our = torch.optim.SGD(ours.parameters(), lr=0.5)
        lyco.load_weights(str(path))
        ours.load_weights(str(path))
        x, upstream = inputs()
        y_ref, _ = run(ref_model, x, upstream)
        y_our, _ = run(our_model, x, upstream)
        assert_rel(y_our, y_ref, RTOL, "output right after load_weights")
        opt_ref.step()
        opt_our.step()
        y_ref, _ = run(ref_model, x)
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, "output after one SGD step of the optimizer made before load_weights")
    finally:
        _close(ours)


# MARK: finite differences (no LyCORIS involved)

FD_CASES = [
    ("lora", {"use_tucker": True}), ("loha", {"use_tucker": True}), ("lokr", {"factor": 2}),
    ("ia3", {}), ("dylora", {"block_size": 2}), ("lora", {"bypass_mode": True}),
]


@pytest.mark.parametrize("algo,options", FD_CASES, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, o in FD_CASES])
def test_gradients_against_finite_differences(algo, options):
    """A strided 3×3 conv and a Linear, each adapted; L = ⟨g, y⟩. Every adapter factor enters
    Δ linearly when the others are fixed (and y is linear in x), so the central difference
    (L(θ+εv) − L(θ−εv)) / 2ε is exact up to rounding: it must equal ⟨∂θ, v⟩. Each probe
    changes a Parameter in place through torch, so it also checks that values reach the server."""
    torch.manual_seed(13)
    model = nn.ModuleDict({"conv": nn.Conv2d(4, 6, 3, stride=2, padding=1), "fc": nn.Linear(6, 5)})
    net = sl.create_lycoris(nn.Sequential(*model.values()), 0.7, 2, 1.5, algo=algo, **options, threads=1)
    try:
        g = torch.Generator().manual_seed(14)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        net.apply_to()
        net.eval()
        x = torch.randn(2, 4, 7, 7, generator=g)
        upstream_conv = torch.randn(2, 6, 4, 4, generator=g)
        xf = torch.randn(3, 6, generator=g)
        upstream_fc = torch.randn(3, 5, generator=g)

        def loss(xc=x):
            return ((model["conv"](xc) * upstream_conv).sum() + (model["fc"](xf) * upstream_fc).sum()).double()

        xr = x.clone().requires_grad_(True)
        loss(xr).backward()
        checked = 0
        for name, p in net.named_parameters():
            v = torch.randn(p.shape, generator=g)
            eps = 0.5
            with torch.no_grad():
                p.add_(eps * v)
                plus = loss().item()
                p.sub_(2 * eps * v)
                minus = loss().item()
                p.add_(eps * v)
            fd = (plus - minus) / (2 * eps)
            analytic = (p.grad.double() * v.double()).sum().item()
            assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(fd)), f"∂{name}: finite difference {fd} vs backward {analytic}"
            checked += 1
        assert checked >= 2
        v = torch.randn(x.shape, generator=g)
        with torch.no_grad():
            fd = ((loss(x + v) - loss(x - v)) / 2).item()
        analytic = (xr.grad.double() * v.double()).sum().item()
        assert abs(fd - analytic) <= 1e-4 * max(1.0, abs(fd)), f"∂x: finite difference {fd} vs backward {analytic}"
    finally:
        net.close()


def test_two_networks_on_one_model_add_up():
    """LyCORIS stacks networks applied to the same layers (each wraps the forward before
    it); a second swift_lycoris network on the same model must add its delta too, not be
    skipped silently."""
    base = base_model()
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    ref_a = lycoris.create_lycoris(ref_model, 1.0, 4, 2.0)
    ref_b = lycoris.create_lycoris(ref_model, 0.5, 2, 1.0, algo="loha")
    ours_a = sl.create_lycoris(our_model, 1.0, 4, 2.0, threads=1)
    ours_b = sl.create_lycoris(our_model, 0.5, 2, 1.0, algo="loha", threads=1)
    try:
        randomize_lycoris(ref_a, seed=1)
        randomize_lycoris(ref_b, seed=2)
        copy_lycoris_into_ours(ref_a, ours_a)
        copy_lycoris_into_ours(ref_b, ours_b)
        for network in (ref_a, ref_b, ours_a, ours_b):
            network.apply_to()
        x, upstream = inputs()
        y_ref, gx_ref = run(ref_model, x, upstream)
        y_our, gx_our = run(our_model, x, upstream)
        assert_rel(y_our, y_ref, RTOL, "two stacked networks")
        assert_rel(gx_our, gx_ref, RTOL, "∂x, two stacked networks")
    finally:
        _close(ours_a, ours_b)
