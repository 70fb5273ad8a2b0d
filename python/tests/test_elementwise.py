"""The elementwise transfer (protocol `forward` with `"elementwise": true`): IA3 scales the base
layer's output (or, with train_on_input, its input) in one elementwise pass on the server.

Oracle: LyCORIS 4.1.3's own IA3 modules with the same parameter values — outputs, ∂x and
every parameter gradient over two SGD steps — and the calls the client actually made (every
adapted layer took the elementwise transfer, no ΔW was fetched).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from swift_lycoris import call_record

from _sl_oracle import assert_step_matches, inputs, make_pair, run, sgd_step, sl

RTOL = 1e-4


def _record_calls(network):
    """Wraps the network's checked server calls; returns the list they are recorded in."""
    calls = []
    checked = network._checked_call

    def recording(method, params, *values):
        # A per-call request comes as a template (a binary call record's or a JSON
        # RequestTemplate) and the integers it is filled with; a forward record's flags are
        # recorded as its JSON form's "elementwise".
        if isinstance(params, call_record.RecordTemplate):
            flags = struct.unpack_from("<I", params.fill(0, values), 20)[0]
            calls.append((method, {"calls": [{"elementwise": bool(flags & call_record.FORWARD_ELEMENTWISE)}]}))
        else:
            calls.append((method, params if isinstance(params, dict) else json.loads(params.fill(0, values))["params"]))
        return checked(method, params, *values)

    network._checked_call = recording
    return calls


@pytest.mark.parametrize("options,side", [
    ({}, "output"),
    ({"train_on_input": True}, "input"),
    ({"bypass_mode": True}, "output"),
], ids=["output", "on-input", "bypass"])
def test_ia3_elementwise_transfer_matches_lycoris(options, side):
    base, ref_model, lyco, our_model, ours = make_pair("ia3", transfer="auto", multiplier=0.7, **options)
    try:
        if options.get("bypass_mode"):
            # bypass_mode makes the client move activations; ask for auto to reach the server's
            # bypass semantics of the elementwise transfer (the bias is scaled too).
            ours.transfer = "auto"
        assert {info["elementwise"] for info in ours.modules_info.values()} == {side}
        calls = _record_calls(ours)
        x, upstream = inputs()
        y0, _ = run(base, x)
        for step in range(2):
            calls.clear()
            assert_step_matches(ref_model, our_model, lyco, ours, x, upstream, y0, RTOL, f"step {step} ")
            forwards = [params for method, params in calls if method == "forward"]
            assert len(forwards) == len(ours.modules_info), [m for m, _ in calls]
            assert all(call.get("elementwise") for params in forwards for call in params["calls"])
            assert not [m for m, _ in calls if m.startswith("delta_weight")]
            sgd_step(lyco, ours)
    finally:
        ours.close()


def test_elementwise_only_where_the_module_has_one():
    """IA3 with rank_dropout and every other algorithm have no elementwise transfer (info
    null, the client keeps op(x, ΔW)); asking the server anyway is -32007, and a tensor that
    does not fit the side is -32002 — and the server keeps serving."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    lora = sl.create_lycoris(model, 1.0, 2, 1.0, algo="lora", threads=1)
    try:
        (info,) = lora.modules_info.values()
        assert info["elementwise"] is None
        t = torch.ones(2, 5)
        with pytest.raises(sl.ServerError) as error:
            lora.server.call("forward", {"calls": [{"module": info["name"], "input": lora._inline(t), "elementwise": True}]})
        assert error.value.code == -32007 and "no elementwise transfer" in str(error.value)
    finally:
        lora.close()
    ia3 = sl.create_lycoris(torch.nn.Sequential(torch.nn.Linear(6, 5)), 1.0, 2, 1.0, algo="ia3", threads=1,
                            rank_dropout=0.5)
    try:
        assert [info["elementwise"] for info in ia3.modules_info.values()] == [None]
    finally:
        ia3.close()
    ia3 = sl.create_lycoris(torch.nn.Sequential(torch.nn.Linear(6, 5)), 1.0, 2, 1.0, algo="ia3", threads=1)
    try:
        (name,) = ia3.modules_info
        with pytest.raises(sl.ServerError) as error:  # 6 channels: the input's shape, not the output's
            ia3.server.call("forward", {"calls": [{"module": name, "input": ia3._inline(torch.ones(2, 6)),
                                                   "elementwise": True}]})
        assert error.value.code == -32002 and "5 channels" in str(error.value)
        result = ia3.server.call("forward", {"calls": [{"module": name, "input": ia3._inline(torch.ones(2, 5)),
                                                        "elementwise": True}], "grad": False})
        assert result["results"][0]["output"]["shape"] == [2, 5]
    finally:
        ia3.close()
