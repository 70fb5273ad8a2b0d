"""A catalogue of hostile inputs — files, RPC messages and command-line arguments — each
asserting the exact error a person or client sees and that the process goes on serving
(the server answers the next request correctly; a command exits with its status instead of
crashing). Files are read through swift_lycoris (file.describe and network.load, the paths
every Python entry takes), RPC messages go raw to a lycoris-server, arguments to the
lycoris and lycoris-server executables."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from _sl_oracle import sl

REPOSITORY = Path(__file__).resolve().parents[2]
FIXTURES = REPOSITORY / "Tests" / "LycorisFormatsTests" / "Fixtures"
NETWORKS = REPOSITORY / "Tests" / "LycorisAlgorithmsTests" / "Fixtures" / "networks"
SERVER = sl.find_server()
LYCORIS = str(Path(SERVER).parent / "lycoris")


# MARK: - files

# The committed hostile fixtures (scripts/generate_safetensors_fixtures.py): (file, rule, details).
FIXTURE_CASES = [
    ('bad_byte_size_overflow', 'validation overflow',
     'tensor "a" with shape [4611686018427387904] and dtype F32 has a byte size that overflows 64 bits'),
    ('bad_data_offset_above_u64', 'invalid header deserialization',
     'tensor "a": data_offsets[1] is an integer too large for 64 bits (18446744073709551616), not a non-negative integer'),
    ('bad_deep_nesting', 'invalid header deserialization',
     'JSON nesting deeper than 128 levels at header byte 128'),
    ('bad_dtype_not_string', 'invalid header deserialization',
     'tensor "a": dtype is a non-negative integer, not a string'),
    ('bad_duplicate_field', 'invalid header deserialization',
     'tensor "a": duplicate key "dtype" at header byte 20'),
    ('bad_duplicate_tensor_key', 'invalid header deserialization',
     'duplicate key "a" at header byte 54'),
    ('bad_empty_file', 'header too small',
     'the file is 0 bytes long, shorter than the 8-byte header length prefix'),
    ('bad_end_offset_overflow', 'validation overflow',
     'tensor "a" ends at data offset 18446744073709551615, and that plus the header\'s length overflows 64 bits'),
    ('bad_entry_not_object', 'invalid header deserialization',
     'tensor "a": the entry is an array, not an object with dtype, shape and data_offsets'),
    ('bad_float_shape', 'invalid header deserialization',
     'tensor "a": shape element 0 is a non-integer number (2.0), not a non-negative integer'),
    ('bad_header_length_past_eof', 'invalid header length',
     'the header length prefix says 1000 bytes, but 8 + 1000 is past the end of the 27-byte file'),
    ('bad_header_not_object', 'invalid header deserialization',
     'the header is an array, not a JSON object'),
    ('bad_header_too_large_100000001', 'header too large',
     'the header length prefix says 100000001 bytes, more than the limit of 100000000'),
    ('bad_header_too_large_2_63', 'header too large',
     'the header length prefix says 9223372036854775808 bytes, more than the limit of 100000000'),
    ('bad_header_too_small', 'header too small',
     'the file is 5 bytes long, shorter than the 8-byte header length prefix'),
    ('bad_hole_between_tensors', 'invalid offset',
     'tensor "b" has data_offsets [12, 20] but must begin at 8, where the previous tensor ends (tensors must be contiguous, non-overlapping and start at 0)'),
    ('bad_invalid_utf8', 'invalid header (not valid UTF-8)',
     'the header JSON is not valid UTF-8 (first bad byte at header offset 3)'),
    ('bad_metadata_non_string_value', 'invalid header deserialization',
     '"__metadata__": the value of metadata key "epochs" is a non-negative integer, not a string (metadata must map strings to strings)'),
    ('bad_metadata_not_object', 'invalid header deserialization',
     '"__metadata__": metadata is a string, not an object mapping strings to strings'),
    ('bad_missing_data_offsets', 'invalid header deserialization',
     'tensor "a": missing field "data_offsets"'),
    ('bad_negative_data_offset', 'invalid header deserialization',
     'tensor "a": data_offsets[0] is a negative number (-4), not a non-negative integer'),
    ('bad_negative_shape', 'invalid header deserialization',
     'tensor "a": shape element 0 is a negative number (-1), not a non-negative integer'),
    ('bad_offsets_end_before_begin', 'invalid offset',
     'tensor "b" has data_offsets [8, 4] that end before they begin'),
    ('bad_offsets_not_starting_at_zero', 'invalid offset',
     'tensor "a" has data_offsets [4, 12] but must begin at 0, where the previous tensor ends (tensors must be contiguous, non-overlapping and start at 0)'),
    ('bad_overlapping_offsets', 'invalid offset',
     'tensor "b" has data_offsets [8, 24] but must begin at 16, where the previous tensor ends (tensors must be contiguous, non-overlapping and start at 0)'),
    ('bad_shape_product_overflow', 'validation overflow',
     'tensor "a" with shape [4611686018427387904, 4611686018427387904] and dtype F32 has a byte size that overflows 64 bits'),
    ('bad_size_mismatch', 'tensor invalid info',
     'tensor "a" with shape [4] and dtype F32 needs 16 bytes, but its data_offsets span 12 bytes (size mismatch)'),
    ('bad_three_data_offsets', 'invalid header deserialization',
     'tensor "a": data_offsets has 3 elements, not two non-negative integers [begin, end]'),
    ('bad_trailing_bytes', 'metadata incomplete buffer',
     'the header describes a 72-byte file but the file is 76 bytes (trailing bytes after the tensor data)'),
    ('bad_trailing_characters', 'invalid header deserialization',
     'trailing characters after the JSON value at header byte 3'),
    ('bad_truncated_buffer', 'metadata incomplete buffer',
     'the header describes a 80-byte file but the file is 72 bytes (tensor data truncated)'),
    ('bad_truncated_json', 'invalid header deserialization',
     'tensor "a": unexpected end of JSON input inside a string at header byte 48'),
    ('bad_unknown_dtype', 'invalid header deserialization',
     'tensor "a": unknown dtype "F17" (known: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)'),
]

# Files that are not safetensors at all, and paths that are not files: (name, bytes or None, rule, details).
FOREIGN_CASES = [
    ("text", b"these are my notes\n", "not a safetensors file",
     'the file is text (it begins "these ar"), not a safetensors header'),
    ("json text", b'{"lora_up": [1, 2]}', "not a safetensors file",
     'the file is text (it begins "{\\"lora_u"), not a safetensors header'),
    ("torch.save zip", b"PK\x03\x04\x14\x00\x00\x00\x08\x00rest of the archive", "not a safetensors file",
     "the file is a ZIP archive (torch.save's format; convert it to safetensors), not a safetensors header"),
    ("pickle", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00}q", "not a safetensors file",
     "the file is a Python pickle, not a safetensors header"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a safetensors file",
     "the file is a PNG image, not a safetensors header"),
    ("gguf", b"GGUF\x03\x00\x00\x00\x00\x00\x00\x00", "not a safetensors file",
     "the file is a GGUF file, not a safetensors header"),
    ("missing", None, "cannot open file", "cannot be opened for reading (No such file or directory (errno 2))"),
    ("directory", "dir", "not a regular file", "the path is not a regular file"),
]


@pytest.fixture(scope="module")
def network():
    """One network (and server) for every file case: each must leave it serving."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    net = sl.create_lycoris(model, linear_dim=2)
    net.apply_to()
    yield model, net
    net.close()


