#!/usr/bin/env python3
"""The pure-Python side of the GPU bundle (scripts/gpu-bundle.sh, scripts/gpu-check.sh): the
wheels the device check needs besides torch, carried to a GPU host that has no network.

    gpu_wheels.py download DIR [--python-version 3.12]   # here: fill DIR with wheels
    gpu_wheels.py install DIR TARGET                     # there: unpack what the host lacks

``download`` walks the requirements of the check's roots (lycoris-lora, diffusers,
transformers, safetensors, pytest) through the distributions installed in *this* interpreter,
so the versions are the ones the tests pass with here; it leaves out torch and what torch
brings (nvidia-*, triton: the GPU host has its own CUDA build). Each is fetched with ``pip download --no-deps`` as a wheel for the GPU
host's CPython (3.12, manylinux x86_64), binary where the package has native code, and
rewritten uncompressed (a wheel is a zip; stored members let the bundle's xz compress across
all wheels: 44 MB of wheels become 24 MB of tar.xz instead of 42).

``install`` unpacks into TARGET (a directory to put first on PYTHONPATH) every bundled wheel
whose distribution the host lacks or has at another version, so the check runs against the
versions tested here; distributions the host has at the same version stay the host's, and so
does the host's numpy at any version (its torch and CuPy were built against it; the bundled
one is for a host without numpy). A wheel is a zip of importable files, so no pip is needed
there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata

ROOTS = ("lycoris-lora", "diffusers", "transformers", "safetensors", "pytest")
#: What the GPU host provides itself: torch with its CUDA libraries.
HOST_PROVIDED = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|pip|wheel)$")
#: Bundled, but the host's copy is used at whatever version it has.
HOST_PREFERRED = {"numpy"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots, python_version: str) -> dict[str, str]:
    """Installed distribution name → version for `roots` and everything they require
    (markers evaluated for Linux x86_64 CPython `python_version`, no extras)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": python_version + ".0", "extra": ""}
    found: dict[str, str] = {}
    queue = list(roots)
    while queue:
        name = canonical(queue.pop())
        if name in found or HOST_PROVIDED.match(name):
            continue
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is required but not installed in {sys.executable}")
        found[name] = distribution.version
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                queue.append(requirement.name)
    return found


def download(directory: str, python_version: str) -> int:
    pins = closure(ROOTS, python_version)
    os.makedirs(directory, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", directory, "--python-version", python_version, "--implementation", "cp", "--abi", abi,
               "--abi", "abi3", "--abi", "none"]
    for platform in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"):
        command += ["--platform", platform]
    command += [f"{name}=={version}" for name, version in sorted(pins.items())]
    subprocess.run(command, check=True)
    for filename in os.listdir(directory):
        if filename.endswith(".whl"):
            store_uncompressed(os.path.join(directory, filename))
    print(f"gpu_wheels: {len(pins)} distributions for CPython {python_version}: "
          + ", ".join(f"{n} {v}" for n, v in sorted(pins.items())))
    return 0


def store_uncompressed(path: str) -> None:
    """Rewrites the zip at `path` with every member stored (no deflate)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_STORED) as copy:
        for info in source.infolist():
            copy.writestr(info, source.read(info), compress_type=zipfile.ZIP_STORED)
    os.replace(path + ".tmp", path)


def wheel_name_version(filename: str) -> tuple[str, str]:
    name, version = os.path.basename(filename).split("-")[:2]
    return canonical(name), version


def install(directory: str, target: str) -> int:
    os.makedirs(target, exist_ok=True)
    unpacked, kept = [], []
    for filename in sorted(os.listdir(directory)):
        if not filename.endswith(".whl"):
            continue
        name, version = wheel_name_version(filename)
        try:
            host = metadata.version(name)
        except metadata.PackageNotFoundError:
            host = None
        if host == version or (host and name in HOST_PREFERRED):
            kept.append(f"{name} {version}")
            continue
        with zipfile.ZipFile(os.path.join(directory, filename)) as archive:
            archive.extractall(target)
        unpacked.append(f"{name} {version}" + (f" (host has {host})" if host else ""))
    print(f"gpu_wheels: unpacked into {target}: {', '.join(unpacked) or 'nothing'}")
    print(f"gpu_wheels: the host's own: {', '.join(kept) or 'none'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    down = commands.add_parser("download")
    down.add_argument("directory")
    down.add_argument("--python-version", default="3.12")
    inst = commands.add_parser("install")
    inst.add_argument("directory")
    inst.add_argument("target")
    args = parser.parse_args()
    if args.command == "download":
        return download(args.directory, args.python_version)
    return install(args.directory, args.target)


if __name__ == "__main__":
    raise SystemExit(main())
