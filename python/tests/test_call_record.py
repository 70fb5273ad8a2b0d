"""The binary call record (protocol/README.md §2.1): the struct formats against the spec's
tables, a training step on the record path and on the JSON path against LyCORIS, and bad
records — each answered with an error record naming the problem while the server keeps
serving."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch

from swift_lycoris import call_record
from swift_lycoris.server import Server, ServerError

from _sl_oracle import assert_step_matches, inputs, make_pair, run, sl

SPEC = Path(__file__).resolve().parents[2] / "protocol" / "README.md"
_TYPES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "i32": "i", "pad3": "3x"}


def spec_layouts() -> dict[str, tuple[str, list[str]]]:
    """Each part's table in §2.1: part name → (struct format the caption states, formats of
    its rows in order); the rows' offsets must follow from the sizes."""
    text = SPEC.read_text().split("### 2.1 Binary call record", 1)[1].split("\n## 3.", 1)[0]
    layouts = {}
    for match in re.finditer(r"\*\*([a-z .]+)\*\* \(([^\n]*)\)\n\n((?:\|[^\n]*\n)+)", text):
        name, caption, table = match.groups()
        stated = re.search(r"struct `([^`]+)`", caption).group(1)
        rows = [row.split("|")[1:-1] for row in table.strip().splitlines()[2:]]
        start = 16 if name in ("forward", "forward result", "backward", "tapes.release", "error") else 0
        position, formats = start, []
        for offset, _field, kind, _meaning in rows:
            assert int(offset) == position, f"{name}: field at {offset}, expected {position}"
            formats.append(_TYPES[kind.strip()])
            position += struct.calcsize("<" + formats[-1])
        layouts[name] = (stated, formats)
    return layouts


def test_struct_formats_are_the_spec_tables():
    layouts = spec_layouts()
    assert set(layouts) == set(call_record.LAYOUTS)
    for name, (stated, formats) in layouts.items():
        assert stated == call_record.LAYOUTS[name], name
        assert "<" + "".join(formats) == call_record.LAYOUTS[name], name


def test_forward_record_bytes_follow_the_layout():
    record = call_record.forward_template(3, call_record.FORWARD_GRAD, "BF16", [2, 5], "F16").fill(9, [64, 128])
    assert len(record) == 16 + 8 + 12 + 16 + 12
    assert record[:16] == bytes([0xFF, 1, 1, 0]) + len(record).to_bytes(4, "little") + (9).to_bytes(8, "little")
    assert record[16:24] == (3).to_bytes(4, "little") + (1).to_bytes(4, "little")
    assert record[24:36] == (64).to_bytes(8, "little") + bytes([2, 2, 0, 0])
    assert record[36:52] == (2).to_bytes(8, "little") + (5).to_bytes(8, "little")
    assert record[52:] == (128).to_bytes(8, "little") + bytes([1, 0, 0, 0])


@pytest.mark.parametrize("json_calls", [False, True], ids=["record", "json"])
@pytest.mark.parametrize("algo,options", [("lora", {}), ("ia3", {})])
def test_training_step_matches_lycoris_on_both_paths(monkeypatch, json_calls, algo, options):
    monkeypatch.setenv("SWIFT_LYCORIS_JSON_CALLS", "1" if json_calls else "0")
    base, ref_model, lyco, our_model, ours = make_pair(algo, transfer="activations" if algo == "lora" else "auto", **options)
    try:
        assert ours.server.call_records is (not json_calls)
        x, upstream = inputs()
        y0, _ = run(base, x)
        assert_step_matches(ref_model, our_model, lyco, ours, x, upstream, y0, 1e-4)
        kinds = {type(t).__name__ for t in ours._templates.values()}
        assert kinds == {"RequestTemplate" if json_calls else "RecordTemplate"}
    finally:
        ours.close()


class _Raw:
    """A record given as bytes (what `Server.call_record` sends), its id patched in."""

    def __init__(self, data: bytes):
        self.data = data

    def fill(self, request_id, values):
        if len(self.data) < 16:
            return self.data
        return self.data[:8] + request_id.to_bytes(8, "little") + self.data[16:]


@pytest.fixture(scope="module")
def served():
    """A server with one LoRA module on a linear 4→3 and an arena; x (2×4 F32) at 0."""
    server = Server(threads=1)
    server.call("arena.create", {"size": 4096})
    server.call("network.create", {"algo": "lora", "options": {"lora_dim": 2, "alpha": 1.0},
                                   "layers": [{"name": "m", "kind": "linear", "in_features": 4, "out_features": 3}]})
    assert server.call("network.info")["modules"][0]["handle"] == 0
    yield server
    server.close()


def _forward(handle=0, flags=call_record.FORWARD_GRAD, dtype="F32", shape=(2, 4), offset=0, output=256) -> bytes:
    return call_record.forward_template(handle, flags, dtype, shape, "F32").fill(0, [offset, output])


def _error(server, data: bytes) -> ServerError:
    with pytest.raises(ServerError) as caught:
        server.call_record("forward", _Raw(data))
    return caught.value


