"""The lycoris-server process: finding it, starting it, and calling it (JSON-RPC 2.0 over
its stdin/stdout, one JSON text per line; ``forward``/``backward`` of one layer as binary
call records where the server offers them, see :mod:`.call_record`).

The server's stderr is forwarded to Python logging (logger ``swift_lycoris.server``). If the
server dies, the pending or next call raises :class:`ServerDied` with the tail of its
stderr, within a second — never a hang.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import select
import shutil
import subprocess
import threading
from pathlib import Path

from . import call_record
from .call_record import Slot

log = logging.getLogger("swift_lycoris.server")

_REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerError(RuntimeError):
    """An error response: ``code``, ``message`` and ``data`` as the server sent them."""

    def __init__(self, method: str, error: dict):
        self.method = method
        self.code = error.get("code")
        self.data = error.get("data")
        super().__init__(f"lycoris-server {method}: {error.get('message')} (code {self.code})")


class ServerDied(RuntimeError):
    """The server process ended; the message carries the tail of its stderr."""


class ServerNotFound(FileNotFoundError):
    pass


class AdapterFileError(ValueError):
    """A file that cannot be opened or breaks a safetensors rule, as the server's checked
    reader reports it: the message names the file and the rule (``safetensors file
    '<path>': <rule>: <details>``); ``path`` and ``rule`` carry them."""

    def __init__(self, path: str, rule: str | None, message: str):
        self.path, self.rule = path, rule
        super().__init__(message)

    @classmethod
    def from_server_error(cls, path: str, error: ServerError) -> "AdapterFileError":
        data = error.data or {}
        message = str(error).split(": I/O error: ", 1)[-1].rsplit(" (code ", 1)[0]
        return cls(data.get("file", path), data.get("rule"), message)


def describe_file(path, server: "Server | None" = None) -> dict:
    """What the checked reader says of safetensors file `path` (header only):
    ``{"path", "bytes", "tensors": [{"key", "dtype", "shape"}, …] in file order, "metadata"}``.
    Raises :class:`AdapterFileError` naming the file and the rule for a file that is missing,
    truncated, hostile or not safetensors at all. Uses `server`, or a short-lived one."""
    path = os.path.abspath(os.fspath(path))
    owned = server is None
    server = server or Server()
    try:
        return server.call("file.describe", {"path": path})
    except ServerError as error:
        if error.code == -32005:
            raise AdapterFileError.from_server_error(path, error) from None
        raise
    finally:
        if owned:
            server.close()


def find_server() -> str:
    """The server binary: ``$LYCORIS_SERVER``, then this repository's release (then debug)
    build, then ``lycoris-server`` on ``PATH``."""
    explicit = os.environ.get("LYCORIS_SERVER")
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ServerNotFound(f"LYCORIS_SERVER={explicit} is not an executable file")
        return explicit
    for build in ("release", "debug"):
        candidate = _REPO_ROOT / ".build" / build / "lycoris-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("lycoris-server")
    if on_path:
        return on_path
    raise ServerNotFound(
        "lycoris-server not found. Build it with `swift build -c release` in the swift-lycoris "
        "repository (or `make build`), or point LYCORIS_SERVER at the binary."
    )


def _forward_stderr(stream, tail: collections.deque) -> None:
    """Forwards the server's stderr to logging, keeping the last lines for error messages."""
    for raw in io.BufferedReader(stream):
        line = raw.decode("utf-8", "replace").rstrip()
        tail.append(line)
        log.info("%s", line)


