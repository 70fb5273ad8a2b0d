"""What each transfer of an adapted layer costs on this machine, measured once when a network
is created (a few milliseconds); ``transfer="auto"`` chooses per call by these numbers (see
``LycorisNetwork._moves_weights``).

Per forward + backward of one layer with input x (|x| elements), output y, weight W, at P
output positions (rows of a Linear's input, pixels of a convolution's output):

- activations: 2 round trips; x and ∂y are copied in by the client and read by the server,
  y and ∂x written by the server straight into the tensors torch gets (CPU),
  3·(|x| + |y|) copies; the server computes the adapter: through its factors
  (``factor_multiply_adds`` c per position: forward, ∂x and ∂parameters, 3·P·c
  multiply-adds), or, without a factor path, op(x, ΔW), its ∂x and ∂ΔW (3·P·|W|);
- weights: ΔW written in place, ∂ΔW copied in and read, 3·|W| copies; their round trips are
  shared by a whole group of modules, so none is counted; torch computes ∂W of
  op(x, W0 + m·ΔW) — P·|W| multiply-adds, as many as the layer's forward, which the frozen
  base layer alone never does (the forward and ∂x replace the base layer's own).

The network replaces these estimates by what it observes (``LycorisNetwork._weights_cheaper``):
the activation path's server calls, and the layer's own forward as the measure of ∂W.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# Elements of the copy and sides of the GEMM that calibration times: large enough to leave the
# caches and the call overhead behind, small enough to take a few milliseconds.
_COPY_ELEMENTS = 1 << 20
_GEMM_SIDE = 256
_REPEATS = 3


@dataclass(frozen=True)
class TransferCosts:
    """Seconds per unit of each kind of work."""

    round_trip: float
    """one empty server call (pipe, JSON, wake-up)"""
    copy: float
    """one float32 element copied once (into or out of the arena)"""
    multiply_add: float
    """one float32 multiply-add of a GEMM on this process's threads"""

    def activations(self, inputs: int, outputs: int, server_multiply_adds: float) -> float:
        """Seconds of the activation transfer for a call with `inputs` elements of x,
        `outputs` of y, and `server_multiply_adds` the server computes (forward + backward)."""
        return 2 * self.round_trip + 3 * (inputs + outputs) * self.copy + server_multiply_adds * self.multiply_add

    def weights(self, weight_elements: int, gradient_seconds: float) -> float:
        """Seconds of the weight transfer for a layer whose ΔW has `weight_elements`, with
        `gradient_seconds` torch spends on ∂W."""
        return 3 * weight_elements * self.copy + gradient_seconds

    def describe(self) -> dict:
        return {"round_trip_us": self.round_trip * 1e6, "copy_ns_per_element": self.copy * 1e9,
                "multiply_add_ps": self.multiply_add * 1e12}


def _best(run, repeats: int = _REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(server, arena) -> TransferCosts:
    """The costs on this machine: the fastest of a few empty calls (`parameters.get` of no
    keys), of a copy of 2²⁰ floats into an arena block and out again into a tensor (both
    already touched, as on the per-call path: the arena reuses its blocks and torch its
    memory, so no page is faulted in), and of a 256³ GEMM in torch (the same BLAS work the
    server does on the same cores)."""
    round_trip = _best(lambda: server.call("parameters.get", {"keys": []}), repeats=10)
    source, sink = torch.rand(_COPY_ELEMENTS), torch.empty(_COPY_ELEMENTS)

    def copy_through_arena():
        arena.begin()
        arena.plan([4 * _COPY_ELEMENTS])
        placed = arena.put(source)
        sink.copy_(arena.view(placed["offset"], (_COPY_ELEMENTS,), torch.float32))

    copy = _best(copy_through_arena) / (2 * _COPY_ELEMENTS)
    a, b = torch.rand(_GEMM_SIDE, _GEMM_SIDE), torch.rand(_GEMM_SIDE, _GEMM_SIDE)
    multiply_add = _best(lambda: torch.mm(a, b)) / _GEMM_SIDE ** 3
    return TransferCosts(round_trip=round_trip, copy=copy, multiply_add=multiply_add)
