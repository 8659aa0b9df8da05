"""The report as figures (matplotlib, imported only here)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from llm.inspection.report import MERGE, over_time_quantity

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> "Figure":
    # A bare Figure renders PNGs with the Agg canvas and touches no pyplot state or GUI backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _run_label(checkpoint: str) -> str:
    """`RUN/step_N` for a checkpoint inside a run directory, else the checkpoint's own name."""
    path = Path(checkpoint)
    return f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name


def _title(report: dict[str, Any]) -> str:
    return f"{_run_label(report['checkpoint'])} · step {report['step']} · {report['router']}"


def plot_budget(report: dict[str, Any]) -> "Figure":
    """Bars: budget k_l and measured active experts per token, per layer; line: uniform k̄."""
    rows = report["layers"]
    x = np.arange(len(rows))
    fig = _figure(max(5.0, 0.7 * len(rows) + 3), 4)
    ax = fig.add_subplot()
    k = [r["k"] for r in rows]
    active = [r["active_mean"] for r in rows]
    has_active = all(a is not None for a in active)
    width = 0.4 if has_active else 0.7
    k_label = "budget $k_l$" if report["budget"] is not None else "top_k"
    bars = ax.bar(x - (width / 2 if has_active else 0), k, width, label=k_label, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center", color="white")
    if has_active:
        bars = ax.bar(x + width / 2, active, width, label="active experts / token (mean)", color="tab:orange")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center")
        # Above each pair: how far the layer is off its budget, and the tokens it skips.
        ax.bar_label(bars, fontsize=7, padding=2, labels=[
            (f"{r['active_gap']:+.2f}\n" if r["active_gap"] is not None else "") + f"{r['no_expert']:.0%} none"
            for r in rows])
    if report["k_mean"] is not None:
        ax.axhline(report["k_mean"], color="black", ls="--", lw=1, label=f"uniform $\\bar k$ = {report['k_mean']:g}")
    ax.set_xticks(x, [str(r["layer"]) for r in rows])
    ax.set_xlabel("layer")
    ax.set_ylabel("experts per token")
    K = f", K = {report['K']:g}" if report["K"] is not None else ""
    ax.set_title(f"Expert budget per layer{K}\n{_title(report)}", fontsize=10)
    ax.set_ylim(0, max(v for v in k + active + [report["k_mean"] or 0] if v is not None) * 1.3)
    fig.legend(fontsize=8, loc="outside upper center", ncols=3, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_active_histograms(report: dict[str, Any]) -> "Figure":
    """One panel per routed layer: fraction of tokens that computed 0, 1, ..., m experts."""
    rows = report["layers"]
    n = len(rows)
    ncols = min(4, n)
    nrows = -(-n // ncols)
    fig = _figure(3.2 * ncols, 2.6 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.remove()
            continue
        r = rows[i]
        hist = np.asarray(r["active_hist"] or [0], float)
        frac = hist / max(hist.sum(), 1)
        ax.bar(np.arange(len(frac)), frac, color="tab:orange", width=0.8)
        if r["k"] is not None:
            ax.axvline(r["k"], color="tab:blue", ls="--", lw=1.2, label=f"$k_l$ = {r['k']:.2f}")
        if r["active_mean"] is not None:
            ax.axvline(r["active_mean"], color="black", ls=":", lw=1.2, label=f"mean = {r['active_mean']:.2f}")
        ax.set_xticks(np.arange(len(frac)))
        ax.set_title(f"layer {r['layer']}", fontsize=10)
        ax.set_xlabel("active experts per token")
        if i % ncols == 0:
            ax.set_ylabel("fraction of tokens")
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Experts computed per token\n{_title(report)}", fontsize=11)
    return fig


def _heatmap(report: dict[str, Any], values: np.ndarray, label: str, title: str, center: Optional[float],
             fmt: str) -> "Figure":
    from matplotlib.colors import TwoSlopeNorm

    rows = report["layers"]
    L, E = values.shape
    fig = _figure(max(5.0, 0.45 * E + 3), max(3.0, 0.45 * L + 1.8))
    ax = fig.add_subplot()
    if center is not None:  # values ≥ 0: blue below the center, white at it, red above
        hi = max(float(np.nanmax(values)) if np.isfinite(values).any() else 0.0, 2 * center)
        norm = TwoSlopeNorm(vcenter=center, vmin=0.0, vmax=hi)
        im = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
    else:
        im = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label=label)
    if L * E <= 256:  # numbers stay legible up to about 16 x 16 cells
        norm_vals = im.norm(values)
        for l in range(L):
            for e in range(E):
                # white on the dark ends of the colormap: low viridis, either end of RdBu
                dark = norm_vals[l, e] < 0.6 if center is None else abs(norm_vals[l, e] - 0.5) > 0.3
                ax.text(e, l, format(values[l, e], fmt), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(np.arange(E))
    ax.set_yticks(np.arange(L), [str(r["layer"]) for r in rows])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}\n{_title(report)}", fontsize=10)
    return fig


def plot_load_heatmap(report: dict[str, Any]) -> "Figure":
    """Layer × expert load relative to uniform (1 = the expert got exactly 1/E of the slots)."""
    E = report["n_experts"]
    loads = np.array([r["load"] if r["load"] is not None else [np.nan] * E for r in report["layers"]], float)
    return _heatmap(report, loads * E, "load × E  (1 = uniform)", "Expert load (share of computed token-slots)",
                    center=1.0, fmt=".2f")


def plot_merge_weights(report: dict[str, Any]) -> "Figure":
    """SMEAR: layer × expert mean merge weight."""
    E = report["n_experts"]
    w = np.array([r["merge_weights"] if r["merge_weights"] is not None else [np.nan] * E
                  for r in report["layers"]], float)
    return _heatmap(report, w, f"mean merge weight (uniform = {1 / E:.2f})", "SMEAR merge weights per expert",
                    center=None, fmt=".2f")


def plot_entropy(report: dict[str, Any]) -> "Figure":
    """SMEAR: routing entropy per layer, against the uniform maximum log E."""
    rows = report["layers"]
    x = np.arange(len(rows))
    fig = _figure(max(5.0, 0.7 * len(rows) + 3), 4)
    ax = fig.add_subplot()
    ent = [r["entropy"] if r["entropy"] is not None else np.nan for r in rows]
    ax.bar_label(ax.bar(x, ent, 0.6, color="tab:green", label="mean routing entropy"), fmt="%.2f", fontsize=7)
    ax.axhline(math.log(report["n_experts"]), color="black", ls="--", lw=1,
               label=f"uniform: log {report['n_experts']} = {math.log(report['n_experts']):.2f}")
    ax.set_xticks(x, [str(r["layer"]) for r in rows])
    ax.set_xlabel("layer")
    ax.set_ylabel("entropy (nats)")
    ax.set_ylim(0, math.log(report["n_experts"]) * 1.25)
    ax.set_title(f"SMEAR routing entropy per layer (lower = more specialised)\n{_title(report)}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_over_time(reports: list[dict[str, Any]]) -> "Figure":
    """One line per layer across the checkpoints of a run (k_l, SMEAR entropy or load CV)."""
    key, label = over_time_quantity(reports[0]["kind"], reports[0]["budget"] is not None)
    steps = [rep["step"] for rep in reports]
    layers = [r["layer"] for r in reports[0]["layers"]]
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    cmap = _colormap("viridis")
    for j, layer in enumerate(layers):
        ys = [rep["layers"][j][key] if rep["layers"][j][key] is not None else np.nan for rep in reports]
        ax.plot(steps, ys, marker="o", ms=4, color=cmap(j / max(1, len(layers) - 1)), label=f"layer {layer}")
    first = reports[0]
    if key == "k" and first["k_mean"] is not None:
        ax.axhline(first["k_mean"], color="black", ls="--", lw=1, label=f"uniform $\\bar k$ = {first['k_mean']:g}")
    if key == "entropy":
        ax.axhline(math.log(first["n_experts"]), color="black", ls="--", lw=1, label="uniform (log E)")
    ax.set_xlabel("training step")
    ax.set_ylabel(label.replace("k_l", "$k_l$"))
    run = _run_label(first["checkpoint"]).split("/")[0]
    what = label[0].upper() + label[1:].replace("k_l", "$k_l$")
    ax.set_title(f"{what} per layer during training\n{run} · {first['router']} · {len(reports)} checkpoints",
                 fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def figures(report: dict[str, Any]) -> dict[str, "Figure"]:
    """The figures of one report, by file stem."""
    if report["kind"] == MERGE:
        return {"merge_weights": plot_merge_weights(report), "entropy": plot_entropy(report)}
    figs = {"budget": plot_budget(report)}
    if any(r["active_hist"] for r in report["layers"]):
        figs["active_experts"] = plot_active_histograms(report)
    figs["load"] = plot_load_heatmap(report)
    return figs


def save_figures(figs: dict[str, "Figure"], directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        path = directory / f"{name}.png"
        fig.savefig(path, dpi=130)
        paths.append(path)
    return paths
