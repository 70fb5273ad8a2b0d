"""The device path (issue 8 parts 3 and 4) end to end on the emulated device: the batching
autograd Function, the wire (device references, network.bind, network.delta_weights,
network.delta_weights_backward, device.release), the server's handle cache and
LycorisDevice's DeviceAdapterMath — against LyCORIS 4.1.3 on the CPU. The emulated device
is the real path with host memory standing in for GPU memory (protocol/README.md §5.3);
python/tests/test_cuda_device.py runs the same checks on a GPU where one is lent.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from _sl_oracle import (assert_checkpointing_matches, assert_grads_match, assert_rel, inputs, make_pair,
                        our_parameters, run, sgd_step, significant_delta)

import swift_lycoris as sl
from swift_lycoris import device as devices

RTOL = 1e-4

CASES = [
    ("lora", {}),
    ("lora", {"use_tucker": True, "conv_dim": 3, "conv_alpha": 1.5}),
    ("loha", {}),
    ("lokr", {"linear_dim": 2}),
    ("lokr", {"decompose_both": True, "factor": 4}),
    ("ia3", {}),
    ("ia3", {"train_on_input": True}),
    ("glora", {}),
    ("lora", {"dora_wd": True}),
    ("loha", {"dora_wd": True, "wd_on_output": False}),
    ("diag-oft", {}),
    ("boft", {"linear_dim": 6, "conv_dim": 6}),
]
IDS = [f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for a, o in CASES]


@pytest.fixture
def emulated(monkeypatch):
    """Servers started from here accept the emulated device; networks ask for it."""
    monkeypatch.setenv("LYCORIS_EMULATED_DEVICE", "1")
    monkeypatch.setenv(devices.ENVIRONMENT, "emulated")


class CallLog:
    """Counts the server methods a network calls."""

    def __init__(self, network):
        self.methods: list[str] = []
        server = network.server
        original, encoded, record = server.call, server.call_encoded, server.call_record

        def call(method, params=None):
            self.methods.append(method)
            return original(method, params)

        def call_encoded(method, template, *values):  # the per-call path's forward/backward
            self.methods.append(method)
            return encoded(method, template, *values)

        def call_record(method, template, *values):  # the same as binary call records
            self.methods.append(method)
            return record(method, template, *values)

        server.call, server.call_encoded, server.call_record = call, call_encoded, call_record

    def count(self, method: str) -> int:
        return self.methods.count(method)


def _close(network):
    network.close()


@pytest.mark.parametrize("algo,options", CASES, ids=IDS)
def test_two_training_steps_match_lycoris_with_two_calls_per_step(emulated, algo, options):
    """Outputs, ∂x and every ∂parameter equal LyCORIS's over two SGD steps; each step is one
    network.delta_weights and one network.delta_weights_backward, nothing else (the first
    also binds)."""
    base, ref_model, lyco, our_model, ours = make_pair(algo, **options)
    try:
        calls = CallLog(ours)
        x, upstream = inputs()
        for step in range(2):
            calls.methods.clear()
            y_ref, gx_ref = run(ref_model, x, upstream)
            y_our, gx_our = run(our_model, x, upstream)
            if step == 0:
                significant_delta(y_ref, run(base, x)[0])
                assert isinstance(ours._device_path, devices.DevicePath), "the device path was not taken"
                assert {info["transfer"] for info in ours.modules_info.values()} == {"device"}
            assert_rel(y_our, y_ref, RTOL, f"step {step}: output")
            assert_rel(gx_our, gx_ref, RTOL, f"step {step}: ∂x")
            assert_grads_match(lyco, ours, RTOL, f"step {step}: ")
            # The first forward binds the buffers once.
            expected = ["network.delta_weights", "network.delta_weights_backward"]
            assert calls.methods == (["network.bind"] if step == 0 else []) + expected, calls.methods
            sgd_step(lyco, ours)
    finally:
        _close(ours)


@pytest.mark.parametrize("algo", ["lora", "ia3"])
def test_conv1d_conv3d_and_norm_layers_with_their_bias_deltas(emulated, algo):
    """test_layer_kinds's model (conv1d, conv3d, linear; LayerNorm and GroupNorm with
    train_norm, whose norm adapters change the bias too: m·Δb travels beside m·ΔW) over two
    SGD steps in training mode, against LyCORIS."""
    from test_layer_kinds import make_inputs, pair
    from test_layer_kinds import run as run_signals

    base, ref_model, lyco, our_model, ours = pair(algo, "auto")
    try:
        seq, vol, upstream = make_inputs()
        lyco.train()
        ours.train()
        for step in range(2):
            y_ref, gseq_ref, gvol_ref = run_signals(ref_model, seq, vol, upstream)
            y_our, gseq_our, gvol_our = run_signals(our_model, seq, vol, upstream)
            assert isinstance(ours._device_path, devices.DevicePath) and ours._device_path.biased
            assert_rel(y_our, y_ref, RTOL, f"step {step} output")
            assert_rel(gseq_our, gseq_ref, RTOL, f"step {step} ∂seq")
            assert_rel(gvol_our, gvol_ref, RTOL, f"step {step} ∂vol")
            assert_grads_match(lyco, ours, RTOL, f"step {step} ")
            sgd_step(lyco, ours)
    finally:
        _close(ours)


def test_parameters_live_in_device_memory_and_the_server_reads_them_in_place(emulated):
    """After binding, every Parameter is in emulated device memory; an in-place change is
    seen by the next forward without any parameters.set."""
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, upstream = inputs()
        run(our_model, x, upstream)
        memory = ours._device_path.memory
        assert all(memory.contains(p) for p in ours.parameters())
        calls = CallLog(ours)
        with torch.no_grad():
            for p in list(ours.parameters()) + list(lyco.parameters()):
                p.mul_(1.5)
        y_ref, _ = run(ref_model, x)
        y_our, _ = run(our_model, x)
        assert_rel(y_our, y_ref, RTOL, "output after an in-place change")
        assert calls.methods == ["network.delta_weights"], calls.methods
    finally:
        _close(ours)


def test_gradient_accumulation_equals_one_big_batch(emulated):
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, 8, 8, generator=g)
        upstream = torch.randn(4, 4, 4, 12, generator=g)
        (our_model(x) * upstream).sum().backward()
        (ref_model(x) * upstream).sum().backward()
        assert_grads_match(lyco, ours, RTOL, "big batch: ")
        big = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        calls = CallLog(ours)
        for part in (slice(0, 2), slice(2, 4)):
            (our_model(x[part]) * upstream[part]).sum().backward()
        for name, p in ours.named_parameters():
            assert_rel(p.grad, big[name], 1e-5, f"accumulated ∂{name}")
        assert calls.count("network.delta_weights") == 2 and calls.count("network.delta_weights_backward") == 2
    finally:
        _close(ours)


def test_adamw_steps_match_lycoris(emulated):
    """torch's AdamW on the device Parameters: every step's loss and the final values match
    LyCORIS's."""
    base, ref_model, lyco, our_model, ours = make_pair("lokr", linear_dim=2, randomize=False, multiplier=1.0)
    try:
        g = torch.Generator().manual_seed(17)
        x = torch.randn(4, 3, 8, 8, generator=g)
        with torch.no_grad():
            target = base(x) + 0.3 * torch.randn(4, 4, 4, 12, generator=g)
        # The first forward binds (and moves the Parameters into device memory): create the
        # optimizer after it, as kohya creates it after the network moved to the GPU.
        with torch.no_grad():
            our_model(x)
        opt_ref = torch.optim.AdamW(lyco.parameters(), lr=2e-2)
        opt_our = torch.optim.AdamW(ours.parameters(), lr=2e-2)
        for step in range(4):
            losses = []
            for model, opt in ((ref_model, opt_ref), (our_model, opt_our)):
                opt.zero_grad()
                loss = F.mse_loss(model(x), target)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), f"step {step}: {losses[1]} vs LyCORIS {losses[0]}"
        theirs = {l.lora_name: dict(l.named_parameters()) for l in lyco.loras}
        for module, params in our_parameters(ours).items():
            for key, p in params.items():
                assert_rel(p, theirs[module][key], 1e-3, f"{module}.{key} after 4 AdamW steps")
    finally:
        _close(ours)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(emulated, reentrant):
    """A checkpointed model (kohya's gradient_checkpointing): its first pass runs without a
    graph and its recomputation inside backward builds one; the gradients are the plain run's."""
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        assert_checkpointing_matches(our_model, ours, reentrant)
        assert isinstance(ours._device_path, devices.DevicePath)
    finally:
        _close(ours)


