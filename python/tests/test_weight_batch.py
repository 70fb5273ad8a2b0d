"""The weight path's batching (transfer="weights"): after a parameter change, one
``delta_weight`` call fetches every weight-path module's m·ΔW through one autograd Function
and one ``delta_weight_backward`` call returns all their gradients. These tests train a few
steps side by side with LyCORIS 4.1.3 and check the values and the calls: modules used
twice, modules not used in a step, gradient checkpointing (both kinds), retain_graph, and a
change to one module's parameters only."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import copy

import lycoris
from _sl_oracle import (assert_grads_match, assert_rel, copy_lycoris_into_ours, inputs, lycoris_gradients, make_pair,
                        our_parameters, randomize_lycoris, sgd_step)

import swift_lycoris as sl

RTOL = 1e-5
LR = 0.05


class _MethodCounter:
    """Counts the server calls of one network by method (JSON, encoded or binary records)."""

    def __init__(self, network):
        self.counts: dict[str, int] = {}
        server = network.server
        self._call, self._call_encoded, self._call_record = server.call, server.call_encoded, server.call_record
        network.server.call = self
        network.server.call_encoded = self.encoded
        network.server.call_record = self.record

    def record(self, method, template, *values):
        self.counts[method] = self.counts.get(method, 0) + 1
        return self._call_record(method, template, *values)

    def __call__(self, method, params=None):
        self.counts[method] = self.counts.get(method, 0) + 1
        return self._call(method, params)

    def encoded(self, method, template, *values):
        self.counts[method] = self.counts.get(method, 0) + 1
        return self._call_encoded(method, template, *values)

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


def _sgd_step(*networks) -> None:
    sgd_step(*networks, lr=LR)


def _pending(network) -> int:
    gc.collect()
    network.release_orphaned_tapes()
    return network.server.call("network.info")["pending_tapes"]


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_training_steps_match_lycoris_with_one_call_each_way(algo):
    """Three SGD steps through the weight path equal LyCORIS's; from the second step on,
    each step is one delta_weight and one delta_weight_backward call for all 8 modules."""
    base, ref_model, lyco, our_model, ours = make_pair(algo, transfer="weights")
    counter = _MethodCounter(ours)
    try:
        x, upstream = inputs()
        for step in range(3):
            y_ref = ref_model(x)
            (y_ref * upstream).sum().backward()
            y_our = our_model(x)
            (y_our * upstream).sum().backward()
            assert_rel(y_our, y_ref.detach(), RTOL, f"step {step} output")
            assert_grads_match(lyco, ours, RTOL, f"step {step} ")
            calls = counter.take()
            if step > 0:
                assert calls.get("delta_weight") == 1, f"step {step}: {calls}"
                assert calls.get("delta_weight_backward") == 1, f"step {step}: {calls}"
                assert "forward" not in calls and "backward" not in calls, f"step {step}: {calls}"
            del y_our
            _sgd_step(lyco, ours)
        assert _pending(ours) == 0
    finally:
        ours.close()


def test_gradient_accumulation_batches_every_micro_step():
    """Micro-batches without a parameter change between them (no optimizer step, no
    on_step_start): each still makes one delta_weight and one delta_weight_backward call,
    and the accumulated gradients are LyCORIS's."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="weights")
    counter = _MethodCounter(ours)
    try:
        x, upstream = inputs()
        for model in (ref_model, our_model):  # the first forward discovers the modules one by one
            (model(x) * upstream).sum().backward()
        for micro in range(3):
            counter.take()
            for model in (ref_model, our_model):
                (model(x[micro % 2:micro % 2 + 1]) * upstream[micro % 2:micro % 2 + 1]).sum().backward()
            calls = counter.take()
            assert calls.get("delta_weight") == 1 and calls.get("delta_weight_backward") == 1, f"micro {micro}: {calls}"
        assert_grads_match(lyco, ours, RTOL, "accumulated ")
        assert _pending(ours) == 0
    finally:
        ours.close()


