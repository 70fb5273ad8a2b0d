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
        _assert_elementwise_steps(base, ref_model, lyco, our_model, ours, layer_input=False)
    finally:
        ours.close()


def _assert_elementwise_steps(base, ref_model, lyco, our_model, ours, layer_input: bool) -> None:
    """Two SGD steps in which our model's output, ∂x and every parameter gradient match
    LyCORIS's, every adapted layer took the elementwise transfer (one forward call each,
    with `layer_input` exactly when asked) and no ΔW was fetched."""
    calls = _record_calls(ours)
    x, upstream = inputs()
    y0, _ = run(base, x)
    for step in range(2):
        calls.clear()
        assert_step_matches(ref_model, our_model, lyco, ours, x, upstream, y0, RTOL, f"step {step} ")
        forwards = [call for method, params in calls if method == "forward" for call in params["calls"]]
        assert len(forwards) == len(ours.modules_info), [m for m, _ in calls]
        assert all(call.get("elementwise") and ("layer_input" in call) == layer_input for call in forwards)
        assert not [m for m, _ in calls if m.startswith("delta_weight")]
        sgd_step(lyco, ours)


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


@pytest.mark.parametrize("algo,options", [
    ("lora", {"conv_dim": 4, "conv_alpha": 2.0}),
    ("lora", {"conv_dim": 4, "conv_alpha": 2.0, "use_scalar": True, "multiplier": 1.0}),
    ("loha", {}),
], ids=["lora-conv", "lora-scalar-mult1", "loha"])
def test_dora_output_with_input_transfer_matches_lycoris(algo, options):
    """DoRA with the norm per output row (LyCORIS's default) takes the elementwise transfer
    with the layer input (side output_with_input): the client sends y = org_forward(x) and x,
    the server returns op(x, W') + b from y and the factor chain. Output, ∂x and every
    parameter gradient (dora_scale included) equal LyCORIS 4.1.3's rebuild over two SGD
    steps, every forward carried x as layer_input, and no ΔW was fetched."""
    options = {"multiplier": 0.7, **options}
    base, ref_model, lyco, our_model, ours = make_pair(algo, transfer="auto", dora_wd=True, **options)
    try:
        assert {info["elementwise"] for info in ours.modules_info.values()} == {"output_with_input"}
        _assert_elementwise_steps(base, ref_model, lyco, our_model, ours, layer_input=True)
    finally:
        ours.close()


def _refusal(network, layer_input_rows: int | None = 2):
    """The ServerError of an elementwise forward of the network's only module on a (2, 5)
    base output, with a (layer_input_rows, 6) layer input (None: none)."""
    (info,) = network.modules_info.values()
    call = {"module": info["name"], "input": network._inline(torch.ones(2, 5)), "elementwise": True}
    if layer_input_rows is not None:
        call["layer_input"] = network._inline(torch.ones(layer_input_rows, 6))
    with pytest.raises(sl.ServerError) as error:
        network.server.call("forward", {"calls": [call]})
    return error.value


def _linear_network(algo: str, **options):
    return sl.create_lycoris(torch.nn.Sequential(torch.nn.Linear(6, 5)), 1.0, 2, 1.0, algo=algo, threads=1, **options)


def test_dora_on_the_input_axis_keeps_the_weight_path():
    """wd_on_out false: the scales act on x before W0, so the module has no elementwise
    transfer (info null; an elementwise forward is -32007)."""
    ours = _linear_network("lora", dora_wd=True, wd_on_output=False)
    try:
        assert [info["elementwise"] for info in ours.modules_info.values()] == [None]
        error = _refusal(ours)
        assert error.code == -32007 and "no elementwise transfer" in str(error)
    finally:
        ours.close()


def test_dora_layer_input_is_checked():
    """On the output axis the elementwise call needs layer_input (-32602 without it), shaped
    so that input is its output (-32002 otherwise); IA3 refuses one (-32602); the server
    keeps serving and a good call then works."""
    ours = _linear_network("lora", dora_wd=True)
    try:
        (info,) = ours.modules_info.values()
        assert info["elementwise"] == "output_with_input"
        error = _refusal(ours, None)
        assert error.code == -32602 and "layer_input" in str(error)
        assert _refusal(ours, 3).code == -32002
        call = {"module": info["name"], "input": ours._inline(torch.ones(2, 5)), "elementwise": True,
                "layer_input": ours._inline(torch.ones(2, 6))}
        (result,) = ours.server.call("forward", {"calls": [call]})["results"]
        assert result["output"]["shape"] == [2, 5]
    finally:
        ours.close()
    ia3 = _linear_network("ia3")
    try:
        error = _refusal(ia3)
        assert error.code == -32602 and "output_with_input" in str(error)
    finally:
        ia3.close()


def test_dora_layer_input_needs_json_calls():
    """Binary call records have no layer_input field: an elementwise forward record of a DoRA
    module is -32602 naming layer_input, and the tape of a JSON forward with a layer input
    refuses a backward record (-32602 naming grad_layer_input) without consuming it — a JSON
    backward then returns ∂x and ∂(layer input)."""
    ours = _linear_network("lora", dora_wd=True)
    try:
        assert ours.server.call_records
        (info,) = ours.modules_info.values()
        ours.arena.begin()
        ours.arena.plan([40, 40, 48, 48, 40])
        y, x = ours.arena.put(torch.ones(2, 5)), ours.arena.put(torch.ones(2, 6))
        out = ours._output((2, 5), torch.float32, None)[0]
        flags = call_record.FORWARD_GRAD | call_record.FORWARD_ELEMENTWISE
        record = call_record.forward_template(info["handle"], flags, "F32", [2, 5], "F32")
        with pytest.raises(sl.ServerError) as error:
            ours.server.call_record("forward", record, y["offset"], out["offset"])
        assert error.value.code == -32602 and "layer_input" in str(error.value)
        call = {"module": info["name"], "input": y, "elementwise": True, "layer_input": x, "output": out}
        (result,) = ours.server.call("forward", {"calls": [call], "grad": True})["results"]
        tape = result["tape"]
        grad = ours.arena.put(torch.ones(2, 5))
        backward = call_record.backward_template(0, "F32", [2, 5], "F32", 0)
        with pytest.raises(sl.ServerError) as error:
            ours.server.call_record("backward", backward, tape, grad["offset"], out["offset"])
        assert error.value.code == -32602 and "grad_layer_input" in str(error.value)
        (answer,) = ours.server.call("backward", {"calls": [{"tape": tape, "grad_output": grad}]})["results"]
        assert answer["grad_input"]["shape"] == [2, 5] and answer["grad_layer_input"]["shape"] == [2, 6]
    finally:
        ours.close()
