"""Shared pieces of the protocol tests: the server binary, a JSON-RPC client that speaks
both framings, tensor helpers, and validators built from protocol/openrpc.json.

The server is the real binary: $LYCORIS_SERVER, else .build/debug/lycoris-server under the
repository root. A missing binary fails the tests (it never skips them).
"""
from __future__ import annotations

import base64
import copy
import json
import os
import pathlib
import select
import subprocess
import time
from typing import Any

import jsonschema
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENT_PATH = REPO_ROOT / "protocol" / "openrpc.json"
TIMEOUT = 60.0


def server_path() -> pathlib.Path:
    configured = os.environ.get("LYCORIS_SERVER")
    path = pathlib.Path(configured) if configured else REPO_ROOT / ".build" / "debug" / "lycoris-server"
    if not path.is_absolute():
        path = REPO_ROOT / path
    return path


def missing_server_message() -> str | None:
    path = server_path()
    if path.is_file() and os.access(path, os.X_OK):
        return None
    return (f"lycoris-server not found at {path}: build it (swift build) or set LYCORIS_SERVER "
            "to the binary's path")


def pytest_collection_finish(session):
    """A missing server fails the whole run at once (never a skip, never an xfail)."""
    message = missing_server_message()
    if message and session.items:
        pytest.exit(message, returncode=1)


@pytest.fixture(scope="session")
def server_binary() -> pathlib.Path:
    message = missing_server_message()
    if message:
        pytest.fail(message, pytrace=False)
    return server_path()


# MARK: - The OpenRPC document and its schemas


def load_document() -> dict:
    with open(DOCUMENT_PATH, encoding="utf-8") as f:
        return json.load(f)