def assert_serves(model, net):
    """The server still answers: a forward through the adapter equals one computed again."""
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert sl.describe_file(NETWORKS / "lora.safetensors", net.server)["tensors"]


def assert_file_refused(network, path: str, rule: str, details: str):
    model, net = network
    expected = f"safetensors file '{path}': {rule}: {details}"
    with pytest.raises(sl.AdapterFileError) as described:
        sl.describe_file(path, net.server)
    assert str(described.value) == expected and described.value.rule == rule and described.value.path == path
    with pytest.raises(sl.AdapterFileError) as loaded:
        net.load_weights(path)
    assert str(loaded.value) == expected
    assert_serves(model, net)


@pytest.mark.parametrize("name, rule, details", FIXTURE_CASES, ids=[c[0] for c in FIXTURE_CASES])
def test_hostile_fixture_file(network, name, rule, details):
    assert_file_refused(network, str(FIXTURES / f"{name}.safetensors"), rule, details)


@pytest.mark.parametrize("name, content, rule, details", FOREIGN_CASES, ids=[c[0] for c in FOREIGN_CASES])
def test_foreign_file(network, tmp_path, name, content, rule, details):
    path = tmp_path / "adapter.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "dir":
        path.mkdir()
    assert_file_refused(network, str(path), rule, details)


