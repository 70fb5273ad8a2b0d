"""transfer="auto" chooses activations or weights per call from the costs measured on this
machine (swift_lycoris.calibration), shows the choice in modules_info[name]["transfer"] and a
debug log line. Oracle: injected costs whose choice is worked out by hand below, and the
calls the client actually made."""

from __future__ import annotations

import logging
import math

import torch

from _sl_oracle import sl
from swift_lycoris import calibration

# Linear 64→64 (|W| = 4096) on x (1, 2, 64): |x| + |y| = 256 elements.
IN, OUT, TOKENS = 64, 64, 2


def _network(algo="lora", rank=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT))
    network = sl.create_lycoris(model, 1.0, rank, 1.0, algo=algo, threads=1)
    network.apply_to()
    return model, network


def _step(model, network):
    """One training step's forward + backward; the methods the client called."""
    methods = []
    checked = network._checked_call
    network._checked_call = lambda method, params, *values: (methods.append(method), checked(method, params, *values))[1]
    server_call = network.server.call
    network.server.call = lambda method, params=None: (methods.append(method), server_call(method, params))[1]
    try:
        model(torch.randn(1, TOKENS, IN)).sum().backward()
    finally:
        network._checked_call = checked
        network.server.call = server_call
    return methods


def test_the_choice_follows_injected_costs(caplog):
    model, network = _network()
    (name,) = network.modules_info
    try:
        # Free round trips: activations cost 3·256 copies and 3 passes of the LoRA r4 factor
        # path (4·64 + 64·4 = 512 multiply-adds per position, 2 positions); weights 3·4096
        # copies and torch's ∂W (2·4096 multiply-adds) → activations.
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=1e-9, multiply_add=1e-12)
        with caplog.at_level(logging.DEBUG, logger="swift_lycoris"):
            methods = _step(model, network)
        assert "forward" in methods and "delta_weight" not in methods
        assert network.modules_info[name]["transfer"] == "activations"
        assert network.modules_info[name]["factor_multiply_adds"] == 512
        costs = network.modules_info[name]["transfer_costs_ms"]
        assert math.isclose(costs["activations"], (3 * 256 * 1e-9 + 3 * TOKENS * 512 * 1e-12) * 1e3)
        assert math.isclose(costs["weights"], (3 * 4096 * 1e-9 + TOKENS * 4096 * 1e-12) * 1e3)
        assert any(f"{name} takes the activations transfer" in r.getMessage() for r in caplog.records)
        # A round trip of 1 ms outweighs 3·(4096 − 256) ns of copies → weights.
        network.transfer_costs = calibration.TransferCosts(round_trip=1e-3, copy=1e-9, multiply_add=1e-12)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="swift_lycoris"):
            methods = _step(model, network)
        assert "delta_weight" in methods and "forward" not in methods
        assert network.modules_info[name]["transfer"] == "weights"
        assert any(f"{name} takes the weights transfer" in r.getMessage() for r in caplog.records)
    finally:
        network.close()


def test_the_server_multiply_adds_count_without_a_factor_path():
    """LoHa r8 on 64→64 has no cheaper factor path (its rank-r² chain costs
    64·(64 + 64) > 64·64 per position): the server's op(x, ΔW), ∂x and ∂ΔW (3·2·4096
    multiply-adds) against torch's one ∂W (2·4096) tip a choice that copies alone would make
    for activations."""
    model, network = _network("loha", rank=8)
    (name,) = network.modules_info
    try:
        assert network.modules_info[name]["factor_path"] is False
        assert network.modules_info[name]["factor_multiply_adds"] is None
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=1e-9, multiply_add=0.0)
        _step(model, network)
        assert network.modules_info[name]["transfer"] == "activations"
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=1e-9, multiply_add=1e-9)
        _step(model, network)
        assert network.modules_info[name]["transfer"] == "weights"
        costs = network.modules_info[name]["transfer_costs_ms"]
        assert math.isclose(costs["activations"], (3 * 256 * 1e-9 + 3 * TOKENS * 4096 * 1e-9) * 1e3)
        assert math.isclose(costs["weights"], (3 * 4096 * 1e-9 + TOKENS * 4096 * 1e-9) * 1e3)
    finally:
        network.close()