def test_bf16_autocast_matches_lycoris(emulated):
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        x, upstream = inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ref, gx_ref = run(ref_model, x, upstream)
            y_our, gx_our = run(our_model, x, upstream)
        assert y_our.dtype == y_ref.dtype == torch.bfloat16
        assert isinstance(ours._device_path, devices.DevicePath)
        assert_rel(y_our.float(), y_ref.float(), 2e-2, "bf16 autocast output")
        assert_rel(gx_our.float(), gx_ref.float(), 5e-2, "bf16 autocast ∂x")
        assert_grads_match(lyco, ours, 5e-2, "bf16 autocast: ")
        for p in ours.parameters():
            assert p.grad.dtype == torch.float32
    finally:
        _close(ours)


def test_save_after_training_and_reload(emulated, tmp_path):
    """network.save writes the trained device values (the client pushes them first); a new
    network loading the file gives the same outputs, and LyCORIS loads it too."""
    base, ref_model, lyco, our_model, ours = make_pair("loha")
    try:
        x, upstream = inputs()
        run(our_model, x, upstream)
        run(ref_model, x, upstream)
        sgd_step(lyco, ours)
        y_trained, _ = run(our_model, x)
        path = tmp_path / "trained.safetensors"
        ours.save_weights(str(path))
    finally:
        _close(ours)
    import copy

    fresh_model = copy.deepcopy(base)
    fresh = sl.create_lycoris_from_weights(1.0, str(path), fresh_model)
    try:
        fresh.set_multiplier(0.8)
        fresh.apply_to()
        y_loaded, _ = run(fresh_model, x)
        assert_rel(y_loaded, y_trained, RTOL, "reloaded output")
        assert isinstance(fresh._device_path, devices.DevicePath)
    finally:
        fresh.close()
    y_ref, _ = run(ref_model, x)
    assert_rel(y_trained, y_ref, RTOL, "trained output vs LyCORIS after the same step")


