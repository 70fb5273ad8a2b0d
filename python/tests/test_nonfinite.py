"""NaN and ±∞ name their layer: the same NonFiniteError (module, pass) on both transfers, in
training and in evaluation; nan_policy=skip_step leaves the adapters unchanged by the step
that met them (create_lycoris and the kohya network_args)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from _sl_oracle import sl

import swift_lycoris.kohya as sk


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def batch(nan_at=None) -> torch.Tensor:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    if nan_at is not None:
        x[nan_at] = float("nan")
    return x


def message(module: str, stage: str, what: str) -> str:
    return (f"swift_lycoris: non-finite values in the {stage} pass of {module}: {what} "
            f"(nan_policy=error; nan_policy=skip_step skips such steps)")


def snapshot(network) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in network.named_parameters()}


@pytest.mark.parametrize("transfer", ["activations", "weights"])
@pytest.mark.parametrize("training", [True, False])
def test_nan_input_names_the_module_and_the_forward_pass(transfer, training):
    m = model()
    network = sl.create_lycoris(m, transfer=transfer)
    try:
        network.apply_to()
        network.train(training)
        x = batch()
        x[1, 3], x[0, 0] = float("nan"), float("inf")
        with torch.set_grad_enabled(training), pytest.raises(sl.NonFiniteError) as caught:
            m(x)
        assert str(caught.value) == message("lycoris_0", "forward", "its input has 2 NaN or infinite elements")
        assert (caught.value.module, caught.value.stage) == ("lycoris_0", "forward")
        # The network keeps serving: a finite batch goes through.
        with torch.set_grad_enabled(training):
            assert torch.isfinite(m(batch())).all()
    finally:
        network.close()


@pytest.mark.parametrize("transfer", ["activations", "weights"])
def test_nan_output_gradient_names_the_module_and_the_backward_pass(transfer):
    m = model()
    network = sl.create_lycoris(m, transfer=transfer)
    try:
        network.apply_to()
        y = m(batch())
        with pytest.raises(sl.NonFiniteError) as caught:
            (y * float("nan")).sum().backward()
        assert str(caught.value) == message("lycoris_2", "backward", "the gradient of its output is not finite")
        m(batch()).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in network.parameters())
    finally:
        network.close()


@pytest.mark.parametrize("transfer", ["activations", "weights"])
def test_nan_parameter_names_the_module_and_the_key(transfer):
    m = model()
    network = sl.create_lycoris(m, transfer=transfer)
    try:
        network.apply_to()
        with torch.no_grad():
            network.adapters["lycoris_2"].get("lora_down.weight")[0, 1] = float("nan")
        with pytest.raises(sl.NonFiniteError) as caught:
            m(batch())
        assert str(caught.value) == message("lycoris_2", "forward",
                                            "parameter lycoris_2.lora_down.weight has 1 NaN or infinite elements")
    finally:
        network.close()


def training_step(m, network, optimizer, x, loss_scale=1.0):
    optimizer.zero_grad(set_to_none=True)
    (m(x).square().mean() * loss_scale).backward()
    optimizer.step()


@pytest.mark.parametrize("transfer", ["activations", "weights"])
def test_skip_step_leaves_the_adapters_unchanged_and_training_goes_on(transfer, caplog):
    m = model()
    network = sl.create_lycoris(m, transfer=transfer, nan_policy="skip_step")
    try:
        network.apply_to()
        with torch.no_grad():  # lora_up starts at 0: make every parameter receive gradients
            for p in network.parameters():
                p.add_(0.1)
        optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
        training_step(m, network, optimizer, batch())
        before = snapshot(network)
        with caplog.at_level(logging.WARNING, logger="swift_lycoris"):
            training_step(m, network, optimizer, batch(nan_at=(0, 2)))  # a NaN input
            assert all(p.grad is None for p in network.parameters())
            assert all(torch.equal(before[k], p) for k, p in network.named_parameters()), "a NaN input changed the adapters"
            training_step(m, network, optimizer, batch(), loss_scale=float("inf"))  # a non-finite output gradient
            assert all(torch.equal(before[k], p) for k, p in network.named_parameters()), "an inf gradient changed them"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings[0] == ("swift_lycoris: non-finite values in the forward pass of lycoris_0: its input has 1 NaN or "
                               "infinite elements — skipping this step (nan_policy=skip_step)")
        # The first module whose output gradient arrives non-finite: the last layer on the
        # activation path (layer by layer), the first of the step's ΔW group on the weight path.
        first = "lycoris_2" if transfer == "activations" else "lycoris_0"
        assert any(f"in the backward pass of {first}: the gradient of its output is not finite" in w for w in warnings)
        # A parameter made non-finite goes back to its last finite value at the next forward.
        with torch.no_grad():
            network.adapters["lycoris_0"].get("lora_up.weight")[1, 1] = float("inf")
        training_step(m, network, optimizer, batch())
        after = snapshot(network)
        assert all(torch.isfinite(p).all() for p in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before), "a finite step must train again"
    finally:
        network.close()


def test_kohya_network_args_nan_policy():
    class Transformer2DModel(nn.Module):  # a class name the default preset targets
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    def root():
        r = nn.Module()
        torch.manual_seed(0)
        r.block = Transformer2DModel()
        return r

    assert sk.NetworkArgs.parse(4, 1, None, {}).nan_policy == "error"
    assert sk.NetworkArgs.parse(4, 1, None, {"nan_policy": "Skip_Step"}).nan_policy == "skip_step"
    with pytest.raises(ValueError, match="nan_policy must be one of error, skip_step, not 'sometimes'"):
        sk.NetworkArgs.parse(4, 1, None, {"nan_policy": "sometimes"})
    unet = root()
    network = sk.create_network(1.0, 4, 1.0, None, None, unet, nan_policy="skip_step")
    try:
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        assert network.core.nan_policy == "skip_step" and network.target_names == ["lora_unet_block_proj"]
        y = unet.block(batch(nan_at=(1, 1)))  # skipped: no error
        assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    finally:
        network.close()
    strict_unet = root()
    network = sk.create_network(1.0, 4, 1.0, None, None, strict_unet)
    try:
        network.apply_to(None, strict_unet, apply_text_encoder=False, apply_unet=True)
        with pytest.raises(sl.NonFiniteError, match="forward pass of lora_unet_block_proj: its input has 1 NaN"):
            strict_unet.block(batch(nan_at=(1, 1)))
    finally:
        network.close()


def test_create_lycoris_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="nan_policy must be one of error, skip_step, not 'ignore'"):
        sl.create_lycoris(model(), nan_policy="ignore")