class Schemas:
    """Validators for the document's schemas; `$ref`s of the form `#/components/...` resolve
    against the document (each schema is wrapped in a root that carries `components`)."""

    def __init__(self, document: dict):
        self.document = document
        self.methods = {m["name"]: m for m in document["methods"]}
        self._cache: dict[str, jsonschema.Draft202012Validator] = {}

    def validator(self, schema: dict) -> jsonschema.Draft202012Validator:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._cache:
            root = {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "components": copy.deepcopy(self.document["components"]),
                "allOf": [schema],
            }
            self._cache[key] = jsonschema.Draft202012Validator(root)
        return self._cache[key]

    def component(self, name: str) -> jsonschema.Draft202012Validator:
        return self.validator({"$ref": f"#/components/schemas/{name}"})

    def validate(self, instance: Any, schema: dict, what: str) -> None:
        errors = sorted(self.validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
        if errors:
            details = "\n".join(
                f"  at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors[:10]
            )
            raise AssertionError(f"{what} does not match its schema:\n{details}\ninstance: {short(instance)}")

    def validate_result(self, method: str, result: Any) -> None:
        self.validate(result, self.methods[method]["result"]["schema"], f"result of {method}")

    def validate_error(self, error: Any, method: str = "?") -> None:
        self.validate(error, {"$ref": "#/components/schemas/ErrorObject"}, f"error of {method}")

    def params_schema(self, method: str) -> dict:
        """The method's params as one object schema (by-name; extra members allowed)."""
        params = self.methods[method]["params"]
        return {
            "type": "object",
            "properties": {p["name"]: p["schema"] for p in params},
            "required": [p["name"] for p in params if p.get("required")],
        }

    def validate_params(self, method: str, params: Any) -> None:
        self.validate({} if params is None else params, self.params_schema(method), f"params of {method}")

    def validate_response(self, response: Any, method: str | None) -> None:
        """Envelope, then the result (by the method's schema) or the error."""
        self.validate(response, {"$ref": "#/components/schemas/Response"}, f"response to {method}")
        if "error" in response:
            self.validate_error(response["error"], method or "?")
        elif method in self.methods:
            self.validate_result(method, response["result"])


@pytest.fixture(scope="session")
def document() -> dict:
    return load_document()


@pytest.fixture(scope="session")
def schemas(document) -> Schemas:
    return Schemas(document)


# MARK: - Tensors


def short(value: Any, limit: int = 600) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns, round to nearest even (NaN-free input)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def encode(a: np.ndarray, dtype: str = "F32") -> bytes:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    if dtype == "BF16":
        return to_bf16_bits(a).astype("<u2").tobytes()
    raise ValueError(dtype)


def decode(raw: bytes, dtype: str, shape) -> np.ndarray:
    if dtype == "F32":
        flat = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    elif dtype == "F16":
        flat = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        flat = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(dtype)
    return flat.reshape(shape)


ELEMENT_SIZE = {"F32": 4, "F16": 2, "BF16": 2}


def inline(a, dtype: str = "F32") -> dict:
    """An inline (base64) tensor descriptor."""
    a = np.asarray(a, dtype=np.float32)
    return {"dtype": dtype, "shape": list(a.shape), "data": base64.b64encode(encode(a, dtype)).decode("ascii")}


def tensor(descriptor: dict, arena=None) -> np.ndarray:
    """The values of a descriptor the server returned (inline, or in `arena`, an mmap)."""
    dtype, shape = descriptor["dtype"], descriptor["shape"]
    if "data" in descriptor:
        return decode(base64.b64decode(descriptor["data"], validate=True), dtype, shape)
    assert arena is not None, "an arena descriptor without an arena"
    count = int(np.prod(shape)) if shape else 1
    start = descriptor["offset"]
    return decode(bytes(arena[start:start + count * ELEMENT_SIZE[dtype]]), dtype, shape)


# MARK: - The client


class RPCError(Exception):
    def __init__(self, error: dict):
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.error = error
        self.code = error.get("code")


class Server:
    """One lycoris-server process. Every response read is validated against the document:
    the envelope, then the result against the method's result schema or the error against
    ErrorObject; the params of every request that succeeded are validated against the
    method's params. `answered` collects the methods that answered a valid result."""

    def __init__(self, binary: pathlib.Path, schemas: Schemas, args=(), env=None, answered: set | None = None):
        self.schemas = schemas
        self.process = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "LYCORIS_LOG_LEVEL": "warning", **(env or {})},
        )
        self.buffer = b""
        self.next_id = 0
        self.answered = answered if answered is not None else set()

    # Raw bytes

    def write(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _fill(self, deadline: float) -> bool:
        fd = self.process.stdout.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer from the server within {TIMEOUT} s; buffered: {self.buffer[:200]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            raise TimeoutError(f"no answer from the server within {TIMEOUT} s; buffered: {self.buffer[:200]!r}")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_message(self, timeout: float = TIMEOUT) -> tuple[Any, str]:
        """The next message and its framing ("ndjson" or "content-length")."""
        deadline = time.monotonic() + timeout
        while True:
            if self.buffer.lower().startswith(b"content-length:"):
                end = self.buffer.find(b"\r\n\r\n")
                if end >= 0:
                    header = self.buffer[:end].decode("ascii")
                    length = int(header.split(":", 1)[1].strip())
                    body_start = end + 4
                    if len(self.buffer) >= body_start + length:
                        body = self.buffer[body_start:body_start + length]
                        self.buffer = self.buffer[body_start + length:]
                        return json.loads(body), "content-length"
            else:
                newline = self.buffer.find(b"\n")
                if newline >= 0:
                    line, self.buffer = self.buffer[:newline], self.buffer[newline + 1:]
                    return json.loads(line), "ndjson"
            if not self._fill(deadline):
                raise EOFError(f"the server closed stdout; unread: {self.buffer[:200]!r}; "
                               f"exit status {self.process.poll()}")

    def read_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Everything left until the server closes stdout."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline):
            pass
        rest, self.buffer = self.buffer, b""
        return rest

    # JSON-RPC

    def send(self, message: Any, framing: str = "ndjson") -> None:
        body = json.dumps(message).encode()
        if framing == "ndjson":
            self.write(body + b"\n")
        else:
            self.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)

    def request(self, method: str, params: Any = None, *, framing: str = "ndjson", id: Any = None) -> dict:
        """Sends one request and returns its whole (validated) response."""
        if id is None:
            self.next_id += 1
            id = self.next_id
        message = {"jsonrpc": "2.0", "id": id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message, framing)
        response, got = self.read_message()
        assert got == framing, f"{method}: answered in {got} framing, asked in {framing}"
        assert isinstance(response, dict) and response.get("id") == id, f"{method}: expected id {id}, got {short(response)}"
        self.check(response, method)
        if "result" in response and method in self.schemas.methods:
            # The server accepted these params, so the document must accept them too.
            self.schemas.validate_params(method, params)
        return response

    def check(self, response: dict, method: str | None) -> None:
        self.schemas.validate_response(response, method)
        if "result" in response and method is not None:
            self.answered.add(method)

    def call(self, method: str, params: Any = None, **kwargs) -> Any:
        """The result, or RPCError for an error response."""
        response = self.request(method, params, **kwargs)
        if "error" in response:
            raise RPCError(response["error"])
        return response["result"]

    def error(self, method: str, params: Any = None, code: int | None = None) -> dict:
        """The error object of a call that must fail (with `code`, when given)."""
        response = self.request(method, params)
        assert "error" in response, f"{method} should have failed: {short(response)}"
        if code is not None:
            assert response["error"]["code"] == code, f"{method}: expected {code}, got {short(response['error'])}"
        return response["error"]

    def close(self) -> int:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def methods_answered() -> set:
    """Every method that answered a result valid against its schema, across the session."""
    return set()


@pytest.fixture
def start_server(server_binary, schemas, methods_answered):
    """Starts servers (args → Server); every one is closed at the end of the test."""
    started: list[Server] = []

    def start(*args: str, initialize: bool = True, env=None) -> Server:
        server = Server(server_binary, schemas, args, env, methods_answered)
        started.append(server)
        if initialize:
            server.call("initialize", {"protocol_version": "1.0", "client": "pytest"})
        return server

    yield start
    for server in started:
        server.close()
