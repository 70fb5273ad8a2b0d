"""swift_lycoris.kohya against LyCORIS 4.1.3's ``lycoris.kohya`` (the oracle), on a tiny
diffusers UNet2DConditionModel and a tiny transformers CLIPTextModel built from configs.

For each algorithm (LoRA/LoCon, LoHa, LoKr, IA3, DyLoRA, GLoRA, Full; DoRA on LoRA, LoHa and
LoKr; options such as Tucker, scalar, rs_lora, decompose_both) the same random values go into
LyCORIS's network and ours; then:
the adapted module names and parameter shapes, the text-encoder and UNet outputs, the input
gradients and every parameter gradient, the saved key sets and shapes, and files loaded
both ways (ours into ``lycoris.kohya.create_network_from_weights``, LyCORIS's into ours)
must agree. The oracle packages are required: without them collection fails.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import sys

import pytest
import torch

_PYTHON_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if _PYTHON_DIR not in sys.path:
    sys.path.insert(0, _PYTHON_DIR)

try:  # the oracle and the model libraries: missing ones are an error, never a skip
    import diffusers  # noqa: F401
    import lycoris  # noqa: F401
    import lycoris.kohya as lk
    import lycoris.modules.dylora as lycoris_dylora
    import lycoris.modules.tlora as lycoris_tlora
    import safetensors.torch
    import transformers  # noqa: F401
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
except ImportError as error:  # pragma: no cover - environment problem
    raise ImportError(
        f"test_kohya needs lycoris-lora 4.1.3, diffusers, transformers and safetensors (the oracle and the "
        f"tiny models); install python/requirements-test.txt. Import failed: {error}"
    ) from error

import swift_lycoris  # noqa: E402
from swift_lycoris import kohya as sk  # noqa: E402
from _sl_oracle import randomize_ours  # noqa: E402
from swift_lycoris.presets import BUILTIN_PRESETS, preset_to_toml, resolve_preset  # noqa: E402

assert importlib.metadata.version("lycoris-lora") == "4.1.3", "the oracle must be lycoris-lora 4.1.3"

RTOL = 1e-4


# MARK: tiny models

def build_unet(linear_projection: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, use_linear_projection=linear_projection,
    )
    return unet.eval().requires_grad_(False)


def build_te(seed: int = 1, hidden: int = 32) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                            pad_token_id=1)
    return CLIPTextModel(config).eval().requires_grad_(False)


class Models:
    """A text encoder and a UNet (fresh copies of the same weights on each call)."""

    def __init__(self, linear_projection: bool = False):
        self._te = build_te()
        self._unet = build_unet(linear_projection)

    def copy(self):
        return copy.deepcopy(self._te), copy.deepcopy(self._unet)


def inputs(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    weights_unet = torch.randn(2, 4, 8, 8, generator=g)
    weights_te = torch.randn(2, 7, 32, generator=g)
    return ids, x, timesteps, weights_unet, weights_te


def run(te, unet, grad: bool = True):
    """TE → UNet with the TE output as cross-attention context. Returns the outputs and,
    with `grad`, the gradients of a fixed linear loss w.r.t. the UNet input and the TE's
    token embeddings (the input gradients of both models)."""
    ids, x, timesteps, wu, wt = inputs()
    captured = {}

    def leaf(module, args, output):
        if grad:
            output = output.detach().requires_grad_(True)
        captured["embeddings"] = output
        return output

    handle = te.embeddings.register_forward_hook(leaf)
    try:
        x = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            enc = te(ids).last_hidden_state
            out = unet(x, timesteps, enc).sample
            if grad:
                ((out * wu).sum() + (enc * wt).sum()).backward()
    finally:
        handle.remove()
    result = {"te": enc.detach(), "unet": out.detach()}
    if grad:
        result["x.grad"] = x.grad.detach()
        result["embeddings.grad"] = captured["embeddings"].grad.detach()
    return result


def assert_close(actual, expected, what: str, rtol: float = RTOL):
    """Relative comparison: |a − e| ≤ rtol·(|e| + max|e|·1e-1) elementwise."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6) * 0.1 + 1e-7,
                               msg=lambda m: f"{what}: {m}")


# MARK: the oracle

def lycoris_preset(preset) -> dict:
    """Our preset in the form LyCORIS can run: for full/full-lin without the names
    time_embedding.linear_1/2, which the class TimestepEmbedding already covers (LyCORIS
    4.1.3 adds those layers twice and fails; the modules are the same)."""
    p = resolve_preset(preset)
    if "unet_target_name" in p:
        p["unet_target_name"] = [n for n in p["unet_target_name"] if not n.startswith("time_embedding.")]
    return p


def reset_lycoris_class(preset: dict):
    """LyCORIS keeps the preset in class attributes; start each network from a clean state."""
    cls = lk.LycorisNetworkKohya
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP, cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME = {}, {}, False, []
    cls.apply_preset(preset)


