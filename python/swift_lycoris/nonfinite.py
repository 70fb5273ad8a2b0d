"""NaN and ±∞ met by an adapted layer, named by module and pass, and what to do about them
(``nan_policy``).

The server refuses non-finite tensors (-32004, naming the module and the pass); on the
weight transfer the layer's input never reaches it, so the network checks that input
itself. Either way the user sees one :class:`NonFiniteError`, the same whichever transfer
the call took, in training and in evaluation:

- ``nan_policy="error"`` (default): raise it;
- ``nan_policy="skip_step"``: log it as a warning and skip the step — a call whose input
  is not finite contributes nothing, a backward whose output gradient is not finite
  returns no gradients and, when the backward pass ends, every adapter parameter's
  ``.grad`` is dropped (torch optimizers leave parameters without a gradient unchanged),
  and parameters that an optimizer step made non-finite are put back to their last finite
  values (the server still holds them).
"""

from __future__ import annotations

import torch

NAN_POLICIES = ("error", "skip_step")


def check_nan_policy(policy: str) -> str:
    if policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {', '.join(NAN_POLICIES)}, not {policy!r}")
    return policy


class NonFiniteError(FloatingPointError):
    """NaN or ±∞ in an adapted layer's input, output gradient or parameters: ``module`` (its
    kohya/LyCORIS name), ``stage`` (``forward`` or ``backward``) and ``what`` name it."""

    def __init__(self, module: str, stage: str, what: str):
        self.module, self.stage, self.what = module, stage, what
        super().__init__(f"swift_lycoris: non-finite values in the {stage} pass of {module}: {what} "
                         f"(nan_policy=error; nan_policy=skip_step skips such steps)")


class SkipCall(Exception):
    """Raised inside the network when ``nan_policy="skip_step"`` skips a call."""


def count_non_finite(x: torch.Tensor) -> int:
    """NaN/±∞ elements of `x`: one reduction (a sum is finite exactly when no element is
    NaN or ±∞, or the sum overflowed), an exact count only when it is not."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return 0
    return int((~torch.isfinite(x)).sum())


def describe_server_error(data: dict) -> tuple[str, str, str]:
    """(module, stage, what) of a -32004 error's ``data`` (``path``, ``count``, ``module``,
    ``pass``). A parameter is refused when it is sent, at a forward."""
    count, path = data.get("count"), data.get("path", "")
    server_pass = data.get("pass", "forward")
    if server_pass == "parameters":
        key = path.split(".", 1)[1] if path.startswith("parameters.") else path
        return data.get("module", key.split(".", 1)[0]), "forward", f"parameter {key} has {count} NaN or infinite elements"
    if server_pass == "backward":
        return data.get("module", "?"), "backward", "the gradient of its output is not finite"
    return data.get("module", "?"), server_pass, f"its input has {count} NaN or infinite elements"
