"""The lycoris-server process as swift_lycoris manages it: finding the binary, stderr into
Python logging, death detection (ServerDied, never a hang), the arena file's lifetime,
and tapes (kept only when a backward can come)."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import stat
import struct
import sys
import textwrap
import time

import pytest
import torch
from swift_lycoris import call_record
from torch import nn

from _sl_oracle import base_model, inputs, make_pair, run, sl

SERVER = sl.find_server()


def _wrapper_script(tmp_path, body: str, name: str = "fake-server") -> str:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def _marker_server(tmp_path, marker: str) -> str:
    """A launcher that prints `marker` on stderr, records that it ran, then execs the real
    server (same pid)."""
    return _wrapper_script(tmp_path, textwrap.dedent(f"""\
        #!/bin/sh
        echo "{marker}" >&2
        echo ran > "{tmp_path}/launcher-ran"
        exec "{SERVER}" "$@"
        """), name="launcher")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class _CallSpy:
    """Wraps Server.call, call_encoded and call_record on one instance and records (method,
    params, result); an encoded request's params are decoded from its text, a binary call
    record's as far as these tests read them (forward's grad flag and tape, backward's tape)."""

    def __init__(self, server):
        self.calls = []
        self._call, self._call_encoded, self._call_record = server.call, server.call_encoded, server.call_record
        server.call = self
        server.call_encoded = self.encoded
        server.call_record = self.record

    def record(self, method, template, *values):
        body = self._call_record(method, template, *values)
        request = template.fill(0, values)
        if method == "forward":
            flags = struct.unpack_from("<I", request, 20)[0]
            tape = call_record.FORWARD_RESULT.unpack_from(body)[0]
            self.calls.append((method, {"grad": bool(flags & call_record.FORWARD_GRAD)},
                               {"results": [{"tape": tape} if tape else {}]}))
        else:
            self.calls.append((method, {"calls": [{"tape": struct.unpack_from("<Q", request, 16)[0]}]}, None))
        return body

    def __call__(self, method, params=None):
        result = self._call(method, params)
        self.calls.append((method, params, result))
        return result

    def encoded(self, method, template, *values):
        result = self._call_encoded(method, template, *values)
        self.calls.append((method, json.loads(template.fill(0, values))["params"], result))
        return result

    def tapes_made(self):
        return [r["tape"] for m, _, res in self.calls if m == "forward" for r in res["results"] if "tape" in r]

    def tapes_consumed(self):
        return [c["tape"] for m, p, _ in self.calls if m == "backward" for c in p["calls"]]


# MARK: finding the binary


def test_find_server_honours_LYCORIS_SERVER(tmp_path, monkeypatch):
    launcher = _marker_server(tmp_path, "launcher-marker")
    monkeypatch.setenv("LYCORIS_SERVER", launcher)
    assert sl.find_server() == launcher
    server = sl.Server()
    try:
        assert server.binary == launcher
        assert (tmp_path / "launcher-ran").exists(), "Server() did not start the binary LYCORIS_SERVER names"
        assert server.info["server"]["name"] == "lycoris-server"
    finally:
        server.close()


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
def test_find_server_bad_LYCORIS_SERVER_is_a_clear_error(tmp_path, monkeypatch, kind):
    if kind == "missing":
        bad = str(tmp_path / "no-such-server")
    elif kind == "not-executable":
        bad = str(tmp_path / "plain-file")
        (tmp_path / "plain-file").write_text("#!/bin/sh\n")
    else:
        bad = str(tmp_path)
    monkeypatch.setenv("LYCORIS_SERVER", bad)
    with pytest.raises(sl.ServerNotFound) as info:
        sl.find_server()
    assert bad in str(info.value)
    assert "LYCORIS_SERVER" in str(info.value)
    with pytest.raises(sl.ServerNotFound):
        sl.Server()


def test_find_server_without_LYCORIS_SERVER_finds_the_build(monkeypatch):
    monkeypatch.delenv("LYCORIS_SERVER", raising=False)
    found = sl.find_server()
    assert os.access(found, os.X_OK) and os.path.basename(found) == "lycoris-server"


# MARK: stderr → logging


def test_server_stderr_reaches_python_logging(caplog, monkeypatch):
    monkeypatch.setenv("LYCORIS_LOG_LEVEL", "debug")
    caplog.set_level(logging.DEBUG, logger="swift_lycoris.server")
    server = sl.Server()
    try:
        with pytest.raises(sl.ServerError) as info:
            server.call("forward", {"calls": []})  # no network yet: a State error, logged by the server
        assert info.value.code == -32007
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            text = "\n".join(r.getMessage() for r in caplog.records if r.name == "swift_lycoris.server")
            if "client: swift_lycoris" in text and "forward" in text:
                break
            time.sleep(0.02)
        assert "ready" in text and "client: swift_lycoris" in text, f"server stderr not in logging: {text!r}"
        assert "forward" in text, f"the server's log line about the failed call did not arrive: {text!r}"
    finally:
        server.close()


# MARK: death


