#!/usr/bin/env python3
"""Writes the fuzz seed corpora under fuzz/corpus/<target>/ (standard library only;
deterministic, so re-running leaves the committed seeds unchanged).

- safetensors, adapter-file: the small safetensors fixtures of the test suites (valid files of
  every dtype, the hostile-header catalogue, and saved networks of every algorithm).
- framing: byte streams of NDJSON and Content-Length messages, batches and broken frames.
- network-params: {"create": params, "load": params} objects for network.create/network.load
  (sizes at most 16, the fuzz target's size budget; see Sources/FuzzSupport/SizeBudget.swift).
- call-record: binary call records (protocol/README.md §2.1) for the fuzz target's module
  (linear 16→24, handle 0): a forward and its backward, and the bad records of the spec's
  error table.
"""
import base64
import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
FORMATS = ROOT / "Tests" / "LycorisFormatsTests" / "Fixtures"
NETWORKS = ROOT / "Tests" / "LycorisAlgorithmsTests" / "Fixtures" / "networks"


def write(target, name, data):
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def copy_fixtures():
    for path in sorted(FORMATS.glob("*.safetensors")):
        if path.stat().st_size <= 4096:
            shutil.copyfile(path, CORPUS / "safetensors" / path.name)
    for name in ["lora", "loha", "lokr", "ia3", "dylora", "norms", "full", "boft", "diag-oft",
                 "glora", "tlora", "kohya_lora", "convnd_lokr"]:
        shutil.copyfile(NETWORKS / f"{name}.safetensors", CORPUS / "adapter-file" / f"{name}.safetensors")
    for name in ["lora", "lokr", "ia3"]:
        shutil.copyfile(NETWORKS / f"{name}.safetensors", CORPUS / "safetensors" / f"network_{name}.safetensors")


def request(method, params=None, id=1):
    message = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        message["params"] = params
    return json.dumps(message, separators=(",", ":"))


def framed(body):
    return f"Content-Length: {len(body.encode())}\r\n\r\n{body}"


def framing_seeds():
    seeds = {
        "ndjson_two": request("initialize", {"protocol_version": "1.0"}) + "\n" + request("network.info", id="a") + "\n",
        "ndjson_crlf_notification": '{"jsonrpc":"2.0","method":"x","params":[1,2]}\r\n' + request("fail", {"k": [1.5, None]}) + "\r\n",
        "batch": json.dumps([json.loads(request("echo", {"a": 1})), {"jsonrpc": "2.0", "method": "n"}, 5, []]) + "\n",
        "empty_batch": "[]\n",
        "content_length": framed(request("echo", {"s": "\u00e9\u4e2d\U0001F600"})) + framed(request("throw", id=None)),
        "content_length_lf_only": "Content-Length: 2\n\n{}" + "content-length:   7 \r\nX-Other: y\r\n\r\n[1,2,3]",
        "content_length_bad": "Content-Length: -3\r\n\r\nContent-Length: 99999999999999999999\r\n\r\n",
        "content_length_over_limit": "Content-Length: 300\r\n\r\n" + "[" + "1," * 149 + "]",
        "call_record_between_lines": b"[]\n" + struct.pack("<BBHIQQ", 0xFF, 1, 1, 24, 1, 0) + b"{}\n",
        "long_line": "[" + ",".join(["\"x\""] * 100) + "]\n",
        "mixed": request("echo") + "\n" + framed('{"jsonrpc":"2.0","id":null,"method":"m","params":{}}') + "\n  \n" + "garbage\n",
        "truncated_content_length": "Content-Length: 50\r\n\r\n{\"jsonrpc\"",
        "bad_ids": '{"jsonrpc":"2.0","id":[1],"method":"m"}\n{"jsonrpc":"1.0","id":2,"method":"m"}\n{"jsonrpc":"2.0","id":3,"method":7}\n',
        "escapes": '{"jsonrpc":"2.0","id":"\\u0000\\ud83d\\ude00","method":"echo","params":{"\\u00e9":"\\n"}}\n',
        "header_prefix_only": "Content-Len",
    }
    for name, text in seeds.items():
        write("framing", name, text)


def zeros(shape):
    count = 1
    for extent in shape:
        count *= extent
    return {"dtype": "F32", "shape": shape, "data": base64.b64encode(bytes(4 * count)).decode()}