def lycoris_network(tmp_path, te, unet, dim, alpha, preset="full", **args):
    p = lycoris_preset(preset)
    path = tmp_path / f"lycoris_preset_{abs(hash(str(p)))}.toml"
    path.write_text(preset_to_toml(p))
    reset_lycoris_class(p)
    network = lk.create_network(1.0, dim, alpha, None, te, unet, preset=str(path), **args)
    network.apply_to(te, unet, True, True)
    return network


def lycoris_from_file(file, te, unet, preset="full"):
    reset_lycoris_class(lycoris_preset(preset))
    network, _ = lk.create_network_from_weights(1.0, str(file), None, te, unet)
    network.apply_to(te, unet, True, True)
    return network


@pytest.fixture
def closing():
    """Networks to close (their server processes end) when the test ends."""
    networks = []
    yield networks
    for network in networks:
        network.close()


@pytest.fixture
def timestep_mask():
    """Sets T-LoRA's rank mask in both libraries, as a training loop would; cleared at the end."""
    def set_mask(mask):
        lycoris_tlora.set_timestep_mask(mask)
        swift_lycoris.set_timestep_mask(mask)
    yield set_mask
    lycoris_tlora.clear_timestep_mask()
    swift_lycoris.clear_timestep_mask()


def ours_network(closing, te, unet, dim, alpha, preset="full", **args):
    network = sk.create_network(1.0, dim, alpha, None, te, unet, neuron_dropout=None, preset=preset, **args)
    network.apply_to(te, unet, True, True)
    closing.append(network)
    return network


# MARK: parameters side by side

def dylora_blocks(network) -> dict:
    """LyCORIS DyLoRA modules by name."""
    return {m.lora_name: m for m in network.loras}


def full_differences(lyco, grad: bool = False) -> dict[str, torch.Tensor]:
    """LyCORIS's Full modules hold the absolute weight and bias after apply_to: their
    differences from the originals (or those parameters' gradients) under our keys."""
    result = {}
    for m in lyco.loras:
        pairs = [("diff", m.weight, m.org_weight)] + ([("diff_b", m.bias, m.org_bias[0])] if m.bias is not None else [])
        for suffix, param, original in pairs:
            value = (param.grad if param.grad is not None else torch.zeros_like(param)) if grad else param - original
            result[f"{m.lora_name}.{suffix}"] = value.detach()
    return result


def oracle_parameters(lyco, algo: str) -> dict[str, torch.Tensor]:
    """LyCORIS's parameters under our keys (DyLoRA blocks concatenated like its file; Full's
    differences)."""
    if algo == "full":
        return full_differences(lyco)
    if algo != "dylora":
        return dict(lyco.named_parameters())
    result = {}
    for name, module in dylora_blocks(lyco).items():
        result[f"{name}.lora_up.weight"] = torch.cat(list(module.up_list), dim=1)
        result[f"{name}.lora_down.weight"] = torch.cat(list(module.down_list)).reshape(
            module.lora_dim, -1, *module.shape[2:])
    return result


def oracle_gradients(lyco, algo: str) -> dict[str, torch.Tensor]:
    def grad(p):
        return p.grad if p.grad is not None else torch.zeros_like(p)

    if algo == "full":
        return full_differences(lyco, grad=True)
    if algo != "dylora":
        return {k: grad(p) for k, p in lyco.named_parameters()}
    result = {}
    for name, module in dylora_blocks(lyco).items():
        result[f"{name}.lora_up.weight"] = torch.cat([grad(p) for p in module.up_list], dim=1)
        result[f"{name}.lora_down.weight"] = torch.cat([grad(p) for p in module.down_list]).reshape(
            module.lora_dim, -1, *module.shape[2:])
    return result


@torch.no_grad()
def randomize(ours, lyco, algo: str, std: float, seed: int = 3) -> None:
    """The same random values in every adapter parameter of both networks (DoRA's magnitudes:
    their initial norms times 1 + noise; Full: W0 + diff in LyCORIS's absolute weights)."""
    g = torch.Generator().manual_seed(seed)
    ours_params = dict(ours.named_parameters())
    reference = oracle_parameters(lyco, algo)
    assert set(ours_params) == set(reference), (
        f"parameter keys differ: only ours {sorted(set(ours_params) - set(reference))[:5]}, "
        f"only LyCORIS {sorted(set(reference) - set(ours_params))[:5]}")
    for key, param in ours_params.items():
        value = torch.randn(param.shape, generator=g) * std
        if key.endswith(".scalar"):
            value = 0.5 + value.abs()
        if key.endswith(".dora_scale"):
            value = param * (1 + value)
        param.copy_(value)
        if algo == "full":
            name, _, suffix = key.partition(".")
            module = {m.lora_name: m for m in lyco.loras}[name]
            target, original = (module.weight, module.org_weight) if suffix == "diff" else (module.bias, module.org_bias[0])
            target.copy_(original + value)
        elif algo != "dylora":
            dict(lyco.named_parameters())[key].copy_(value)
    if algo == "dylora":
        for name, module in dylora_blocks(lyco).items():
            up = ours_params[f"{name}.lora_up.weight"]
            down = ours_params[f"{name}.lora_down.weight"].reshape(module.lora_dim, -1)
            bs = module.block_size
            for i, p in enumerate(module.up_list):
                p.copy_(up[:, i * bs:(i + 1) * bs])
            for i, p in enumerate(module.down_list):
                p.copy_(down[i * bs:(i + 1) * bs])


