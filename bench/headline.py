"""The README's headline tables: for every bench and task, AdamW against the full method and the
best anchored/penalised variant, then every method's loss and forgetting relative to AdamW,
from the benches' summary.json files.

    python bench/headline.py bench/results/2026-11-28-*/summary.json > bench/results/headline.md
"""

import json
import sys
from pathlib import Path


def fmt_steps(m):
    s = m["steps"]
    if s["median"] is None:
        return f"not reached ({s['reached']}/{s['n']})"
    return f"{s['median']:.0f} ({s['reached']}/{s['n']})"


def num(x, spec):
    return "–" if x is None else format(x, spec)


def done(m):
    return sum(v is not None for v in m.get("final_loss", {}).values())


def main(paths):
    print("| bench | task | seeds done (adamw / full) | target T | AdamW steps to T | full method steps to T "
          "| final val loss AdamW → full | forgetting AdamW → full | lowest-forgetting method within 1% of AdamW's loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        bench = Path(path).parent.name.split("-", 3)[-1]
        d = json.loads(Path(path).read_text())
        for task, p in d["pairs"].items():
            a, f = p["methods"]["adamw"], p["methods"]["full-method"]
            base = a["final_loss_median"]
            close = [(m["forgetting_median"], name) for name, m in p["methods"].items()
                     if name != "adamw" and m.get("final_loss_median") is not None and base is not None
                     and m["forgetting_median"] is not None and m["final_loss_median"] <= 1.01 * base]
            best = min(close)[1] if close else "none"
            print(f"| {bench} | {task} | {done(a)} / {done(f)} | {num(p['target'], '.4f')} | "
                  f"{fmt_steps(a)} | {fmt_steps(f)} | {num(base, '.4f')} → {num(f['final_loss_median'], '.4f')} | "
                  f"{num(a['forgetting_median'], '+.3f')} → {num(f['forgetting_median'], '+.3f')} | {best} |")


def tradeoffs(paths):
    """Second table: each method's final validation loss and forgetting relative to AdamW's."""
    names = ["l2sp", "spd", "balanced", "wdp-decoupled", "wdp-coupled", "full-method", "dora", "loraplus"]
    print("\n| bench | task | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for path in paths:
        bench = Path(path).parent.name.split("-", 3)[-1]
        d = json.loads(Path(path).read_text())
        for task, p in d["pairs"].items():
            a = p["methods"]["adamw"]
            cells = []
            for n in names:
                m = p["methods"].get(n)
                if not m or None in (m["final_loss_median"], a["final_loss_median"], m["forgetting_median"]):
                    cells.append("")
                    continue
                dl = 100 * (m["final_loss_median"] / a["final_loss_median"] - 1)
                df = 100 * (m["forgetting_median"] / a["forgetting_median"] - 1)
                cells.append(f"{dl:+.1f}% / {df:+.0f}%")
            print(f"| {bench} | {task} | " + " | ".join(cells) + " |")
    print("\nCells: final validation loss / forgetting, relative to AdamW's (medians over the seeds done).")


if __name__ == "__main__":
    main(sys.argv[1:])
    tradeoffs(sys.argv[1:])
