"""The per-call path's transport (issue 9 part 5): outputs written by the server straight
into the tensor torch gets (an arena block that lives as long as the tensor), inputs that
already lie in the arena sent in place, orphaned tapes released in the write of the next
request, and requests encoded once (RequestTemplate). The oracle is LoRA's
m·Δ(x) = m·(α/r)·x·Aᵀ·Bᵀ computed in torch from the same parameters."""

from __future__ import annotations

import gc
import json
import struct

import torch
from torch import nn

from _sl_oracle import sl
from swift_lycoris import call_record
from swift_lycoris import server as server_module
from swift_lycoris.server import RequestTemplate, Slot

RANK, ALPHA, MULTIPLIER = 4, 2.0, 0.75


def _network(features: int = 16):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(features, features)).requires_grad_(False)
    network = sl.create_lycoris(model, MULTIPLIER, RANK, ALPHA, algo="lora", transfer="activations", threads=1)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(std=0.3)
    network.apply_to()
    network.train()
    (name,) = network.modules_info
    return model, network, name


def _expected(network, name, x):
    holder = network.adapters[name]
    down, up = holder.get("lora_down.weight"), holder.get("lora_up.weight")
    return MULTIPLIER * ALPHA / RANK * (x @ down.detach().T @ up.detach().T)


def _in_arena(network, tensor) -> bool:
    arena = network.arena
    return arena._base <= tensor.data_ptr() < arena._base + arena.size


def _delta(network, name, x):
    with torch.no_grad():
        return network.adapter_delta(name, x, torch.empty(*x.shape[:-1], 16))


def test_outputs_are_written_into_the_returned_tensor_and_reused_only_once_freed():
    _, network, name = _network()
    try:
        x1, x2 = torch.randn(3, 16), torch.randn(3, 16)
        d1 = _delta(network, name, x1)
        assert _in_arena(network, d1), "the output was copied out of the arena"
        torch.testing.assert_close(d1, _expected(network, name, x1), rtol=1e-5, atol=1e-6)
        kept = d1.clone()
        d2 = _delta(network, name, x2)
        assert d2.data_ptr() != d1.data_ptr(), "a live output's block was handed out again"
        torch.testing.assert_close(d1, kept, rtol=0, atol=0)
        torch.testing.assert_close(d2, _expected(network, name, x2), rtol=1e-5, atol=1e-6)
        address = d1.data_ptr()
        view = d1[1:]  # a view keeps the block too
        del d1
        d3 = _delta(network, name, x2)
        assert d3.data_ptr() != address
        torch.testing.assert_close(view, kept[1:], rtol=0, atol=0)
    finally:
        network.close()


def test_a_freed_block_is_reused():
    _, network, name = _network()
    try:
        x = torch.randn(5, 16)
        first = _delta(network, name, x)
        address = first.data_ptr()
        del first
        second = _delta(network, name, x)
        assert second.data_ptr() == address
        torch.testing.assert_close(second, _expected(network, name, x), rtol=1e-5, atol=1e-6)
    finally:
        network.close()


def test_an_input_already_in_the_arena_is_sent_in_place(monkeypatch):
    _, network, name = _network()
    sent = []  # the input offset of each call, from the binary record or the JSON request
    checked = network._checked_call

    def spy(method, template, *values):
        encoded = template.fill(0, values)
        if isinstance(template, call_record.RecordTemplate):
            sent.append(struct.unpack_from("<Q", encoded, 24)[0])  # forward's input.offset
        else:
            sent.append(json.loads(encoded)["params"]["calls"][0]["input"]["offset"])
        return checked(method, template, *values)

    monkeypatch.setattr(network, "_checked_call", spy)
    try:
        y = _delta(network, name, torch.randn(4, 16))
        assert _in_arena(network, y)
        sent.clear()
        z = _delta(network, name, y)
        assert sent[0] == y.data_ptr() - network.arena._base, "the arena input was copied"
        torch.testing.assert_close(z, _expected(network, name, y.clone()), rtol=1e-5, atol=1e-6)
        # A non-contiguous view of an arena tensor is copied (its elements are not one span).
        rows = y[::2]
        sent.clear()
        t = _delta(network, name, rows)
        assert sent[0] != rows.data_ptr() - network.arena._base
        torch.testing.assert_close(t, _expected(network, name, rows.clone()), rtol=1e-5, atol=1e-6)
    finally:
        network.close()