def zero_grads(*networks):
    for network in networks:
        for p in network.parameters():
            p.grad = None


# MARK: the parity cases

CASES = {
    # id: (algo, preset, network_dim, network_alpha, network_args, std of the random values)
    "lora": ("lora", "full", 4, 2.0, {"conv_dim": "4", "conv_alpha": "1"}, 0.2),
    "locon-tucker-rslora": ("locon", "full", 4, 2.0,
                            {"conv_dim": "2", "conv_alpha": "2", "use_tucker": "True", "rs_lora": "True"}, 0.2),
    "lora-scalar": ("lora", "attn-mlp", 4, 2.0, {"use_scalar": "True"}, 0.2),
    "lora-attn-mlp": ("lora", "attn-mlp", 8, 4.0, {}, 0.2),
    "loha": ("loha", "full", 4, 2.0, {"conv_dim": "4", "conv_alpha": "2"}, 0.5),
    "loha-tucker": ("loha", "full", 4, 1.0, {"conv_dim": "2", "use_tucker": "True"}, 0.5),
    "lokr": ("lokr", "full", 4, 1.0, {}, 0.4),
    "lokr-decompose-factor": ("lokr", "full", 2, 1.0, {"decompose_both": "True", "factor": "4"}, 0.4),
    "ia3": ("ia3", "ia3", 4, 1.0, {}, 0.3),
    "dylora": ("dylora", "full", 4, 2.0, {"block_size": "2", "conv_dim": "4"}, 0.2),
    # The norm adapter on every GroupNorm/LayerNorm inside the matched blocks.
    "lora-train-norm": ("lora", "full", 4, 2.0, {"conv_dim": "4", "train_norm": "True"}, 0.2),
    "loha-train-norm": ("loha", "attn-mlp", 4, 2.0, {"train_norm": "True"}, 0.5),
    # Diag-OFT and BOFT rotate the base weight (the server holds it); BOFT needs out = even
    # block ≤ dim times a power of two, which dim 6 gives on every layer of the tiny models.
    "diag-oft": ("diag-oft", "full", 4, 1.0, {"constraint": "0.01", "rescaled": "True"}, 0.3),
    "boft": ("boft", "full", 6, 1.0, {"conv_dim": "6", "rescaled": "True"}, 0.3),
    # Bypass rotates the base output with its bias (the weight path would not): the UNet's
    # layers with a bias must move activations even under transfer="auto".
    "boft-bypass": ("boft", "attn-mlp", 6, 1.0, {"constraint": "0.5", "bypass_mode": "True"}, 0.3),
    # T-LoRA on linear and 1x1 conv layers (LyCORIS crashes on larger kernels), with the rank
    # mask of timestep 300 of 1000 (3 of 4 ranks).
    "tlora": ("tlora", "attn-mlp", 4, 2.0, {}, 0.3),
    # DoRA (dora_wd) on LoRA, LoHa (on input columns) and LoKr; GLoRA; Full.
    "lora-dora": ("lora", "full", 4, 2.0, {"conv_dim": "4", "conv_alpha": "1", "dora_wd": "True"}, 0.2),
    "loha-dora-input": ("loha", "attn-mlp", 4, 2.0, {"dora_wd": "True", "wd_on_output": "False"}, 0.5),
    "lokr-dora": ("lokr", "full", 4, 1.0, {"dora_wd": "True"}, 0.4),
    "glora": ("glora", "full", 4, 2.0, {"conv_dim": "4", "conv_alpha": "1"}, 0.2),
    "glora-scalar": ("glora", "attn-mlp", 4, 2.0, {"use_scalar": "True"}, 0.2),
    "full": ("full", "attn-mlp", 4, 1.0, {}, 0.05),
}


def _lycoris_args(args: dict) -> dict:
    # LyCORIS counts any string but "false" as true and passes decompose_both unparsed, so
    # only true values are given to it (wd_on_output defaults to true: it is always given).
    return {k: v for k, v in args.items() if str(v).lower() != "false" or k == "wd_on_output"}


