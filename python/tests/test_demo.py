"""The README's main job: `python -m swift_lycoris.demo` trains through swift_lycoris.kohya,
the loss falls, and it writes the adapter (kohya metadata, LoHa keys) and a matplotlib plot
(axes with ticks, labels, a title naming the algorithm, the scale stated); a bad algorithm
is one line naming the choices, from the module and from `make demo`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import swift_lycoris as sl
from swift_lycoris import kohya
from swift_lycoris.plot import loss_figure, loss_scale

REPOSITORY = Path(__file__).resolve().parents[2]


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
    described = sl.describe_file(out)
    metadata, keys = described["metadata"], [t["key"] for t in described["tensors"]]
    assert metadata["ss_network_module"] == "swift_lycoris.kohya" and "sshs_model_hash" in metadata
    assert any(key.endswith(".hada_w1_a") for key in keys) and all(key.startswith("lora_") for key in keys)
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Matplotlib" in png[:200]  # its tEXt "Software" chunk
    assert f"loss curve {plot} (matplotlib, " in result.stdout
    assert "algorithms: loha" in result.stdout  # `lycoris info` of the file


@pytest.mark.parametrize("losses, scale", [([1.0, 0.5, 0.2], "linear"), ([2.0, 0.3, 0.05, 0.01], "log"), ([0.0, 1.0], "linear")])
def test_loss_plot_has_axes_ticks_labels_title_and_scale(losses, scale):
    from matplotlib import pyplot

    figure = loss_figure(losses, "lokr")
    try:
        (axes,) = figure.axes
        assert loss_scale(losses) == scale and axes.get_yscale() == scale
        assert axes.get_xlabel() == "step" and axes.get_ylabel() == f"loss ({scale} scale)"
        assert axes.get_title() == f"lokr adapter: training loss per step ({scale} scale)"
        assert len(axes.get_xticks()) >= 2 and len(axes.get_yticks()) >= 2
        (line,) = axes.get_lines()
        assert list(line.get_xdata()) == list(range(1, len(losses) + 1)) and list(line.get_ydata()) == losses
    finally:
        pyplot.close(figure)


def test_a_bad_algorithm_is_one_line_naming_the_choices():
    result = subprocess.run([sys.executable, "-m", "swift_lycoris.demo", "--algo", "bogus"], capture_output=True, text=True,
                            timeout=120)
    choices = ", ".join(kohya.COMPUTED_ALGORITHMS)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"swift_lycoris.demo: unknown algorithm 'bogus'; choose one of {choices}\n"
    make = subprocess.run(["make", "-s", "-C", str(REPOSITORY), "demo", "ALGO=bogus"], capture_output=True, text=True,
                          timeout=120)
    assert make.returncode != 0 and make.stdout == ""
    (line,) = make.stderr.splitlines()
    assert re.fullmatch(r"Makefile:\d+: \*\*\* ALGO=bogus is not an algorithm of the demo; choose one of: "
                        + re.escape(" ".join(kohya.COMPUTED_ALGORITHMS)) + r"\.  Stop\.", line), line
