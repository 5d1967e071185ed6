"""The README's headline tables, from the benches' summary.json files:

  1. per bench and task: AdamW against the full method (steps to AdamW's target, final loss,
     forgetting), the fastest method with its median speedup, the method that forgets least
     within 1% of AdamW's final loss, and the learning-rate grid check (protocol v2);
  2. per bench and task: the fastest method to 50/75/90/95/100% of AdamW's improvement, the
     largest speedup over AdamW *at one same rate*, and AdamW's overtraining (final − best);
  3. per group of benches with the same methods: each method's final validation loss and
     forgetting relative to AdamW's (a sweep gets its own table, with its own columns).

† marks a method whose chosen rate sits on the edge of its grid (grid check FAILED): its
numbers are not from a tuned comparison. Summaries written before protocol v2 have no grid
check, fractions or same-rate comparison; their cells say "–".

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


def dagger(m):
    return "†" if m.get("edge") else ""


def fastest(methods, key=lambda m: m.get("speedup")):
    """The method with the highest median speedup over AdamW (by `key`), if any beats 1.0."""
    best = max(((key(m)["median"], name) for name, m in methods.items()
                if name != "adamw" and (key(m) or {}).get("median") is not None), default=None)
    if not best or best[0] <= 1.0:
        return "none"
    return f"{best[1]}{dagger(methods[best[1]])} {best[0]:.2f}×"


def grid_check(p):
    """'ok', 'FAILED (k/n)' (methods whose chosen rate is on the grid's edge), or '–' (old file)."""
    ms = p["methods"].values()
    if not all("edge" in m for m in ms):
        return "–"
    k = sum(bool(m["edge"]) for m in ms)
    return f"**FAILED** ({k}/{len(ms)})" if k else "ok"


def headline(benches):
    print("| bench | task | seeds (adamw / full) | target T | AdamW steps to T | full method steps to T "
          "| final val loss AdamW → full | forgetting AdamW → full | fastest to T (median speedup) "
          "| least forgetting within 1% of AdamW's loss | lr grid check (methods on the edge) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for bench, d in benches:
        for task, p in d["pairs"].items():
            a, f = p["methods"]["adamw"], p["methods"].get("full-method")
            if f is None:
                continue
            base = a["final_loss_median"]
            close = [(m["forgetting_median"], name) for name, m in p["methods"].items()
                     if name != "adamw" and m.get("final_loss_median") is not None and base is not None
                     and m["forgetting_median"] is not None and m["final_loss_median"] <= 1.01 * base]
            best = min(close)[1] + dagger(p["methods"][min(close)[1]]) if close else "none"
            print(f"| {bench} | {task} | {done(a)} / {done(f)} | {num(p['target'], '.4f')} | "
                  f"{fmt_steps(a)} | {fmt_steps(f)} | {num(base, '.4f')} → {num(f['final_loss_median'], '.4f')} | "
                  f"{num(a['forgetting_median'], '+.3f')} → {num(f['forgetting_median'], '+.3f')} | "
                  f"{fastest(p['methods'])} | {best} | {grid_check(p)} |")
    print("\n† chosen learning rate on the edge of the grid (grid check FAILED): not a tuned comparison.")


FRACTIONS = ("0.5", "0.75", "0.9", "0.95", "1")


def at_one_rate(p):
    """The largest speedup of any method over AdamW at the same learning rate (tune seeds)."""
    best = None
    for lr, cell in (p.get("at_rates") or {}).items():
        for name, m in cell["methods"].items():
            med = (m.get("speedup") or {}).get("median")
            if name != "adamw" and isinstance(med, (int, float)) and (best is None or med > best[0]):
                best = (med, name, lr)
    if not p.get("at_rates"):
        return "–"  # a summary from before protocol v2
    return "none" if best is None or best[0] <= 1.0 else f"{best[1]} {best[0]:.2f}× at lr {best[2]}"


def curve(benches):
    print("\n| bench | task | " + " | ".join(f"fastest to {float(f):.0%}" for f in FRACTIONS)
          + " | largest speedup at one same rate | AdamW final − best val loss |")
    print("|---|---|" + "---|" * (len(FRACTIONS) + 2))
    for bench, d in benches:
        for task, p in d["pairs"].items():
            cells = []
            for f in FRACTIONS:
                if not all(m.get("fractions") for m in p["methods"].values()):
                    cells.append("–")
                    continue
                cells.append(fastest(p["methods"], lambda m, f=f: m["fractions"].get(f, {}).get("speedup")))
            gap = p["methods"]["adamw"].get("overtrain_gap_median")
            print(f"| {bench} | {task} | " + " | ".join(cells) + f" | {at_one_rate(p)} | {num(gap, '+.4f')} |")
    print("\nFastest: the highest median speedup over AdamW to that fraction of AdamW's improvement "
          "from its step-0 loss to T (\"none\": no method beats AdamW). Same rate: every method "
          "against AdamW at each rate of the grid, tune seeds; a win there that vanishes under "
          "tuning is a learning-rate effect, not a faster method.")


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
    curve(loaded)
    tradeoffs(loaded)