@pytest.mark.parametrize("transfer", ["auto", "activations"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_lycoris(case, transfer, tmp_path, closing, monkeypatch, timestep_mask):
    """`auto` sends these small layers' ΔWs (the weight path); `activations` forces every
    call through the server's forward/backward."""
    algo, preset, dim, alpha, args, std = CASES[case]
    if algo == "tlora":
        timestep_mask(lycoris_tlora.compute_timestep_mask(300, 1000, dim))
        # LyCORIS takes the frozen factors from a float32 SVD, the server from a float64 one;
        # the oracle uses float64 too (rounded to float32 as the server keeps them).
        svd = torch.linalg.svd
        monkeypatch.setattr(torch.linalg, "svd", lambda a, full_matrices=True: tuple(
            t.to(a.dtype) for t in svd(a.double(), full_matrices=full_matrices)))
    models = Models()
    base = run(*models.copy(), grad=False)

    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, dim, alpha, preset, algo=algo, **_lycoris_args(args))
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, dim, alpha, preset, algo=algo, **args)
    ours.core.transfer = transfer

    # 1. The same modules with the same parameter shapes (and the same alpha).
    lyco_names = {m.lora_name for m in lyco.loras}
    assert set(ours.lora_names) == lyco_names
    assert len(ours.lora_names) == len(lyco_names) > 0
    reference = oracle_parameters(lyco, algo)
    ours_params = dict(ours.named_parameters())
    assert {k: tuple(v.shape) for k, v in ours_params.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    for key, value in reference.items():
        if key.endswith(".dora_scale"):  # DoRA's magnitude starts at the norms of W0 along its axis
            assert_close(ours_params[key], value, f"{case}: initial {key}")
    lyco_sd, ours_sd = lyco.state_dict(), ours.state_dict()
    if algo not in ("dylora", "full"):  # (LyCORIS's Full state dict holds absolute weights)
        assert set(ours_sd) - {k for k in ours_sd if k.endswith(".scalar")} == set(lyco_sd)
        for key, value in lyco_sd.items():
            if key.endswith(".alpha") or key.endswith(".on_input"):
                assert float(ours_sd[key]) == pytest.approx(float(value), rel=1e-6), key

    # 2. Random values everywhere; outputs, input gradients and parameter gradients agree.
    randomize(ours, lyco, algo, std)
    lyco.train()
    ours.train()
    if algo == "dylora":
        # LyCORIS draws the DyLoRA block at random on every forward, even in eval mode; use the
        # last block (all of them), which is what the server uses in evaluation mode.
        monkeypatch.setattr(lycoris_dylora.random, "randint", lambda a, b: b)
        ours.eval()
    zero_grads(ours, lyco)
    expected = run(te_l, unet_l)
    actual = run(te_o, unet_o)
    change = float((expected["unet"] - base["unet"]).abs().max())
    assert change > 1e-2 * float(base["unet"].abs().max()), f"the adapters barely change the output ({change})"
    assert float((expected["te"] - base["te"]).abs().max()) > 1e-3
    for what in ("te", "unet", "x.grad", "embeddings.grad"):
        assert_close(actual[what], expected[what], f"{case}: {what}")
    grads = oracle_gradients(lyco, algo)
    bias_scale = max((float(g.abs().max()) for k, g in grads.items() if k.endswith(".diff_b")), default=0.0)
    for key, param in ours.named_parameters():
        assert param.grad is not None, f"{key} received no gradient"
        if key.endswith("k_proj.diff_b"):
            # A key projection's bias shifts every attention logit of a query equally: softmax
            # ignores it, so its gradient is 0 (both sides hold rounding noise).
            assert max(float(param.grad.abs().max()), float(grads[key].abs().max())) <= 1e-4 * bias_scale, key
            continue
        assert_close(param.grad, grads[key], f"{case}: grad {key}")
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0

    # 3. Saved files: the same keys and shapes.
    ours_file, lyco_file = tmp_path / "ours.safetensors", tmp_path / "lycoris.safetensors"
    ours.save_weights(str(ours_file), None, {"ss_network_module": "swift_lycoris.kohya"})
    lyco.save_weights(str(lyco_file), None, {})
    ours_saved, lyco_saved = safetensors.torch.load_file(ours_file), safetensors.torch.load_file(lyco_file)
    assert set(ours_saved) == set(lyco_saved)
    for key, value in lyco_saved.items():
        shape = tuple(value.shape)
        if algo == "dylora" and key.endswith("lora_up.weight") and ours_saved[key].dim() == 4:
            # LyCORIS saves a DyLoRA conv's lora_up 2-D (its own loader then fails); the
            # server saves the LoCon shape (out, r, 1, 1).
            shape = shape + (1, 1)
        assert tuple(ours_saved[key].shape) == shape, key

    # 4. Our file in LyCORIS, LyCORIS's file in ours: the same outputs. Both loaders give a
    # file rebuild semantics, which differ from a bypass_mode network's where the bypass
    # transforms the bias too (Diag-OFT/BOFT): those compare with LyCORIS reading its own file.
    file_reference = None
    if args.get("bypass_mode") == "True":
        te_r, unet_r = models.copy()
        lycoris_from_file(lyco_file, te_r, unet_r, preset).eval()
        with torch.no_grad():
            file_reference = run(te_r, unet_r, grad=False)
    if algo == "ia3":
        # LyCORIS 4.1.3 cannot load IA3 files at all (make_module_from_state_dict arity).
        te_x, unet_x = models.copy()
        with pytest.raises(TypeError):
            lycoris_from_file(ours_file, te_x, unet_x, preset)
    elif args.get("wd_on_output") == "False":
        # LyCORIS 4.1.3 builds every loaded DoRA module on the output axis: (1, in) does not fit.
        te_x, unet_x = models.copy()
        with pytest.raises(RuntimeError):
            lycoris_from_file(ours_file, te_x, unet_x, preset)
    else:
        te_x, unet_x = models.copy()
        lyco_loaded = lycoris_from_file(ours_file, te_x, unet_x, preset)
        lyco_loaded.eval()
        with torch.no_grad():
            ours.eval()
            ours_now = file_reference or run(te_o, unet_o, grad=False)
            loaded_out = run(te_x, unet_x, grad=False)
        for what in ("te", "unet"):
            assert_close(loaded_out[what], ours_now[what], f"{case}: our file in LyCORIS: {what}")

    te_y, unet_y = models.copy()
    ours_loaded, sd = sk.create_network_from_weights(1.0, str(lyco_file), None, te_y, unet_y)
    closing.append(ours_loaded)
    assert set(sd) == set(lyco_saved)
    ours_loaded.apply_to(te_y, unet_y, True, True)
    ours_loaded.eval()
    assert set(ours_loaded.lora_names) == lyco_names
    if algo != "dylora":
        # (A LyCORIS DyLoRA file means LoCon with alpha/r, not its in-process α/(r/bs):
        # test_dylora_lycoris_file_means_locon compares with LyCORIS reading its own file.)
        with torch.no_grad():
            got, reference_out = run(te_y, unet_y, grad=False), file_reference or run(te_l, unet_l, grad=False)
        for what in ("te", "unet"):
            assert_close(got[what], reference_out[what], f"{case}: LyCORIS's file in ours: {what}")


def test_dylora_lycoris_file_means_locon(tmp_path, closing):
    """A LyCORIS DyLoRA file (linear layers: LyCORIS can reload those) gives the same outputs
    in ours as in LyCORIS's own loader."""
    models = Models(linear_projection=True)
    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, 4, 2.0, "attn-mlp", algo="dylora", block_size="2")
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, 4, 2.0, "attn-mlp", algo="dylora", block_size="2")
    randomize(ours, lyco, "dylora", 0.2)
    file = tmp_path / "dylora_lycoris.safetensors"
    lyco.save_weights(str(file), None, {})
    te_a, unet_a = models.copy()
    reference = lycoris_from_file(file, te_a, unet_a, "attn-mlp")
    reference.eval()
    assert_same_outputs(ours_from_file(closing, file, models), (te_a, unet_a), "dylora file")


