"""Reward vs sqrt(KL): the paper finds PM reward roughly linear in sqrt(KL(pi || pi0)) (Bai et al. 2022, §4.3)."""

from __future__ import annotations

import math
from pathlib import Path


def fit_linear(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; returns (a, b, R^2)."""
    n = len(x)
    if n < 2:
        raise ValueError("need at least two points to fit a line")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y))
    b = sxy / sxx if sxx > 0 else 0.0
    a = my - b * mx
    ss_tot = sum((yi - my) ** 2 for yi in y)
    ss_res = sum((yi - a - b * xi) ** 2 for xi, yi in zip(x, y))
    return a, b, (1 - ss_res / ss_tot) if ss_tot > 0 else 0.0


def plot_reward_vs_sqrt_kl(rows: list[dict], out: Path) -> Path | None:
    """Scatter of PM reward against sqrt(KL) per iteration, with the linear fit; None (no plot)
    below two iterations, where there is no relation to show."""
    pts = [(math.sqrt(max(0.0, r["kl"])), r["reward_pm"]) for r in rows if r.get("kl") is not None]
    if len(pts) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = zip(*pts)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # Points, not a line: successive iterations jump about in KL, and a line through them hides the trend.
    dots = ax.scatter(x, y, c=range(1, len(x) + 1), cmap="viridis", s=18, label="PPO iterations")
    fig.colorbar(dots, ax=ax, label="iteration")
    a, b, r2 = fit_linear(list(x), list(y))
    xs = [min(x), max(x)]
    ax.plot(xs, [a + b * v for v in xs], "--", label=f"fit: {a:.3f} + {b:.3f}·√KL (R²={r2:.2f})")
    save_reward_axes(fig, ax, out)
    return out


def save_reward_axes(fig, ax, out: Path, title: str = "") -> None:
    """PM reward against sqrt(KL) axes, the same in every plot of the run, saved to `out`."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("√KL(π ‖ π₀)  (nats, per response)")
    ax.set_ylabel("PM reward")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