def test_live_outputs_survive_the_arena_growing():
    _, network, name = _network()
    try:
        x = torch.randn(4, 16)
        kept = _delta(network, name, x)
        copy = kept.clone()
        old_size = network.arena.size
        network.arena.ensure(old_size * 4)
        assert network.arena.size >= old_size * 4
        after = _delta(network, name, x)
        torch.testing.assert_close(kept, copy, rtol=0, atol=0)
        torch.testing.assert_close(after, _expected(network, name, x), rtol=1e-5, atol=1e-6)
    finally:
        network.close()


def test_training_step_gradients_match_torch():
    model, network, name = _network()
    try:
        x = torch.randn(6, 16, requires_grad=True)
        g = torch.randn(6, 16)
        model(x).backward(g)
        holder = network.adapters[name]
        down = holder.get("lora_down.weight").detach().clone().requires_grad_(True)
        up = holder.get("lora_up.weight").detach().clone().requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        (model[0].__class__.forward(model[0], x_ref) + MULTIPLIER * ALPHA / RANK * (x_ref @ down.T @ up.T)).backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(holder.get("lora_down.weight").grad, down.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(holder.get("lora_up.weight").grad, up.grad, rtol=1e-5, atol=1e-6)
    finally:
        network.close()


def test_orphaned_tapes_travel_in_the_next_requests_write(monkeypatch):
    model, network, _ = _network()
    writes = []
    real_write = server_module.os.write

    def counting(fd, data):
        if fd == network.server._stdin:
            writes.append(bytes(data))
        return real_write(fd, data)

    try:
        x, g = torch.randn(2, 16, requires_grad=True), torch.randn(2, 16)
        model(x).backward(g)  # step 1: its graph is freed after backward, its tape orphaned
        gc.collect()
        assert len(network._orphaned_tapes) == 1
        (tape,) = network._orphaned_tapes
        monkeypatch.setattr(server_module.os, "write", counting)
        model(x).backward(g)  # step 2: forward + backward, two writes, the release in the first
        monkeypatch.undo()
        assert len(writes) == 2, [w[:60] for w in writes]
        if network.server.call_records:
            release = call_record.tapes_release([tape])
            assert writes[0].startswith(release), writes[0][:40]
            request = writes[0][len(release):]
            assert request[0] == call_record.MAGIC and request[2] == call_record.FORWARD, request[:16]
        else:
            release, request = writes[0].split(b"\n", 1)
            assert json.loads(release) == {"jsonrpc": "2.0", "method": "tapes.release", "params": {"tapes": [tape]}}
            assert json.loads(request)["method"] == "forward"
        gc.collect()
        # Step 1's tape is gone on the server; step 2's is pending until the next request.
        assert network.server.call("tapes.release", {"tapes": []})["pending"] == 1
    finally:
        network.close()


def test_request_template_encodes_like_json():
    params = {"calls": [{"module": "a%b \"q\" é", "input": {"dtype": "F32", "shape": [1, 2], "offset": Slot(1)},
                         "output": {"offset": Slot(0), "dtype": "F32"}, "tape": Slot(2)}], "grad": True}
    text = RequestTemplate("forward", params).fill(41, (640, 128, 7))
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    expected = json.loads(json.dumps(params))
    expected["calls"][0]["input"]["offset"], expected["calls"][0]["output"]["offset"] = 128, 640
    expected["calls"][0]["tape"] = 7
    assert json.loads(text) == {"jsonrpc": "2.0", "id": 41, "method": "forward", "params": expected}


def test_blocks_never_overlap_and_freeing_everything_returns_the_layout_to_zero():
    """The allocator alone (no server): random sizes, random frees, some through the queue
    output finalizers use; live blocks never overlap, and with all freed the top is 0."""
    import random

    from swift_lycoris.arena import Arena

    arena = Arena.__new__(Arena)
    arena._top, arena._free, arena._scratch, arena._returned, arena.size = 0, [], [], [], 1 << 40
    arena.ensure = lambda size: None
    rng = random.Random(5)
    live: dict[int, int] = {}
    high = 0
    for _ in range(4000):
        if live and rng.random() < 0.48:
            offset = rng.choice(list(live))
            block = (offset, live.pop(offset))
            if rng.random() < 0.5:
                arena._returned.append(block)
            else:
                arena._give_back(*block)
        else:
            nbytes = rng.choice([1, 64, 100, 4096, 5000, 1 << 16])
            offset, size = arena._block(nbytes)
            assert size >= nbytes and offset % 64 == 0 and size % 64 == 0
            assert all(offset + size <= o or o + s <= offset for o, s in live.items()), "overlapping blocks"
            live[offset] = size
        high = max(high, sum(live.values()))
        assert arena._top <= 4 * high + (1 << 16), "the layout grows past what is alive (no reuse)"
    for block in list(live.items()):
        arena._give_back(*block)
    arena._block(1)  # drains the queue
    assert arena._top == 64 and arena._free == []


def test_a_training_steps_delta_weight_is_written_in_place_and_an_evaluation_one_copied():
    _, network, name = _network()
    try:
        holder = network.adapters[name]
        expected = MULTIPLIER * ALPHA / RANK * (holder.get("lora_up.weight").detach() @ holder.get("lora_down.weight").detach())
        network.sync()  # (weight_delta syncs before it fetches; this calls the fetch itself)
        (delta,), tape = network._fetch_delta_weights([name], keep_tapes=True)[name]
        network._orphaned_tapes.append(tape)
        assert _in_arena(network, delta), "a training step's ΔW was copied out"
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        (kept,), _ = network._fetch_delta_weights([name], keep_tapes=False)[name]
        assert not _in_arena(network, kept), "an evaluation ΔW (kept until the parameters change) lies in the arena"
        torch.testing.assert_close(kept, expected, rtol=1e-5, atol=1e-6)
    finally:
        network.close()


def test_inputs_of_any_size_and_layout_arrive_whole(monkeypatch):
    """A contiguous CPU input is copied in with one memmove whatever its size (here 1 MiB,
    past the old 64 KiB limit); a non-contiguous one (a transposed view) and a bfloat16 one
    still arrive element for element: m·Δ(x) matches LoRA computed in torch on each, and
    outputs copied out (take) equal the server's."""
    from swift_lycoris import arena as arena_module

    _, network, name = _network()
    moved = []
    memmove = arena_module.ctypes.memmove
    monkeypatch.setattr(arena_module.ctypes, "memmove", lambda dst, src, n: (moved.append(n), memmove(dst, src, n))[1])
    try:
        x = torch.randn(16384, 16)
        torch.testing.assert_close(_delta(network, name, x), _expected(network, name, x), rtol=1e-5, atol=1e-6)
        assert 16384 * 16 * 4 in moved, moved
        columns = torch.randn(16, 16384).T  # (16384, 16), not contiguous
        assert not columns.is_contiguous()
        torch.testing.assert_close(_delta(network, name, columns), _expected(network, name, columns.contiguous()),
                                   rtol=1e-5, atol=1e-6)
        half = torch.randn(4096, 16).to(torch.bfloat16)
        torch.testing.assert_close(_delta(network, name, half).float(), _expected(network, name, half.float()),
                                   rtol=2e-2, atol=2e-2)
        arena = network.arena
        arena.begin()
        placed = arena.put(x)
        taken = arena.take(placed)
        assert taken.data_ptr() != x.data_ptr() and not _in_arena(network, taken)
        assert torch.equal(taken, x)
    finally:
        network.close()
