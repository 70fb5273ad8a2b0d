"""swift_lycoris.kohya driven the way kohya sd-scripts' train_network.py drives a network
module: the calls in its order, gradient accumulation, clipping, max-norm, saving with
metadata, accelerate save_state/load_state; plus the autograd bookkeeping that training
relies on (no tapes without gradients, tapes of dropped graphs given back under gradient
checkpointing), precision, partial application and reloading.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from test_kohya import Models, assert_close, inputs, run  # the tiny models and helpers
from _sl_oracle import randomize_ours

try:  # required, never skipped: the resume test uses accelerate's save_state/load_state
    import accelerate
except ImportError as error:  # pragma: no cover - environment problem
    raise ImportError(f"test_kohya_flow needs accelerate (python/requirements-test.txt): {error}") from error
import safetensors.torch  # noqa: E402
from safetensors import safe_open  # noqa: E402



def kohya_metadata() -> dict:
    """The metadata keys train_network.py writes (values str()-ed, as it does)."""
    metadata = {
        "ss_session_id": "1234", "ss_training_started_at": "1700000000.0", "ss_output_name": "tiny",
        "ss_learning_rate": "0.001", "ss_text_encoder_lr": "0.001", "ss_unet_lr": "0.002",
        "ss_num_train_images": "4", "ss_num_batches_per_epoch": "8", "ss_num_epochs": "3",
        "ss_gradient_checkpointing": "False", "ss_gradient_accumulation_steps": "2", "ss_max_train_steps": "24",
        "ss_lr_warmup_steps": "0", "ss_lr_scheduler": "constant", "ss_network_module": "swift_lycoris.kohya",
        "ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_dropout": "None",
        "ss_mixed_precision": "no", "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_clip_skip": "None",
        "ss_seed": "42", "ss_network_args": json.dumps({"algo": "lora", "conv_dim": "4", "conv_alpha": "1"}),
        "ss_training_finished_at": "1700000100.0", "ss_steps": "24", "ss_epoch": "3",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "tiny",
    }
    return {k: str(v) for k, v in metadata.items()}


def kohya_hashes(path) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes on the file's tensors and ss_* metadata:
    SHA-256 of the serialised bytes after the header, and the first 8 hex digits of the
    SHA-256 of bytes 0x100000–0x10FFFF."""
    tensors = safetensors.torch.load_file(path)
    with safe_open(path, framework="pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, metadata)
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def batches(count: int = 4):
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(3, 1000, (2, 7), generator=g), torch.randn(2, 4, 8, 8, generator=g),
             torch.randint(0, 1000, (2,), generator=g), torch.randn(2, 4, 8, 8, generator=g) * 0.5)
            for _ in range(count)]


