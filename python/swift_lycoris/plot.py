"""The demo's loss curve, drawn with matplotlib (optional dependency: ``pip install
swift-lycoris[plot]``): step on x, loss on y, ticks and labels on both axes, a title naming
the algorithm, and the y scale stated in the title and the axis label."""

from __future__ import annotations


def loss_scale(losses: list[float]) -> str:
    """"log" when every loss is positive and they span more than a decade, else "linear"."""
    return "log" if min(losses) > 0 and max(losses) / min(losses) > 10 else "linear"


def loss_figure(losses: list[float], algorithm: str):
    """The figure of the loss per step (steps numbered from 1); the caller closes it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the loss plot needs matplotlib: pip install matplotlib (or swift-lycoris[plot])") from error
    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    scale = loss_scale(losses)
    figure, axes = pyplot.subplots(figsize=(7, 4), dpi=100)
    axes.plot(range(1, len(losses) + 1), losses, color="tab:red", linewidth=1.5)
    axes.set_yscale(scale)
    axes.set_xlabel("step")
    axes.set_ylabel(f"loss ({scale} scale)")
    axes.set_title(f"{algorithm} adapter: training loss per step ({scale} scale)")
    axes.grid(True, which="major", alpha=0.3)
    figure.tight_layout()
    return figure


def write_loss_plot(path: str, losses: list[float], algorithm: str) -> str:
    """Writes :func:`loss_figure` as a PNG at `path`; returns the y scale used."""
    from matplotlib import pyplot

    figure = loss_figure(losses, algorithm)
    try:
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)
    return loss_scale(losses)