class RequestTemplate:
    """A request encoded once: JSON text with the id and every :class:`Slot` left as
    ``%d``, so that a call formats integers into it instead of encoding a dict (the per-call
    path of a layer sends the same request with new offsets and tapes)."""

    _MARK = "\x00slot%d\x00"

    def __init__(self, method: str, params: dict):
        def mark(value):
            if isinstance(value, Slot):
                return self._MARK % int(value)
            if isinstance(value, dict):
                return {k: mark(v) for k, v in value.items()}
            if isinstance(value, list):
                return [mark(v) for v in value]
            return value

        text = json.dumps({"jsonrpc": "2.0", "id": "\x00id\x00", "method": method, "params": mark(params)},
                          separators=(",", ":")).replace("%", "%%")
        # Slots in the order they appear in the text, the id first.
        marks = [(text.index('"\\u0000id\\u0000"'), -1)]
        index = 0
        while ('"\\u0000slot%d\\u0000"' % index) in text:
            marks.append((text.index('"\\u0000slot%d\\u0000"' % index), index))
            index += 1
        self._order = [slot for _, slot in sorted(marks)]
        text = text.replace('"\\u0000id\\u0000"', "%d")
        for slot in range(index):
            text = text.replace('"\\u0000slot%d\\u0000"' % slot, "%d")
        self._text = text + "\n"

    def fill(self, request_id: int, values) -> bytes:
        return (self._text % tuple(request_id if slot < 0 else values[slot] for slot in self._order)).encode()