def test_evaluation_without_grad_computes_once(emulated):
    base, ref_model, lyco, our_model, ours = make_pair("lokr", linear_dim=2)
    try:
        calls = CallLog(ours)
        x, _ = inputs()
        with torch.no_grad():
            for _ in range(3):
                y_our, _ = run(our_model, x)
        y_ref, _ = run(ref_model, x)
        assert_rel(y_our, y_ref, RTOL, "no-grad output")
        assert calls.methods.count("network.delta_weights") == 1, calls.methods
        ours.set_multiplier(0.3)
        lyco.set_multiplier(0.3)
        with torch.no_grad():
            y_our, _ = run(our_model, x)
        assert_rel(y_our, run(ref_model, x)[0], RTOL, "output at another multiplier")
    finally:
        _close(ours)


def test_close_releases_every_handle_and_file(emulated, tmp_path):
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    x, upstream = inputs()
    run(our_model, x, upstream)
    directory = ours.server.info["capabilities"]["arena"]["directory"]
    mine = [f for f in os.listdir(directory) if f.startswith(f"lycoris-emulated-{os.getpid()}-")]
    assert mine, "no emulated allocation"
    calls = CallLog(ours)
    ours.close()
    assert "device.release" in calls.methods
    assert not [f for f in os.listdir(directory) if f in mine]


def test_tlora_follows_the_timestep_mask_on_the_device_path(emulated):
    """T-LoRA on the device path: the mask of each step (none, timestep 600 of 1000, a short
    mask padded with 1s) reaches the device math — output, ∂x and ∂parameters as LyCORIS's."""
    import test_tlora

    base, ref_model, lyco, our_model, ours = test_tlora.pair()
    try:
        x, upstream = test_tlora.inputs()
        for mask in (None, test_tlora.lycoris_tlora.compute_timestep_mask(600, 1000, 4), torch.tensor([[1.0, 1.0, 1.0]])):
            if mask is not None:
                test_tlora.set_masks(mask)
            for p in list(lyco.parameters()) + list(ours.parameters()):
                p.grad = None
            y_ref, gx_ref = run(ref_model, x, upstream)
            y_our, gx_our = run(our_model, x, upstream)
            assert isinstance(ours._device_path, devices.DevicePath), "the device path was not taken"
            assert_rel(y_our, y_ref, RTOL, f"output, mask {mask}")
            assert_rel(gx_our, gx_ref, RTOL, f"∂x, mask {mask}")
            assert_grads_match(lyco, ours, RTOL, f"mask {mask}: ")
    finally:
        test_tlora.lycoris_tlora.clear_timestep_mask()
        sl.clear_timestep_mask()
        _close(ours)


# MARK: selection and fallback (part 4)


