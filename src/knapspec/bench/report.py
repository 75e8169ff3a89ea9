"""Benchmark reports: per-run records summarised into tables (markdown), headline figures and
the Pearson correlation of predicted and measured speed. Pure functions over dicts.
"""

from __future__ import annotations

import numpy as np


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return float(np.exp(np.mean(np.log(xs)))) if xs else 0.0


def summarize(records: list[dict]) -> list[dict]:
    """Per (strategy, dataset): runs, geometric-mean speedup, mean accepted tokens per round, mean
    tokens/s, planning share, mismatches."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["strategy"], r["dataset"]), []).append(r)
    out = []
    for (s, d), rs in groups.items():
        out.append({"strategy": s, "dataset": d, "runs": len(rs),
                    "speedup": geomean([r["speedup"] for r in rs if r["speedup"]]),
                    "mean_accepted": float(np.mean([r["mean_accepted"] for r in rs])),
                    "tokens_per_s": float(np.mean([r["tokens_per_s"] for r in rs])),
                    "plan_share": float(np.mean([r["plan_share"] for r in rs])),
                    "repeat_share": _mean_or_none([r.get("repeat_share") for r in rs]),
                    "mismatches": sum(r["match"] is False for r in rs),
                    "hard_mismatches": sum(r["match"] is False and not (r["mismatch"] or {}).get("near_tie")
                                           for r in rs)})
    return out


def _mean_or_none(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def markdown_table(summary: list[dict]) -> str:
    """Strategy × dataset: geometric-mean speedup over autoregressive (mean accepted tokens/round);
    a last row with the share of the autoregressive outputs that repeat themselves
    (:func:`~knapspec.bench.harness.repeat_share`), where the records have it."""
    strategies = list(dict.fromkeys(r["strategy"] for r in summary))
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    cell = {(r["strategy"], r["dataset"]): r for r in summary}
    lines = ["| strategy | " + " | ".join(datasets) + " | all |", "|---|" + "---|" * (len(datasets) + 1)]
    for s in strategies:
        row = []
        for d in datasets:
            c = cell.get((s, d))
            row.append("" if c is None else f"{c['speedup']:.2f}x ({c['mean_accepted']:.2f})"
                       + (" MISMATCH" if c["hard_mismatches"] else ""))
        allx = geomean([cell[(s, d)]["speedup"] for d in datasets if (s, d) in cell])
        lines.append(f"| {s} | " + " | ".join(row) + f" | {allx:.2f}x |")
    ref = {r["dataset"]: r.get("repeat_share") for r in summary if r["strategy"] == "autoregressive"}
    if any(v is not None for v in ref.values()):
        def pct(v: float | None) -> str:
            return "" if v is None else f"{100 * v:.0f}%"
        shares = [ref.get(d) for d in datasets]
        lines.append("| output repeating itself | " + " | ".join(pct(v) for v in shares)
                     + f" | {pct(_mean_or_none(shares))} |")
    return "\n".join(lines)


def category_table(records: list[dict], key: str = "speedup") -> str | None:
    """Category × strategy: geometric-mean ``key`` (``speedup`` of the median runs, or
    ``speedup_fastest`` of the fastest runs with repeats) over autoregressive decoding, for the
    datasets with categories (Spec-Bench); the last column compares the last strategy with the
    best of the other non-reference strategies in each category. None without categories."""
    rows = [r for r in records if r.get("category") and r.get(key)]
    strategies = [s for s in dict.fromkeys(r["strategy"] for r in rows) if s != "autoregressive"]
    cats = list(dict.fromkeys(r["category"] for r in rows))
    if not cats or not strategies:
        return None
    last, others = strategies[-1], strategies[:-1]
    head = "| category | " + " | ".join(strategies) + (f" | {last} / best of the others |" if others else " |")
    lines = [head, "|---|" + "---|" * (len(strategies) + bool(others))]
    for c in cats + [None]:
        g = {s: geomean([r[key] for r in rows if r["strategy"] == s and (c is None or r["category"] == c)])
             for s in strategies}
        # one document cut to several lengths is several prompts: count (dataset, prompt id)
        n = len({(r.get("dataset"), r["prompt_id"]) for r in rows if c is None or r["category"] == c})
        label = c if c is not None else f"all {n} prompts"
        cells = [f"{g[s]:.2f}x" for s in strategies]
        if others:
            best = max(g[s] for s in others)
            cells.append(f"{g[last] / best:.3f}" if best > 0 else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import pearsonr
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return None
    return float(pearsonr(xs, ys).statistic)


def headline(records: list[dict]) -> dict:
    summary = summarize(records)
    out: dict = {"runs": len(records), "mismatches": sum(r["match"] is False for r in records),
                 "hard_mismatches": sum(s["hard_mismatches"] for s in summary), "speedup": {}}
    for s in dict.fromkeys(r["strategy"] for r in records):
        out["speedup"][s] = geomean([r["speedup"] for r in records if r["strategy"] == s and r["speedup"]])
    pts = [(r["predicted_tps"], r["tokens_per_s"]) for r in records if r.get("predicted_tps")]
    if pts:
        out["tpt_pearson_r"] = pearson([p for p, _ in pts], [m for _, m in pts])
    shares = [r["plan_share"] for r in records if r["strategy"] not in ("autoregressive",)]
    out["max_plan_share"] = max(shares) if shares else 0.0
    return out
