"""Loss against forgetting for every method and strength of benches that share a source model and
fine-tuning type (a bench and its sweep), one panel per task: where each variant sits on the
trade-off, with AdamW's point and its dashed lines to compare against.

    python bench/frontier.py OUT.png TITLE bench/results/DATE-debian-full/summary.json \
        bench/results/DATE-debian-full-sweep/summary.json

Each point is the median over seeds of the final validation loss (x) and of the forgetting (y:
the legacy forget set, or the first named forget set of runs that have only named sets); the
bars span the seeds. Methods that appear in several benches (AdamW) are drawn once, from the
first file.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FAMILIES = {  # colour by what the variant changes; the first matching prefix wins
    "adamw": "black", "l2sp": "tab:blue", "spd": "tab:cyan", "balanced": "tab:green",
    "wdp-coupled": "tab:red", "wdp-decoupled": "tab:orange", "full-method": "tab:purple",
    "dora": "tab:brown", "loraplus": "tab:pink",
}


def colour(name):
    return next((c for prefix, c in FAMILIES.items() if name.startswith(prefix)), "tab:gray")


def forgetting(m):
    """({seed: Δ forget loss}, median) on the legacy forget set, else on the first named set
    (protocol v2 summaries of runs that measure only named sets)."""
    if any(v is not None for v in (m.get("forgetting") or {}).values()):
        return m["forgetting"], m["forgetting_median"]
    for fs in (m.get("forget_sets") or {}).values():
        return fs["end"], fs["end_median"]
    return {}, None


def points(paths):
    """{task: {method: (loss median, [losses], forgetting median, [forgettings])}}"""
    out: dict[str, dict] = {}
    for path in paths:
        for task, pair in json.loads(Path(path).read_text())["pairs"].items():
            for name, m in pair["methods"].items():
                losses = [v for v in m.get("final_loss", {}).values() if v is not None]
                forget, forget_median = forgetting(m)
                forgets = [v for v in forget.values() if v is not None]
                if losses and forgets and name not in out.setdefault(task, {}):
                    out[task][name] = (m["final_loss_median"], losses, forget_median, forgets)
    return out


def plot(png, title, paths):
    data = points(paths)
    names = list(dict.fromkeys(n for methods in data.values() for n in methods))
    seen: dict[str, int] = {}
    style = {}
    for n in names:  # colour by family, marker by variant within it
        c = colour(n)
        style[n] = (c, "s" if n == "adamw" else "o^Dv<>P"[seen.get(c, 0) % 7])
        seen[c] = seen.get(c, 0) + 1
    fig, axes = plt.subplots(1, len(data), figsize=(4.8 * len(data) + 2.2, 4.6), squeeze=False)
    for ax, (task, methods) in zip(axes[0], data.items()):
        for name, (x, xs, y, ys) in methods.items():
            c, marker = style[name]
            ax.errorbar(x, y, xerr=[[x - min(xs)], [max(xs) - x]], yerr=[[y - min(ys)], [max(ys) - y]],
                        fmt=marker, color=c, ms=6, capsize=2, lw=1, label=name)
        if "adamw" in methods:
            ax.axvline(methods["adamw"][0], color="black", ls="--", lw=0.8)
            ax.axhline(methods["adamw"][2], color="black", ls="--", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel("final validation loss (lower is better)")
        ax.set_ylabel("forgetting: Δ loss on source text")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    plot(sys.argv[1], sys.argv[2], sys.argv[3:])
