"""Generated SD-shaped checkpoints for the checkpoint tests (scripts/generate_checkpoints.py)
and the `lycoris` executable they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def make_checkpoints(family: str, root: Path, seed: int):
    """(unet, text encoders, diffusers folder, single LDM file) of a small `family` model;
    SDXL's folder is sharded in two."""
    from safetensors.torch import save_file

    unet, texts = gen.build_models(family, unet_width=16, text_width=32, seed=seed)
    folder = root / "diffusers"
    gen.save_diffusers(unet, texts, str(folder), shards=2 if family == "sdxl" else 1)
    single = root / "model.safetensors"
    save_file(gen.ldm_state_dict(str(folder), lycoris_cli()), str(single))
    return unet, texts, folder, single


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def model(request, tmp_path_factory):
    """(family, unet, text encoders, diffusers folder, single file, scratch folder) per family."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    return (family, *make_checkpoints(family, root, seed=1), root)
