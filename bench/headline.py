"""The README's headline tables, from the benches' summary.json files:

  1. per bench and task: AdamW against the full method (steps to AdamW's target, final loss,
     forgetting), the fastest method with its median speedup, and the method that forgets least
     within 1% of AdamW's final loss;
  2. per group of benches with the same methods: each method's final validation loss and
     forgetting relative to AdamW's (a sweep gets its own table, with its own columns).

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


def bench_name(path):
    return Path(path).parent.name.split("-", 3)[-1]


def load(paths):
    return [(bench_name(p), json.loads(Path(p).read_text())) for p in paths]


def fastest(methods):
    """The method with the highest median speedup over AdamW, if any beats 1.0."""
    best = max(((m["speedup"]["median"], name) for name, m in methods.items()
                if name != "adamw" and (m.get("speedup") or {}).get("median") is not None), default=None)
    return f"{best[1]} {best[0]:.2f}×" if best and best[0] > 1.0 else "none"


def headline(benches):
    print("| bench | task | seeds (adamw / full) | target T | AdamW steps to T | full method steps to T "
          "| final val loss AdamW → full | forgetting AdamW → full | fastest to T (median speedup) "
          "| least forgetting within 1% of AdamW's loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bench, d in benches:
        for task, p in d["pairs"].items():
            a, f = p["methods"]["adamw"], p["methods"].get("full-method")
            if f is None:
                continue
            base = a["final_loss_median"]
            close = [(m["forgetting_median"], name) for name, m in p["methods"].items()
                     if name != "adamw" and m.get("final_loss_median") is not None and base is not None
                     and m["forgetting_median"] is not None and m["final_loss_median"] <= 1.01 * base]
            best = min(close)[1] if close else "none"
            print(f"| {bench} | {task} | {done(a)} / {done(f)} | {num(p['target'], '.4f')} | "
                  f"{fmt_steps(a)} | {fmt_steps(f)} | {num(base, '.4f')} → {num(f['final_loss_median'], '.4f')} | "
                  f"{num(a['forgetting_median'], '+.3f')} → {num(f['forgetting_median'], '+.3f')} | "
                  f"{fastest(p['methods'])} | {best} |")


def relative(m, a):
    if not m or None in (m["final_loss_median"], a["final_loss_median"], m["forgetting_median"],
                         a["forgetting_median"]):
        return ""
    dl = 100 * (m["final_loss_median"] / a["final_loss_median"] - 1)
    df = 100 * (m["forgetting_median"] / a["forgetting_median"] - 1)
    return f"{dl:+.1f}% / {df:+.0f}%"


def tradeoffs(benches):
    """One table per distinct method list (main benches share one; each sweep has its own)."""
    groups: dict[tuple, list] = {}
    for bench, d in benches:
        names = []
        for p in d["pairs"].values():
            names += [n for n in p["methods"] if n != "adamw" and n not in names]
        key = tuple(n for n in names if n not in ("dora", "loraplus")) or tuple(names)
        groups.setdefault(key, []).append((bench, d, names))
    for rows in groups.values():
        names = []
        for _, _, ns in rows:
            names += [n for n in ns if n not in names]
        print("\n| bench | task | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for bench, d, _ in rows:
            for task, p in d["pairs"].items():
                a = p["methods"]["adamw"]
                print(f"| {bench} | {task} | " + " | ".join(relative(p["methods"].get(n), a) for n in names) + " |")
    print("\nCells: final validation loss / forgetting, relative to AdamW's (medians over seeds; "
          "negative forgetting = forgets less than AdamW).")


if __name__ == "__main__":
    loaded = load(sys.argv[1:])
    headline(loaded)
    tradeoffs(loaded)