def test_every_hostile_fixture_is_in_the_catalogue():
    assert sorted(p.stem for p in FIXTURES.glob("bad_*.safetensors")) == sorted(c[0] for c in FIXTURE_CASES)


def test_kohya_and_the_wrapper_refuse_a_text_adapter_by_name(tmp_path):
    from swift_lycoris import kohya

    path = tmp_path / "notes.safetensors"
    path.write_text("my training notes\n")
    expected = f"safetensors file '{path}': not a safetensors file: the file is text (it begins \"my train\"), not a safetensors header"
    with pytest.raises(sl.AdapterFileError) as wrapper:
        sl.create_lycoris_from_weights(1.0, str(path), torch.nn.Sequential(torch.nn.Linear(4, 3)))
    with pytest.raises(sl.AdapterFileError) as kohya_entry:
        kohya.create_network_from_weights(1.0, str(path), None, None, torch.nn.Sequential(torch.nn.Linear(4, 3)))
    assert str(wrapper.value) == expected == str(kohya_entry.value)


# MARK: - RPC

def inline(a, dtype="F32") -> dict:
    a = np.asarray(a, dtype=np.float32)
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


X = inline(np.ones((2, 4)))
TEXT_FILE = "{text}"

# (case, raw line or (method, params), code, message, data); the server holds an arena of
# 4096 bytes and a network with one linear module "m" (4 → 3, lora_dim 2).
RPC_CASES = [
    ("truncated JSON", '{"jsonrpc":"2.0","id":1,"method":"network.info"', -32700,
     "Parse error: '}' expected near end of file", {"line": 1, "column": 47, "position": 47}),
    ("not JSON at all", "hello server", -32700, "Parse error: invalid token near 'hello'", {"line": 1, "column": 5, "position": 5}),
    ("a number, not a request", "42", -32600, "Invalid Request: a request must be an object, got a number", None),
    ("an empty batch", "[]", -32600, "Invalid Request: an empty batch", None),
    ("jsonrpc 1.0", '{"jsonrpc":"1.0","id":1,"method":"network.info"}', -32600, 'Invalid Request: "jsonrpc" must be exactly "2.0"', None),
    ("unknown method", ("network.explode", {}), -32601, "Method not found: network.explode", {"method": "network.explode"}),
    ("params as an array", ("network.info", [1, 2]), -32602,
     "Invalid params: this method takes named parameters (an object), not an array", {"path": "params"}),
    ("second network.create", ("network.create", {"layers": [{"name": "m", "kind": "linear", "in_features": 4, "out_features": 3}]}),
     -32007, "State error: a network exists already (one network per server)", None),
    ("forward on an unknown module", ("forward", {"calls": [{"module": "zz", "input": X}]}), -32001, "Unknown module: zz", {"module": "zz"}),
    ("forward input of the wrong shape", ("forward", {"calls": [{"module": "m", "input": inline(np.ones((2, 5)))}]}), -32002,
     "Shape mismatch: linear input must end with 4 features, got shape [2, 5]", {"path": "calls[0].input"}),
    ("forward input dtype I8", ("forward", {"calls": [{"module": "m", "input": dict(X, dtype="I8")}]}), -32003,
     'Dtype error: calls[0].input.dtype has dtype "I8"; tensors travel as F32, F16 or BF16', {"path": "calls[0].input.dtype"}),
    ("forward input with NaN and inf", ("forward", {"calls": [{"module": "m", "input": inline([[np.nan, 1, np.inf, 0]])}]}), -32004,
     "Non-finite values: calls[0].input (module m, forward) has 2 NaN or infinite elements",
     {"path": "calls[0].input", "count": 2, "module": "m", "pass": "forward"}),
    ("base64 that is not base64", ("forward", {"calls": [{"module": "m", "input": dict(X, data="not base64!")}]}), -32602,
     "Invalid params: calls[0].input.data is not valid base64", {"path": "calls[0].input.data"}),
    ("base64 of the wrong length", ("forward", {"calls": [{"module": "m", "input": dict(X, data="AAAA")}]}), -32002,
     "Shape mismatch: calls[0].input holds 3 bytes; shape [2, 4] of F32 needs 32", {"path": "calls[0].input"}),
    ("a negative extent", ("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [-1, 4], "data": ""}}]}), -32602,
     "Invalid params: calls[0].input.shape has a negative extent", {"path": "calls[0].input.shape"}),
    ("a shape whose product overflows",
     ("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "offset": 0}}]}), -32602,
     "Invalid params: calls[0].input.shape is too large", {"path": "calls[0].input.shape"}),
    ("both offset and data", ("forward", {"calls": [{"module": "m", "input": dict(X, offset=0)}]}), -32602,
     'Invalid params: calls[0].input needs exactly one of "offset" (arena) or "data" (base64)', {"path": "calls[0].input"}),
    ("an arena offset past the end", ("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2, 4], "offset": 4096}}]}),
     -32006, "Arena error: calls[0].input: bytes 4096..<4128 lie outside the arena of 4096 bytes", {"path": "calls[0].input"}),
    ("a misaligned arena offset", ("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2, 4], "offset": 2}}]}),
     -32006, "Arena error: calls[0].input: offset 2 is not aligned to 4 bytes (F32)", {"path": "calls[0].input"}),
    ("a negative arena offset", ("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2, 4], "offset": -64}}]}),
     -32006, "Arena error: calls[0].input: offset -64 or size is invalid", {"path": "calls[0].input"}),
    ("an output spec past the arena", ("forward", {"calls": [{"module": "m", "input": X, "output": {"offset": 4080}}]}), -32006,
     "Arena error: calls[0].output: bytes 4080..<4104 lie outside the arena of 4096 bytes", {"path": "calls[0].output"}),
    ("backward of an unknown tape", ("backward", {"calls": [{"tape": 999, "grad_output": inline(np.ones((2, 3)))}]}), -32001,
     "Unknown tape: 999", {"tape": "999"}),
    ("tapes.release of a string", ("tapes.release", {"tapes": ["one"]}), -32602,
     "Invalid params: tapes[0] must be an integer", {"path": "tapes[0]"}),
    ("parameters.get of an unknown key", ("parameters.get", {"keys": ["m.nothing"]}), -32001,
     "Unknown parameter: m.nothing", {"parameter": "m.nothing"}),
    ("parameters.set of the wrong shape", ("parameters.set", {"parameters": {"m.lora_up.weight": inline(np.ones((3, 3)))}}), -32002,
     "Shape mismatch: m.lora_up.weight has shape [3, 2], got [3, 3]", {"path": "parameters.m.lora_up.weight"}),
    ("parameters.set with NaN", ("parameters.set", {"parameters": {"m.lora_up.weight": inline(np.full((3, 2), np.nan))}}), -32004,
     "Non-finite values: parameters.m.lora_up.weight (module m, parameters) has 6 NaN or infinite elements",
     {"path": "parameters.m.lora_up.weight", "count": 6, "module": "m", "pass": "parameters"}),
    ("arena.resize to 0 bytes", ("arena.resize", {"size": 0}), -32006,
     "Arena error: size must be between 1 byte and 68719476736 bytes, got 0", "arena"),
    ("arena.resize beyond 64 GiB", ("arena.resize", {"size": 1 << 40}), -32006,
     "Arena error: size must be between 1 byte and 68719476736 bytes, got 1099511627776", "arena"),
    ("a negative seed", ("network.seed", {"seed": -1}), -32602, "Invalid params: seed must be non-negative, got -1", {"path": "seed"}),
    ("a non-finite multiplier", ("network.set_multiplier", {"multiplier": 1e39}), -32602,
     "Invalid params: multiplier must be finite (as a 32-bit float), got 1e+39", {"path": "multiplier"}),
    ("network.save into a missing directory", ("network.save", {"path": "/nonexistent-dir/a.safetensors"}), -32005,
     "I/O error: safetensors file '/nonexistent-dir/a.safetensors': write failed: creating a temporary file in directory "
     "'/nonexistent-dir' failed: No such file or directory (errno 2)",
     {"file": "/nonexistent-dir/a.safetensors", "rule": "write failed"}),
    ("network.save as I64", ("network.save", {"path": "/nonexistent-dir/a.safetensors", "dtype": "I64"}), -32003,
     "Dtype error: files are saved as F32, F16 or BF16, not I64", {"path": "dtype"}),
    ("network.load of a text file", ("network.load", {"path": TEXT_FILE}), -32005,
     "I/O error: safetensors file '{text}': not a safetensors file: the file is text (it begins \"these ar\"), not a safetensors header",
     {"file": TEXT_FILE, "rule": "not a safetensors file"}),
    ("network.load of a missing file", ("network.load", {"path": "/nonexistent/adapter.safetensors"}), -32005,
     "I/O error: safetensors file '/nonexistent/adapter.safetensors': cannot open file: cannot be opened for reading "
     "(No such file or directory (errno 2))", {"file": "/nonexistent/adapter.safetensors", "rule": "cannot open file"}),
    ("file.describe of a directory", ("file.describe", {"path": "/"}), -32005,
     "I/O error: safetensors file '/': not a regular file: the path is not a regular file", {"file": "/", "rule": "not a regular file"}),
    ("optimizer.step without an optimizer", ("optimizer.step", {}), -32007, "State error: no optimizer: call optimizer.create first", None),
    ("optimizer.create with a negative lr", ("optimizer.create", {"lr": -1}), -32602, "Invalid params: lr must be non-negative",
     {"path": "lr"}),
    ("initialize with protocol 2.0", ("initialize", {"protocol_version": "2.0"}), -32602,
     "Invalid params: protocol_version 2.0 is not compatible with 1.0", {"path": "protocol_version"}),
]


class RawServer:
    """A lycoris-server spoken to line by line, with an arena and one network."""

    def __init__(self, arena_dir: str):
        self.process = subprocess.Popen([SERVER, "--arena-dir", arena_dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True)
        self.call("initialize", {})
        self.arena = self.call("arena.create", {"size": 4096})["result"]["path"]
        self.call("network.create", {"options": {"lora_dim": 2}, "seed": 3,
                                     "layers": [{"name": "m", "kind": "linear", "in_features": 4, "out_features": 3}]})
        self.call("parameters.set", {"parameters": {"m.lora_up.weight": inline(np.full((3, 2), 0.5))}})
        self.expected = self.call("forward", {"calls": [{"module": "m", "input": X}]})["result"]

    def send(self, line: str):
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def call(self, method: str, params):
        return self.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))

    def assert_serves(self):
        assert self.process.poll() is None
        assert self.call("forward", {"calls": [{"module": "m", "input": X}]})["result"] == self.expected

    def close(self):
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def raw_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("catalogue")
    text = directory / "notes.safetensors"
    text.write_text("these are notes\n")
    server = RawServer(str(directory))
    server.text = str(text)
    yield server
    server.close()


@pytest.mark.parametrize("name, request_, code, message, data", RPC_CASES, ids=[c[0] for c in RPC_CASES])
def test_hostile_rpc(raw_server, name, request_, code, message, data):
    if isinstance(request_, str):
        response = raw_server.send(request_)
    else:
        method, params = request_
        response = raw_server.call(method, json.loads(json.dumps(params).replace(TEXT_FILE, raw_server.text)))
    error = response["error"]
    assert error["code"] == code and error["message"] == message.replace(TEXT_FILE, raw_server.text)
    if data == "arena":
        assert error["data"] == {"path": raw_server.arena}
    elif data is None:
        assert "data" not in error
    else:
        assert error["data"] == json.loads(json.dumps(data).replace(TEXT_FILE, raw_server.text))
    raw_server.assert_serves()


# MARK: - command-line arguments

NETWORK = str(NETWORKS / "loha.safetensors")
BASE = str(NETWORKS / "base.safetensors")

# (case, executable, arguments, status, the first line of stderr, another stderr line or None).
CLI_CASES = [
    ("unknown subcommand", LYCORIS, ["bogus"], 64, "Error: Unexpected argument 'bogus'", "Usage: lycoris <subcommand>"),
    ("info without a file", LYCORIS, ["info"], 64, "Error: Missing expected argument '<file>'", "Usage: lycoris info <file> [--json] [--wide]"),
    ("info with an unknown flag", LYCORIS, ["info", NETWORK, "--tall"], 64, "Error: Unknown option '--tall'",
     "Usage: lycoris info <file> [--json] [--wide]"),
    ("info of a text file", LYCORIS, ["info", "{text}"], 1,
     "Error: safetensors file '{text}': not a safetensors file: the file is text (it begins \"these ar\"), not a safetensors header", None),
    ("info of a directory", LYCORIS, ["info", "/"], 1, "Error: safetensors file '/': not a regular file: the path is not a regular file", None),
    ("info of a truncated file", LYCORIS, ["info", str(FIXTURES / "bad_truncated_buffer.safetensors")], 1,
     f"Error: safetensors file '{FIXTURES / 'bad_truncated_buffer.safetensors'}': metadata incomplete buffer: the header describes "
     "a 80-byte file but the file is 72 bytes (tensor data truncated)", None),
    ("merge without --out", LYCORIS, ["merge", "--base", BASE, "--adapter", NETWORK], 64, "Error: Missing expected argument '--out <out>'",
     "Usage: lycoris merge --base <base> --adapter <file[:multiplier]> ... --out <out> [--multiplier <multiplier>]"),
    ("merge with a NaN multiplier", LYCORIS, ["merge", "--base", BASE, "--adapter", NETWORK, "--out", "{out}", "--multiplier", "nan"], 64,
     "Error: --multiplier must be finite, got nan", "Usage: lycoris merge --base <base> --adapter <file[:multiplier]> ... "
     "--out <out> [--multiplier <multiplier>]"),
    ("merge of a text base", LYCORIS, ["merge", "--base", "{text}", "--adapter", NETWORK, "--out", "{out}"], 1,
     "Error: safetensors file '{text}': not a safetensors file: the file is text (it begins \"these ar\"), not a safetensors header", None),
    ("merge into a missing directory", LYCORIS, ["merge", "--base", BASE, "--adapter", NETWORK, "--out", "/nonexistent/o.safetensors"], 1,
     "Error: safetensors file '/nonexistent/o.safetensors': write failed: creating a temporary file in directory '/nonexistent' "
     "failed: No such file or directory (errno 2)", None),
    ("merge --strict with unmatched modules", LYCORIS, ["merge", "--base", str(NETWORKS / "lora.safetensors"), "--adapter", NETWORK,
                                                        "--out", "{out}", "--strict"], 1,
     "Error: 5 unmatched and 0 failed modules; --strict wrote nothing to {out}", None),
    ("demo with an unknown algorithm", LYCORIS, ["demo", "--algo", "lorax"], 64,
     "Error: unknown algorithm 'lorax'; choose one of lora, locon, loha, lokr, ia3, dylora, norm", "Usage: lycoris demo [--algo <algo>]"),
    ("demo with zero steps", LYCORIS, ["demo", "--steps", "0"], 64, "Error: --steps must be positive, got 0", "Usage: lycoris demo"),
    ("demo with a word for threads", LYCORIS, ["demo", "--threads", "abc"], 64, "Error: The value 'abc' is invalid for '--threads <threads>'",
     "Usage: lycoris demo"),
    ("demo into a missing directory", LYCORIS, ["demo", "--steps", "1", "--out", "/nonexistent/d.safetensors"], 1,
     "Error: safetensors file '/nonexistent/d.safetensors': write failed: creating a temporary file in directory '/nonexistent' failed: "
     "No such file or directory (errno 2)", None),
    ("server with an unknown log level", SERVER, ["--log-level", "loud"], 64, "Error: unknown log level loud", "Usage: lycoris-server"),
    ("server with an unknown option", SERVER, ["--bogus"], 64, "Error: Unknown option '--bogus'", "Usage: lycoris-server"),
    ("server with a word for threads", SERVER, ["--threads", "x"], 64, "Error: The value 'x' is invalid for '--threads <threads>'",
     "Usage: lycoris-server"),
]


@pytest.mark.parametrize("name, executable, arguments, status, first, other", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_hostile_arguments(tmp_path, name, executable, arguments, status, first, other):
    text, out = tmp_path / "notes.safetensors", tmp_path / "out.safetensors"
    text.write_text("these are notes\n")

    def fill(s: str) -> str:
        return s.replace("{text}", str(text)).replace("{out}", str(out))

    result = subprocess.run([executable, *map(fill, arguments)], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL, env={**os.environ, "LYCORIS_ARENA_DIR": str(tmp_path)})
    assert result.returncode == status, result.stderr  # an exit status, never a signal
    lines = result.stderr.splitlines()
    assert lines[0] == fill(first)
    if other is not None:
        assert any(line.startswith(fill(other)) for line in lines[1:]), result.stderr
    assert not out.exists(), "a failed job left output behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors"]


def test_the_catalogue_has_at_least_40_cases():
    assert len(FIXTURE_CASES) + len(FOREIGN_CASES) + len(RPC_CASES) + len(CLI_CASES) >= 40


# MARK: - nothing left behind

def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_save_removes_temporary_files_of_killed_saves(network, tmp_path):
    _, net = network
    stale = tmp_path / f".adapter.safetensors.tmp-{dead_pid()}-9e1f"
    live = tmp_path / f".adapter.safetensors.tmp-{os.getpid()}-9e20"
    for leftover in (stale, live):
        leftover.write_bytes(b"half a file")
    net.save_weights(str(tmp_path / "adapter.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "adapter.safetensors"])


def test_a_failed_torch_format_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    from swift_lycoris import kohya

    class Transformer2DModel(torch.nn.Module):  # a class name the default preset targets
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    unet = torch.nn.Module()
    unet.block = Transformer2DModel()
    network = kohya.create_network(1.0, 2, 1.0, None, None, unet)
    try:
        network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
        file = tmp_path / "adapter.pt"
        network.save_weights(str(file), None, None)
        saved = file.read_bytes()
        assert sorted(torch.load(file, weights_only=True)) == ["lora_unet_block_proj.alpha", "lora_unet_block_proj.lora_down.weight",
                                                              "lora_unet_block_proj.lora_up.weight"]

        def interrupted(state, handle):
            handle.write(b"PK\x03\x04 half of an archive")
            raise KeyboardInterrupt  # Ctrl-C in the middle of the write

        monkeypatch.setattr(torch, "save", interrupted)
        with pytest.raises(KeyboardInterrupt):
            network.save_weights(str(file), None, None)
        assert file.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]
    finally:
        network.close()
