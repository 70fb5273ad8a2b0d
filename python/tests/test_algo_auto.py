"""algo=auto (create_lycoris and kohya network_args): each layer gets the algorithm and rank
or factor of the server's plan (network.suggest, the rule `lycoris suggest` uses); the
network has exactly the planned size, within the budget; its file is an ordinary mixed file
that LyCORIS 4.1.3 and this package load with the same outputs; a kohya training step with
it trains and saves."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import swift_lycoris as sl
from _sl_oracle import assert_rel, base_model, inputs, lycoris, randomize_ours, run, significant_delta
from swift_lycoris import kohya as sk
from swift_lycoris import suggestion
from swift_lycoris.wrapper import _targets
from test_kohya import Models, assert_close, lycoris_from_file
from test_kohya import run as run_sd


def _size(network) -> int:
    return sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("budget,algorithms", [(800, {"locon", "lokr"}), ("2KB", {"loha", "lokr"})])
def test_create_lycoris_auto_is_the_plan_and_reloads_in_lycoris(tmp_path, budget, algorithms):
    base = base_model()
    plan = suggestion.plan(_targets(base, False), budget)
    limit = budget if isinstance(budget, int) else 1000  # 2 KB at f16
    assert plan["budget"] == limit and plan["parameters"] <= limit
    model = copy.deepcopy(base)
    ours = sl.create_lycoris(model, 1.0, linear_alpha=2.0, algo="auto", budget=budget, threads=1)
    loaded = mine = None
    try:
        assert {e["algo"] for e in plan["layers"]} == algorithms
        assert {n: i["algorithm"] for n, i in ours.modules_info.items()} == {e["name"]: e["algo"] for e in plan["layers"]}
        assert _size(ours) == plan["parameters"]
        randomize_ours(ours)
        ours.apply_to()
        ours.eval()
        x, _ = inputs()
        y_ours, _ = run(model, x)
        significant_delta(y_ours, run(base, x)[0])
        path = tmp_path / "auto.safetensors"
        ours.save_weights(str(path))
        theirs = copy.deepcopy(base)
        loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(path), theirs)
        assert {type(m).__name__ for m in loaded.loras} == {{"locon": "LoConModule", "loha": "LohaModule",
                                                              "lokr": "LokrModule"}[a] for a in algorithms}
        loaded.apply_to()
        assert_rel(run(theirs, x)[0], y_ours, 1e-4, "LyCORIS 4.1.3 on the algo=auto file")
        again = copy.deepcopy(base)
        mine = sl.create_lycoris_from_weights(1.0, str(path), again, threads=1)
        mine.apply_to()
        assert_rel(run(again, x)[0], y_ours, 1e-5, "the algo=auto file reloaded here")
    finally:
        for network in (ours, mine):
            if network is not None:
                network.close()


def test_auto_needs_a_budget_that_fits():
    base = base_model()
    with pytest.raises(ValueError, match="needs a budget"):
        sl.create_lycoris(base, algo="auto")
    with pytest.raises(ValueError, match="too small: rank 1 on every layer needs 695"):
        sl.create_lycoris(base, algo="auto", budget=100)
    with pytest.raises(ValueError, match="budget must be"):
        sl.create_lycoris(base, algo="auto", budget="12 parsecs")
    with pytest.raises(ValueError, match="algo=auto needs a budget"):
        sk.create_network(1.0, 4, 1, None, None, torch.nn.Linear(4, 4), algo="auto")


def test_kohya_auto_trains_saves_and_reloads(tmp_path, capsys):
    te, unet = Models().copy()
    fresh = Models().copy()
    network = sk.create_network(1.0, 4, 1.0, None, te, unet, algo="auto", budget="20000", conv_dim="4", seed="3")
    printed = capsys.readouterr().out
    loaded = None
    try:
        assert "algo=auto, budget 20000 (f16)" in printed and "total: " in printed, printed
        assert any(line.lstrip().startswith("lora_unet_down_blocks_0") for line in printed.splitlines()), printed
        assert all(len(line) <= 100 for line in printed.splitlines())
        network.apply_to(te, unet, True, True)
        size = _size(network)
        assert size == int(re.search(r"total: (\d+) parameters", printed).group(1)) and size <= 20_000
        algorithms = {info["algorithm"] for info in network.core.modules_info.values()}
        assert len(algorithms - {"norms"}) >= 2, algorithms
        groups, _ = network.prepare_optimizer_params(1e-2, 1e-2, 1e-2)
        optimizer = torch.optim.SGD(groups, lr=0.5)
        before = [p.detach().clone() for p in network.parameters()]
        run_sd(te, unet)
        optimizer.step()
        assert sum(not torch.equal(a, p) for a, p in zip(before, network.parameters())) >= len(before) // 2
        network.eval()
        expected = run_sd(te, unet, grad=False)
        path = tmp_path / "auto.safetensors"
        network.save_weights(str(path), torch.float32, {"ss_network_module": "swift_lycoris.kohya"})
        te_l, unet_l = copy.deepcopy(fresh[0]), copy.deepcopy(fresh[1])
        lycoris_from_file(path, te_l, unet_l)
        theirs = run_sd(te_l, unet_l, grad=False)
        assert_close(theirs["unet"], expected["unet"], "LyCORIS 4.1.3 on the trained algo=auto file", rtol=1e-4)
        te_o, unet_o = fresh
        # kohya passes the same network_args; the file decides, no budget needed.
        loaded, _ = sk.create_network_from_weights(1.0, str(path), None, te_o, unet_o, algo="auto")
        loaded.apply_to(te_o, unet_o, True, True)
        loaded.eval()
        assert_close(run_sd(te_o, unet_o, grad=False)["unet"], expected["unet"], "reloaded here", rtol=1e-5)
    finally:
        network.close()
        if loaded is not None:
            loaded.close()


def test_auto_lokr_square_factors_reload_in_lycoris(tmp_path):
    """At a generous budget every layer is a full-rank LoKr; on these convolutions the plan
    picks square first factors (f, f) from LyCORIS's `factor` f ≠ −1 — and LyCORIS 4.1.3's
    loader rebuilds exactly those factors from the file."""
    torch.manual_seed(2)
    base = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 48, 3, padding=1),
                               torch.nn.Conv2d(48, 24, 3, padding=1), torch.nn.Conv2d(24, 12, 1))
    plan = suggestion.plan(_targets(base, False), 10**6)
    factors = {e["name"]: (e["algo"], e["options"].get("factor"), e["w1_shape"]) for e in plan["layers"]}
    assert factors["lycoris_0"] == ("lokr", 2, [2, 2]) and factors["lycoris_1"] == ("lokr", 4, [4, 4]), factors
    model = copy.deepcopy(base)
    ours = sl.create_lycoris(model, 1.0, algo="auto", budget=10**6, threads=1)
    try:
        assert _size(ours) == plan["parameters"]
        randomize_ours(ours)
        ours.apply_to()
        ours.eval()
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            y_ours = model(x)
        path = tmp_path / "auto.safetensors"
        ours.save_weights(str(path))
        theirs = copy.deepcopy(base)
        loaded, _ = lycoris.create_lycoris_from_weights(1.0, str(path), theirs)
        loaded.apply_to()
        with torch.no_grad():
            assert_rel(theirs(x), y_ours, 1e-4, "LyCORIS 4.1.3 on square LoKr factors")
    finally:
        ours.close()