class Twice(nn.Module):
    """`fc` applied twice and `skip` used only when asked: a module called several times per
    step, and one that a step may not use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.skip = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.use_skip = True

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = self.fc(h)
        if self.use_skip:
            h = h + self.skip(x)
        return self.out(h)


def _twice_pair():
    torch.manual_seed(5)
    base = Twice()
    ref_model, our_model = copy.deepcopy(base), copy.deepcopy(base)
    lyco = lycoris.create_lycoris(ref_model, 1.0, 2, 1.0, algo="lora")
    ours = sl.create_lycoris(our_model, 1.0, 2, 1.0, algo="lora", threads=1, transfer="weights")
    randomize_lycoris(lyco, seed=7, std=0.3)
    copy_lycoris_into_ours(lyco, ours)
    lyco.apply_to()
    ours.apply_to()
    return ref_model, lyco, our_model, ours


def test_module_called_twice_and_module_unused():
    """A module called twice in one forward gets a call of its own for its second use; a
    batched module a step does not use gets no gradient (as in LyCORIS) and its tape goes
    with the graph."""
    ref_model, lyco, our_model, ours = _twice_pair()
    try:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
        for step, use_skip in enumerate([True, True, False, True]):
            ref_model.use_skip = our_model.use_skip = use_skip
            y_ref = ref_model(x)
            y_ref.square().sum().backward()
            y_our = our_model(x)
            y_our.square().sum().backward()
            assert_rel(y_our, y_ref.detach(), RTOL, f"step {step} output")
            theirs = lycoris_gradients(lyco)
            for module, params in our_parameters(ours).items():
                for key, p in params.items():
                    if theirs[module][key] is None:
                        assert p.grad is None, f"step {step}: {module}.{key} has a gradient LyCORIS does not"
                    else:
                        assert_rel(p.grad, theirs[module][key], RTOL, f"step {step} ∂{module}.{key}")
            del y_our
            _sgd_step(lyco, ours)
        assert _pending(ours) == 0
    finally:
        ours.close()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_through_the_weight_path(reentrant):
    """Checkpointing re-runs forwards inside backward (recomputations make calls of their own,
    never a batch): gradients over two steps equal the plain run's, and no tape is left."""
    results = []
    for checkpointed in (False, True):
        base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="weights")
        try:
            x, upstream = inputs()
            grads = []
            for step in range(2):
                xr = x.clone().requires_grad_(True)
                if checkpointed:
                    y = torch.utils.checkpoint.checkpoint(our_model, xr, use_reentrant=reentrant)
                else:
                    y = our_model(xr)
                (y * upstream).sum().backward()
                grads.append((xr.grad.clone(), {n: p.grad.clone() for n, p in ours.named_parameters()}))
                del y
                _sgd_step(ours)
            assert _pending(ours) == 0
            results.append(grads)
        finally:
            ours.close()
    for step, ((plain_x, plain), (ckpt_x, ckpt)) in enumerate(zip(*results)):
        assert_rel(ckpt_x, plain_x, RTOL, f"step {step} checkpointed ∂x")
        for name, grad in plain.items():
            assert_rel(ckpt[name], grad, RTOL, f"step {step} checkpointed ∂{name}")


def test_retain_graph_runs_the_batch_backward_twice():
    base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="weights")
    try:
        x, upstream = inputs()
        for _ in range(2):  # the second step is batched
            _sgd_step(ours)
            y = (our_model(x) * upstream).sum()
            y.backward(retain_graph=True)
            first = {n: p.grad.clone() for n, p in ours.named_parameters()}
            y.backward()
            for n, p in ours.named_parameters():
                assert_rel(p.grad, 2 * first[n], RTOL, f"second backward ∂{n}")
            del y
        assert _pending(ours) == 0
    finally:
        ours.close()