def test_killed_server_raises_server_died_quickly_with_stderr_tail(tmp_path, monkeypatch):
    monkeypatch.setenv("LYCORIS_SERVER", _marker_server(tmp_path, "MARKER-before-kill-4711"))
    model = base_model()
    network = sl.create_lycoris(model, 1.0, 4, 1.0, threads=1)
    network.apply_to()
    x, _ = inputs()
    run(model, x)
    os.kill(network.server.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(sl.ServerDied) as info:
        model(x)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"ServerDied took {elapsed:.2f} s"
    assert "MARKER-before-kill-4711" in str(info.value), f"no stderr tail in: {info.value}"
    # every later call fails the same way, promptly
    start = time.monotonic()
    with pytest.raises(sl.ServerDied):
        network.server.call("network.info")
    assert time.monotonic() - start < 2.0
    arena = network.arena.path
    assert os.path.exists(arena), "a server killed outright cannot unlink its arena"
    network.close()  # must not hang or raise on a dead server
    assert not os.path.exists(arena), "close() left the dead server's arena file behind"


def test_server_dying_during_a_call_raises_server_died(tmp_path, monkeypatch):
    """A server that dies while a call is pending (stdout closes without an answer)."""
    fake = _wrapper_script(tmp_path, textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        sys.stdin.readline()
        sys.stderr.write("fatal: simulated crash 0xdead\\n")
        sys.stderr.flush()
        sys.stdout.write('{{"jsonrpc":"2.0","id":1,')  # half an answer
        sys.stdout.flush()
        sys.exit(3)
        """))
    start = time.monotonic()
    with pytest.raises(sl.ServerDied) as info:
        sl.Server(binary=fake)
    assert time.monotonic() - start < 2.0
    assert "simulated crash 0xdead" in str(info.value)


def test_server_died_reports_the_exit_status(tmp_path):
    """The process closes its pipes, then exits with status 3 a moment later (as a crashing
    process does while it is torn down): ServerDied says status 3, not None."""
    fake = _wrapper_script(tmp_path, textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys, time
        sys.stdin.readline()
        sys.stderr.write("fatal: going down\\n")
        sys.stderr.flush()
        os.close(1); os.close(2)
        time.sleep(0.3)
        os._exit(3)
        """))
    with pytest.raises(sl.ServerDied) as info:
        sl.Server(binary=fake)
    assert "going down" in str(info.value)
    assert "status 3" in str(info.value), f"exit status not reported: {info.value}"


# MARK: arena file and process lifetime


def test_close_unlinks_the_arena_and_ends_the_server():
    model = base_model()
    network = sl.create_lycoris(model, 1.0, 4, 1.0, threads=1)
    path, pid = network.arena.path, network.server.pid
    assert os.path.exists(path)
    network.apply_to()
    run(model, inputs()[0])
    network.close()
    assert not os.path.exists(path), f"arena file {path} still exists after close()"
    deadline = time.monotonic() + 5
    while not _process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _process_gone(pid)
    # the model is the base model again
    x, _ = inputs()
    assert torch.equal(run(model, x)[0], run(base_model(), x)[0])


def test_sigterm_unlinks_the_arena_and_next_call_raises():
    network = sl.create_lycoris(base_model(), 1.0, 4, 1.0, threads=1)
    path = network.arena.path
    os.kill(network.server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(path)
    with pytest.raises(sl.ServerDied):
        network.server.call("network.info")
    network.close()


def test_a_killed_servers_arena_is_removed_by_the_next_client_start(tmp_path):
    """SIGKILL leaves the arena file (no handler runs) and here the client dies too (it
    never calls close()); the next client's server start removes it, and only it."""
    first = sl.Server(threads=1, arena_dir=str(tmp_path))
    arena = first.call("arena.create", {"size": 4096})["path"]
    first._process.kill()
    first._process.wait()
    live = tmp_path / f"lycoris-arena-{os.getpid()}-1-abc"  # a live pid: kept
    live.write_bytes(b"")
    assert os.path.exists(arena)
    second = sl.Server(threads=1, arena_dir=str(tmp_path))
    try:
        assert not os.path.exists(arena) and live.exists()
    finally:
        second.close()


def test_dropping_the_network_ends_its_server():
    """A network that goes out of scope without close() must not leave its server process
    (and arena file) behind for the life of the Python process."""

    def make():
        model = base_model()
        network = sl.create_lycoris(model, 1.0, 4, 1.0, threads=1)
        network.apply_to()
        run(model, inputs()[0])
        return network.server.pid, network.arena.path

    pid, path = make()
    gc.collect()
    deadline = time.monotonic() + 3
    while not _process_gone(pid) and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    alive = not _process_gone(pid)
    if alive:
        os.kill(pid, signal.SIGTERM)  # do not leak it past this test
    assert not alive, "the server of an unreferenced network is still running"
    assert not os.path.exists(path)


# MARK: tapes


def test_no_grad_forwards_make_no_tapes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 64))
    network = sl.create_lycoris(model, 1.0, 4, 1.0, threads=1, transfer="activations")
    network.apply_to()
    spy = _CallSpy(network.server)
    try:
        x = torch.randn(256, 512)
        # a forward with grad, consumed by its backward: the tape ids before the no-grad run
        model(x).sum().backward()
        before = spy.tapes_made()
        assert len(before) == 2 and sorted(spy.tapes_consumed()) == sorted(before)
        rss0 = _rss_mib(network.server.pid)
        with torch.no_grad():
            for _ in range(120):
                model(x)
        # grad mode on, but nothing needs a gradient (frozen model and adapters, plain input)
        model.requires_grad_(False)
        network.requires_grad_(False)
        for _ in range(10):
            model(x)
        model.requires_grad_(True)
        network.requires_grad_(True)
        forwards = [p for m, p, _ in spy.calls if m == "forward"]
        assert len(forwards) == 2 + 2 * 130
        assert all(p["grad"] is False for p in forwards[2:]), "a no_grad forward asked the server for a tape"
        assert spy.tapes_made() == before, "no_grad forwards returned tapes"
        growth = _rss_mib(network.server.pid) - rss0
        assert growth < 40, f"server memory grew by {growth:.0f} MiB over 260 no-grad forwards"
        # server-side check: tape ids are never reused and shared by all forwards, so the
        # next tapes follow the last ones directly when no tape was made in between
        model(x).sum().backward()
        after = spy.tapes_made()[len(before):]
        assert after == [max(before) + 1, max(before) + 2], f"tapes {before} then {after}: tapes were made in between"
    finally:
        network.close()


