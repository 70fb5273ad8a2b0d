"""Inference: evaluation ΔWs kept between no-grad calls, the generic wrapper's
onfly_merge/onfly_restore, and gen_img.py's --network_pre_calc sequence on the kohya network
(backup_weights once; per generation set_multiplier, restore_weights, pre_calculation)."""

from __future__ import annotations

import pytest
import torch

from _sl_oracle import assert_rel, base_model, inputs, randomize_ours
from test_kohya import Models, run
from test_weight_batch import _MethodCounter

import swift_lycoris as sl
import swift_lycoris.kohya as sk

RTOL = 1e-5


def test_evaluation_deltas_are_fetched_once():
    """Eval mode without gradients: every layer takes the weight path, each module's ΔW is
    fetched once and kept until a parameter, the multiplier or the mode changes."""
    model = base_model()
    network = sl.create_lycoris(model, 1.0, 4, 1.0, algo="loha", threads=1)
    counter = _MethodCounter(network)
    try:
        randomize_ours(network, seed=3)
        network.apply_to()
        network.eval()
        x, _ = inputs()
        with torch.no_grad():
            counter.take()
            first = model(x)
            calls = counter.take()
            assert calls.get("delta_weight") == len(network.modules_info) and "forward" not in calls, calls
            assert_rel(model(x), first, 0, "second call")
            assert counter.take() == {}, "the second no-grad call reached the server"
            network.set_multiplier(0.5)
            half = model(x)
            assert counter.take().get("delta_weight") == len(network.modules_info)
        # The same with gradients (a fresh fetch with tapes, nothing kept).
        assert_rel(half, model(x).detach(), RTOL, "kept ΔWs at multiplier 0.5")
        network.set_multiplier(1.0)
        assert_rel(first, model(x).detach(), RTOL, "kept ΔWs at multiplier 1")
    finally:
        network.close()


def test_onfly_merge_and_restore():
    model = base_model()
    x, _ = inputs()
    with torch.no_grad():
        plain = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    network = sl.create_lycoris(model, 0.7, 4, 1.0, algo="lora", threads=1)
    counter = _MethodCounter(network)
    try:
        randomize_ours(network, seed=3)
        network.apply_to()
        network.eval()
        with torch.no_grad():
            adapted = model(x)
            assert (adapted - plain).abs().max() > 1e-2 * plain.abs().max()
            network.onfly_merge()
            with pytest.raises(RuntimeError, match="already merged"):
                network.onfly_merge()
            counter.take()
            assert_rel(model(x), adapted, RTOL, "merged on the fly")
            assert counter.take() == {}, "a merged model called the server"
            network.onfly_restore()
            for name, p in model.named_parameters():
                assert torch.equal(p, weights[name]), f"{name} not restored"
            assert_rel(model(x), adapted, RTOL, "adapters again after onfly_restore")
    finally:
        network.close()


def test_gen_img_pre_calc_sequence():
    models = Models()
    te, unet = models.copy()
    network, _ = None, None
    network = sk.create_network(1.0, 4, 2.0, None, te, unet, train_norm="true")
    network.apply_to(te, unet, True, True)
    randomize_ours(network, seed=3, std=0.2)
    network.eval()
    originals = {n: p.detach().clone() for n, p in unet.named_parameters()}
    counter = _MethodCounter(network.core)
    try:
        expected = {}
        for multiplier in (0.5, 1.0):
            network.set_multiplier(multiplier)
            expected[multiplier] = run(te, unet, grad=False)
        network.backup_weights()
        for multiplier in (0.5, 1.0, 0.5):
            network.set_multiplier(multiplier)
            network.restore_weights()
            network.pre_calculation()
            counter.take()
            got = run(te, unet, grad=False)
            assert counter.take() == {}, "generation after pre_calculation called the server"
            for what in ("te", "unet"):
                assert_rel(got[what], expected[multiplier][what], RTOL, f"pre-calculated {what} at {multiplier}")
        network.restore_weights()
        for name, p in unet.named_parameters():
            assert torch.equal(p, originals[name]), f"{name} not restored"
        assert_rel(run(te, unet, grad=False)["unet"], expected[0.5]["unet"], RTOL, "adapters again after restore")
    finally:
        network.core.close()