def ours_from_file(closing, file, models):
    """Fresh copies of the models with our network from `file` applied, in eval mode."""
    te, unet = models.copy()
    loaded, _ = sk.create_network_from_weights(1.0, str(file), None, te, unet)
    closing.append(loaded)
    loaded.apply_to(te, unet, True, True)
    loaded.eval()
    return te, unet


def assert_same_outputs(actual_models, expected_models, what: str):
    """The text-encoder and UNet outputs of two (te, unet) pairs agree."""
    with torch.no_grad():
        actual, expected = run(*actual_models, grad=False), run(*expected_models, grad=False)
    for key in ("te", "unet"):
        assert_close(actual[key], expected[key], f"{what}: {key}")


# MARK: naming, presets, arguments

def test_two_text_encoders_are_te1_te2(tmp_path, closing):
    """A list of text encoders (SDXL) gives lora_te1_/lora_te2_ names, as LyCORIS; the
    multiple-lr variant gives each its own group."""
    te1, te2 = build_te(1), build_te(2, hidden=48)
    unet = build_unet()
    lyco = lycoris_network(tmp_path, [copy.deepcopy(te1), copy.deepcopy(te2)], copy.deepcopy(unet), 4, 1.0, "attn-mlp")
    ours = ours_network(closing, [te1, te2], unet, 4, 1.0, "attn-mlp")
    names = {m.lora_name for m in lyco.loras}
    assert set(ours.lora_names) == names
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    groups, descriptions = ours.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert descriptions == ["textencoder 1", "textencoder 2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    lyco_groups, lyco_descriptions = lyco.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    ours_groups, ours_descriptions = ours.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert ours_descriptions == lyco_descriptions
    assert [sum(p.numel() for p in g["params"]) for g in ours_groups] == \
        [sum(p.numel() for p in g["params"]) for g in lyco_groups]


@pytest.mark.parametrize("ratios", [
    {"loraplus_lr_ratio": "4"},
    {"loraplus_unet_lr_ratio": "8", "loraplus_text_encoder_lr_ratio": "2"},
    {"loraplus_lr_ratio": "4", "loraplus_unet_lr_ratio": "16"},
])
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_loraplus_groups_match_lycoris(ratios, algo, tmp_path, closing):
    models = Models()
    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, 4, 1.0, "full", algo=algo, **ratios)
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, 4, 1.0, "full", algo=algo, **ratios)
    for call in ((5e-5, 1e-4, 1e-3), (None, 1e-4, 1e-3), (None, None, 2e-4), (0.0, 1e-4, 1e-3)):
        lyco_groups, lyco_descriptions = lyco.prepare_optimizer_params(*call)
        ours_groups, ours_descriptions = ours.prepare_optimizer_params(*call)
        assert ours_descriptions == lyco_descriptions, call
        lyco_names = {id(p): k for k, p in lyco.named_parameters()}
        ours_names = {id(p): k for k, p in ours.named_parameters()}
        assert [g["lr"] for g in ours_groups] == pytest.approx([g["lr"] for g in lyco_groups])
        assert [sorted(ours_names[id(p)] for p in g["params"]) for g in ours_groups] == \
            [sorted(lyco_names[id(p)] for p in g["params"]) for g in lyco_groups]


