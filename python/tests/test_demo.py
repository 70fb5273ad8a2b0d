"""The README's main job: `python -m swift_lycoris.demo` trains through swift_lycoris.kohya,
the loss falls, and it writes the adapter (kohya metadata, LoHa keys) and a PNG plot."""

import json
import struct
import subprocess
import sys
from pathlib import Path


def test_demo_trains_saves_and_plots(tmp_path):
    out, plot = tmp_path / "demo.safetensors", tmp_path / "loss.png"
    result = subprocess.run(
        [sys.executable, "-m", "swift_lycoris.demo", "--steps", "24", "--out", str(out), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("loss "))
    first, last = (float(v) for v in summary.split()[1:4:2])
    assert last < 0.8 * first, summary
    with open(out, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__")
    assert metadata["ss_network_module"] == "swift_lycoris.kohya" and "sshs_model_hash" in metadata
    assert any(key.endswith(".hada_w1_a") for key in header) and all(key.startswith("lora_") for key in header)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "algorithms: loha" in result.stdout  # `lycoris info` of the file
