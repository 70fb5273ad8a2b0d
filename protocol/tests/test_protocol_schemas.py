"""The wire protocol of lycoris-server against protocol/openrpc.json, on the real binary.

Every response read by `Server` (conftest.py) is validated: the JSON-RPC envelope, then the
result against the method's result schema or the error against ErrorObject. The tests
drive every method with valid inputs (base64 tensors, and one session through a mapped
arena), check the numbers against numpy where the math is simple (LoRA), and provoke each
error code of the table in protocol/README.md.
"""
from __future__ import annotations

import base64
import json
import math
import mmap
import os
import re
import stat

import jsonschema
import numpy as np
import pytest

from conftest import DOCUMENT_PATH, REPO_ROOT, encode, inline, load_document, tensor

DOCUMENT = load_document()
METHOD_NAMES = [m["name"] for m in DOCUMENT["methods"]]
PRE_INITIALIZATION = {"initialize", "rpc.discover", "shutdown"}

# A compact structural schema of an OpenRPC 1.2 document: the parts this project uses.
OPENRPC_STRUCTURE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["openrpc", "info", "methods"],
    "additionalProperties": False,
    "properties": {
        "openrpc": {"type": "string", "pattern": r"^1\.2\.\d+$"},
        "info": {
            "type": "object",
            "required": ["title", "version"],
            "properties": {"title": {"type": "string"}, "version": {"type": "string"}, "description": {"type": "string"}},
        },
        "methods": {"type": "array", "items": {"$ref": "#/$defs/method"}},
        "components": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "schemas": {"type": "object", "additionalProperties": {"type": ["object", "boolean"]}},
                "errors": {"type": "object", "additionalProperties": {"$ref": "#/$defs/error"}},
            },
        },
    },
    "$defs": {
        "contentDescriptor": {
            "type": "object",
            "required": ["name", "schema"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "required": {"type": "boolean"},
                "deprecated": {"type": "boolean"},
                "schema": {"type": ["object", "boolean"]},
            },
        },
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}},
        },
        "method": {
            "type": "object",
            "required": ["name", "params", "result"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "paramStructure": {"enum": ["by-name", "by-position", "either"]},
                "params": {"type": "array", "items": {"$ref": "#/$defs/contentDescriptor"}},
                "result": {"$ref": "#/$defs/contentDescriptor"},
                "errors": {
                    "type": "array",
                    "items": {"anyOf": [
                        {"$ref": "#/$defs/error"},
                        {"type": "object", "required": ["$ref"], "additionalProperties": False,
                         "properties": {"$ref": {"type": "string", "pattern": "^#/components/errors/"}}},
                    ]},
                },
            },
        },
    },
}


def pointer(document: dict, ref: str):
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"dangling reference {ref}"
        node = node[part]
    return node


