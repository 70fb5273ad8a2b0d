"""The lycoris-server process: finding it, starting it, and calling it (JSON-RPC 2.0 over
its stdin/stdout, one JSON text per line).

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


class Server:
    """One running lycoris-server, owned by this object (it ends with :meth:`close`)."""

    def __init__(self, binary: str | None = None, threads: int | None = None, arena_dir: str | None = None):
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
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        # The thread holds the stream and the tail, not this object, so an unused Server can
        # be collected (and its process ended by __del__).
        self._stderr_thread = threading.Thread(
            target=_forward_stderr, args=(self._process.stderr, self._stderr_tail), daemon=True, name="lycoris-server-stderr")
        self._stderr_thread.start()
        self._lock = threading.Lock()
        self.info = self.call("initialize", {"client": "swift_lycoris", "protocol_version": "1.0"})

    def _died(self) -> ServerDied:
        try:
            self._process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        self._stderr_thread.join(timeout=1.0)
        tail = "\n".join(self._stderr_tail) or "(no output on stderr)"
        return ServerDied(f"lycoris-server exited with status {self._process.returncode}; its last stderr lines:\n{tail}")

    def call(self, method: str, params: dict | None = None):
        """Sends one request and returns its result (raises ServerError / ServerDied)."""
        with self._lock:
            if self._process.poll() is not None:
                raise self._died()
            request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
            if params is not None:
                request["params"] = params
            self._write(request)
            line = self._read_line()
        response = json.loads(line)
        if "error" in response:
            raise ServerError(method, response["error"])
        return response.get("result")

    def notify(self, method: str, params: dict | None = None) -> None:
        """Sends a notification (no response is sent back, none is awaited)."""
        with self._lock:
            if self._process.poll() is not None:
                raise self._died()
            self._write({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})

    def _write(self, message: dict) -> None:
        data = memoryview(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        try:
            while data:
                written = os.write(self._process.stdin.fileno(), data)
                data = data[written:]
        except (BrokenPipeError, OSError):
            raise self._died() from None

    def _read_line(self) -> bytes:
        """The next response line, read with os.read into our own buffer (select with a
        1 s timeout between reads, so a dead server is noticed promptly)."""
        fd = self._process.stdout.fileno()
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return line
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise self._died()
                self._buffer += chunk
            elif self._process.poll() is not None:
                raise self._died()

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