def test_builtin_presets_are_lycoris_presets_except_ia3():
    from lycoris.config import PRESET

    for name, preset in BUILTIN_PRESETS.items():
        if name == "ia3":
            continue
        assert preset == PRESET[name], name
    assert set(BUILTIN_PRESETS) == set(PRESET)


def test_default_preset_works_where_lycoris_fails(closing):
    """LyCORIS's default preset adapts time_embedding.linear_1/2 twice and fails; ours adapts
    them once."""
    te, unet = Models().copy()
    lk.LycorisNetworkKohya.apply_preset(lk.PRESET["full"])
    with pytest.raises(AssertionError, match="duplicated lora name"):
        lk.create_network(1.0, 4, 1.0, None, copy.deepcopy(te), copy.deepcopy(unet))
    ours = ours_network(closing, te, unet, 4, 1.0)  # preset omitted: full
    names = ours.lora_names
    assert names.count("lora_unet_time_embedding_linear_1") == 1
    assert "lora_unet_conv_in" in names and "lora_unet_conv_out" in names


def test_ia3_preset_matches_layers(tmp_path, closing):
    """LyCORIS's own ia3 preset matches nothing (anchored names); ours adapts to_k, to_v,
    ff.net.2 and k_proj, v_proj, mlp.fc2, with train_on_input on the fc2 layers."""
    te, unet = Models().copy()
    reset_lycoris_class(lk.PRESET["ia3"])
    lyco = lk.create_network(1.0, 4, 1.0, None, copy.deepcopy(te), copy.deepcopy(unet), algo="ia3", preset="ia3")
    assert len(lyco.loras) == 0
    ours = ours_network(closing, te, unet, 4, 1.0, "ia3", algo="ia3")
    names = ours.lora_names
    kinds = ("_to_k", "_to_v", "_ff_net_2", "_k_proj", "_v_proj", "_mlp_fc2")
    assert names and all(n.endswith(kinds) for n in names)
    assert all(any(n.endswith(kind) for n in names) for kind in kinds)
    assert {ours.core.modules_info[n]["algorithm"] for n in names} == {"ia3"}
    sd = ours.state_dict()
    assert int(sd["lora_te_encoder_layers_0_mlp_fc2.on_input"]) == 1
    assert int(sd["lora_te_encoder_layers_0_self_attn_k_proj.on_input"]) == 0


def test_toml_preset_file(tmp_path, closing):
    """A TOML preset with LyCORIS's keys: module_algo_map, name_algo_map with dim/alpha and
    algo overrides, exclude_name, enable_conv; the same modules, algorithms and shapes as
    LyCORIS."""
    preset = {
        "enable_conv": True,
        "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
        "unet_target_name": ["conv_in"],
        "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
        "module_algo_map": {"CLIPMLP": {"algo": "loha", "dim": 2, "alpha": 1}},
        "name_algo_map": {"conv_in": {"algo": "lokr", "factor": 4}},
        "exclude_name": [r".*\.attn2\..*"],
    }
    path = tmp_path / "custom.toml"
    path.write_text(preset_to_toml(preset))
    models = Models()
    te_l, unet_l = models.copy()
    reset_lycoris_class(lycoris_preset(str(path)))
    lyco = lk.create_network(1.0, 4, 2.0, None, te_l, unet_l, preset=str(path), conv_dim="2")
    lyco.apply_to(te_l, unet_l, True, True)
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, 4, 2.0, str(path), conv_dim="2")
    assert set(ours.lora_names) == {m.lora_name for m in lyco.loras}
    assert not any("attn2" in n for n in ours.lora_names)
    kinds = {"LoConModule": "locon", "LohaModule": "loha", "LokrModule": "lokr"}
    for module in lyco.loras:
        assert ours.core.modules_info[module.lora_name]["algorithm"] == kinds[type(module).__name__], module.lora_name
    assert {k: tuple(v.shape) for k, v in ours.named_parameters()} == \
        {k: tuple(v.shape) for k, v in lyco.named_parameters()}


