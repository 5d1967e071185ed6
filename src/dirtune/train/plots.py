"""loss.png for one run: training and validation loss against step (and forgetting, when measured)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs happen on headless machines
import matplotlib.pyplot as plt  # noqa: E402


def _finite(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(records: list[dict], path: Path, title: str = "", target: float | None = None) -> Path:
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    has_forget = any("forget_loss" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if has_forget else 1, figsize=(11 if has_forget else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    xs, ys = _finite(train, "loss")
    ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    xs, ys = _finite(evals, "eval_loss")
    ax.plot(xs, ys, "o-", color="tab:orange", ms=3, lw=1.5, label="validation loss")
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1, label=f"target {target:.4g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_forget:
        ax = axes[0][1]
        xs, ys = _finite(evals, "forget_loss")
        ax.plot(xs, ys, "o-", color="tab:red", ms=3, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss on source-domain text")
        ax.set_title("forgetting (higher = more forgotten)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
