"""The report as text and JSON."""
from __future__ import annotations

import json
import math
from typing import Any


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of one report."""
    rows = report["layers"]
    head = (f"{report['checkpoint']} (step {report['step']}): router {report['router']}, "
            f"{len(rows)} routed layers, {report['n_experts']} experts each; "
            f"{report['batches']} {report['data']} batches, {report['tokens']:,} tokens")
    lines = [head]
    if report["kind"] == MERGE:
        E = report["n_experts"]
        cols = ["layer", "entropy", "max_w"] + [f"e{i}" for i in range(E)]
        table = [[r["layer"], _f(r["entropy"], 3), _f(r["max_weight"], 3)]
                 + [_f(w, 3) for w in (r["merge_weights"] or [None] * E)] for r in rows]
        lines.append(f"mean merge weights per expert; entropy in nats (uniform = {math.log(E):.3f})")
    else:
        if report["K"] is not None:
            budget = f"K = {report['K']:g} (k̄ = {report['k_mean']:g}" + (
                f", {report['budget']} budget)" if report["budget"] else ")")
            lines.append(budget)
        cols = ["layer", "k", "share", "active", "active-k", "no_expert", "p50", "p90", "load_min", "load_max",
                "load_cv", "dropped", "entropy"]
        table = [[r["layer"], _f(r["k"], 3), _f(r["k_share"], 3), _f(r["active_mean"], 3), _f(r["active_gap"], 3),
                  _f(r["no_expert"], 3), _f(r["active_p50"], 0), _f(r["active_p90"], 0), _f(r["load_min"], 3),
                  _f(r["load_max"], 3), _f(r["load_cv"], 3),
                  _f(r["dropped"], 4), _f(r["entropy"], 3)] for r in rows]
    lines.append(_table(cols, table))
    return "\n".join(lines)


def format_over_time(reports: list[dict[str, Any]]) -> str:
    """One row per checkpoint: the headline quantity of each layer (k_l, entropy or load CV)."""
    key, label = over_time_quantity(reports[0]["kind"], reports[0]["budget"] is not None)
    layers = [r["layer"] for r in reports[0]["layers"]]
    cols = ["step"] + [f"L{layer}" for layer in layers]
    table = [[rep["step"]] + [_f(r[key], 3) for r in rep["layers"]] for rep in reports]
    return f"{label} per layer across {len(reports)} checkpoints\n" + _table(cols, table)


# `kind` of a report whose layers merge every expert (SMEAR): merge weights instead of loads.
MERGE = "merge"
SELECT = "select"


def over_time_quantity(kind: str, budgeted: bool) -> tuple[str, str]:
    """What --over-time follows: the learned budget, or what changes for fixed-k routers."""
    if budgeted:
        return "k", "budget k_l"
    if kind == MERGE:
        return "entropy", "merge-weight entropy (nats)"
    return "load_cv", "expert load CV"


def summary_line(kind: str, rows: list[dict[str, Any]]) -> str:
    """Compact console form: `k=[1.2 1.4 1.9] active=1.6 cv=0.31` (entropies for SMEAR)."""
    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    if kind == MERGE:
        parts = ["H=[" + " ".join(_f(r["entropy"], 2) for r in rows) + "]", f"max_w={_f(mean('max_weight'), 2)}"]
    else:
        parts = ["k=[" + " ".join(_f(r["k"], 2) for r in rows) + "]"]
        if mean("active_mean") is not None:
            parts.append(f"active={_f(mean('active_mean'), 2)}")
        parts.append(f"cv={_f(mean('load_cv'), 2)}")
        if any(r["dropped"] for r in rows):
            parts.append(f"dropped={_f(mean('dropped'), 3)}")
    return " ".join(parts)


def _f(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    cells = [cols] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def to_json(obj: Any) -> str:
    """JSON with NaN/inf as null (strict JSON readers reject NaN)."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2)
