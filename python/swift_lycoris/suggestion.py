"""``algo=auto``: each layer gets the algorithm, rank or Kronecker factor of the plan that
``lycoris suggest`` prints, asked of the server (``network.suggest``; the rule lives in
the Swift ``AlgorithmSuggestion`` alone).

The rule: every layer attains at least a fraction ρ of its full rank m = min(out, in·Πk),
ρ as high as the budget allows, each by the cheapest of LoRA (rank r, r·(out + n)
parameters), LoHa (rank ≤ r², 2r·(out + n)) and LoKr with both Kronecker halves full
(rank min(a₁, b₁)·min(out/a₁, n/b₁)). The budget is a parameter count or a size
(``"10MB"``, decimal units) at ``budget_dtype`` (f16 by default, as kohya saves)."""

from __future__ import annotations

from torch import nn

from .network import is_norm_layer, layer_description
from .server import Server, ServerError

_ALGORITHM_COLUMN = 20


def plan(layers: dict[str, nn.Module], budget, budget_dtype: str = "f16", server: Server | None = None) -> dict:
    """The server's plan (``network.suggest``'s result) for the Linear/Conv layers of
    `layers` (norm layers are left out). `budget`: an int, a digit string (parameters) or
    a size string. Raises ValueError naming the problem (a budget too small or not a size)."""
    if budget is None:
        raise ValueError("algo=auto needs a budget: a size such as '10MB' or a parameter count")
    if isinstance(budget, str) and budget.strip().isdigit():
        budget = int(budget.strip())
    elif not isinstance(budget, (int, str)) or isinstance(budget, bool):
        raise ValueError(f"budget must be a size such as '10MB' or a parameter count, not {budget!r}")
    descriptions = [layer_description(name, module) for name, module in layers.items() if not is_norm_layer(module)]
    descriptions = [d for d in descriptions if d is not None]
    owned = server is None
    server = server or Server()
    try:
        return server.call("network.suggest", {"layers": descriptions, "budget": budget, "dtype": str(budget_dtype).lower()})
    except ServerError as error:
        raise ValueError(f"algo=auto: {error}") from None
    finally:
        if owned:
            server.close()


def layer_options(result: dict) -> dict[str, dict]:
    """``LycorisNetwork``'s ``layer_options`` for a plan: per layer its algo and options."""
    return {entry["name"]: {"algo": entry["algo"], "options": dict(entry["options"])} for entry in result["layers"]}


def plan_lines(result: dict, budget_dtype: str = "f16") -> list[str]:
    """The plan per block (layers, algorithms, attainable ranks, MB at `budget_dtype`) and
    the total, as ``lycoris suggest`` prints it; every line fits 100 columns."""
    size = result["bytes"] / max(1, result["parameters"]) if result["parameters"] else 2
    lines = [f"{'block':<48} {'layers':>6}  {'algorithms':<{_ALGORITHM_COLUMN}}{'ranks':<10} {'size (MB)':>9}"]
    for block in result["blocks"]:
        name = block["name"] if len(block["name"]) <= 48 else block["name"][:22] + "…" + block["name"][-25:]
        algorithms = ", ".join(f"{k} {v}" for k, v in sorted(block["algorithms"].items()))
        ranks = f"{block['min_rank']}–{block['max_rank']}"
        lines.append(f"{name:<48} {block['layers']:>6}  {algorithms:<{_ALGORITHM_COLUMN}}{ranks:<10} "
                     f"{block['parameters'] * size / 1e6:>9.2f}")
    lines.append(f"total: {result['parameters']} parameters, {result['bytes'] / 1e6:.2f} MB ({budget_dtype}) of a budget of "
                 f"{result['budget']}; every layer ≥ {100 * result['target']:.1f}% of its full rank")
    return lines