def _good_forward(server) -> int:
    body = server.call_record("forward", _Raw(_forward()))
    tape = call_record.FORWARD_RESULT.unpack_from(body)[0]
    assert tape > 0
    return tape


def _length(data: bytes, length: int) -> bytes:
    return data[:4] + length.to_bytes(4, "little") + data[8:]


@pytest.mark.parametrize("case,code,words", [
    ("truncated", -32602, ["truncated", "input.shape[1]"]),
    ("trailing", -32602, ["after its last field"]),
    ("method", -32601, ["method code 9"]),
    ("handle", -32001, ["handle 7", "1 modules"]),
    ("past the arena", -32006, ["outside the arena"]),
    ("dtype code", -32003, ["dtype code 5"]),
    ("shape", -32002, ["input"]),
    ("flags", -32602, ["flags"]),
    ("rank", -32602, ["rank is 9"]),
])
def test_bad_record_is_an_error_and_the_server_serves_on(served, case, code, words):
    good = _forward()
    data = {
        "truncated": _length(good[:-20], len(good) - 20),
        "trailing": _length(good + b"\0\0", len(good) + 2),
        "method": good[:2] + (9).to_bytes(2, "little") + good[4:],
        "handle": _forward(handle=7),
        "past the arena": _forward(offset=4096 - 16),
        "dtype code": good[:32] + bytes([5]) + good[33:],
        "shape": _forward(shape=(2, 5)),
        "flags": _forward(flags=64),
        "rank": good[:33] + bytes([9]) + good[34:],
    }[case]
    error = _error(served, data)
    assert error.code == code, error
    for word in words:
        assert word in str(error), error
    _good_forward(served)


def test_backward_record_errors_name_the_tape_and_the_count(served):
    tape = _good_forward(served)
    grad = call_record.backward_template(call_record.BACKWARD_PARAMETER_GRADS, "F32", [2, 3], "F32", 1)
    with pytest.raises(ServerError, match="module m has 2 parameters") as caught:
        served.call_record("backward", grad, tape, 512, 768, 1024)
    assert caught.value.code == -32602
    wrong_shape = call_record.backward_template(0, "F32", [2, 4], "F32", 0)
    with pytest.raises(ServerError, match=r"grad_output has shape \[2, 4\], expected \[2, 3\]"):
        served.call_record("backward", wrong_shape, tape, 512, 768)
    # Nothing consumed the tape: a good backward runs, then the tape is gone.
    good = call_record.backward_template(0, "F32", [2, 3], "F32", 0)
    assert served.call_record("backward", good, tape, 512, 768) == b""
    with pytest.raises(ServerError, match=f"Unknown tape: {tape}") as caught:
        served.call_record("backward", good, tape, 512, 768)
    assert caught.value.code == -32001


def test_short_length_and_json_between_records(served):
    # A header that says 8 bytes: -32700 with id 0, then the JSON call after it is answered.
    header = bytes([0xFF, 1, 1, 0]) + (8).to_bytes(4, "little")
    with pytest.raises(ServerError, match="shorter than its 16-byte header") as caught:
        served.call_record("forward", _Raw(header))
    assert caught.value.code == -32700
    assert served.call("network.info")["modules"][0]["name"] == "m"
    _good_forward(served)


def test_record_without_a_network_is_a_state_error():
    server = Server(threads=1)
    try:
        error = _error(server, _forward())
        assert error.code == -32007 and "no network" in str(error)
    finally:
        server.close()


def test_json_calls_can_be_forced(monkeypatch):
    for server, expected in ((Server(threads=1, call_records=False), False), (Server(threads=1), True)):
        assert server.call_records is expected
        server.close()
    monkeypatch.setenv("SWIFT_LYCORIS_JSON_CALLS", "1")
    server = Server(threads=1)
    assert server.call_records is False
    server.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_records_match_the_json_path(monkeypatch, dtype):
    """F16/BF16 inputs travel with their dtype code (1, 2): the record path's output, ∂x and
    parameter gradients equal the JSON path's bit for bit (the two encode the same call
    independently; the arithmetic is the server's either way)."""
    results = {}
    for json_calls in (False, True):
        monkeypatch.setenv("SWIFT_LYCORIS_JSON_CALLS", "1" if json_calls else "0")
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(8, 6)).to(dtype)
        network = sl.create_lycoris(model, 1.0, 2, 1.0, threads=1, transfer="activations")
        network.apply_to()
        try:
            assert network.server.call_records is (not json_calls)
            with torch.no_grad():
                for p in network.parameters():
                    p.copy_(torch.randn(p.shape))
            x = torch.randn(3, 8).to(dtype).requires_grad_(True)
            y = model(x)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(dtype))
            results[json_calls] = [y.detach(), x.grad] + [p.grad for p in network.parameters()]
        finally:
            network.close()
    for record, json_value in zip(results[False], results[True]):
        assert record.dtype == json_value.dtype
        torch.testing.assert_close(record, json_value, rtol=0, atol=0)

