"""Generated SD-shaped checkpoints for the checkpoint tests (scripts/generate_checkpoints.py)
and the `lycoris` executable they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import generate_checkpoints as gen  # noqa: E402


def lycoris_cli() -> str:
    """LYCORIS_CLI, else the `lycoris` beside LYCORIS_SERVER, else the debug build."""
    if os.environ.get("LYCORIS_CLI"):
        return os.environ["LYCORIS_CLI"]
    server = os.environ.get("LYCORIS_SERVER")
    if server and (Path(server).parent / "lycoris").exists():
        return str(Path(server).parent / "lycoris")
    return str(REPO / ".build" / "debug" / "lycoris")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([lycoris_cli(), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"lycoris {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def layers(path) -> dict:
    return json.loads(run("layers", str(path), "--json").stdout)