def train_steps(network, te, unet, optimizer, data, steps, accumulation, max_norm, losses):
    for step in range(steps):
        network.on_step_start(te, unet)
        ids, x, t, target = data[step % len(data)]
        enc = te(ids).last_hidden_state
        pred = unet(x, t, enc).sample
        loss = F.mse_loss(pred, target)
        (loss / accumulation).backward()
        if (step + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scaled = network.apply_max_norm_regularization(max_norm, "cpu")
            assert isinstance(scaled, tuple) and len(scaled) == 3
        losses.append(loss.item())


def test_train_network_call_sequence(tmp_path):
    """create_network → apply_to → load_weights → prepare_optimizer_params →
    prepare_grad_etc → on_epoch_start → (on_step_start, forward, backward, clip on
    get_trainable_params, optimizer.step, apply_max_norm_regularization) with gradient
    accumulation → save_weights with kohya's metadata → accelerate save_state/load_state."""
    module = importlib.import_module("swift_lycoris.kohya")  # as train_network.py loads it
    models = Models()
    te, unet = models.copy()
    net_kwargs = {"algo": "lora", "conv_dim": "4", "conv_alpha": "1"}
    net_kwargs["dropout"] = None  # train_network.py injects args.network_dropout
    network = module.create_network(1.0, 8, 4.0, None, te, unet, neuron_dropout=None, **net_kwargs)
    assert network is not None
    assert list(network.parameters()) == []  # registered by apply_to, as kohya's networks do
    assert hasattr(network, "apply_max_norm_regularization")
    network.apply_to(te, unet, True, True)
    init = tmp_path / "init.safetensors"
    network.save_weights(str(init), None, None)
    assert network.load_weights(str(init)) == {}
    network.enable_gradient_checkpointing()
    try:
        results = network.prepare_optimizer_params(5e-3, 1e-2, 5e-3)
    except TypeError:  # train_network.py's fallback
        results = network.prepare_optimizer_params(5e-3, 1e-2)
    groups, descriptions = results
    assert descriptions == ["textencoder", "unet"]
    assert sum(len(list(g["params"])) for g in groups) == len(list(network.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=1e-3)

    accelerator = accelerate.Accelerator(cpu=True)
    network, optimizer = accelerator.prepare(network, optimizer)
    network.prepare_grad_etc(te, unet)
    data = batches()
    losses = []
    for epoch in range(4):
        network.on_epoch_start(te, unet)
        train_steps(network, te, unet, optimizer, data, 8, 2, 2.0, losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.7 * first, (first, last)

    # Saving, as train_network.py does at each save point.
    metadata = kohya_metadata()
    file = tmp_path / "tiny.safetensors"
    network.save_weights(str(file), torch.float16, metadata)
    with safe_open(str(file), framework="pt") as f:
        saved_metadata = f.metadata()
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    for key, value in kohya_metadata().items():
        assert saved_metadata[key] == value, key
    model_hash, legacy_hash = kohya_hashes(str(file))
    assert saved_metadata["sshs_model_hash"] == model_hash and saved_metadata["sshs_legacy_hash"] == legacy_hash
    assert metadata["sshs_model_hash"] == model_hash  # kohya's save_weights fills the caller's dict too
    assert {k for k, d in dtypes.items() if d != torch.float16} == {k for k in dtypes if k.endswith(".alpha")}
    saved = safetensors.torch.load_file(str(file))
    assert set(saved) == set(network.state_dict())
    assert any(k.startswith("lora_te_") for k in saved) and any(k.startswith("lora_unet_") for k in saved)

    # accelerate save_state / load_state into a fresh network and optimizer (--resume).
    state_dir = tmp_path / "state"
    accelerator.save_state(str(state_dir))
    te2, unet2 = models.copy()
    resumed = module.create_network(1.0, 8, 4.0, None, te2, unet2, neuron_dropout=None, **net_kwargs)
    resumed.apply_to(te2, unet2, True, True)
    groups2, _ = resumed.prepare_optimizer_params(5e-3, 1e-2, 5e-3)
    optimizer2 = torch.optim.AdamW(groups2, lr=1e-3)
    accelerator2 = accelerate.Accelerator(cpu=True)
    resumed, optimizer2 = accelerator2.prepare(resumed, optimizer2)
    accelerator2.load_state(str(state_dir))
    for (k1, p1), (k2, p2) in zip(network.state_dict().items(), resumed.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2), k1
    network.eval()
    resumed.eval()
    with torch.no_grad():
        a, b = run(te, unet, grad=False), run(te2, unet2, grad=False)
    for what in ("te", "unet"):
        assert_close(b[what], a[what], f"resumed: {what}")
    # One more identical step on both: the optimizer state came back too.
    network.train()
    resumed.train()
    train_steps(network, te, unet, optimizer, data, 2, 2, 2.0, [])
    train_steps(resumed, te2, unet2, optimizer2, data, 2, 2, 2.0, [])
    for (k1, p1), (k2, p2) in zip(network.named_parameters(), resumed.named_parameters()):
        assert_close(p2, p1, f"after resume step: {k1}")
    network.close()
    resumed.close()


def record_tapes(core) -> list[int]:
    """The ids of the tapes `core` asks the server to keep from now on, through either path
    (activations: `forward`; weights: `delta_weight`)."""
    tapes: list[int] = []
    forward, fetch = core._server_forward, core._fetch_delta_weights

    def forward_spy(name, x, output_shape, keep_tape, *elementwise):
        delta, tape = forward(name, x, output_shape, keep_tape, *elementwise)
        tapes.extend([tape] if tape is not None else [])
        return delta, tape

    def fetch_spy(names, keep_tapes):
        fetched = fetch(names, keep_tapes)
        tapes.extend(tape for _, tape in fetched.values() if tape is not None)
        return fetched

    core._server_forward, core._fetch_delta_weights = forward_spy, fetch_spy
    return tapes


def test_no_grad_forwards_keep_no_tapes_and_dropped_graphs_release_theirs():
    """Sampling and validation run under no_grad: no tape may be left on the server."""
    te, unet = Models().copy()
    network = importlib.import_module("swift_lycoris.kohya").create_network(1.0, 4, 1.0, None, te, unet)
    network.apply_to(te, unet, True, True)
    core = network.core
    flags = []  # per server request for activations or ΔWs: whether it kept tapes
    forward, fetch = core._server_forward, core._fetch_delta_weights

    def forward_spy(name, x, output_shape, keep_tape, *elementwise):
        flags.append(keep_tape)
        return forward(name, x, output_shape, keep_tape, *elementwise)

    def fetch_spy(names, keep_tapes):
        flags.append(keep_tapes)
        return fetch(names, keep_tapes)

    core._server_forward, core._fetch_delta_weights = forward_spy, fetch_spy
    with torch.no_grad():
        run(te, unet, grad=False)
    assert flags and not any(flags)
    assert core.server.call("network.info")["pending_tapes"] == 0
    flags.clear()
    network.requires_grad_(False)  # grad mode on, but nothing requires a gradient
    run(te, unet, grad=False)
    assert flags and not any(flags)
    flags.clear()
    network.requires_grad_(True)
    run(te, unet, grad=True)
    assert flags and all(flags)
    # Backward keeps each tape (retain_graph); the freed graphs' tapes go at the next step.
    gc.collect()
    network.on_step_start(te, unet)
    assert core.server.call("network.info")["pending_tapes"] == 0
    # A graph dropped without backward: its tapes are released at the next step.
    te(inputs()[0]).last_hidden_state.sum()
    gc.collect()
    assert core.server.call("network.info")["pending_tapes"] > 0
    network.on_step_start(te, unet)
    assert core.server.call("network.info")["pending_tapes"] == 0
    network.close()


def test_gradient_checkpointing_gives_tapes_back():
    """diffusers' (non-reentrant) gradient checkpointing recomputes the forward during
    backward; those recomputed calls' tapes are never backpropagated and must be handed
    back. Gradients equal those without checkpointing."""
    module = importlib.import_module("swift_lycoris.kohya")
    models = Models()
    results = []
    for checkpointing in (False, True):
        te, unet = models.copy()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        network = module.create_network(1.0, 4, 2.0, None, te, unet, algo="loha")
        network.apply_to(te, unet, True, True)
        randomize_ours(network, seed=3)
        tapes_seen = record_tapes(network.core)
        out = run(te, unet, grad=True)
        grads = {k: p.grad.clone() for k, p in network.named_parameters()}
        gc.collect()
        assert network.core._orphaned_tapes, "freed graphs queued no tapes"
        network.on_step_start(te, unet)
        assert network.core._orphaned_tapes == []
        assert tapes_seen
        assert network.core.server.call("network.info")["pending_tapes"] == 0
        results.append((out, grads))
        network.close()
    (plain_out, plain_grads), (ckpt_out, ckpt_grads) = results
    assert_close(ckpt_out["x.grad"], plain_out["x.grad"], "checkpointed x.grad")
    for key, grad in plain_grads.items():
        assert_close(ckpt_grads[key], grad, f"checkpointed grad {key}")


def test_autocast_and_half_precision():
    """Under autocast a layer keeps its own output dtype; network.to(fp16/bf16) (kohya's
    --full_fp16/--full_bf16) trains with low-precision Parameters."""
    module = importlib.import_module("swift_lycoris.kohya")
    te, unet = Models().copy()
    network = module.create_network(1.0, 4, 1.0, None, te, unet)
    network.apply_to(te, unet, True, True)
    layer = network._targets[network.lora_names[0]].module
    x = torch.randn(2, 7, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    network.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in network.parameters())
    groups, _ = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    optimizer = torch.optim.SGD(groups, lr=0.1)
    ids, xs, t, _, _ = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc = te(ids).last_hidden_state
        out = unet(xs, t, enc).sample
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in network.parameters())
    before = [p.detach().clone() for p in network.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, network.parameters()))
    network.close()


def test_unet_only_and_dim_from_weights(tmp_path):
    """--network_train_unet_only: apply_to(te, unet, False, True) adapts the U-Net only (as
    LyCORIS, the saved file has no text-encoder modules); --dim_from_weights:
    create_network_from_weights(1, file, …, **net_kwargs) then apply_to with the U-Net
    only rebuilds on those layers with the file's values."""
    module = importlib.import_module("swift_lycoris.kohya")
    models = Models()
    te, unet = models.copy()
    network = module.create_network(1.0, 4, 1.0, None, te, unet, algo="lokr")
    network.apply_to(te, unet, False, True)
    assert network.lora_names and all(n.startswith("lora_unet_") for n in network.lora_names)
    file = tmp_path / "unet_only.safetensors"
    network.save_weights(str(file), None, {})
    assert all(k.startswith("lora_unet_") for k in safetensors.torch.load_file(str(file)))
    network.close()

    te, unet = models.copy()
    full = module.create_network(1.0, 8, 4.0, None, te, unet, algo="loha", conv_dim="2")
    full.apply_to(te, unet, True, True)
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    file = tmp_path / "both.safetensors"
    full.save_weights(str(file), None, {})
    full.eval()
    with torch.no_grad():
        expected = run(te, unet, grad=False)
    full.close()

    te2, unet2 = models.copy()
    network, weights_sd = module.create_network_from_weights(1, str(file), None, te2, unet2, dropout=None, algo="loha")
    assert set(weights_sd) == set(safetensors.torch.load_file(str(file)))
    network.apply_to(te2, unet2, True, True)
    network.eval()
    assert {network.core.modules_info[n]["algorithm"] for n in network.lora_names} == {"loha"}
    with torch.no_grad():
        got = run(te2, unet2, grad=False)
    for what in ("te", "unet"):
        assert_close(got[what], expected[what], f"from weights: {what}")
    network.close()

    te3, unet3 = models.copy()
    network, _ = module.create_network_from_weights(1, str(file), None, te3, unet3)
    network.apply_to(te3, unet3, False, True)
    assert network.lora_names and all(n.startswith("lora_unet_") for n in network.lora_names)
    unet_ranks = {n: network.core.modules_info[n]["rank"] for n in network.lora_names}
    assert set(unet_ranks.values()) == {8, 2}
    network.close()


def test_load_state_dict_and_load_weights_change_structure(tmp_path):
    """gen_img's path (create_network_from_weights → apply_to → load_state_dict(sd, False))
    and loading a file of another rank/algorithm into a network: the server rebuilds the
    modules from the keys; same-shape Parameters are updated in place."""
    module = importlib.import_module("swift_lycoris.kohya")
    models = Models()
    te, unet = models.copy()
    source = module.create_network(1.0, 8, 2.0, None, te, unet, algo="lora", preset="attn-mlp")
    source.apply_to(te, unet, True, True)
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    source.eval()
    with torch.no_grad():
        expected = run(te, unet, grad=False)
    file = tmp_path / "rank8.pt"  # a torch pickle, not safetensors
    source.save_weights(str(file), None, None)
    state = torch.load(str(file))
    source.close()

    te2, unet2 = models.copy()
    target = module.create_network(1.0, 4, 1.0, None, te2, unet2, algo="loha", preset="attn-mlp")
    target.apply_to(te2, unet2, True, True)
    params_before = {k: p for k, p in target.named_parameters()}
    result = target.load_state_dict(state, False)
    assert not result.missing_keys and not result.unexpected_keys
    target.eval()
    with torch.no_grad():
        got = run(te2, unet2, grad=False)
    for what in ("te", "unet"):
        assert_close(got[what], expected[what], f"rebuilt from state dict: {what}")
    assert {target.core.modules_info[n]["algorithm"] for n in target.lora_names} == {"locon"}
    assert not (set(map(id, params_before.values())) & set(map(id, target.parameters())))  # new shapes, new Parameters

    # Same structure: copied in place, the Parameter objects (the optimizer's) stay.
    kept = {k: p for k, p in target.named_parameters()}
    target.load_state_dict(state)
    assert all(kept[k] is p for k, p in target.named_parameters())
    assert target.load_weights(str(file)) == {}
    assert all(kept[k] is p for k, p in target.named_parameters())
    with pytest.raises(RuntimeError):
        target.load_state_dict({"lora_unet_nothing.lora_up.weight": torch.zeros(1)})
    target.close()


def test_train_and_eval_modes_reach_the_server():
    module = importlib.import_module("swift_lycoris.kohya")
    te, unet = Models().copy()
    network = module.create_network(1.0, 4, 1.0, None, te, unet, rank_dropout="0.5", module_dropout="0.1")
    network.apply_to(te, unet, True, True)
    network.on_epoch_start(te, unet)
    assert network.core.server.call("network.info")["training"] is True
    network.eval()
    assert network.core.server.call("network.info")["training"] is False
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
        a, b = run(te, unet, grad=False), run(te, unet, grad=False)
    assert torch.equal(a["unet"], b["unet"])  # no dropout in eval mode
    network.train()
    with torch.no_grad():
        c, d = run(te, unet, grad=False), run(te, unet, grad=False)
    assert not torch.equal(c["unet"], d["unet"])  # rank/module dropout in training mode
    network.close()


def test_apply_to_after_early_use_keeps_values():
    """prepare_optimizer_params before apply_to builds every module; apply_to with the U-Net
    only then rebuilds on those layers and keeps the values (DyLoRA stays DyLoRA)."""
    module = importlib.import_module("swift_lycoris.kohya")
    te, unet = Models().copy()
    network = module.create_network(1.0, 4, 1.0, None, te, unet, algo="dylora", block_size="2")
    network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    assert any(n.startswith("lora_te_") for n in network.lora_names)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape))
    values = {k: p.detach().clone() for k, p in network.named_parameters() if k.startswith("lora_unet_")}
    network.apply_to(te, unet, False, True)
    assert all(n.startswith("lora_unet_") for n in network.lora_names)
    assert {network.core.modules_info[n]["algorithm"] for n in network.lora_names} == {"dylora"}
    now = dict(network.named_parameters())
    assert set(now) == set(values)
    for key, value in values.items():
        assert torch.equal(now[key], value), key
    network.close()