def test_network_args_parsing(caplog):
    parse = sk.NetworkArgs.parse
    args = parse(8, 4.0, None, {"decompose_both": "False", "use_cp": "true", "rs_lora": "0", "factor": "8",
                                "conv_dim": "0", "block_size": "None", "dropout": None})
    assert args.decompose_both is False and args.use_tucker is True and args.rs_lora is False
    assert args.factor == 8 and args.conv_dim == 0 and args.block_size == 4 and args.dropout == 0.0
    defaults = parse(None, 1, None, {})
    assert (defaults.network_dim, defaults.conv_dim, defaults.conv_alpha, defaults.algo, defaults.preset) == \
        (4, 4, 1.0, "lora", "full")
    assert defaults.wd_on_output is True and defaults.factor == -1 and defaults.block_size == 4
    assert parse(4, 1, 0.25, {}).dropout == 0.25  # neuron_dropout when dropout is absent
    assert parse(4, 1, None, {"constrain": "0.5"}).constraint == 0.5
    assert parse(4, 1, None, {"disable_conv_cp": "False"}).use_tucker is True
    for bad in ({"use_scalar": "maybe"}, {"dropout": "x"}, {"factor": "1.5"}):
        with pytest.raises(ValueError):
            parse(4, 1, None, bad)
    for algo in ("bogus", "lycoris"):  # every LyCORIS algorithm is computed; unknown names are refused
        with pytest.raises(ValueError, match=algo):
            parse(4, 1, None, {"algo": algo})
    dora = parse(4, 1, None, {"dora_wd": "True", "wd_on_output": "off"})
    assert dora.server_options()["weight_decompose"] is True and dora.server_options()["wd_on_out"] is False
    assert "weight_decompose" not in parse(4, 1, None, {}).server_options()
    assert parse(4, 1, None, {"train_norm": "True"}).train_norm is True
    for algo in ("norm", "norms"):  # the norm adapter comes with train_norm, not as the algorithm
        with pytest.raises(ValueError, match="train_norm=True"):
            parse(4, 1, None, {"algo": algo})


def test_unsupported_layers_and_algorithms_are_reported(tmp_path, caplog):
    class Transformer2DModel(torch.nn.Module):  # a foreign class with a targeted name
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.conv1d = torch.nn.Conv1d(8, 8, 3)
            self.norm = torch.nn.LayerNorm(8)
            self.reflect = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
            self.plain_norm = torch.nn.GroupNorm(2, 8, affine=False)

    root = torch.nn.Module()
    root.block = Transformer2DModel()
    with caplog.at_level("WARNING", logger="swift_lycoris.kohya"):
        network = sk.create_network(1.0, 4, 1.0, None, None, root, train_norm="true")
    assert network.target_names == ["lora_unet_block_proj", "lora_unet_block_conv1d", "lora_unet_block_norm"]
    messages = " ".join(r.message for r in caplog.records)
    assert "lora_unet_block_reflect (Conv2d)" in messages and "lora_unet_block_plain_norm (GroupNorm)" in messages
    preset = tmp_path / "bogus.toml"
    preset.write_text(preset_to_toml({"unet_target_module": ["Transformer2DModel"],
                                      "module_algo_map": {"Transformer2DModel": {"algo": "bogus"}}}))
    with pytest.raises(ValueError, match="bogus"):
        sk.create_network(1.0, 4, 1.0, None, None, root, preset=str(preset))
    with pytest.raises(ValueError, match="preset"):
        sk.create_network(1.0, 4, 1.0, None, None, root, preset="no-such-preset")


def test_files_whose_modules_do_not_fit_their_layers_are_refused(tmp_path):
    """A file with a module that cannot be built on its layer (here diag-oft blocks covering
    24 of the layer's 32 outputs) fails in create_network_from_weights with the server's
    reason, naming the algorithm."""
    te, unet = Models().copy()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    file = tmp_path / "oft.safetensors"
    safetensors.torch.save_file({f"{name}.oft_blocks": torch.zeros(3, 8, 8)}, str(file))
    with pytest.raises(ValueError, match="diag-oft"):
        sk.create_network_from_weights(1.0, str(file), None, te, unet)


def test_dora_files_load_into_a_network_without_dora(tmp_path, closing):
    """A LyCORIS DoRA file loaded into a network created without dora_wd (load_weights, as
    kohya's --network_weights does): the server needs the layers' weights, which that
    network did not send, and says so; create_network_from_weights sends them and
    reproduces LyCORIS's outputs."""
    models = Models()
    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, 4, 1.0, "attn-mlp", dora_wd="True")
    ours_seed = ours_network(closing, *models.copy(), 4, 1.0, "attn-mlp", dora_wd="True")
    randomize(ours_seed, lyco, "lora", 0.2)
    file = tmp_path / "dora.safetensors"
    lyco.save_weights(str(file), None, {})
    te, unet = models.copy()
    plain = ours_network(closing, te, unet, 4, 1.0, "attn-mlp")
    with pytest.raises(Exception, match="base weight"):
        plain.load_weights(str(file))
    lyco.eval()
    assert_same_outputs(ours_from_file(closing, file, models), (te_l, unet_l), "DoRA file")