class Server:
    """One running lycoris-server, owned by this object (it ends with :meth:`close`)."""

    def __init__(self, binary: str | None = None, threads: int | None = None, arena_dir: str | None = None,
                 cuda_library_dirs: list[str] | None = None, call_records: bool | None = None):
        """``cuda_library_dirs``: ask the server to probe CUDA with these folders searched first
        (``cuda_libraries.torch_library_dirs()``); the report is ``info["capabilities"]["cuda"]``.
        ``call_records``: send the per-layer calls as binary call records when the server
        offers them (default: yes, unless ``$SWIFT_LYCORIS_JSON_CALLS`` is ``1``); False keeps
        every call JSON-RPC. :attr:`call_records` says what was chosen."""
        self.binary = binary or find_server()
        args = [self.binary]
        if threads:
            args += ["--threads", str(threads)]
        if arena_dir:
            args += ["--arena-dir", arena_dir]
        # OpenBLAS workers otherwise spin (sched_yield) between the many small GEMMs of a
        # training step, taking the CPU the client needs; a short timeout parks them.
        environment = {**os.environ}
        environment.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
        self._process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=environment
        )
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._queued = b""
        self._stdin, self._stdout = self._process.stdin.fileno(), self._process.stdout.fileno()
        os.set_blocking(self._stdout, False)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        # The thread holds the stream and the tail, not this object, so an unused Server can
        # be collected (and its process ended by __del__).
        self._stderr_thread = threading.Thread(
            target=_forward_stderr, args=(self._process.stderr, self._stderr_tail), daemon=True, name="lycoris-server-stderr")
        self._stderr_thread.start()
        self._lock = threading.Lock()
        handshake = {"client": "swift_lycoris", "protocol_version": "1.0"}
        if cuda_library_dirs is not None:
            handshake["cuda"] = {"library_dirs": list(cuda_library_dirs)}
        self.info = self.call("initialize", handshake)
        if call_records is None:
            call_records = os.environ.get("SWIFT_LYCORIS_JSON_CALLS", "") != "1"
        offered = self.info.get("capabilities", {}).get("call_record") or {}
        self.call_records = bool(call_records) and offered.get("version") == call_record.VERSION

    def _died(self) -> ServerDied:
        try:
            self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self._stderr_thread.join(timeout=1.0)
        tail = "\n".join(self._stderr_tail) or "(no output on stderr)"
        return ServerDied(f"lycoris-server exited with status {self._process.returncode}; its last stderr lines:\n{tail}")

    def call(self, method: str, params: dict | None = None):
        """Sends one request (after any queued notifications, in the same write) and returns
        its result (raises ServerError / ServerDied)."""
        request = {"jsonrpc": "2.0", "id": 0, "method": method}
        if params is not None:
            request["params"] = params
        with self._lock:
            request["id"] = next(self._ids)
            line = self._exchange(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        return self._result(method, line)

    def call_encoded(self, method: str, template: "RequestTemplate", *values: int):
        """:meth:`call` with a request encoded once (:class:`RequestTemplate`): `values` fill
        its integer slots, in order."""
        with self._lock:
            line = self._exchange(template.fill(next(self._ids), values))
        return self._result(method, line)

    def call_record(self, method: str, template: "call_record.RecordTemplate", *values: int) -> bytes:
        """One binary call record (:mod:`.call_record`): `values` fill its slots; the body of
        the response record (after its header). An error record raises :class:`ServerError`
        with the error object it carries."""
        with self._lock:
            request_id = next(self._ids)
            self._send(template.fill(request_id, values))
            record = self._read_record()
        _, _, status, length, answered = call_record.HEADER.unpack_from(record)
        if status != call_record.OK:
            code, size = call_record.ERROR_BODY.unpack_from(record, call_record.HEADER.size)
            start = call_record.HEADER.size + call_record.ERROR_BODY.size
            raise ServerError(method, json.loads(record[start: start + size]))
        if answered != request_id:
            raise ServerError(method, {"code": -32603, "message": f"response record for id {answered}, expected {request_id}"})
        return record[call_record.HEADER.size:]

    @staticmethod
    def _result(method: str, line: bytes):
        response = json.loads(line)
        if "error" in response:
            raise ServerError(method, response["error"])
        return response.get("result")

    def notify(self, method: str, params: dict | None = None) -> None:
        """Sends a notification now (no response is sent back, none is awaited)."""
        message = {"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})}
        with self._lock:
            self._send(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def queue_encoded(self, notification: bytes) -> None:
        """A notification (one JSON text and its newline, encoded, or a call record that is
        never answered) sent with the next
        request, in the same write: one system call and one wake-up of the server fewer than
        :meth:`notify`; the server handles it first."""
        with self._lock:
            self._queued += notification

    def _exchange(self, request: bytes) -> bytes:
        """Writes the queued notifications and `request` in one write; the response line."""
        self._send(request)
        return self._read_line()

    def _send(self, message: bytes) -> None:
        """Writes the queued notifications and `message` (a dead server: ServerDied, as the
        pipe is broken)."""
        data = memoryview(self._queued + message if self._queued else message)
        self._queued = b""
        try:
            while data:
                written = os.write(self._stdin, data)
                data = data[written:]
        except (BrokenPipeError, OSError):
            raise self._died() from None

    def _read_line(self) -> bytes:
        """The next response line, read with os.read into our own buffer."""
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return line
            self._fill()

    def _read_record(self) -> bytes:
        """The next response record (header included), as its header's length says."""
        header = call_record.HEADER.size
        while True:
            if len(self._buffer) >= header:
                if self._buffer[0] != call_record.MAGIC:
                    raise ServerDied(f"lycoris-server answered a call record with {bytes(self._buffer[:40])!r}")
                length = int.from_bytes(self._buffer[4:8], "little")
                if len(self._buffer) >= length:
                    record = bytes(self._buffer[:length])
                    del self._buffer[:length]
                    return record
            self._fill()

    def _fill(self) -> None:
        """Reads what the server wrote into our buffer. The pipe is non-blocking: the answer
        is usually there when the write returns (the server ran meanwhile); else select with
        a 1 s timeout between reads, so a dead server is noticed promptly. (Polling the pipe
        for up to 30 or 100 µs before select did not pay: bench/README.md §6, "Binary call
        record".)"""
        fd = self._stdout
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready and self._process.poll() is not None:
                raise self._died() from None
            return
        if not chunk:
            raise self._died()
        self._buffer += chunk

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        """Asks the server to shut down and waits for it (kills it after 5 s)."""
        if self._process.poll() is None:
            try:
                self.call("shutdown")
            except (ServerError, ServerDied, OSError):
                pass
            try:
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