def walk(node, path="#"):
    """(path, value) of every dict in a JSON tree."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}/{index}")


def server_method_table() -> set[str]:
    """The method names in LycorisService.methods, read from the Swift source."""
    source = (REPO_ROOT / "Sources" / "LycorisServer" / "LycorisService.swift").read_text()
    match = re.search(r"static let methods[^=]*=\s*\[(.*?)\n\s*\]", source, re.S)
    assert match, "LycorisService.methods not found in LycorisService.swift"
    return set(re.findall(r'"([^"]+)"\s*:\s*\{', match.group(1)))


# MARK: - The document


def test_document_is_openrpc_with_valid_json_schemas(document):
    jsonschema.Draft202012Validator.check_schema(OPENRPC_STRUCTURE)
    jsonschema.Draft202012Validator(OPENRPC_STRUCTURE).validate(document)
    assert document["info"]["title"] == "lycoris-server"
    assert document["info"]["version"] == "1.0"
    assert len(set(METHOD_NAMES)) == len(METHOD_NAMES), "a method is listed twice"
    # Every schema is a valid draft 2020-12 schema (the meta-schema check)…
    for name, schema in document["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    for method in document["methods"]:
        assert method["paramStructure"] == "by-name", method["name"]
        for descriptor in [*method["params"], method["result"]]:
            jsonschema.Draft202012Validator.check_schema(descriptor["schema"])
        names = [p["name"] for p in method["params"]]
        assert len(set(names)) == len(names), f"{method['name']}: a parameter is listed twice"
    # …and every reference resolves.
    for path, node in walk(document):
        if "$ref" in node and isinstance(node["$ref"], str):
            pointer(document, node["$ref"])
    # The error components are the server's codes.
    codes = {e["code"] for e in document["components"]["errors"].values()}
    assert codes == {-32602, *range(-32009, -32000 + 1)}
    assert set(document["components"]["schemas"]["ErrorCode"]["enum"]) == {
        -32700, -32600, -32601, -32602, -32603, *range(-32009, -32000 + 1)}


def test_schemas_are_strict_where_the_server_is(schemas):
    def valid(instance, name):
        return schemas.component(name).is_valid(instance)

    tensor_ = {"dtype": "F32", "shape": [2], "data": "AAAAAAAAAAA="}
    assert valid(tensor_, "TensorDescriptor") and valid(tensor_, "TensorInput")
    assert valid({"dtype": "BF16", "shape": [2, 3], "offset": 64}, "TensorDescriptor")
    for bad in [dict(tensor_, offset=0), dict(tensor_, dtype="F64"), dict(tensor_, data="AAA"),
                dict(tensor_, data="AAAA AAA="), {"dtype": "F32", "shape": [2]}, dict(tensor_, shape=[-1])]:
        assert not valid(bad, "TensorDescriptor") and not valid(bad, "TensorInput"), bad
    assert not valid(dict(tensor_, note="x"), "TensorDescriptor"), "results carry nothing else"
    assert valid(dict(tensor_, note="x"), "TensorInput"), "the server ignores extra members of inputs"
    assert valid({"lora_dim": 4, "alpha": None, "conv_dim": 0, "bypass_mode": True}, "AdapterOptions")
    for bad in [{"rank": 4}, {"lora_dim": 0}, {"dropout": 1.0}, {"factor": 0}, {"use_tucker": 1}]:
        assert not valid(bad, "AdapterOptions"), bad
    assert valid({"name": "m", "kind": "linear", "in_features": 4, "out_features": 3, "algo": "LoRA"}, "LayerInput")
    assert not valid({"name": "a.b", "kind": "linear", "in_features": 4, "out_features": 3}, "LayerInput")
    assert valid({"name": "m", "kind": "conv1d", "in_channels": 4, "out_channels": 3, "kernel_size": [3], "stride": 2}, "LayerInput")
    assert valid({"name": "m", "kind": "conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": [3, 1, 3]}, "LayerInput")
    assert not valid({"name": "m", "kind": "conv1d", "in_channels": 4, "out_channels": 3, "kernel_size": [3, 3]}, "LayerInput")
    assert not valid({"name": "m", "kind": "conv3d", "in_channels": 4, "out_channels": 3, "padding": [1, 1]}, "LayerInput")
    assert not valid({"name": "m", "kind": "norm", "in_channels": 4, "out_channels": 3}, "LayerInput")
    assert not valid({"name": "m", "kind": "linear", "in_features": 4, "out_features": 3, "algo": "bogus"}, "LayerInput")
    assert not valid({"code": -32099, "message": "x"}, "ErrorObject")
    assert not valid({"code": -32001, "message": "x", "data": {"module": "m", "extra": 1}}, "ErrorObject")
    assert not valid({"jsonrpc": "2.0", "id": 1, "result": None, "error": {"code": -32601, "message": "x"}}, "Response")
    assert not valid({"modules": [], "parameter_count": 0, "training": False, "skipped_layers": []}, "NetworkInfo")


def test_the_document_on_disk_is_what_the_server_embeds():
    swift = (REPO_ROOT / "Sources" / "LycorisServer" / "OpenRPCDocument.swift").read_text(encoding="utf-8")
    text = DOCUMENT_PATH.read_text(encoding="utf-8")
    assert text in swift, "OpenRPCDocument.swift is stale: run python3 scripts/embed_openrpc.py and rebuild"


def test_rpc_discover_returns_the_document(start_server, document):
    server = start_server(initialize=False)
    assert server.call("rpc.discover") == document, "rpc.discover before initialize"
    server.call("initialize")
    assert server.call("rpc.discover", {}) == document, "rpc.discover after initialize"


def test_method_table_matches_the_document(start_server, document):
    # The source's table and the document list the same names.
    table = server_method_table()
    assert table == set(METHOD_NAMES), (
        f"in the server, not documented: {sorted(table - set(METHOD_NAMES))}; "
        f"documented, not in the server: {sorted(set(METHOD_NAMES) - table)}")
    # And the running server knows every documented name: before initialize a known
    # method answers -32000 (or runs, for the three allowed ones), an unknown one -32601.
    server = start_server(initialize=False)
    for name in ["lycoris.frobnicate", "network.destroy", "", "Initialize"]:
        error = server.error(name, {}, code=-32601)
        assert error["data"] == {"method": name}
    for name in METHOD_NAMES:
        if name in PRE_INITIALIZATION:
            continue
        error = server.error(name, {})
        assert error["code"] == -32000, f"{name}: {error}"
        assert error["data"] == {"method": name}
    server.call("rpc.discover")
    server.call("initialize", {})
    for name in METHOD_NAMES:
        if name == "shutdown":
            continue
        response = server.request(name, {})
        assert response.get("error", {}).get("code") != -32601, f"{name} is documented but unknown to the server"
    assert server.call("shutdown") is None
    assert server.process.wait(timeout=30) == 0


# MARK: - A whole session with base64 tensors


def lora_delta(x, down, up, scale, multiplier=1.0):
    return multiplier * scale * (x @ down.T @ up.T)


def close(actual, expected, tolerance=1e-4):
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance)


def test_base64_session_drives_every_method(start_server, tmp_path):
    rng = np.random.default_rng(0)
    server = start_server()
    info = server.call("initialize", {"protocol_version": "1.3", "client": "pytest"})
    assert info["protocol_version"] == "1.0"
    assert info["capabilities"]["dtypes"] == ["F32", "F16", "BF16"]
    assert set(info["capabilities"]["algorithms"]) == {"locon", "loha", "lokr", "ia3", "dylora", "glora", "full", "diag-oft", "boft", "norms", "tlora"}
    assert server.call("network.seed", {"seed": 7}) is None

    W = rng.standard_normal((6, 8)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    created = server.call("network.create", {
        "algo": "lora", "seed": 1, "options": {"lora_dim": 2, "alpha": 1},
        "layers": [
            {"name": "lora_unet_q", "kind": "linear", "in_features": 8, "out_features": 6,
             "weight": inline(W), "bias": inline(b)},
            {"name": "lora_unet_k", "kind": "linear", "in_features": 8, "out_features": 4},
            {"name": "lora_unet_conv", "kind": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3,
             "padding": 1, "algo": "LoHa", "options": {"conv_dim": 2, "conv_alpha": 2}},
            {"name": "lora_unet_skip", "kind": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3, 3],
             "options": {"conv_dim": 0}},
        ],
    })
    assert created["skipped_layers"] == ["lora_unet_skip"]
    assert [m["name"] for m in created["modules"]] == ["lora_unet_q", "lora_unet_k", "lora_unet_conv"]
    q, k, conv = created["modules"]
    assert (q["algorithm"], q["rank"], q["scale"]) == ("locon", 2, 0.5)
    assert (conv["algorithm"], conv["rank"], conv["scale"]) == ("loha", 2, 1.0)
    assert conv["layer"] == {"kind": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": [3, 3],
                             "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    assert created["training"] is False
    info = server.call("network.info")
    assert info["modules"] == created["modules"] and "skipped_layers" not in info
    keys = [p["key"] for m in info["modules"] for p in m["parameters"]]
    assert sum(math.prod(p["shape"]) for m in info["modules"] for p in m["parameters"]) == info["parameter_count"]

    # Known LoRA factors, so that the outputs can be checked.
    down = rng.standard_normal((2, 8)).astype(np.float32)
    up = rng.standard_normal((6, 2)).astype(np.float32)
    updated = server.call("parameters.set", {"parameters": {
        "lora_unet_q.lora_down.weight": inline(down), "lora_unet_q.lora_up.weight": inline(up, "F16")}})
    assert updated == {"updated": 2}
    up = up.astype(np.float16).astype(np.float32)
    got = server.call("parameters.get", {"keys": ["lora_unet_q.lora_down.weight", "lora_unet_q.lora_up.weight"],
                                         "outputs": {"lora_unet_q.lora_up.weight": {"dtype": "F16"}}})["parameters"]
    assert got["lora_unet_q.lora_down.weight"]["dtype"] == "F32"
    assert got["lora_unet_q.lora_up.weight"]["dtype"] == "F16"
    close(tensor(got["lora_unet_q.lora_down.weight"]), down)
    close(tensor(got["lora_unet_q.lora_up.weight"]), up)
    everything = server.call("parameters.get", {"dtype": "BF16"})["parameters"]
    assert list(everything) == keys and all(d["dtype"] == "BF16" for d in everything.values())

    # T-LoRA's mask (no T-LoRA module here: accepted and ignored), then every rank again.
    assert server.call("network.set_timestep_mask", {"mask": [1, 1, 0]}) is None
    assert server.call("network.set_timestep_mask", {"mask": None}) is None
    # forward in training mode: tapes by default.
    assert server.call("network.set_training", {"training": True}) is None
    x = (rng.integers(-8, 8, (3, 8)) / 4).astype(np.float32)  # exact in F16 and BF16
    image = (rng.integers(-8, 8, (2, 3, 5, 5)) / 4).astype(np.float32)
    forward = server.call("forward", {"calls": [
        {"module": "lora_unet_q", "input": inline(x)},
        {"module": "lora_unet_q", "input": inline(x, "BF16"), "full": True, "output": {"dtype": "F32"}},
        {"module": "lora_unet_conv", "input": inline(image, "F16")},
        {"module": "lora_unet_k", "input": inline(x)},
    ]})["results"]
    assert [r["module"] for r in forward] == ["lora_unet_q", "lora_unet_q", "lora_unet_conv", "lora_unet_k"]
    tapes = [r["tape"] for r in forward]
    assert len(set(tapes)) == 4
    delta = lora_delta(x, down, up, 0.5)
    close(tensor(forward[0]["output"]), delta)
    close(tensor(forward[1]["output"]), x @ W.T + b + delta)
    assert forward[2]["output"]["dtype"] == "F16" and forward[2]["output"]["shape"] == [2, 4, 5, 5]
    close(tensor(forward[3]["output"]), np.zeros((3, 4)))  # a new LoRA's up factor is zero

    # backward: dL/dx and this call's parameter gradients; the server accumulates them.
    g = rng.standard_normal((3, 6)).astype(np.float32)
    backward = server.call("backward", {"return_parameter_grads": True, "calls": [
        {"tape": tapes[0], "grad_output": inline(g)},
        {"tape": tapes[1], "grad_output": inline(g), "grad_input": {"dtype": "F32"},
         "parameter_grads": {"lora_unet_q.lora_up.weight": {"dtype": "BF16"}}},
        {"tape": tapes[2], "grad_output": inline(np.ones((2, 4, 5, 5)))},
        {"tape": tapes[3], "grad_output": inline(np.ones((3, 4)))},
    ]})["results"]
    grad_down = 0.5 * (g @ up).T @ x
    grad_up = 0.5 * g.T @ (x @ down.T)
    close(tensor(backward[0]["grad_input"]), 0.5 * g @ up @ down)
    close(tensor(backward[1]["grad_input"]), g @ W + 0.5 * g @ up @ down)
    close(tensor(backward[0]["parameter_grads"]["lora_unet_q.lora_down.weight"]), grad_down)
    close(tensor(backward[0]["parameter_grads"]["lora_unet_q.lora_up.weight"]), grad_up)
    assert backward[1]["parameter_grads"]["lora_unet_q.lora_up.weight"]["dtype"] == "BF16"
    assert set(backward[2]["parameter_grads"]) == {k for k in keys if k.startswith("lora_unet_conv.")}
    accumulated = server.call("gradients.get", {"keys": ["lora_unet_q.lora_down.weight", "lora_unet_q.lora_up.weight"]})
    close(tensor(accumulated["parameters"]["lora_unet_q.lora_down.weight"]), 2 * grad_down)
    close(tensor(accumulated["parameters"]["lora_unet_q.lora_up.weight"]), 2 * grad_up)
    with pytest.raises(Exception) as used:
        server.call("backward", {"calls": [{"tape": tapes[0], "grad_output": inline(g)}]})
    assert used.value.code == -32001  # a tape serves one backward

    # keep: a tape may serve a second backward (retain_graph) until tapes.release drops it.
    kept = server.call("forward", {"grad": True, "calls": [{"module": "lora_unet_q", "input": inline(x)}]})["results"][0]["tape"]
    for _ in range(2):
        again = server.call("backward", {"accumulate": False, "calls": [{"tape": kept, "grad_output": inline(g), "keep": True}]})
        close(tensor(again["results"][0]["grad_input"]), 0.5 * g @ up @ down)
    assert server.call("network.info")["pending_tapes"] == 1
    assert server.call("tapes.release", {"tapes": [kept, kept, 123456]}) == {"released": 1, "pending": 0}
    assert server.call("network.info")["pending_tapes"] == 0

    # ΔW and its backward (rebuild-mode clients).
    dw = server.call("delta_weight", {"modules": ["lora_unet_q"], "grad": True, "dtype": "F32"})["results"]
    assert dw[0]["module"] == "lora_unet_q"
    close(tensor(dw[0]["delta_weight"]), 0.5 * up @ down)
    G = rng.standard_normal((6, 8)).astype(np.float32)
    dwb = server.call("delta_weight_backward", {"accumulate": False, "return_parameter_grads": True, "calls": [
        {"tape": dw[0]["tape"], "grad": inline(G)}]})["results"]
    close(tensor(dwb[0]["parameter_grads"]["lora_unet_q.lora_up.weight"]), 0.5 * G @ down.T)
    close(tensor(dwb[0]["parameter_grads"]["lora_unet_q.lora_down.weight"]), 0.5 * up.T @ G)
    all_dw = server.call("delta_weight", {"grad": False})["results"]
    assert [r["module"] for r in all_dw] == ["lora_unet_q", "lora_unet_k", "lora_unet_conv"]
    assert all("tape" not in r for r in all_dw)
    quiet = server.call("delta_weight_backward", {"calls": []})
    assert quiet == {"results": []}

    # The optimizer steps on the accumulated gradients, then clears them.
    norm = math.sqrt(sum(float(np.sum(tensor(t) ** 2)) for t in server.call("gradients.get")["parameters"].values()))
    assert server.call("optimizer.create", {"type": "adamw", "lr": 1e-2, "betas": [0.9, 0.99], "eps": 1e-8,
                                            "weight_decay": 0.0, "max_grad_norm": 1.0,
                                            "groups": [{"prefix": "lora_unet_conv", "lr": 1e-3}]}) == {"type": "adamw", "step": 0}
    before = tensor(server.call("parameters.get", {"keys": ["lora_unet_q.lora_up.weight"]})["parameters"]["lora_unet_q.lora_up.weight"])
    step = server.call("optimizer.step", {"zero_grad": True})
    assert step["step"] == 1 and step["clipped"] is (norm > 1.0)
    assert step["grad_norm"] == pytest.approx(norm, rel=1e-4)
    after = tensor(server.call("parameters.get", {"keys": ["lora_unet_q.lora_up.weight"]})["parameters"]["lora_unet_q.lora_up.weight"])
    assert not np.allclose(before, after)
    assert all(not tensor(t).any() for t in server.call("gradients.get")["parameters"].values())
    optimizer_file = tmp_path / "optimizer.safetensors"
    assert server.call("optimizer.save", {"path": str(optimizer_file)}) == {"path": str(optimizer_file), "step": 1}
    assert server.call("optimizer.load", {"path": str(optimizer_file)}) == {"type": "adamw", "step": 1}
    assert server.call("optimizer.create", {"type": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True}) == {"type": "sgd", "step": 0}
    assert server.call("gradients.zero") is None
    assert server.call("optimizer.step")["step"] == 1

    # Multiplier, then save and load (in Content-Length framing, to mix framings).
    assert server.call("network.set_multiplier", {"multiplier": 0.5}) is None
    assert server.call("network.set_training", {"training": False}) is None
    values = server.call("parameters.get")["parameters"]
    down2 = tensor(values["lora_unet_q.lora_down.weight"])
    up2 = tensor(values["lora_unet_q.lora_up.weight"])
    half = server.call("forward", {"calls": [{"module": "lora_unet_q", "input": inline(x)}]}, framing="content-length")["results"]
    assert "tape" not in half[0]
    close(tensor(half[0]["output"]), lora_delta(x, down2, up2, 0.5, 0.5))
    adapter = tmp_path / "adapter.safetensors"
    saved = server.call("network.save", {"path": str(adapter), "dtype": "F32", "metadata": {"ss_network_module": "lycoris.kohya"}})
    assert saved == {"path": str(adapter), "bytes": adapter.stat().st_size, "modules": 3}
    server.call("network.save", {"path": str(tmp_path / "adapter-bf16.safetensors"), "dtype": "BF16"})
    described = server.call("file.describe", {"path": str(adapter)})
    assert described["bytes"] == adapter.stat().st_size and described["metadata"] == {"ss_network_module": "lycoris.kohya"}
    assert {t["key"]: (t["dtype"], t["shape"]) for t in described["tensors"]}["lora_unet_q.lora_up.weight"] == ("F32", [6, 2])
    text = tmp_path / "notes.safetensors"
    text.write_text("not an adapter\n")
    assert server.error("file.describe", {"path": str(text)}, -32005)["data"] == {"file": str(text), "rule": "not a safetensors file"}
    server.call("parameters.set", {"parameters": {"lora_unet_q.lora_up.weight": inline(np.zeros((6, 2)))}})
    loaded = server.call("network.load", {"path": str(adapter), "strict": True}, framing="content-length")
    assert loaded == {"loaded": ["lora_unet_conv", "lora_unet_k", "lora_unet_q"], "unmatched_file_modules": [],
                      "modules_not_in_file": [], "metadata": {"ss_network_module": "lycoris.kohya"}}
    restored = server.call("parameters.get", {"keys": ["lora_unet_q.lora_up.weight"]})["parameters"]
    close(tensor(restored["lora_unet_q.lora_up.weight"]), up2, 1e-6)

    assert server.call("shutdown") is None
    assert server.read_eof() == b""
    assert server.process.wait(timeout=30) == 0


def test_network_suggest_plans_within_the_budget_and_builds_it(start_server):
    """network.suggest: the plan fits the budget, every layer reaches ⌈target·full rank⌉, and
    the planned algo/options given to network.create build modules of the planned size."""
    server = start_server()
    layers = [{"name": "lora_unet_down_blocks_0_attn_to_q", "kind": "linear", "in_features": 64, "out_features": 64},
              {"name": "lora_unet_down_blocks_0_ff", "kind": "linear", "in_features": 64, "out_features": 256},
              {"name": "lora_unet_down_blocks_1_conv", "kind": "conv2d", "in_channels": 32, "out_channels": 48,
               "kernel_size": 3, "padding": 1},
              {"name": "lora_te_layers_0_fc", "kind": "linear", "in_features": 30, "out_features": 7}]
    full = {"lora_unet_down_blocks_0_attn_to_q": 64, "lora_unet_down_blocks_0_ff": 64,
            "lora_unet_down_blocks_1_conv": 48, "lora_te_layers_0_fc": 7}
    previous = -1.0
    for budget in (1200, 4000, 9000, "30KB"):
        plan = server.call("network.suggest", {"layers": layers, "budget": budget})
        limit = budget if isinstance(budget, int) else 30_000 // 2
        assert plan["budget"] == limit and plan["parameters"] <= limit and plan["bytes"] == 2 * plan["parameters"]
        assert plan["parameters"] == sum(entry["parameters"] for entry in plan["layers"])
        assert [entry["name"] for entry in plan["layers"]] == [layer["name"] for layer in layers]
        for entry in plan["layers"]:
            assert entry["full_rank"] == full[entry["name"]]
            assert entry["attainable_rank"] >= min(full[entry["name"]], max(1, math.ceil(plan["target"] * entry["full_rank"])))
        assert [b["name"] for b in plan["blocks"]] == ["lora_unet_down_blocks_0", "lora_unet_down_blocks_1", "lora_te_layers_0"]
        assert plan["target"] >= previous
        previous = plan["target"]
    assert {entry["algo"] for entry in plan["layers"]} <= {"locon", "loha", "lokr"}
    created = server.call("network.create", {"layers": [
        {**layer, "algo": entry["algo"], "options": entry["options"]} for layer, entry in zip(layers, plan["layers"])]})
    for module, entry in zip(created["modules"], plan["layers"]):
        assert module["algorithm"] == entry["algo"]
        assert sum(math.prod(p["shape"]) for p in module["parameters"]) == entry["parameters"], module
    assert "too small" in server.error("network.suggest", {"layers": layers, "budget": 10}, -32602)["message"]
    for bad in ({"layers": layers, "budget": "12 parsecs"}, {"layers": layers, "budget": 0},
                {"layers": layers, "budget": 100, "dtype": "f8"},
                {"layers": [{"name": "n", "kind": "layer_norm", "normalized_shape": 8}], "budget": 100}):
        server.error("network.suggest", bad, -32602)


def test_other_algorithms_and_options(start_server):
    server = start_server()
    weight = np.ones((6, 8), dtype=np.float32)
    created = server.call("network.create", {"seed": 3, "multiplier": 0.75, "layers": [
        {"name": "ia3", "kind": "linear", "in_features": 8, "out_features": 6, "algo": "ia3", "weight": inline(weight),
         "options": {"train_on_input": True}},
        {"name": "lokr", "kind": "linear", "in_features": 8, "out_features": 6, "algo": "lokr",
         "options": {"lora_dim": 2, "factor": 2, "decompose_both": True, "use_scalar": True, "rs_lora": True}},
        {"name": "dylora", "kind": "linear", "in_features": 8, "out_features": 6, "algo": "dylora",
         "options": {"lora_dim": 4, "block_size": 2, "alpha": None}},
        {"name": "locon_tucker", "kind": "conv2d", "in_channels": 4, "out_channels": 4, "kernel_size": [3, 3],
         "stride": 2, "groups": 1, "algo": "locon",
         "options": {"use_tucker": True, "bypass_mode": True, "rank_dropout": 0.1, "module_dropout": 0.1,
                     "dropout": 0.1, "rank_dropout_scale": True}},
        {"name": "loha_conv", "kind": "conv2d", "in_channels": 4, "out_channels": 6, "kernel_size": 1, "algo": "loha",
         "options": {"full_matrix": False, "unbalanced_factorization": False}},
    ]})
    modules = {m["name"]: m for m in created["modules"]}
    assert modules["ia3"]["rank"] is None and modules["ia3"]["parameters"] == [{"key": "ia3.weight", "shape": [8]}]
    assert all(m["multiplier"] == 0.75 for m in created["modules"])
    assert modules["dylora"]["rank"] == 4
    assert server.call("network.set_training", {"training": True}) is None
    forward = server.call("forward", {"calls": [
        {"module": name, "input": inline(np.ones((1, 4, 7, 7)) if "conv" in name or "tucker" in name else np.ones((2, 8)))}
        for name in modules]})["results"]
    assert all("tape" in r for r in forward)
    backward = server.call("backward", {"calls": [
        {"tape": r["tape"], "grad_output": inline(np.ones(r["output"]["shape"]))} for r in forward]})
    assert len(backward["results"]) == len(forward)


def test_dora_glora_full(start_server):
    """DoRA (weight_decompose), GLoRA and Full on linear layers: ΔW (DoRA's W'(m) − W0), Full's
    Δb and Δ(x), checked against numpy; the schemas check every result."""
    rng = np.random.default_rng(9)
    server = start_server()
    w0 = rng.standard_normal((6, 8)).astype(np.float32)
    b0 = rng.standard_normal(6).astype(np.float32)
    layer = {"kind": "linear", "in_features": 8, "out_features": 6}
    created = server.call("network.create", {"multiplier": 0.5, "layers": [
        dict(layer, name="dora", algo="lora", weight=inline(w0), options={"lora_dim": 2, "alpha": 2.0, "weight_decompose": True}),
        dict(layer, name="glora", algo="glora", weight=inline(w0), options={"lora_dim": 2, "alpha": 1.0}),
        dict(layer, name="full", algo="full", has_bias=True),
    ]})
    modules = {m["name"]: m for m in created["modules"]}
    assert modules["dora"]["algorithm"] == "locon"
    assert [p["key"] for p in modules["dora"]["parameters"]] == ["dora.lora_down.weight", "dora.lora_up.weight", "dora.dora_scale"]
    assert [p["shape"] for p in modules["glora"]["parameters"]] == [[8, 2], [2, 8], [6, 2], [2, 8]]
    assert modules["full"]["parameters"] == [{"key": "full.diff", "shape": [6, 8]}, {"key": "full.diff_b", "shape": [6]}]
    assert modules["full"]["rank"] is None
    values = {p["key"]: rng.standard_normal(p["shape"]).astype(np.float32) for m in created["modules"] for p in m["parameters"]}
    server.call("parameters.set", {"parameters": {k: inline(v) for k, v in values.items()}})
    delta = {r["module"]: r for r in server.call("delta_weight", {})["results"]}
    v = w0 + values["dora.lora_up.weight"] @ values["dora.lora_down.weight"]  # scale 2/2
    norm = np.linalg.norm(v, axis=1, keepdims=True) + np.finfo(np.float32).eps
    close(tensor(delta["dora"]["delta_weight"]), v * (0.5 * (values["dora.dora_scale"] / norm - 1) + 1) - w0)
    g = values
    close(tensor(delta["glora"]["delta_weight"]),
          0.5 * 0.5 * (w0 @ g["glora.a1.weight"] @ g["glora.a2.weight"] + g["glora.b1.weight"] @ g["glora.b2.weight"]))
    close(tensor(delta["full"]["delta_weight"]), 0.5 * values["full.diff"])
    close(tensor(delta["full"]["delta_bias"]), 0.5 * values["full.diff_b"])
    assert "delta_bias" not in delta["dora"] and "delta_bias" not in delta["glora"]
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out = server.call("forward", {"calls": [{"module": "full", "input": inline(x)}]})["results"][0]
    close(tensor(out["output"]), 0.5 * (x @ values["full.diff"].T + values["full.diff_b"]))
    assert start_server().error("network.create", {"layers": [dict(layer, name="d", options={"weight_decompose": True})]},
                        -32008)["data"] == {"path": "layers[0].weight"}


def test_conv1d_and_conv3d_layers(start_server):
    server = start_server()
    created = server.call("network.create", {"seed": 5, "options": {"lora_dim": 2, "conv_dim": 3}, "layers": [
        {"name": "seq", "kind": "conv1d", "in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": [2], "padding": 1},
        {"name": "volume", "kind": "conv3d", "in_channels": 4, "out_channels": 6, "kernel_size": [1, 3, 3],
         "padding": [0, 1, 1], "algo": "loha", "options": {"use_tucker": True}},
    ]})
    seq, volume = created["modules"]
    assert seq["layer"] == {"kind": "conv1d", "in_channels": 4, "out_channels": 6, "kernel_size": [3], "stride": [2],
                            "padding": [1], "dilation": [1], "groups": 1}
    assert volume["layer"]["kernel_size"] == [1, 3, 3] and volume["layer"]["stride"] == [1, 1, 1]
    # conv_dim follows the kernel's first extent, as in LyCORIS: 3 for k=3, lora_dim for (1, 3, 3).
    assert (seq["rank"], volume["rank"]) == (3, 2)
    assert {p["key"]: p["shape"] for p in volume["parameters"]}["volume.hada_t1"] == [2, 2, 1, 3, 3]
    forward = server.call("forward", {"calls": [
        {"module": "seq", "input": inline(np.ones((2, 4, 9)))},
        {"module": "volume", "input": inline(np.ones((1, 4, 3, 4, 5)))}]})["results"]
    assert [r["output"]["shape"] for r in forward] == [[2, 6, 5], [1, 6, 3, 4, 5]]
    error = server.error("forward", {"calls": [{"module": "seq", "input": inline(np.ones((2, 4, 3, 3)))}]}, -32002)
    assert "conv1d input must be (N, 4, L)" in error["message"] and error["data"] == {"path": "calls[0].input"}


def norm_reference(x, axes, weight, bias, eps):
    """x_hat * weight + bias, x_hat normalised over `axes` (biased variance)."""
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def test_norm_layers(start_server):
    rng = np.random.default_rng(4)
    server = start_server()
    w0 = rng.standard_normal((2, 3)).astype(np.float32)
    b0 = rng.standard_normal((2, 3)).astype(np.float32)
    created = server.call("network.create", {"algo": "norm", "multiplier": 0.5, "options": {"lora_dim": 8}, "layers": [
        {"name": "ln", "kind": "layer_norm", "normalized_shape": [2, 3], "weight": inline(w0), "bias": inline(b0)},
        {"name": "gn", "kind": "group_norm", "num_groups": 2, "num_channels": 4, "eps": 1e-3},
        {"name": "ln_nobias", "kind": "layer_norm", "normalized_shape": 3, "has_bias": False, "algo": "NORMS"},
        {"name": "lin", "kind": "linear", "in_features": 3, "out_features": 2, "algo": "lora"},
    ]})
    ln, gn, nobias, lin = created["modules"]
    assert ln["layer"] == {"kind": "layer_norm", "normalized_shape": [2, 3], "eps": 1e-5, "has_bias": True}
    assert gn["layer"] == {"kind": "group_norm", "num_groups": 2, "num_channels": 4, "eps": 1e-3, "has_bias": True}
    assert nobias["layer"]["has_bias"] is False
    assert (ln["algorithm"], ln["rank"], ln["scale"]) == ("norms", None, 1.0)
    assert ln["parameters"] == [{"key": "ln.w_norm", "shape": [6]}, {"key": "ln.b_norm", "shape": [6]}]
    w, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    server.call("parameters.set", {"parameters": {"ln.w_norm": inline(w), "ln.b_norm": inline(b),
                                                  "gn.w_norm": inline(w[:4]), "gn.b_norm": inline(b[:4])}})
    x = rng.standard_normal((4, 2, 3)).astype(np.float32)
    image = rng.standard_normal((2, 4, 3, 2)).astype(np.float32)
    forward = server.call("forward", {"grad": True, "calls": [
        {"module": "ln", "input": inline(x)}, {"module": "ln", "input": inline(x), "full": True},
        {"module": "gn", "input": inline(image)}]})["results"]
    dw, db = 0.5 * w.reshape(2, 3), 0.5 * b.reshape(2, 3)
    close(tensor(forward[0]["output"]), norm_reference(x, (1, 2), dw, db, 1e-5))
    close(tensor(forward[1]["output"]), norm_reference(x, (1, 2), w0 + dw, b0 + db, 1e-5))
    groups = image.reshape(2, 2, 2, 3, 2)
    expected = norm_reference(groups, (2, 3, 4), 1, 0, 1e-3).reshape(image.shape) * (0.5 * w[:4]).reshape(1, 4, 1, 1) \
        + (0.5 * b[:4]).reshape(1, 4, 1, 1)
    close(tensor(forward[2]["output"]), expected)
    backward = server.call("backward", {"return_parameter_grads": True, "calls": [
        {"tape": r["tape"], "grad_output": inline(np.ones(r["output"]["shape"]))} for r in forward]})["results"]
    assert set(backward[0]["parameter_grads"]) == {"ln.w_norm", "ln.b_norm"}
    close(tensor(backward[0]["parameter_grads"]["ln.b_norm"]), np.full(6, 0.5 * 4))

    server.call("arena.create", {"size": 4096})
    delta = server.call("delta_weight", {"grad": True, "dtype": "F16", "bias_outputs": {"ln": {"offset": 64}}})["results"]
    assert [("delta_bias" in r) for r in delta] == [True, True, False, False]
    assert delta[0]["delta_bias"] == {"dtype": "F16", "shape": [2, 3], "offset": 64}
    close(tensor(delta[0]["delta_weight"]), dw, tolerance=1e-3)
    close(tensor(delta[1]["delta_bias"]), 0.5 * b[:4], tolerance=1e-3)
    grads = server.call("delta_weight_backward", {"return_parameter_grads": True, "calls": [
        {"tape": delta[0]["tape"], "grad": inline(np.ones((2, 3))), "grad_bias": inline(np.full((2, 3), 2.0))},
        {"tape": delta[1]["tape"], "grad": inline(np.ones(4))},
    ]})["results"]
    close(tensor(grads[0]["parameter_grads"]["ln.b_norm"]), np.full(6, 1.0))
    close(tensor(grads[1]["parameter_grads"]["gn.b_norm"]), np.zeros(4))
    error = server.error("delta_weight_backward", {"calls": [
        {"tape": delta[3]["tape"], "grad": inline(np.ones((2, 3))), "grad_bias": inline(np.ones(2))}]}, -32002)
    assert error["data"] == {"path": "calls[0].grad_bias"}

    other = start_server()
    assert other.error("network.create", {"layers": [
        {"name": "gn", "kind": "group_norm", "num_groups": 3, "num_channels": 4, "algo": "norm"}]}, -32602)["data"] == {"path": "layers[0]"}
    assert other.error("network.create", {"layers": [
        {"name": "ln", "kind": "layer_norm", "normalized_shape": 4, "in_features": 4, "algo": "norm"}]}, -32602)["data"] == {"path": "layers[0].in_features"}
    assert other.error("network.create", {"layers": [
        {"name": "ln", "kind": "layer_norm", "normalized_shape": 4}]}, -32008)["data"] == {"path": "layers[0]"}
    assert other.error("network.create", {"algo": "norm", "layers": [
        {"name": "lin", "kind": "linear", "in_features": 4, "out_features": 2}]}, -32008)["data"] == {"path": "layers[0]"}


# MARK: - The arena


def test_arena_session(start_server, tmp_path):
    rng = np.random.default_rng(1)
    server = start_server("--arena-dir", str(tmp_path))
    capabilities = server.call("initialize")["capabilities"]
    assert capabilities["arena"]["directory"] == str(tmp_path)
    arena = server.call("arena.create", {"size": 1 << 14})
    path, size = arena["path"], arena["size"]
    assert size == 1 << 14 and os.path.dirname(path) == str(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.path.getsize(path) == size
    handle = open(path, "r+b")
    memory = mmap.mmap(handle.fileno(), size)
    try:
        server.call("network.create", {"options": {"lora_dim": 2, "alpha": 2}, "layers": [
            {"name": "lora_unet_q", "kind": "linear", "in_features": 8, "out_features": 6}]})
        down = rng.standard_normal((2, 8)).astype(np.float32)
        up = rng.standard_normal((6, 2)).astype(np.float32)
        # The client places tensors at offsets it chooses: parameters from the arena too.
        memory[0:64] = down.astype("<f4").tobytes()
        memory[64:112] = up.astype("<f4").tobytes()
        server.call("parameters.set", {"parameters": {
            "lora_unet_q.lora_down.weight": {"dtype": "F32", "shape": [2, 8], "offset": 0},
            "lora_unet_q.lora_up.weight": {"dtype": "F32", "shape": [6, 2], "offset": 64}}})
        x = (rng.integers(-8, 8, (4, 8)) / 4).astype(np.float32)
        memory[1024:1152] = x.astype("<f4").tobytes()
        memory[2048:2112] = encode(x, "BF16")  # exact: x holds multiples of 1/4
        forward = server.call("forward", {"grad": True, "calls": [
            {"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": 1024}, "output": {"offset": 4096}},
            {"module": "lora_unet_q", "input": {"dtype": "BF16", "shape": [4, 8], "offset": 2048},
             "output": {"offset": 4200, "dtype": "F16"}},
            {"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": 1024}},
        ]})["results"]
        assert forward[0]["output"] == {"dtype": "F32", "shape": [4, 6], "offset": 4096}
        assert forward[1]["output"] == {"dtype": "F16", "shape": [4, 6], "offset": 4200}
        assert forward[2]["output"]["dtype"] == "F32" and "data" in forward[2]["output"]
        expected = x @ down.T @ up.T  # scale alpha/r = 1
        close(tensor(forward[0]["output"], memory), expected)
        close(tensor(forward[1]["output"], memory), expected, 1e-2)
        close(tensor(forward[2]["output"]), expected)

        g = rng.standard_normal((4, 6)).astype(np.float32)
        memory[6000:6096] = g.astype("<f4").tobytes()
        backward = server.call("backward", {"return_parameter_grads": True, "calls": [{
            "tape": forward[0]["tape"], "grad_output": {"dtype": "F32", "shape": [4, 6], "offset": 6000},
            "grad_input": {"offset": 7000},
            "parameter_grads": {"lora_unet_q.lora_up.weight": {"offset": 8000}, "lora_unet_q.lora_down.weight": {"offset": 8192, "dtype": "BF16"}},
        }]})["results"][0]
        assert backward["grad_input"] == {"dtype": "F32", "shape": [4, 8], "offset": 7000}
        close(tensor(backward["grad_input"], memory), g @ up @ down)
        assert backward["parameter_grads"]["lora_unet_q.lora_up.weight"] == {"dtype": "F32", "shape": [6, 2], "offset": 8000}
        close(tensor(backward["parameter_grads"]["lora_unet_q.lora_up.weight"], memory), g.T @ (x @ down.T))
        close(tensor(backward["parameter_grads"]["lora_unet_q.lora_down.weight"], memory), (g @ up).T @ x, 2e-2)

        got = server.call("parameters.get", {"outputs": {"lora_unet_q.lora_down.weight": {"offset": 9000}}})["parameters"]
        assert got["lora_unet_q.lora_down.weight"] == {"dtype": "F32", "shape": [2, 8], "offset": 9000}
        close(tensor(got["lora_unet_q.lora_down.weight"], memory), down)
        grads = server.call("gradients.get", {"dtype": "F16", "outputs": {"lora_unet_q.lora_up.weight": {"offset": 9100}}})
        assert grads["parameters"]["lora_unet_q.lora_up.weight"]["offset"] == 9100
        dw = server.call("delta_weight", {"outputs": {"lora_unet_q": {"offset": 10000, "dtype": "BF16"}}})["results"][0]
        assert dw["delta_weight"] == {"dtype": "BF16", "shape": [6, 8], "offset": 10000}
        close(tensor(dw["delta_weight"], memory), up @ down, 2e-2)

        # Out of bounds and misaligned descriptors are refused.
        error = server.error("forward", {"calls": [{"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": size - 64}}]}, -32006)
        assert error["data"] == {"path": "calls[0].input"}
        server.error("forward", {"calls": [{"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": 1026}}]}, -32006)

        # Resize keeps the path; the client maps again.
        memory.close()
        resized = server.call("arena.resize", {"size": 1 << 16})
        assert resized == {"path": path, "size": 1 << 16}
        memory = mmap.mmap(handle.fileno(), 1 << 16)
        assert bytes(memory[1024:1152]) == x.astype("<f4").tobytes(), "resizing keeps the contents"
        out = server.call("forward", {"calls": [{"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": 1024},
                                                "output": {"offset": 60000}}]})["results"][0]["output"]
        close(tensor(out, memory), expected)
    finally:
        memory.close()
        handle.close()
    assert server.call("arena.release") is None
    assert not os.path.exists(path), "arena.release unlinks the file"
    server.error("forward", {"calls": [{"module": "lora_unet_q", "input": {"dtype": "F32", "shape": [4, 8], "offset": 0}}]}, -32006)
    server.error("arena.release", {}, -32006)

    # A second arena is unlinked when the client closes stdin.
    again = server.call("arena.create", {"size": 4096, "directory": str(tmp_path)})
    assert again["path"] != path and os.path.exists(again["path"])
    assert server.close() == 0
    assert not os.path.exists(again["path"]), "stdin EOF unlinks the arena"


def test_shutdown_unlinks_the_arena(start_server, tmp_path):
    server = start_server("--arena-dir", str(tmp_path))
    path = server.call("arena.create", {"size": 4096})["path"]
    assert os.path.exists(path)
    server.error("arena.create", {"size": 4096}, -32007)
    assert server.call("shutdown") is None
    assert server.process.wait(timeout=30) == 0
    assert not os.path.exists(path)


# MARK: - Errors


def test_every_error_code(start_server, tmp_path):
    server = start_server(initialize=False)
    # -32000 before initialize.
    assert server.error("network.info", None, -32000)["data"] == {"method": "network.info"}
    # -32602: the protocol version's major must match; named parameters only.
    assert server.error("initialize", {"protocol_version": "2.0"}, -32602)["data"] == {"path": "protocol_version"}
    server.error("initialize", [1], -32602)
    server.call("initialize", {"protocol_version": "1"})
    # -32601
    server.error("no.such.method", None, -32601)
    # -32007: no network yet.
    server.error("network.info", None, -32007)
    server.error("network.load", {"path": str(tmp_path / "x")}, -32007)
    server.error("optimizer.create", {"lr": 0.1}, -32007)
    # -32008: algorithms this version does not compute, algorithms a layer kind does not take.
    linear = {"name": "m", "kind": "linear", "in_features": 4, "out_features": 3}
    assert server.error("network.create", {"algo": "glora", "layers": [linear]}, -32008)["data"] == {"path": "layers[0].weight"}
    server.error("network.create", {"algo": "nonsense", "layers": [linear]}, -32008)
    server.error("network.create", {"layers": [dict(linear, algo="norm")]}, -32008)
    server.error("network.create", {"layers": [dict(linear, algo="ia3")]}, -32008)
    server.error("network.create", {"layers": [dict(linear, algo="dylora", options={"lora_dim": 4, "block_size": 3})]}, -32008)
    # -32602: parameters.
    assert server.error("network.create", {}, -32602)["data"] == {"path": "layers"}
    server.error("network.create", {"layers": [dict(linear, kind="dense")]}, -32602)
    assert server.error("network.create", {"layers": [linear], "options": {"rank": 4}}, -32602)["data"] == {"path": "layers[0].options.rank"}
    server.error("network.create", {"layers": [linear], "options": {"lora_dim": 0}}, -32602)
    server.error("network.create", {"layers": [linear], "options": {"dropout": 1}}, -32602)
    server.error("network.create", {"layers": [linear, linear]}, -32602)
    server.error("network.create", {"layers": [dict(linear, name="a.b")]}, -32602)
    server.error("network.create", {"layers": [linear], "multiplier": "one"}, -32602)
    server.error("network.create", {"layers": [linear], "multiplier": -1e39}, -32602)
    assert server.error("network.create", {"layers": [linear], "seed": -1}, -32602)["data"] == {"path": "seed"}
    # -32002 / -32003 / -32004 / -32006 on a layer weight.
    server.error("network.create", {"layers": [dict(linear, weight=inline(np.ones((4, 3))))]}, -32002)
    server.error("network.create", {"layers": [dict(linear, weight=dict(inline(np.ones((3, 4))), dtype="F64"))]}, -32003)
    server.error("network.create", {"layers": [dict(linear, weight=inline(np.full((3, 4), np.nan)))]}, -32004)
    server.error("network.create", {"layers": [dict(linear, weight={"dtype": "F32", "shape": [3, 4], "offset": 0})]}, -32006)
    # A network, then errors of the calls on it.
    server.call("network.create", {"options": {"lora_dim": 2}, "layers": [linear]})
    server.error("network.create", {"layers": [linear]}, -32007)
    x = inline(np.ones((2, 4)))
    assert server.error("forward", {"calls": [{"module": "zz", "input": x}]}, -32001)["data"] == {"module": "zz"}
    assert server.error("forward", {"calls": [{"module": "m", "input": inline(np.ones((2, 5)))}]}, -32002)["data"] == {"path": "calls[0].input"}
    server.error("forward", {"calls": [{"module": "m", "input": dict(x, dtype="I8")}]}, -32003)
    nan = server.error("forward", {"calls": [{"module": "m", "input": inline([[np.nan, 1, np.inf, 0]])}]}, -32004)
    assert nan["data"] == {"path": "calls[0].input", "count": 2, "module": "m", "pass": "forward"}
    server.error("forward", {"calls": [{"module": "m", "input": dict(x, data="AAAA")}]}, -32002)
    server.error("forward", {"calls": [{"module": "m", "input": dict(x, data="not base64!")}]}, -32602)
    server.error("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2, 4]}}]}, -32602)
    server.error("forward", {"calls": [{"module": "m", "input": dict(x, offset=0)}]}, -32602)
    server.error("forward", {"calls": [{"module": "m", "input": x, "full": True}]}, -32007)
    server.error("forward", {"calls": [{"module": "m", "input": x, "output": {"offset": 0}}]}, -32006)
    server.error("forward", {"calls": [{"module": "m", "input": x, "output": 3}]}, -32602)
    assert server.error("backward", {"calls": [{"tape": 999, "grad_output": x}]}, -32001)["data"] == {"tape": "999"}
    tape = server.call("forward", {"grad": True, "calls": [{"module": "m", "input": x}]})["results"][0]["tape"]
    server.error("backward", {"calls": [{"tape": tape, "grad_output": x}]}, -32002)
    server.error("delta_weight_backward", {"calls": [{"tape": tape, "grad": inline(np.ones((3, 4)))}]}, -32007)
    server.error("backward", {"calls": [{"tape": tape, "grad_output": inline(np.ones((2, 3)))}] * 2}, -32001)
    server.call("backward", {"calls": [{"tape": tape, "grad_output": inline(np.ones((2, 3)))}]})
    assert server.error("parameters.get", {"keys": ["m.nothing"]}, -32001)["data"] == {"parameter": "m.nothing"}
    server.error("parameters.get", {"keys": ["m"]}, -32001)
    server.error("gradients.get", {"dtype": "F64"}, -32003)
    server.error("delta_weight", {"modules": ["zz"]}, -32001)
    server.error("parameters.set", {"parameters": {"m.lora_up.weight": inline(np.ones((3, 3)))}}, -32002)
    server.error("network.save", {"path": str(tmp_path / "a.safetensors"), "dtype": "I64"}, -32003)
    server.error("network.save", {"path": str(tmp_path / "a.safetensors"), "metadata": {"n": 1}}, -32602)
    assert server.error("network.save", {"path": str(tmp_path / "missing" / "a.safetensors")}, -32005)["data"] == {
        "file": str(tmp_path / "missing" / "a.safetensors"), "rule": "write failed"}
    server.error("network.load", {"path": str(tmp_path / "missing.safetensors")}, -32005)
    server.error("optimizer.step", {}, -32007)
    server.error("optimizer.save", {"path": str(tmp_path / "o.safetensors")}, -32007)
    server.error("optimizer.create", {"lr": -1}, -32602)
    server.error("optimizer.create", {"lr": 1, "type": "lion"}, -32602)
    server.error("optimizer.create", {}, -32602)
    server.error("optimizer.load", {"path": str(tmp_path / "missing.safetensors")}, -32005)
    server.error("network.seed", {"seed": -1}, -32602)
    assert server.error("network.set_multiplier", {"multiplier": 1e39}, -32602)["data"] == {"path": "multiplier"}
    server.error("optimizer.create", {"lr": 1e39}, -32602)
    server.error("optimizer.create", {"lr": 1, "betas": [0.9, "x"]}, -32602)
    server.error("forward", {"calls": [{"module": "m", "input": {"dtype": "F32", "shape": [2**61], "data": "AAAAAA=="}}]}, -32002)
    server.error("network.set_training", {"training": "yes"}, -32602)
    server.error("network.set_timestep_mask", {"mask": []}, -32602)
    server.error("network.set_multiplier", {}, -32602)
    server.error("arena.resize", {"size": 10}, -32006)
    server.error("arena.create", {"size": 0}, -32006)
    server.error("arena.create", {"size": "big"}, -32602)
    server.error("arena.create", {"size": 4096, "directory": str(tmp_path / "missing")}, -32006)
    # A strict load with modules the network lacks.
    other = start_server()
    other.call("network.create", {"layers": [dict(linear, name="other")]})
    other.call("network.save", {"path": str(tmp_path / "other.safetensors")})
    assert server.error("network.load", {"path": str(tmp_path / "other.safetensors"), "strict": True}, -32001)["data"] == {"module": "other"}
    assert server.call("network.load", {"path": str(tmp_path / "other.safetensors")})["unmatched_file_modules"] == ["other"]


def test_invalid_requests_and_parse_errors(start_server):
    server = start_server()
    cases = [
        (b'{"jsonrpc":"2.0","id":1,"method":"initialize"', -32700, None),
        (b'{"a":1,"a":2}', -32700, None),
        (b'{"jsonrpc":"2.0","id":2,"method":"initialize"} trailing', -32700, None),
        (b'"just a string"', -32600, None),
        (b'{"jsonrpc":"1.0","id":3,"method":"initialize"}', -32600, 3),
        (b'{"id":4,"method":"initialize"}', -32600, 4),
        (b'{"jsonrpc":"2.0","id":5,"method":7}', -32600, 5),
        (b'{"jsonrpc":"2.0","id":6,"method":"initialize","params":null}', -32600, 6),
        (b'{"jsonrpc":"2.0","id":7,"method":"initialize","params":"x"}', -32600, 7),
        (b'{"jsonrpc":"2.0","id":[8],"method":"initialize"}', -32600, None),
        (b'{"jsonrpc":"2.0","id":true,"method":"initialize"}', -32600, None),
        (b'{"method":"initialize"}', -32600, None),
        (b'[]', -32600, None),
        (b'{}', -32600, None),
    ]
    for line, code, id in cases:
        server.write(line + b"\n")
        response, framing = server.read_message()
        assert framing == "ndjson"
        server.check(response, None)
        assert isinstance(response, dict), f"{line!r}: {response}"
        assert response["error"]["code"] == code and response["id"] == id, f"{line!r}: {response}"
        if code == -32700:
            assert set(response["error"]["data"]) == {"line", "column", "position"}
    # Ids are echoed exactly: strings, integers, reals…
    for id in ["x", "", 0, -5, 1.5, 2**62]:
        assert server.request("network.seed", {"seed": 1}, id=id)["id"] == id
    # …and null: a request with "id": null is answered (it is not a notification).
    server.send({"jsonrpc": "2.0", "id": None, "method": "network.seed", "params": {"seed": 1}})
    response, _ = server.read_message()
    server.check(response, "network.seed")
    assert response == {"jsonrpc": "2.0", "id": None, "result": None}


# MARK: - Batches and notifications


def test_batches(start_server):
    server = start_server()
    server.send([
        {"jsonrpc": "2.0", "id": "a", "method": "network.seed", "params": {"seed": 1}},
        {"jsonrpc": "2.0", "method": "network.seed", "params": {"seed": 2}},
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
        42,
        {"jsonrpc": "2.0", "id": "c", "method": "network.info"},
        {"jsonrpc": "2.0", "id": "d", "method": "rpc.discover"},
    ])
    responses, _ = server.read_message()
    assert isinstance(responses, list) and [r["id"] for r in responses] == ["a", "b", None, "c", "d"]
    for response, method in zip(responses, ["network.seed", "nope", None, "network.info", "rpc.discover"]):
        server.check(response, method)
    assert responses[0]["result"] is None
    assert [r.get("error", {}).get("code") for r in responses[1:4]] == [-32601, -32600, -32007]
    # An empty batch is one error object, not an array.
    server.write(b"[]\n")
    response, _ = server.read_message()
    server.check(response, None)
    assert response["error"]["code"] == -32600 and response["id"] is None
    # A batch of successful notifications, and a successful notification, are not answered.
    server.send([{"jsonrpc": "2.0", "method": "network.seed", "params": {"seed": 3}},
                 {"jsonrpc": "2.0", "method": "rpc.discover"}])
    server.send({"jsonrpc": "2.0", "method": "network.seed", "params": {"seed": 4}})
    assert server.call("network.seed", {"seed": 5}, id="after") is None


def test_a_failing_notification_is_not_answered(start_server):
    server = start_server()
    server.send({"jsonrpc": "2.0", "method": "no.such.method"})
    server.send([{"jsonrpc": "2.0", "method": "network.info"}, {"jsonrpc": "2.0", "method": "network.seed", "params": {"seed": 1}}])
    assert server.call("network.seed", {"seed": 1}, id="after") is None


def test_a_short_message_is_answered_at_once(start_server):
    server = start_server()
    for line, code in [(b"[]\n", -32600), (b"{}\n", -32600), (b"1\n", -32600), (b"con\n", -32700)]:
        server.write(line)
        response, _ = server.read_message(timeout=5)
        assert response["error"]["code"] == code, f"{line!r}: {response}"


# MARK: - Framing and the end of a session


def test_framings(start_server):
    server = start_server(initialize=False)
    # Content-Length in, Content-Length out; then NDJSON; CRLF line ends; blank lines.
    result = server.call("initialize", {}, framing="content-length")
    assert "ndjson" in result["capabilities"]["framings"]
    body = json.dumps({"jsonrpc": "2.0", "id": 10, "method": "network.seed", "params": {"seed": 1}}).encode()
    server.write(b"\n\r\n  " + json.dumps({"jsonrpc": "2.0", "id": 9, "method": "network.seed", "params": {"seed": 1}}).encode() + b"\r\n")
    server.write(b"content-length:\t%d\n\n" % len(body) + body)
    first, framing1 = server.read_message()
    second, framing2 = server.read_message()
    assert (first["id"], framing1, second["id"], framing2) == (9, "ndjson", 10, "content-length")
    server.check(first, "network.seed")
    server.check(second, "network.seed")
    # A header block without a usable Content-Length is a parse error in that framing.
    server.write(b"Content-Length: many\r\n\r\n")
    response, framing = server.read_message()
    server.check(response, None)
    assert framing == "content-length" and response["error"]["code"] == -32700
    # An empty Content-Length body too.
    server.write(b"Content-Length: 0\r\n\r\n")
    response, _ = server.read_message()
    server.check(response, None)
    assert response["error"]["code"] == -32700
    assert server.call("network.seed", {"seed": 2}) is None


def test_content_length_with_a_content_type_header(start_server):
    server = start_server()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "network.seed", "params": {"seed": 1}}).encode()
    server.write(b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" % len(body) + body)
    response, framing = server.read_message()
    assert framing == "content-length" and response.get("id") == 1 and response.get("result") is None, response


def test_oversized_and_truncated_messages(start_server):
    server = start_server()
    server.write(b"Content-Length: 300000000\r\n\r\n{}")
    server.process.stdin.close()
    response, framing = server.read_message()
    server.check(response, None)
    assert framing == "content-length" and response["error"]["code"] == -32700
    assert "exceeds the limit of 268435456 bytes" in response["error"]["message"]
    assert server.read_eof() == b""
    assert server.process.wait(timeout=30) == 0

    server = start_server()
    server.write(b"Content-Length: 50\r\n\r\n{\"jsonrpc\"")
    server.process.stdin.close()
    response, _ = server.read_message()
    server.check(response, None)
    assert response["error"]["code"] == -32700 and "input ended" in response["error"]["message"]


def test_shutdown_stops_reading(start_server):
    server = start_server()
    server.write(b'{"jsonrpc":"2.0","id":1,"method":"shutdown"}\n{"jsonrpc":"2.0","id":2,"method":"network.seed","params":{"seed":1}}\n')
    response, _ = server.read_message()
    server.check(response, "shutdown")
    assert response == {"jsonrpc": "2.0", "id": 1, "result": None}
    assert server.read_eof() == b"", "nothing is answered after shutdown"
    assert server.process.wait(timeout=30) == 0


def test_shutdown_before_initialize_and_stdin_eof(start_server):
    server = start_server(initialize=False)
    assert server.call("shutdown") is None
    assert server.process.wait(timeout=30) == 0
    server = start_server()
    assert server.close() == 0


# MARK: - Device networks (the emulated test device, §5.3 and §9.7)


def _emulated_allocation(directory, name: str, values: np.ndarray):
    """A client "device allocation" of the emulated device: a file in the arena directory,
    mapped here; its handle is the name zero-padded to 64 bytes."""
    path = os.path.join(directory, name)
    data = np.ascontiguousarray(values, dtype="<f4")
    with open(path, "wb") as f:
        f.write(data.tobytes())
    handle = open(path, "r+b")
    memory = mmap.mmap(handle.fileno(), data.nbytes)
    handle.close()
    return memory, base64.b64encode(name.encode().ljust(64, b"\0")).decode()


def _reference(handle: str, shape, offset: int = 0, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "cuda_ipc": {"handle": handle, "offset": offset}}


def test_emulated_device_session(start_server, tmp_path):
    """network.create on the emulated device; bind parameters and gradient buffers that live
    in the client's memory; m·ΔW and every ∂parameter written in place, equal to the LoRA
    formulas; device.release drops the binding; each error code of the device path."""
    rng = np.random.default_rng(5)
    server = start_server("--arena-dir", str(tmp_path), env={"LYCORIS_EMULATED_DEVICE": "1"})
    assert server.call("initialize")["capabilities"]["emulated_device"] is True
    layers = [{"name": "lora_unet_q", "kind": "linear", "in_features": 8, "out_features": 6}]
    created = server.call("network.create", {"device": "emulated", "multiplier": 0.5,
                                             "options": {"lora_dim": 2, "alpha": 1}, "layers": layers})
    assert [p["key"] for p in created["modules"][0]["parameters"]] == ["lora_unet_q.lora_down.weight", "lora_unet_q.lora_up.weight"]
    down = rng.standard_normal((2, 8)).astype(np.float32)
    up = rng.standard_normal((6, 2)).astype(np.float32)
    # One allocation holds both parameters (down at 0, up at 64), as torch's allocator packs them.
    params, params_handle = _emulated_allocation(tmp_path, "lycoris-emulated-params", np.concatenate([down.ravel(), up.ravel()]))
    grads, grads_handle = _emulated_allocation(tmp_path, "lycoris-emulated-grads", np.zeros(28))
    delta, delta_handle = _emulated_allocation(tmp_path, "lycoris-emulated-delta", np.zeros(48))
    gradient = rng.standard_normal((6, 8)).astype(np.float32)
    grad_delta, grad_delta_handle = _emulated_allocation(tmp_path, "lycoris-emulated-grad-delta", gradient)
    bind = {"parameters": {"lora_unet_q.lora_down.weight": _reference(params_handle, [2, 8]),
                           "lora_unet_q.lora_up.weight": _reference(params_handle, [6, 2], 64)},
            "gradients": {"lora_unet_q.lora_down.weight": _reference(grads_handle, [2, 8]),
                          "lora_unet_q.lora_up.weight": _reference(grads_handle, [6, 2], 64)}}
    assert server.error("network.delta_weights", {"outputs": {}}, -32007)["message"].startswith("State error: nothing is bound")
    assert server.call("network.bind", bind) == {"bound": 4, "open_handles": 2}
    assert server.call("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [6, 8])}}) == {"modules": 1}
    scale, m = 1 / 2, 0.5
    np.testing.assert_allclose(np.frombuffer(delta, "<f4").reshape(6, 8), m * scale * up @ down, rtol=1e-5, atol=1e-6)
    assert server.call("network.delta_weights_backward", {"grads": {"lora_unet_q": _reference(grad_delta_handle, [6, 8])}}) == {"modules": 1}
    written = np.frombuffer(grads, "<f4")
    np.testing.assert_allclose(written[:16].reshape(2, 8), m * scale * up.T @ gradient, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written[16:].reshape(6, 2), m * scale * gradient @ down.T, rtol=1e-5, atol=1e-6)
    # The server reads the parameters in place: a change here is the next ΔW.
    np.frombuffer(params, "<f4")[16:] *= 2
    server.call("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [6, 8])}})
    np.testing.assert_allclose(np.frombuffer(delta, "<f4").reshape(6, 8), 2 * m * scale * up @ down, rtol=1e-5, atol=1e-6)

    out = {"lora_unet_q": _reference(delta_handle, [6, 8])}
    assert server.error("network.delta_weights", {"outputs": {"nope": out["lora_unet_q"]}}, -32001)["data"] == {"module": "nope"}
    assert server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [8, 6])}}, -32002)
    assert server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [6, 8], dtype="F16")}}, -32003)
    short = base64.b64encode(b"lycoris-emulated-delta").decode()
    assert server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(short, [6, 8])}}, -32602)
    assert server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [6, 8], 2)}}, -32009)
    beyond = server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(delta_handle, [6, 8], 64)}}, -32009)
    assert "outside the 192-byte allocation" in beyond["message"] and beyond["data"] == {"path": "outputs.lora_unet_q"}
    missing = base64.b64encode(b"lycoris-emulated-missing".ljust(64, b"\0")).decode()
    assert server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(missing, [6, 8])}}, -32009)
    foreign = base64.b64encode(b"lycoris-arena-1".ljust(64, b"\0")).decode()
    assert "lycoris-emulated-" in server.error("network.delta_weights", {"outputs": {"lora_unet_q": _reference(foreign, [6, 8])}}, -32009)["message"]
    incomplete = {"parameters": bind["parameters"], "gradients": {"lora_unet_q.lora_up.weight": bind["gradients"]["lora_unet_q.lora_up.weight"]}}
    assert server.error("network.bind", incomplete, -32602)["data"] == {"path": "gradients.lora_unet_q.lora_down.weight"}
    assert server.error("network.bind", {**bind, "device": "cuda:0"}, -32009)

    released = server.call("device.release", {"handles": [params_handle, params_handle, grads_handle]})
    assert released == {"released": 2, "open_handles": 2}
    assert server.error("network.delta_weights", {"outputs": out}, -32007)  # the binding used a released handle
    assert server.call("network.bind", bind)["open_handles"] == 4
    assert server.call("network.info")["modules"][0]["name"] == "lora_unet_q"


def test_device_refusals(start_server, tmp_path):
    """The emulated device without the server's switch, a module the device path does not
    compute, and the device methods on a CPU network."""
    layers = [{"name": "fc", "kind": "linear", "in_features": 4, "out_features": 3}]
    server = start_server("--arena-dir", str(tmp_path))
    assert "emulated_device" not in server.call("initialize")["capabilities"]
    assert "LYCORIS_EMULATED_DEVICE=1" in server.error("network.create", {"layers": layers, "device": "emulated"}, -32009)["message"]
    server.call("network.create", {"layers": layers})
    assert server.error("network.delta_weights", {"outputs": {}}, -32007)["message"].endswith("name a device in network.create or network.bind")
    assert server.call("device.release", {"handles": []}) == {"released": 0, "open_handles": 0}
    enabled = start_server("--arena-dir", str(tmp_path), env={"LYCORIS_EMULATED_DEVICE": "1"})
    refused = enabled.error("network.create", {"layers": layers, "device": "emulated", "options": {"rank_dropout": 0.1}}, -32009)
    assert "module fc does not compute on the device" in refused["message"] and "rank_dropout" in refused["message"]
    weighted = [{**layers[0], "weight": {"dtype": "F32", "shape": [3, 4], "data": base64.b64encode(bytes(48)).decode()}}]
    unported = enabled.error("network.create", {"layers": weighted, "device": "emulated", "algo": "diag-oft"}, -32009)
    assert "does not compute on CUDA yet" in unported["message"]
    assert enabled.call("network.create", {"layers": layers, "device": "emulated"})["modules"]


# MARK: - Coverage (keep last)


def test_every_documented_method_answered_a_valid_result(methods_answered):
    missing = sorted(set(METHOD_NAMES) - methods_answered)
    assert not missing, f"no valid result seen for: {missing} (run the whole file)"
