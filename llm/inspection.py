"""Where a routed model spends its experts: per-layer routing statistics (`llm inspect`).

One set of numbers per routed layer, used three ways:

- `llm inspect CHECKPOINT`: run the checkpoint on fixed batches of its own prepared data
  and print, per routed layer, the budget k_l and its share of the global budget K, how
  many experts tokens really computed (mean, p50, p90), how evenly the experts were
  loaded, the fraction of token-slots dropped by capacity and the router entropy; for
  SMEAR the mean merge weight of each expert instead. `--json` prints the same report
  (schema in README.md, "Inspecting routing"); `--plot DIR` draws it; `RUN_DIR
  --over-time` does it for every checkpoint of a run.
- `RoutingStatsCallback`: the same numbers during training, every `log.routing_every`
  steps, from the forwards the trainer runs anyway (no extra forward pass).
- The report is a plain dict, so the plots can be redrawn from saved JSON.

Statistics over many batches are built from raw counts (`RoutingTally`): the active-experts
histogram, expert loads and dropped slots are summed as counts and divided once at the end,
and per-batch means (entropy, merge weights) are weighted by the tokens or segments they
average over. So p90, load CV and the dropped fraction are those of all the tokens seen, not
averages of per-batch values.

This module is `inspection`, not `inspect`: a file named inspect.py in llm/ shadows the
standard library's `inspect` for anything that runs with llm/ on sys.path (e.g.
`python llm/cli.py`, or an IDE running one file), and torch cannot even be imported then.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np
import torch

from llm.checkpoint import CheckpointError, is_checkpoint_dir, list_checkpoints, load_model, resolve
from llm.config import ConfigError
from llm.monitor import Callback
from llm.routing import registry

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from llm.config import Config

log = logging.getLogger("llm")

LAYER_FIELDS = ("layer", "k", "k_share", "active_mean", "active_gap", "no_expert", "active_p50", "active_p90",
                "active_hist", "tokens",
                "load", "load_min", "load_max", "load_cv", "dropped", "entropy", "tau",
                "merge_weights", "max_weight", "top1_fraction", "prior", "segments")


# ---------------------------------------------------------------------------- tally

class LayerTally:
    """Raw sums for one routed layer over any number of forwards.

    Sparse layers (MoELayer.stats): tokens, the active-experts histogram (counts of tokens
    that computed 0, 1, ... experts), computed and routed token-slots per expert and in all,
    and Σ entropy · tokens. SMEAR layers (SMEARLayer.stats): routed segments and, weighted by
    them, Σ merge weights, Σ max weight, Σ top-1 indicator and Σ entropy.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts
        self.tokens = 0.0
        self.hist = np.zeros(0)  # [m + 1]
        self.load = np.zeros(n_experts)  # computed token-slots per expert
        self.routed = 0.0  # token-slots the router asked for (before capacity)
        self.entropy = 0.0  # Σ entropy · (tokens | segments)
        self.has_active = self.has_entropy = False
        self.segments = 0.0
        self.weights = np.zeros(n_experts)  # Σ merge weights · segments
        self.max_weight = 0.0
        self.top1 = np.zeros(n_experts)
        self.k: Optional[float] = None  # last seen (constant within a step)
        self.tau: Optional[float] = None
        self.prior: Optional[np.ndarray] = None

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Fold in one forward's `layer.stats` (either layer type; missing fields are skipped)."""
        if not stats:
            return
        s = {k: v.detach().double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, float)
             for k, v in stats.items()}
        if "k" in s:
            self.k = float(s["k"])
        if "tau" in s:
            self.tau = float(s["tau"])
        if "routed_segments" in s:  # SMEAR
            n = float(s["routed_segments"])
            self.prior = s["prior"]
            if n > 0:  # a forward that routed no segment reports NaNs
                self.segments += n
                self.weights += n * s["expert_weight"]
                self.max_weight += n * float(s["max_weight"])
                self.top1 += n * s["top1_fraction"]
                self.entropy += n * float(s["entropy"])
                self.has_entropy = True
            return
        if "active_hist" not in s:  # deepspeed_topk: only the load of routed slots, as fractions
            if "load" in s:
                self.load += s["load"]
            return
        hist = s["active_hist"]
        if len(hist) > len(self.hist):
            self.hist = np.pad(self.hist, (0, len(hist) - len(self.hist)))
        self.hist[:len(hist)] += hist
        n = float(s["active_per_token"].size)
        computed = float(s["active_per_token"].sum())  # token-slots the experts computed
        self.tokens += n
        self.has_active = True
        self.load += np.rint(s["load"] * computed)  # back to counts: load = counts / computed
        # computed = routed · (1 − dropped); routed = 0 is the only way to drop everything.
        dropped = float(s["dropped_frac"])
        self.routed += round(computed / (1.0 - dropped)) if dropped < 1.0 else 0.0
        self.entropy += n * float(s["router_entropy"])
        self.has_entropy = True

    def vector(self) -> np.ndarray:
        """All sums as one vector (for an all-reduce across ranks)."""
        return np.concatenate([[self.tokens, self.routed, self.entropy, self.segments, self.max_weight],
                               self.hist, self.load, self.weights, self.top1])

    def set_vector(self, v: np.ndarray) -> None:
        self.tokens, self.routed, self.entropy, self.segments, self.max_weight = v[:5].tolist()
        E, m = self.n_experts, len(self.hist)
        self.hist, rest = v[5:5 + m], v[5 + m:]
        self.load, self.weights, self.top1 = rest[:E], rest[E:2 * E], rest[2 * E:]

    def row(self, layer: int, K: Optional[float]) -> dict[str, Any]:
        """This layer's entry of the report (every field of LAYER_FIELDS; None where it does not apply)."""
        r: dict[str, Any] = dict.fromkeys(LAYER_FIELDS)
        r["layer"] = layer
        r["k"] = self.k
        r["k_share"] = self.k / K if self.k is not None and K else None
        r["tau"] = self.tau
        if self.has_active and self.tokens > 0:
            a = np.arange(len(self.hist))
            r["active_mean"] = float((a * self.hist).sum() / self.tokens)
            r["active_gap"] = r["active_mean"] - self.k if self.k is not None else None  # LapSum: ≈ 0 is on budget
            r["no_expert"] = float(self.hist[0] / self.tokens)  # tokens the layer computed nothing for
            r["active_p50"], r["active_p90"] = _hist_quantile(self.hist, 1, 2), _hist_quantile(self.hist, 9, 10)
            r["active_hist"] = [int(c) for c in self.hist]
            r["tokens"] = int(self.tokens)
        if self.load.sum() > 0:
            load = self.load / self.load.sum()
            r["load"] = load.tolist()
            r["load_min"], r["load_max"] = float(load.min()), float(load.max())
            r["load_cv"] = float(load.std() / load.mean())  # population std; 0 = perfectly even
        if self.has_active:
            r["dropped"] = float(1.0 - self.load.sum() / self.routed) if self.routed > 0 else 0.0
        if self.segments > 0:
            r["merge_weights"] = (self.weights / self.segments).tolist()
            r["max_weight"] = self.max_weight / self.segments
            r["top1_fraction"] = (self.top1 / self.segments).tolist()
            r["segments"] = int(self.segments)
        if self.prior is not None:
            r["prior"] = self.prior.tolist()
        if self.has_entropy:
            count = self.segments if self.prior is not None else self.tokens
            r["entropy"] = self.entropy / count if count > 0 else None
        return r


