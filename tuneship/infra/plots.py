"""Line charts of a run's curves (loss, eval loss, learning rate): drawn by train into the run
folder and by eval into its report, from the same figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

Points = Sequence[tuple[float, float]]


def line_chart(series: dict[str, Points], path: Path, title: str, xlabel: str = "step") -> bool:
    """One line per non-empty series; nothing is written (False) when every series is empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {label: points for label, points in series.items() if points}
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in drawn.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_title(f"{title}: {', '.join(drawn)}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def loss_chart(loss: Points, eval_loss: Points, path: Path, title: str) -> bool:
    return line_chart({"train loss": loss, "eval loss": eval_loss}, path, title)