def test_unported_options_fall_back_to_the_arena_path_with_one_info_line(emulated, caplog):
    """rank_dropout draws per step: the server refuses the device, the network says why at
    INFO and computes through the arena (still matching LyCORIS in evaluation)."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", rank_dropout=0.2)
    try:
        ours.eval()
        lyco.eval()
        x, _ = inputs()
        with caplog.at_level(logging.INFO, logger="swift_lycoris"):
            y_our, _ = run(our_model, x)
        assert ours._device_path is False
        lines = [r.getMessage() for r in caplog.records if "arena path" in r.getMessage()]
        assert len(lines) == 1 and "rank_dropout" in lines[0], lines
        assert_rel(y_our, run(ref_model, x)[0], RTOL, "arena-path output")
    finally:
        _close(ours)


def test_emulated_device_needs_the_servers_test_switch(monkeypatch, caplog):
    monkeypatch.delenv("LYCORIS_EMULATED_DEVICE", raising=False)
    monkeypatch.setenv(devices.ENVIRONMENT, "emulated")
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        with caplog.at_level(logging.INFO, logger="swift_lycoris"):
            y_our, _ = run(our_model, inputs()[0])
        assert ours._device_path is False
        assert any("LYCORIS_EMULATED_DEVICE=1" in r.getMessage() for r in caplog.records)
        assert_rel(y_our, run(ref_model, inputs()[0])[0], RTOL, "arena-path output")
    finally:
        _close(ours)


def test_auto_on_cpu_layers_keeps_the_arena_path_silently(monkeypatch, caplog):
    monkeypatch.delenv(devices.ENVIRONMENT, raising=False)
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        with caplog.at_level(logging.INFO, logger="swift_lycoris"):
            run(our_model, inputs()[0])
        assert ours._device_path is False and ours.device_request == "auto"
        assert not [r for r in caplog.records if "path" in r.getMessage()]
    finally:
        _close(ours)


def test_cuda_request_without_cuda_says_why(monkeypatch, caplog):
    """A model on cuda:0 (faked: this machine has no GPU) asks for the CUDA device; the
    server's probe finds no driver, so the network stays on the arena path and says so."""
    monkeypatch.setenv(devices.ENVIRONMENT, "cuda:0")
    base, ref_model, lyco, our_model, ours = make_pair("lora")
    try:
        with caplog.at_level(logging.INFO, logger="swift_lycoris"):
            y_our, _ = run(our_model, inputs()[0])
        assert ours._device_path is False
        lines = [r.getMessage() for r in caplog.records if "arena path" in r.getMessage()]
        assert len(lines) == 1, lines
        expected = "the server's CUDA is unavailable" if not torch.cuda.is_available() else "cuda"
        assert expected in lines[0], lines
    finally:
        _close(ours)


def test_a_bad_device_name_is_refused(monkeypatch):
    monkeypatch.setenv(devices.ENVIRONMENT, "gpu")
    with pytest.raises(ValueError, match="SWIFT_LYCORIS_DEVICE"):
        make_pair("lora")


# MARK: kohya


def _kohya_steps(monkeypatch, device: str, steps: int = 2):
    """Losses and final adapter values of `steps` AdamW steps of kohya's flow (tiny UNet and
    text encoder, LoKr with train_norm) with swift_lycoris on `device`."""
    from test_kohya import Models

    import swift_lycoris.kohya as sk

    monkeypatch.setenv(devices.ENVIRONMENT, device)
    torch.manual_seed(0)
    te, unet = Models().copy()
    network = sk.create_network(1.0, 4, 2.0, None, te, unet, algo="lokr", train_norm="True")
    network.apply_to(te, unet, True, True)
    groups, _ = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(groups)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500])
    losses = []
    try:
        for _ in range(steps):
            network.on_step_start(te, unet)
            out = unet(x, timesteps, te(ids).last_hidden_state).sample
            loss = F.mse_loss(out, torch.zeros_like(out))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        path = network.core._device_path
        return losses, {k: v.detach().clone() for k, v in network.state_dict().items()}, path
    finally:
        network.core.close()


def test_kohya_steps_on_the_device_path_equal_the_arena_path(emulated, monkeypatch):
    losses_arena, values_arena, arena = _kohya_steps(monkeypatch, "cpu")
    losses_device, values_device, device = _kohya_steps(monkeypatch, "emulated")
    assert arena is False and isinstance(device, devices.DevicePath)
    assert device.biased, "train_norm's norm adapters (with a Δb) were not on the device path"
    for step, (a, b) in enumerate(zip(losses_device, losses_arena)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} on the device path, {b} on the arena path"
    assert set(values_device) == set(values_arena)
    for key, value in values_arena.items():
        assert_rel(values_device[key], value, 1e-4, f"{key} after the steps")