# MARK: max norm, merge, multiplier

@pytest.mark.parametrize("algo,std,extra", [("lora", 0.3, {}), ("loha", 0.6, {}), ("lokr", 0.4, {}),
                                            ("lora", 0.3, {"dora_wd": "True"})])
def test_max_norm_regularization_matches_lycoris(algo, std, extra, tmp_path, closing):
    """(With DoRA the bound is on the adapter's ΔW, as LyCORIS's.)"""
    models = Models()
    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, 4, 2.0, "full", algo=algo, **extra)
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, 4, 2.0, "full", algo=algo, **extra)
    randomize(ours, lyco, algo, std)
    # A bound between the smallest and largest module norms, so some modules are scaled.
    with torch.no_grad():
        norms = sorted(float(m.get_diff_weight(1)[0].norm()) if algo == "lora" else float(m.get_weight(m.shape).norm())
                       for m in lyco.loras)
    bound = norms[len(norms) * 2 // 3]
    expected = lyco.apply_max_norm_regularization(bound, "cpu")
    actual = ours.apply_max_norm_regularization(bound, "cpu")
    assert actual[0] == int(expected[0]) and actual[0] > 0
    assert actual[1] == pytest.approx(float(expected[1]), rel=1e-4)
    assert actual[2] == pytest.approx(float(expected[2]), rel=1e-4)
    lyco.eval()
    ours.eval()
    with torch.no_grad():
        e, a = run(te_l, unet_l, grad=False), run(te_o, unet_o, grad=False)
    for what in ("te", "unet"):
        assert_close(a[what], e[what], f"after max norm: {what}")
    assert ours.apply_max_norm_regularization(1e9, "cpu") == (0, 0, 0)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "ia3", "glora", "full"])
def test_merge_equals_adapted_forward(algo, closing):
    """merge_to adds m·ΔW into the weights: the merged model computes what the adapted one
    did (LyCORIS's LoHa/LoKr merge applies α/r twice, so this is not compared with it)."""
    models = Models()
    te, unet = models.copy()
    preset = "ia3" if algo == "ia3" else "full"
    ours = ours_network(closing, te, unet, 4, 2.0, preset, algo=algo)
    randomize_ours(ours, seed=5, std=0.2)
    ours.set_multiplier(0.7)
    ours.eval()
    with torch.no_grad():
        adapted = run(te, unet, grad=False)
    ours.merge_to(te, unet, ours.state_dict(), torch.float32, "cpu")
    with torch.no_grad():
        merged = run(te, unet, grad=False)
    for what in ("te", "unet"):
        assert_close(merged[what], adapted[what], f"merged {algo}: {what}", rtol=2e-4)


def test_merge_lora_matches_lycoris_and_base_weights_flow(tmp_path, closing):
    """kohya's --base_weights flow: create_network_from_weights(mult, file, for_inference=True)
    then merge_to; for LoRA the merged weights equal LyCORIS's merge."""
    models = Models()
    te_l, unet_l = models.copy()
    lyco = lycoris_network(tmp_path, te_l, unet_l, 4, 2.0, "full")
    te_o, unet_o = models.copy()
    ours = ours_network(closing, te_o, unet_o, 4, 2.0, "full")
    randomize(ours, lyco, "lora", 0.2)
    file = tmp_path / "base.safetensors"
    ours.save_weights(str(file), None, None)
    te_a, unet_a = models.copy()
    reset_lycoris_class(lycoris_preset("full"))
    lyco_merge, sd = lk.create_network_from_weights(1.0, str(file), None, te_a, unet_a, for_inference=True)
    lyco_merge.merge_to(te_a, unet_a, sd, torch.float32, "cpu")
    te_b, unet_b = models.copy()
    merger, sd2 = sk.create_network_from_weights(1.0, str(file), None, te_b, unet_b, for_inference=True)
    closing.append(merger)
    merger.merge_to(te_b, unet_b, sd2, torch.float32, "cpu")
    for (name, a), (_, b) in zip(list(unet_a.named_parameters()) + list(te_a.named_parameters()),
                                 list(unet_b.named_parameters()) + list(te_b.named_parameters())):
        assert_close(b, a, f"merged weight {name}")


def test_multiplier(closing):
    models = Models()
    te, unet = models.copy()
    base = run(te, unet, grad=False)
    ours = ours_network(closing, te, unet, 4, 2.0, "full")
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    ours.eval()
    ours.set_multiplier(0.0)
    with torch.no_grad():
        zero = run(te, unet, grad=False)
    for what in ("te", "unet"):
        assert_close(zero[what], base[what], f"multiplier 0: {what}")
    ours.set_multiplier(1.0)
    with torch.no_grad():
        one = run(te, unet, grad=False)
    assert float((one["unet"] - base["unet"]).abs().max()) > 1e-3
