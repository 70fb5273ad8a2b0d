"""Runs the examples for real against a built lycoris-server.

The server binary comes from $LYCORIS_SERVER, else the repo's .build/debug; the `lycoris`
CLI is taken from the same directory. Run:  .venv/bin/python -m pytest examples/tests -q
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent
REPO_ROOT = EXAMPLES.parent


@pytest.fixture(scope="session")
def server() -> Path:
    path = Path(os.environ.get("LYCORIS_SERVER") or REPO_ROOT / ".build" / "debug" / "lycoris-server")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no lycoris-server at {path}: run `swift build` or set LYCORIS_SERVER")
    return path.resolve()


@pytest.fixture(scope="session")
def lycoris_cli(server) -> Path:
    path = server.parent / "lycoris"
    if not os.access(path, os.X_OK):
        pytest.fail(f"no lycoris CLI next to the server ({path})")
    return path


def run(args, server, timeout=120, **env):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "LYCORIS_SERVER": str(server), **env})


@pytest.fixture(scope="session")
def training_run(server, tmp_path_factory):
    """One full run of the numpy example (default settings), shared by the tests below."""
    out = tmp_path_factory.mktemp("train") / "toy-lora.safetensors"
    result = run([sys.executable, str(EXAMPLES / "train_lora_numpy.py"), "--out", str(out)], server)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, out


def info_json(cli, path) -> dict:
    result = subprocess.run([str(cli), "info", str(path), "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- train_lora_numpy.py ------------------------------------------------------------------

def test_loss_falls_clearly(training_run):
    stdout, _ = training_run
    losses = [float(v) for v in re.findall(r"^step\s+\d+\s+train_loss\s+\S+\s+val_loss\s+([0-9.eE+-]+)$", stdout, re.M)]
    assert len(losses) >= 3, stdout
    assert losses[0] / losses[-1] >= 10, f"validation loss fell only {losses[0] / losses[-1]:.1f}x: {losses}"
    # The summary line agrees with the log.
    summary = re.search(r"^val_loss ([0-9.]+) -> ([0-9.]+) \(([0-9.]+)x lower\)", stdout, re.M)
    assert summary and float(summary.group(3)) >= 10, stdout


def test_saved_file_is_a_locon_adapter_with_kohya_metadata(training_run, lycoris_cli):
    stdout, out = training_run
    assert out.is_file() and f"to {out}" in stdout
    info = info_json(lycoris_cli, out)
    modules = info["modules"]
    assert 2 <= len(modules) <= 3
    assert {m["name"] for m in modules} == {"lycoris_fc1", "lycoris_fc2", "lycoris_fc3"}
    for module in modules:
        assert module["algorithm"] == "locon"
        assert module["rank"] == 4
        assert module["alpha"] == 4
    meta = info["metadata"]
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0"
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora"}
    assert meta["ss_steps"] == "200"
    assert meta["ss_output_name"] == "toy-lora"
    assert meta["ss_num_modules"] == "3"


def test_other_algorithm_runs(server, lycoris_cli, tmp_path):
    out = tmp_path / "toy-loha.safetensors"
    result = run([sys.executable, str(EXAMPLES / "train_lora_numpy.py"), "--algo", "loha",
                  "--steps", "10", "--log-every", "5", "--out", str(out)], server)
    assert result.returncode == 0, result.stdout + result.stderr
    info = info_json(lycoris_cli, out)
    assert [m["algorithm"] for m in info["modules"]] == ["loha"] * 3
    assert json.loads(info["metadata"]["ss_network_args"]) == {"algo": "loha"}


def test_missing_server_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_lora_numpy.py"), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "LYCORIS_SERVER": str(tmp_path / "no-such-server")})
    assert result.returncode != 0
    assert "LYCORIS_SERVER" in result.stderr and "Traceback" not in result.stderr


# --- handshake.sh -------------------------------------------------------------------------

def test_handshake_prints_server_and_methods(server):
    if shutil.which("jq") is None:
        pytest.skip("jq is not installed (apt-get install -y jq)")
    result = run([str(EXAMPLES / "handshake.sh")], server, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^server: lycoris-server \d+\.\d+\.\d+", result.stdout, re.M), result.stdout
    assert "capabilities:" in result.stdout and "algorithms:" in result.stdout
    # rpc.discover: either the method list or, while the document is empty, its raw result.
    assert re.search(r"^methods \(\d+\):\n .*\binitialize\b", result.stdout, re.M) \
        or "rpc.discover (no methods listed yet):" in result.stdout, result.stdout


def test_handshake_without_jq_fails_clearly(server, tmp_path):
    bash = shutil.which("bash")
    result = run([bash, str(EXAMPLES / "handshake.sh")], server, timeout=60, PATH=str(tmp_path))
    assert result.returncode != 0
    assert "jq is required" in result.stderr


def test_causal_lm_example(server, tmp_path):
    """A short run of examples/causal_lm.py: LoRA, LoKr and DoRA on a tiny random Llama
    learn the generated text (loss falls), the saved adapter reloads onto a fresh base model
    and merges into its weights with the trained logits."""
    summary_path = tmp_path / "summary.json"
    result = run([sys.executable, str(EXAMPLES / "causal_lm.py"), "--steps", "30", "--algos", "lora,lokr,dora",
                  "--out-dir", str(tmp_path), "--json", str(summary_path)], server, timeout=600,
                 PYTHONPATH=str(REPO_ROOT / "python"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    for name in ("lora", "lokr", "dora"):
        entry = summary[name]
        assert entry["last_loss"] < 0.92 * entry["first_loss"], (name, entry)
        assert entry["adapter_effect"] > 1e-2, (name, entry)
        assert entry["reload_error"] < 1e-4 and entry["merge_error"] < 1e-4, (name, entry)
        assert Path(entry["file"]).stat().st_size > 0