def network_params_seeds():
    linear = {"name": "lin", "kind": "linear", "in_features": 8, "out_features": 6}
    conv2d = {"name": "conv", "kind": "conv2d", "in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1}
    seeds = {
        "lora_linear": {"create": {"algo": "lora", "options": {"lora_dim": 4, "alpha": 2}, "layers": [linear]}},
        "loha_conv": {"create": {"algo": "loha", "seed": 3, "layers": [conv2d, linear],
                                 "options": {"lora_dim": 2, "use_tucker": True, "conv_dim": 2, "conv_alpha": 1}}},
        "lokr_factor": {"create": {"algo": "lokr", "options": {"factor": 4, "decompose_both": True, "full_matrix": False},
                                   "layers": [dict(linear, out_features=16, in_features=16)]}},
        "ia3_weight": {"create": {"algo": "ia3", "layers": [dict(linear, weight=zeros([6, 8]))]}},
        "dylora_block": {"create": {"algo": "dylora", "options": {"lora_dim": 4, "block_size": 2}, "layers": [linear]}},
        "norms": {"create": {"algo": "norm", "layers": [
            {"name": "ln", "kind": "layer_norm", "normalized_shape": [2, 4], "eps": 1e-6, "weight": zeros([2, 4]), "bias": zeros([2, 4])},
            {"name": "gn", "kind": "group_norm", "num_groups": 2, "num_channels": 4, "has_bias": False}]}},
        "conv1d_conv3d": {"create": {"layers": [
            {"name": "c1", "kind": "conv1d", "in_channels": 2, "out_channels": 4, "kernel_size": [3], "stride": [2], "dilation": 2},
            {"name": "c3", "kind": "conv3d", "in_channels": 2, "out_channels": 2, "kernel_size": [1, 3, 3], "groups": 2}]}},
        "per_layer_algo": {"create": {"multiplier": 0.5, "layers": [dict(linear, algo="loha", options={"lora_dim": 1}), dict(conv2d, algo="LoKr")]}},
        "bad_params": {"create": [1, 2], "load": "path"},
        "over_limit": {"create": {"layers": [dict(linear, in_features=2000000)]}},
        "load_fixture": {"create": {"layers": [linear]},
                         "load": {"path": "Tests/LycorisAlgorithmsTests/Fixtures/networks/lora.safetensors", "strict": True}},
        "load_missing": {"create": {"layers": [linear]}, "load": {"path": "/nonexistent.safetensors"}},
        "load_without_network": {"load": {"path": "fuzz/corpus/adapter-file/lokr.safetensors"}},
    }
    for name, value in seeds.items():
        write("network-params", name, json.dumps(value, separators=(",", ":")))


def record(code, id, body):
    """A call record: the 16-byte header (struct <BBHIQ) and `body`."""
    return struct.pack("<BBHIQ", 0xFF, 1, code, 16 + len(body), id) + body


def forward_body(handle=0, flags=1, offset=0, dtype=0, shape=(2, 16), output=4096):
    return (struct.pack("<II", handle, flags) + struct.pack("<QBBH", offset, dtype, len(shape), 0)
            + struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<QB3x", output, 0))


def backward_body(tape=1, flags=7, shape=(2, 24), outputs=(8192, 12288, 16384)):
    return (struct.pack("<QII", tape, flags, len(outputs) - 1) + struct.pack("<QBBH", 0, 0, len(shape), 0)
            + struct.pack(f"<{len(shape)}Q", *shape) + b"".join(struct.pack("<QB3x", o, 0) for o in outputs))


def call_record_seeds():
    forward = record(1, 1, forward_body())
    seeds = {
        "forward_backward": forward + record(2, 2, backward_body()),
        "forward_elementwise_full_json": record(1, 3, forward_body(flags=7)) + b'{"jsonrpc":"2.0","id":1,"method":"x"}\n' + forward,
        "truncated": record(1, 4, forward_body())[:-20],
        "unknown_method": record(9, 5, forward_body()),
        "unknown_handle": record(1, 6, forward_body(handle=3)),
        "bad_dtype_and_past_arena": record(1, 7, forward_body(dtype=5)) + record(1, 8, forward_body(offset=65536 - 8)),
        "wrong_shape_rank": record(1, 9, forward_body(shape=(2, 17))) + record(1, 10, forward_body(shape=(1,) * 9)),
        "short_length": b"\xff\x01\x01\x00\x08\x00\x00\x00" + forward,
        "release_between": forward + record(3, 0, struct.pack("<I2Q", 2, 1, 7)) + record(3, 0, struct.pack("<I", 5)) + forward,
        "backward_unknown_tape_count": record(2, 11, backward_body(tape=99)) + forward + record(2, 12, backward_body(outputs=(8192,))),
    }
    for name, data in seeds.items():
        write("call-record", name, data)


if __name__ == "__main__":
    for target in ["safetensors", "adapter-file", "framing", "network-params", "call-record"]:
        (CORPUS / target).mkdir(parents=True, exist_ok=True)
    copy_fixtures()
    framing_seeds()
    network_params_seeds()
    call_record_seeds()