def test_a_change_to_one_module_reaches_the_batch():
    """After a step start (prefetch dropped), a change to a late module's parameters only is
    in the batch the first module's forward fetches: the step's ΔWs come in one call."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="weights")
    counter = _MethodCounter(ours)
    try:
        x, upstream = inputs()
        for model in (ref_model, our_model):
            (model(x) * upstream).sum().backward()
        ours.drop_prefetched()
        last = "lycoris_head_2"  # the last layer the forward reaches
        theirs = dict(next(lora for lora in lyco.loras if lora.lora_name == last).named_parameters())
        with torch.no_grad():
            for key, p in our_parameters(ours)[last].items():
                p.mul_(1.5)
                theirs[key].mul_(1.5)
        counter.take()
        y_ref, y_our = ref_model(x), our_model(x)
        assert_rel(y_our, y_ref.detach(), RTOL, f"output after changing {last} only")
        assert counter.take().get("delta_weight") == 1
    finally:
        ours.close()


def test_load_state_dict_with_assign_reaches_the_server():
    """load_state_dict(assign=True) replaces the Parameter objects: the next forward must use
    the new values (LyCORIS given the same values agrees)."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="weights")
    try:
        x, upstream = inputs()
        our_model(x)
        state = {key: 1.5 * value for key, value in ours.state_dict().items()}
        ours.load_state_dict(state, assign=True)
        with torch.no_grad():
            for lora in lyco.loras:
                for p in lora.parameters():
                    p.mul_(1.5)
        assert_rel(our_model(x), ref_model(x).detach(), RTOL, "output after load_state_dict(assign=True)")
    finally:
        ours.close()


@pytest.mark.parametrize("algo,rank,path", [("lora", 4, "activations"), ("loha", 32, "weights")])
def test_auto_transfer_counts_the_servers_work(algo, rank, path):
    """A wide Linear (|W| = 2^20) on 16 rows: LoRA's factor path makes the activations the
    cheaper transfer; LoHa r32 has none (factor_path false: its rank-r² chain costs
    1024·2048 > 1024·1024 per row, so the server would compute three op(x, ΔW)), so ΔW
    crosses instead. The costs are injected (a multiply-add as dear as a copy;
    test_transfer_choice.py covers the measured ones)."""
    from swift_lycoris.calibration import TransferCosts

    model = nn.Sequential(nn.Linear(1024, 1024))
    network = sl.create_lycoris(model, 1.0, rank, 1.0, algo=algo, threads=1)
    network.transfer_costs = TransferCosts(round_trip=150e-6, copy=1e-9, multiply_add=1e-9)
    counter = _MethodCounter(network)
    try:
        assert network.modules_info["lycoris_0"]["factor_path"] is (algo == "lora")
        network.apply_to()
        counter.take()
        model(torch.randn(16, 1024)).sum().backward()
        calls = counter.take()
        used = "weights" if "delta_weight" in calls else "activations" if "forward" in calls else None
        assert used == path, calls
    finally:
        network.close()


def test_groups_are_bounded_in_bytes(monkeypatch):
    """With a small group budget a step's ΔWs come in several groups (one delta_weight and
    one delta_weight_backward call each), greedily in the order of first use; values stay
    LyCORIS's."""
    import swift_lycoris.network as network_module

    base, ref_model, lyco, our_model, ours = make_pair("loha", transfer="weights")
    counter = _MethodCounter(ours)
    try:
        x, upstream = inputs()
        for model in (ref_model, our_model):  # the first step discovers the order of use
            (model(x) * upstream).sum().backward()
        _sgd_step(lyco, ours)
        sizes = [ours._delta_bytes(n) for n in ours._weight_order]
        budget = max(sizes) + min(sizes)  # every module fits; not all of them together
        monkeypatch.setattr(network_module, "_DELTA_GROUP_BYTES", budget)
        groups, size = 1, 0
        for nbytes in sizes:
            if size and size + nbytes > budget:
                groups, size = groups + 1, 0
            size += nbytes
        assert 1 < groups < len(sizes)
        counter.take()
        y_ref = ref_model(x)
        (y_ref * upstream).sum().backward()
        y_our = our_model(x)
        (y_our * upstream).sum().backward()
        calls = counter.take()
        assert calls.get("delta_weight") == groups and calls.get("delta_weight_backward") == groups, (groups, calls)
        assert_rel(y_our, y_ref.detach(), RTOL, "grouped output")
        assert_grads_match(lyco, ours, RTOL, "grouped ")
        del y_our
        assert _pending(ours) == 0
    finally:
        ours.close()