def test_forward_without_backward_does_not_leak_tapes():
    """Forwards with grad enabled whose graph is dropped without a backward (a skipped
    step, a loss computed only for logging, an exception between forward and backward)
    must not keep their tapes (each holds a copy of the input) on the server forever."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 64))
    network = sl.create_lycoris(model, 1.0, 4, 1.0, threads=1)
    network.apply_to()
    try:
        x = torch.randn(256, 512)  # 0.5 MiB per input copy
        for _ in range(5):
            model(x)
        rss0 = _rss_mib(network.server.pid)
        for _ in range(150):
            model(x)  # graph dropped at once
        gc.collect()
        growth = _rss_mib(network.server.pid) - rss0
        assert growth < 25, f"server memory grew by {growth:.0f} MiB over 150 dropped forwards (≈75 MiB of inputs)"
    finally:
        network.close()


def test_gradient_checkpointing_leaves_no_pending_tapes():
    """torch.utils.checkpoint (non-reentrant, as diffusers uses it) re-runs the forward during
    backward; every tape the server is asked to keep must be consumed by a backward."""
    base, ref_model, lyco, our_model, ours = make_pair("lora", transfer="activations")
    spy = _CallSpy(ours.server)
    try:
        x, upstream = inputs()
        for _ in range(3):
            xr = x.clone().requires_grad_(True)
            y = torch.utils.checkpoint.checkpoint(our_model, xr, use_reentrant=False)
            (y * upstream).sum().backward()
        del y  # the last step's graph; tapes live as long as their graph
        made = spy.tapes_made()
        assert made, "no tapes at all"
        # Tapes live as long as their graphs; the freed graphs' tapes are handed back.
        gc.collect()
        ours.release_orphaned_tapes()
        pending = ours.server.call("network.info")["pending_tapes"]
        assert pending == 0, f"{pending} of {len(made)} tapes still kept after 3 checkpointed steps"
    finally:
        ours.close()


def test_backward_with_retain_graph_twice():
    """retain_graph=True lets torch run a graph's backward twice; the second must give the
    same gradients again (accumulated: twice the first)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    network = sl.create_lycoris(model, 1.0, 2, 1.0, threads=1)
    try:
        with torch.no_grad():
            for p in network.parameters():
                p.copy_(torch.randn(p.shape))
        network.apply_to()
        x = torch.randn(3, 8, requires_grad=True)
        y = model(x).sum()
        y.backward(retain_graph=True)
        first = [p.grad.clone() for p in network.parameters()]
        y.backward()
        for p, g in zip(network.parameters(), first):
            torch.testing.assert_close(p.grad, 2 * g)
    finally:
        network.close()


def test_arena_pins_for_cuda_or_says_why_not(caplog):
    """The first CUDA tensor page-locks the arena; where that cannot be done (here: a torch
    without CUDA) a warning says so once and copies keep working through pageable memory."""
    network = sl.create_lycoris(nn.Sequential(nn.Linear(4, 3)), 1.0, 2, 1.0, threads=1)
    try:
        with caplog.at_level("WARNING", logger="swift_lycoris"):
            network.arena._pin_for(torch.device("cuda"))
            network.arena._pin_for(torch.device("cuda"))
        if torch.cuda.is_available():
            assert network.arena._pinned
        else:
            assert not network.arena._pinned
            assert [r.message for r in caplog.records].count(next(
                r.message for r in caplog.records if "could not page-lock the arena" in r.message)) == 1
        network.arena.begin()
        descriptor = network.arena.put(torch.arange(6.0).reshape(2, 3))
        assert torch.equal(network.arena.take(descriptor), torch.arange(6.0).reshape(2, 3))
    finally:
        network.close()