def test_reentrant_checkpointing_keeps_and_consumes_tapes():
    """Reentrant checkpointing (torch.utils.checkpoint(use_reentrant=True), as older
    sd-scripts U-Nets use): the first pass runs without gradient (no tapes), the recomputed
    pass is back-propagated (its tapes consumed); gradients equal the plain ones."""
    module = importlib.import_module("swift_lycoris.kohya")
    models = Models()
    _, x, timesteps, wu, _ = inputs()
    enc = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    results = []
    for reentrant in (False, True):
        te, unet = models.copy()
        network = module.create_network(1.0, 4, 2.0, None, te, unet, algo="lokr")
        network.apply_to(te, unet, False, True)
        randomize_ours(network, seed=3)
        kept = record_tapes(network.core)
        xi = x.clone().requires_grad_(True)
        if reentrant:
            out = torch.utils.checkpoint.checkpoint(lambda a, c: unet(a, timesteps, c).sample, xi, enc,
                                                    use_reentrant=True)
        else:
            out = unet(xi, timesteps, enc).sample
        (out * wu).sum().backward()
        # Tapes live as long as their graph: once `out` goes, every one is handed back (and
        # ΔWs prefetched but not used this step go with drop_prefetched, as at a step start).
        del out
        gc.collect()
        network.core.drop_prefetched()
        network.core.release_orphaned_tapes()
        assert kept and network.core.server.call("network.info")["pending_tapes"] == 0
        results.append((xi.grad.clone(), {k: p.grad.clone() for k, p in network.named_parameters()}))
        network.close()
    (plain_x, plain), (ckpt_x, ckpt) = results
    assert_close(ckpt_x, plain_x, "reentrant x.grad")
    for key, grad in plain.items():
        assert_close(ckpt[key], grad, f"reentrant grad {key}")
