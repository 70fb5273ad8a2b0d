"""The server's CUDA probe (``initialize {cuda: {library_dirs}}``) from torch's wheel folders:
cuBLAS and NVRTC load from them and report the versions of the wheels that hold them; the
driver decides the state — on a machine without a GPU it is absent and named as the reason,
on a GPU host the device matches what torch sees. Every report is checked against the
protocol's CUDAReport schema."""

from __future__ import annotations

import json
import os
import pathlib
from importlib import metadata

import jsonschema
import pytest
import torch

from swift_lycoris.cuda_libraries import torch_library_dirs
from swift_lycoris.server import Server, ServerError

DOCUMENT = pathlib.Path(__file__).resolve().parents[2] / "protocol" / "openrpc.json"
VALIDATOR = jsonschema.Draft202012Validator(
    {"$ref": "#/components/schemas/CUDAReport", "components": json.loads(DOCUMENT.read_text())["components"]})


def probe(library_dirs):
    server = Server(cuda_library_dirs=library_dirs)
    try:
        report = server.info["capabilities"]["cuda"]
    finally:
        server.close()
    VALIDATOR.validate(report)
    return report


def wheel_version(*names):
    """The version of the first installed distribution of `names`."""
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    pytest.fail(f"none of {names} is installed, but torch_library_dirs() found NVIDIA's folders")


@pytest.fixture(scope="module")
def report():
    directories = torch_library_dirs()
    assert directories, "torch has no nvidia/*/lib folders: the test environment needs torch's CUDA wheels"
    return directories, probe(directories)


def test_cublas_and_nvrtc_load_from_torchs_wheels_with_their_versions(report):
    directories, cuda = report
    assert cuda["library_dirs"] == directories
    for key, wheels in (("cublas", ("nvidia-cublas", "nvidia-cublas-cu12")),
                        ("nvrtc", ("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12"))):
        assert any(cuda[key]["path"].startswith(d + os.sep) for d in directories), cuda[key]
        version = wheel_version(*wheels).split(".")
        assert cuda[key]["version"].split(".") == version[: len(cuda[key]["version"].split("."))], (cuda[key], version)


def test_the_driver_decides_the_state(report):
    _, cuda = report
    if torch.cuda.is_available():
        assert cuda["state"] == "available", cuda.get("reason")
        device = cuda["devices"][0]
        properties = torch.cuda.get_device_properties(0)
        assert device["name"] == properties.name
        assert device["memory"] == properties.total_memory
        assert device["compute_capability"] == f"{properties.major}.{properties.minor}"
        assert len(cuda["devices"]) == torch.cuda.device_count()
        assert cuda["kernels"]["state"] == "passed", cuda["kernels"]  # NVRTC → driver → a launch, exact result
    else:
        assert cuda["state"] == "unavailable"
        assert cuda["reason"].startswith("libcuda (the CUDA driver) not found: looked for libcuda.so.1, libcuda.so in ")
        assert "driver" not in cuda and "devices" not in cuda and "kernels" not in cuda


def test_no_probe_without_the_request():
    server = Server()
    try:
        assert "cuda" not in server.info["capabilities"]
    finally:
        server.close()


def test_network_create_on_cuda_follows_the_probe(report):
    """Without a GPU, cuda:0 is refused with the probe's reason; on a GPU host the CUDA
    backend computes there (issue 8), so the network is created on it."""
    directories, cuda = report
    layers = [{"name": "fc", "kind": "linear", "in_features": 4, "out_features": 3}]
    server = Server(cuda_library_dirs=directories)
    try:
        with pytest.raises(ServerError, match="is not a device") as malformed:
            server.call("network.create", {"layers": layers, "device": "gpu0"})
        assert malformed.value.code == -32009
        if cuda["state"] == "unavailable":
            with pytest.raises(ServerError) as refused:
                server.call("network.create", {"layers": layers, "device": "cuda:0"})
            assert refused.value.code == -32009 and refused.value.data == {"path": "device"}
            assert f"cuda:0: CUDA is unavailable: {cuda['reason']}" in str(refused.value)
            assert server.call("network.create", {"layers": layers, "device": "cpu"})["modules"]
        else:
            assert server.call("network.create", {"layers": layers, "device": "cuda:0"})["modules"]
    finally:
        server.close()


def test_network_create_on_cuda_without_a_probe_says_so():
    server = Server()
    try:
        with pytest.raises(ServerError, match="needs CUDA, which was not probed"):
            server.call("network.create", {"layers": [], "device": "cuda"})
    finally:
        server.close()