def test_the_weight_gradient_torch_computes_counts():
    """LoRA r4 on 64→64 with 64 tokens: the weight path's copies (3·4096) cost less than the
    activations' (3·64·128), which the old copies-only rule took for the answer; but on the
    weight path torch computes ∂W of op(x, W0 + ΔW) — 64·4096 multiply-adds — where the
    server's factor path costs 3·64·512: with a multiply-add as dear as a copy the
    activations win (122,880 against 274,432 ns), and only with free arithmetic the weights."""
    model, network = _network()
    (name,) = network.modules_info
    try:
        x = torch.randn(1, 64, IN)
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=1e-9, multiply_add=1e-9)
        model(x).sum().backward()
        assert network.modules_info[name]["transfer"] == "activations"
        costs = network.modules_info[name]["transfer_costs_ms"]
        assert math.isclose(costs["activations"], 122_880e-9 * 1e3)
        assert math.isclose(costs["weights"], 274_432e-9 * 1e3)
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=1e-9, multiply_add=0.0)
        model(x).sum().backward()
        assert network.modules_info[name]["transfer"] == "weights"
    finally:
        network.close()


def test_costs_are_measured_at_the_first_choice():
    model, network = _network()
    try:
        assert network.transfer_costs is None
        _step(model, network)
        costs = network.transfer_costs
        assert isinstance(costs, calibration.TransferCosts)
        for value in (costs.round_trip, costs.copy, costs.multiply_add):
            assert 0 < value < 1, costs
        # A round trip (pipe, JSON, two wake-ups) costs more than copying one float.
        assert costs.round_trip > costs.copy
        (name,) = network.modules_info
        assert network.modules_info[name]["transfer"] in ("activations", "weights")
    finally:
        network.close()


def test_observed_activation_calls_replace_the_estimate():
    """With every injected cost zero the estimates tie and the activations are taken (the
    weights only when strictly cheaper). From the second observation on (the first pays
    one-time costs) the fastest observed activation-path forward + backward (two server
    calls) stands for the activations' cost and the fastest observed forward of the layer
    for the weights' ∂W — real times, both above zero — and the choice follows them."""
    model, network = _network()
    (name,) = network.modules_info
    key = (name, (1, TOKENS, IN))
    try:
        network.transfer_costs = calibration.TransferCosts(round_trip=0.0, copy=0.0, multiply_add=0.0)
        for _ in range(2):
            methods = _step(model, network)
            assert "forward" in methods and "delta_weight" not in methods
            assert network.modules_info[name]["activations_observed"] is False
        count, server_calls = network._observed_activations[key]
        operations, operation = network._observed_operations[key]
        assert count == 2 and operations == 2 and server_calls > 0 and operation > 0
        methods = _step(model, network)
        weights = operation < server_calls
        assert ("delta_weight" in methods) is weights and ("forward" in methods) is not weights
        info = network.modules_info[name]
        assert info["transfer"] == ("weights" if weights else "activations")
        assert info["activations_observed"] and info["gradient_observed"]
        assert math.isclose(info["transfer_costs_ms"]["activations"], server_calls * 1e3)
        assert math.isclose(info["transfer_costs_ms"]["weights"], operation * 1e3)
    finally:
        network.close()


def test_the_weight_paths_forward_is_observed_as_the_cost_of_dw():
    """On the weight path the layer's op(x, W0 + ΔW) is timed too: from the second step the
    weights' cost is 3·|W| copies plus its fastest observed forward instead of P·|W|
    multiply-adds at the calibrated rate (here an absurd 1 ms each, 8 s for the step's ∂W,
    which the observation must replace)."""
    model, network = _network()
    (name,) = network.modules_info
    try:
        # A round trip of 10 s keeps the activations out (20 s against 8.2 s).
        network.transfer_costs = calibration.TransferCosts(round_trip=10.0, copy=1e-9, multiply_add=1e-3)
        for _ in range(2):
            assert "delta_weight" in _step(model, network)
        assert network.modules_info[name]["gradient_observed"] is False
        assert network.modules_info[name]["transfer_costs_ms"]["weights"] > TOKENS * 4096 * 1e-3 * 1e3
        operations, operation = network._observed_operations[(name, (1, TOKENS, IN))]
        assert operations == 2 and 0 < operation < 1.0
        assert "delta_weight" in _step(model, network)
        info = network.modules_info[name]
        assert info["gradient_observed"] is True
        assert math.isclose(info["transfer_costs_ms"]["weights"], (3 * 4096 * 1e-9 + operation) * 1e3)
    finally:
        network.close()
