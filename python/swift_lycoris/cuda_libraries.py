"""Where the server finds CUDA: the ``nvidia/*/lib`` folders of torch's CUDA wheels.

torch's Linux wheels install NVIDIA's libraries as packages beside it
(``site-packages/nvidia/cu13/lib`` from CUDA 13 on; one folder per package before, e.g.
``nvidia/cublas/lib``, ``nvidia/cuda_nvrtc/lib``). The server loads cuBLAS and NVRTC from
the folders the client names in ``initialize {cuda: {library_dirs}}`` before the system's
(protocol/README.md, ``initialize``); the driver, ``libcuda.so.1``, is the host's.
"""

from __future__ import annotations

import glob
import os


def torch_library_dirs() -> list[str]:
    """The existing ``nvidia/*/lib`` folders next to the installed torch, sorted; empty when
    torch is not installed or is a CPU-only build without them."""
    try:
        import torch
    except ImportError:
        return []
    site_packages = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    return sorted(path for path in glob.glob(os.path.join(site_packages, "nvidia", "*", "lib")) if os.path.isdir(path))