def _hist_quantile(hist: np.ndarray, num: int, den: int) -> int:
    """Smallest a with (tokens computing ≤ a experts) ≥ num/den of all tokens (exact integer test)."""
    cdf = np.cumsum(hist)
    return int(np.argmax(cdf * den >= num * cdf[-1]))


class RoutingTally:
    """One LayerTally per routed layer, in layer order."""

    def __init__(self, layers: Sequence[int], n_experts: int):
        self.layers = list(layers)
        self.per_layer = [LayerTally(n_experts) for _ in self.layers]

    def add(self, j: int, stats: dict[str, torch.Tensor]) -> None:
        self.per_layer[j].add(stats)

    def all_reduce(self, device: torch.device) -> None:
        """Sum the counts of every rank (each saw its own tokens); call on every rank."""
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        vectors = [t.vector() for t in self.per_layer]
        flat = torch.from_numpy(np.concatenate(vectors)).to(device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        start = 0
        for t, v in zip(self.per_layer, vectors):
            t.set_vector(flat[start:start + len(v)])
            start += len(v)

    def rows(self, K: Optional[float]) -> list[dict[str, Any]]:
        return [t.row(layer, K) for layer, t in zip(self.layers, self.per_layer)]


# ---------------------------------------------------------------------------- measuring a checkpoint

def global_budget(cfg: "Config") -> Optional[float]:
    """K: Σ_l k_l over the routed layers (k̄ · L for LapSum, top_k · L for top-k); None for SMEAR."""
    spec = registry.get(cfg.model.routing.router)
    if not spec.selects_experts:
        return None
    return float(spec.active_experts(cfg.model) * len(cfg.model.routed_layers()))


def check_routed(cfg: "Config", where: Path) -> None:
    router = cfg.model.routing.router
    if not cfg.model.routing.routed:
        routed = [name for name in registry.names() if registry.get(name).routed]
        raise CheckpointError(f"{where}: model.routing.router is {router}, a model without routed layers; "
                              f"llm inspect needs a routed checkpoint ({', '.join(routed)})")


def data_batches(cfg: "Config", ckpt: Path, split: str, n: int) -> tuple[Path, list[torch.Tensor]]:
    """`n` fixed batches (inputs [B, T]) of `split` from the data checkpoint `ckpt` (config `cfg`) names."""
    from llm.data import DataError, TokenLoader, data_dir, is_prepared

    try:
        directory = data_dir(cfg)
        ready = is_prepared(cfg)
    except DataError as err:  # e.g. the corpus files are not on this machine
        raise DataError(f"cannot locate the data of {ckpt}: {err}") from None
    if not ready:
        raise DataError(f"the data of {ckpt} is not prepared: expected {directory} "
                        f"(data.corpus={cfg.data.corpus}, data.cache_dir={cfg.data.cache_dir}); "
                        f"run `llm prepare {ckpt / 'config.yaml'}`")
    loader = TokenLoader(directory, split, cfg.data.seq_len, cfg.train.micro_batch_size)
    return directory, [inputs for inputs, _ in loader.val_batches(n)]


@torch.no_grad()
def measure(model: torch.nn.Module, batches: Iterable[torch.Tensor], n_experts: int) -> RoutingTally:
    """Run `batches` through `model` and tally every routed layer's stats after each forward."""
    ffns = model.routed_ffns()
    tally = RoutingTally(sorted(model.route_index), n_experts)
    device = next(model.parameters()).device
    for inputs in batches:
        model(inputs.to(device))
        for j, ffn in enumerate(ffns):
            tally.add(j, ffn.stats)
    return tally


def inspect_checkpoint(path: str | Path, split: str = "val", batches: Optional[int] = None,
                       device: Optional[str] = None) -> dict[str, Any]:
    """The routing report of one checkpoint (a dict; README.md "Inspecting routing" has the schema)."""
    from llm.config import load_saved_config

    ckpt = resolve(path)
    cfg = load_saved_config(ckpt / "config.yaml")
    check_routed(cfg, ckpt)  # both checks before building the model
    directory, inputs = data_batches(cfg, ckpt, split, batches or cfg.train.eval_batches)
    loaded = load_model(ckpt, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    r = cfg.model.routing
    if registry.get(r.router).needs_process_group:
        from llm.parallel import init_distributed

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints; stdout is the report
            init_distributed()  # its MoE layer needs a process group, even a world of 1
    tally = measure(loaded.model, inputs, r.n_experts)
    K = global_budget(cfg)
    rows = tally.rows(K)
    model = loaded.model
    if model.budget is not None:  # the learned budget itself, in float64, not the stats' copy
        for row, k in zip(rows, model.budget().tolist()):
            row["k"], row["k_share"] = k, k / K
    return {
        "checkpoint": str(ckpt),
        "step": loaded.step,
        "router": r.router,
        "K": K,
        "k_mean": K / len(rows) if K is not None else None,
        "budget": getattr(r.options, "budget", None),
        "n_experts": r.n_experts,
        "capacity_factor": registry.get(r.router).capacity(cfg.model),
        "data": split,
        "data_dir": str(directory),
        "batches": len(inputs),
        "tokens": int(sum(x.numel() for x in inputs)),
        "layers": rows,
    }


def run_checkpoints(run_or_ckpt: str | Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first (given the run or one of its checkpoints)."""
    path = Path(run_or_ckpt)
    run = path.parent.parent if is_checkpoint_dir(path) and path.parent.name == "checkpoints" else path
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise CheckpointError(f"{path}: no checkpoints found under {run / 'checkpoints'} (--over-time needs a run "
                              f"directory)")
    return ckpts


# ---------------------------------------------------------------------------- text output

def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of one report."""
    rows = report["layers"]
    head = (f"{report['checkpoint']} (step {report['step']}): router {report['router']}, "
            f"{len(rows)} routed layers, {report['n_experts']} experts each; "
            f"{report['batches']} {report['data']} batches, {report['tokens']:,} tokens")
    lines = [head]
    if report["router"] == "smear":
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
    key, label = over_time_quantity(reports[0]["router"])
    layers = [r["layer"] for r in reports[0]["layers"]]
    cols = ["step"] + [f"L{layer}" for layer in layers]
    table = [[rep["step"]] + [_f(r[key], 3) for r in rep["layers"]] for rep in reports]
    return f"{label} per layer across {len(reports)} checkpoints\n" + _table(cols, table)


def over_time_quantity(router: str) -> tuple[str, str]:
    """What --over-time follows: the learned budget, or what changes for fixed-k routers."""
    if router == "lapsum":
        return "k", "budget k_l"
    if router == "smear":
        return "entropy", "merge-weight entropy (nats)"
    return "load_cv", "expert load CV"


def summary_line(router: str, rows: list[dict[str, Any]]) -> str:
    """Compact console form: `k=[1.2 1.4 1.9] active=1.6 cv=0.31` (entropies for SMEAR)."""
    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    if router == "smear":
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


# ---------------------------------------------------------------------------- plots

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
    k_label = "budget $k_l$" if report["router"] == "lapsum" else "top_k"
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
    key, label = over_time_quantity(reports[0]["router"])
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
    if report["router"] == "smear":
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


# ---------------------------------------------------------------------------- the command

def run_inspect(path: str, data: str = "val", batches: Optional[int] = None, as_json: bool = False,
                plot_dir: Optional[str] = None, over_time: bool = False) -> None:
    """`llm inspect`: print the table (or JSON) and draw the plots."""
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches {batches}: expected a positive number of batches")
    if plot_dir and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        raise ConfigError(f"--plot {plot_dir}: is a file; expected a directory to write the PNG figures into")
    if over_time:
        ckpts = run_checkpoints(path)
        reports = []
        for i, ckpt in enumerate(ckpts):
            log.info("inspecting %s (%d/%d)", ckpt, i + 1, len(ckpts))
            reports.append(inspect_checkpoint(ckpt, data, batches))
        if as_json:
            print(to_json({"run": str(Path(ckpts[0]).parent.parent), "router": reports[0]["router"],
                           "K": reports[0]["K"], "checkpoints": reports}))
        else:
            print(format_over_time(reports))
            print()
            print(format_report(reports[-1]))
        if plot_dir:
            figs = {"over_time": plot_over_time(reports), **figures(reports[-1])}
            for p in save_figures(figs, plot_dir):
                log.info("wrote %s", p)
        return
    report = inspect_checkpoint(path, data, batches)
    print(to_json(report) if as_json else format_report(report))
    if plot_dir:
        for p in save_figures(figures(report), plot_dir):
            log.info("wrote %s", p)


# ---------------------------------------------------------------------------- during training

class RoutingStatsCallback(Callback):
    """Per-layer routing statistics every `log.routing_every` steps, from the training forwards.

    Forward hooks on the routed FFNs read each layer's `stats` right after its forward, but
    only during the steps that will be logged and only in training mode: validation
    forwards (which the trainer runs before the callbacks on eval steps) never mix in, and
    all micro-batches of a step with gradient accumulation count. The counts of all ranks
    are summed before logging. Logged as scalars `routing/layer{l}/{field}` (l = block index),
    a wandb table and bar chart, and one console line.
    """

    SCALARS = ("k", "k_share", "active_mean", "active_gap", "no_expert", "active_p50", "active_p90", "load_min",
               "load_max", "load_cv",
               "dropped", "entropy", "max_weight")

    def __init__(self, every: int):
        self.every = every
        self._tally: Optional[RoutingTally] = None
        self._armed = False
        self._handles: list = []
        self._K: Optional[float] = None

    def on_train_start(self, trainer) -> None:
        model = trainer.model
        ffns = model.routed_ffns()
        if not ffns:
            return
        cfg = trainer.cfg
        self._K = global_budget(cfg)
        self._router = cfg.model.routing.router
        self._layers = sorted(model.route_index)
        self._n_experts = cfg.model.routing.n_experts
        for j, ffn in enumerate(ffns):
            self._handles.append(ffn.register_forward_hook(self._hook(j)))
        self._arm(trainer.step + 1)

    def _hook(self, j: int):
        def hook(module, args, output):
            if self._armed and module.training:
                self._tally.add(j, module.stats)
        return hook

    def _arm(self, next_step: int) -> None:
        self._armed = next_step % self.every == 0
        self._tally = RoutingTally(self._layers, self._n_experts) if self._armed else None

    def on_step(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if not self._handles:
            return
        if step % self.every == 0 and self._tally is not None:
            self._tally.all_reduce(getattr(trainer, "device", torch.device("cpu")))
            rows = self._tally.rows(self._K)
            trainer.log(step, self.scalars(rows))
            if hasattr(trainer, "monitor"):
                trainer.monitor.message(f"step {step}: routing {summary_line(self._router, rows)}")
            self._log_tables(step, self._router, rows)
        self._arm(step + 1)

    def on_train_end(self, trainer, summary: dict[str, Any]) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @classmethod
    def scalars(cls, rows: list[dict[str, Any]]) -> dict[str, float]:
        out = {}
        for r in rows:
            for key in cls.SCALARS:
                if r[key] is not None:
                    out[f"routing/layer{r['layer']}/{key}"] = float(r[key])
        for key in ("active_mean", "load_cv", "entropy"):
            vals = [r[key] for r in rows if r[key] is not None]
            if vals:
                out[f"routing/{key}"] = float(np.mean(vals))  # mean over layers
        return out

    @staticmethod
    def _log_tables(step: int, router: str, rows: list[dict[str, Any]]) -> None:
        """A per-layer wandb.Table and bar chart, when this process has a wandb run (rank 0)."""
        wandb = sys.modules.get("wandb")  # imported by the Monitor only when wandb logging is on
        if wandb is None or wandb.run is None:
            return
        smear = router == "smear"
        cols = ["layer", "entropy", "max_weight"] if smear else \
            ["layer", "k", "k_share", "active_mean", "active_gap", "no_expert", "active_p90", "load_cv", "dropped",
             "entropy"]
        table = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        per_expert = wandb.Table(columns=["layer", "expert", "merge_weight" if smear else "load"], data=[
            [r["layer"], e, v] for r in rows for e, v in enumerate((r["merge_weights"] if smear else r["load"]) or [])])
        y, title = over_time_quantity(router)
        wandb.run.log({
            "routing/layers": table,
            "routing/experts": per_expert,
            "routing/per_layer": wandb.plot.bar(table, "layer", y, title=f"{title} per layer (step {step})"),
        }, step=step)
