"""The router study: train every router's tiny config on the same data, steps, batch, seed and
schedule (only the FFN differs), evaluate each the same way, and write the table and plots.

    python scripts/compare_routers.py --corpus 'corpus/enwiki/enwiki-0[0-8].jsonl.gz' --steps 2000 \\
        --out study/ --heldout book.txt --seeds 0 1 2 --eval-data eval-data/ --limit 500

Per run (config x seed), through the code paths of `llm train` and `llm eval`: final train
and validation loss, held-out perplexity and bits per byte of each `--heldout` text file,
lm-eval accuracies on `--tasks` with `--limit` documents, total and active parameters, the
mean number of experts a token computed (`llm inspect`'s measurement), tokens/s and wall time.

Writes into DIR:
    runs/NAME-sSEED/        each run's directory (checkpoints, metrics.jsonl, eval/, row.json)
    results.json            one row per run
    results.md              the table, and the mean ± spread over seeds of each config
    loss.png                training loss of every run on one figure (validation loss as dots)
    budget.png              LapSum's k_l per layer (runs with a LapSum router)

Fairness is checked, not assumed: every run's resolved model, data, train and parallel settings
must equal the others' outside `model.routing` (and the seed and run directory), or the study
refuses to start.

Resumable: a run whose row.json exists is skipped; a run that was cut short continues from
its latest checkpoint (`train.resume=auto`), and resuming is exact, so a killed study re-run
with the same arguments gives the same table. A run directory started with other settings
(e.g. another --steps) is refused rather than mixed in. `wall_s` and `train_seconds` are those
of the invocation that finished the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llm.config import Config, ConfigError, load_config, load_saved_config, to_dict  # noqa: E402

log = logging.getLogger("llm.study")

ROUTER_CONFIGS = ["tiny-dense", "tiny-switch", "tiny-topk", "tiny-lapsum", "tiny-lapsum-fixed", "tiny-smear",
                  "tiny-hash"]
# The sections that decide what a run computes (`log` and `eval` only observe it), and the keys
# of theirs that may differ between runs: the FFN, the run's directory, and the seed of a repetition.
TRAINING_SECTIONS = ("model", "data", "train", "parallel")
VARYING = ("model.routing", "train.out_dir", "train.seed")


@dataclass
class Study:
    corpus: list[str]
    steps: int
    out: Path
    configs: list[Path]
    seeds: list[int]
    repeat: Optional[list[str]] = None  # config stems run at every seed; the rest at the first (None: all)
    heldout: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    limit: int = 200
    eval_data: Optional[str] = None
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run


@dataclass
class Run:
    name: str  # config stem + seed: the run directory's name
    config: str
    seed: int
    cfg: Config

    @property
    def dir(self) -> Path:
        return self.cfg.out_dir


# ---------------------------------------------------------------------------- the runs

def plan(study: Study) -> list[Run]:
    """Every (config, seed) with the study's shared overrides, checked to differ only in the FFN."""
    runs = []
    for seed in study.seeds:
        for path in study.configs:
            if seed != study.seeds[0] and study.repeat is not None and path.stem not in study.repeat:
                continue
            name = f"{path.stem}-s{seed}"
            overrides = [f"data.corpus={json.dumps(study.corpus)}", f"train.max_steps={study.steps}",
                         f"train.seed={seed}", f"train.out_dir={study.out / 'runs' / name}", "train.resume=auto",
                         "log.wandb=disabled", *study.overrides]
            runs.append(Run(name, path.stem, seed, load_config(path, overrides)))
    check_fair(runs)
    return runs


def check_fair(runs: list[Run]) -> None:
    """ConfigError unless the runs differ only in the FFN (and the seed, between repetitions)."""
    reference = _settings(runs[0].cfg, VARYING)
    for run in runs[1:]:
        for key, value in _settings(run.cfg, VARYING).items():
            if value != reference[key]:
                raise ConfigError(f"{run.config} and {runs[0].config} differ in {key} ({value!r} vs "
                                  f"{reference[key]!r}): the study compares FFNs only; align the configs "
                                  f"or pass --set {key}=VALUE")


def check_continuable(run: Run) -> None:
    """ConfigError if the run's directory holds a run started with other settings (another --steps,
    corpus, ...): skipping or resuming it would mix two studies in one table."""
    saved_path = run.dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _settings(load_saved_config(saved_path), ())
    for key, value in _settings(run.cfg, ()).items():
        if value != saved.get(key):
            raise ConfigError(f"{run.dir} was started with {key}={saved.get(key)!r}, this study has {value!r}: "
                              f"pass another --out, or remove that run directory to redo it")


def _settings(cfg: Config, ignore: tuple[str, ...]) -> dict[str, Any]:
    """{section.key: value} of the sections that decide what a run computes, less the `ignore` keys."""
    raw = to_dict(cfg)
    return {f"{section}.{key}": value for section in TRAINING_SECTIONS for key, value in raw[section].items()
            if f"{section}.{key}" not in ignore}


def run_one(run: Run, study: Study) -> dict[str, Any]:
    """Train (or finish training) one run, evaluate it, and return its row (saved as row.json)."""
    from llm.checkpoint import resolve
    from llm.train import train

    t0 = time.time()
    train(run.cfg)
    train_seconds = time.time() - t0
    ckpt = resolve(run.dir)  # the run's newest checkpoint that verifies
    row = {"run": run.name, "config": run.config, "seed": run.seed, "router": run.cfg.model.routing.router,
           "budget": getattr(run.cfg.model.routing.options, "budget", None),
           "steps": study.steps, "checkpoint": str(ckpt), **curve_summary(run.dir)}
    row.update(parameters(ckpt))
    row.update(routing(ckpt, run.cfg))
    row.update(evaluation(ckpt, study))
    row["train_seconds"] = round(train_seconds, 1)
    row["wall_s"] = round(time.time() - t0, 1)
    _atomic_json(run.dir / "row.json", row)
    return row


def curve_summary(run_dir: Path) -> dict[str, Any]:
    """Final train loss, validation loss and mean tokens/s, from the run's metrics.jsonl (all of it,
    so a run resumed by another invocation is summarised whole)."""
    from llm.monitor import read_metrics

    records = read_metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    speeds = [r["tokens_per_s"] for r in train_records if "tokens_per_s" in r]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    return {"train_loss": train_records[-1]["loss"], "val_loss": val_losses[-1],
            "tokens_per_s": statistics.fmean(speeds) if speeds else None}


def parameters(ckpt: Path) -> dict[str, Any]:
    """Total parameters, and active ones: those a token's forward multiplies by (embedding excluded,
    the nominal number of experts: top_k, LapSum's k̄, SMEAR's one merged expert), as the FLOP
    count of the model counts them."""
    from llm.checkpoint import load_model
    from llm.model import flops_per_token

    loaded = load_model(ckpt)
    return {"total_params": loaded.model.num_params(exclude_embedding=False),
            "active_params": int(flops_per_token(loaded.config.model, seq_len=0) / 6)}


def routing(ckpt: Path, cfg: Config) -> dict[str, Any]:
    """Mean experts computed per token over the routed layers, and LapSum's k_l, from `llm inspect`."""
    from llm.inspection import inspect_checkpoint

    if not cfg.model.routing.routed:
        return {"active_experts": None, "k_per_layer": None}
    layers = inspect_checkpoint(ckpt)["layers"]
    active = [layer["active_mean"] for layer in layers if layer["active_mean"] is not None]
    return {"active_experts": statistics.fmean(active) if active else None,
            "k_per_layer": [layer["k"] for layer in layers] if cfg.model.routing.router == "lapsum" else None}


def evaluation(ckpt: Path, study: Study) -> dict[str, Any]:
    """Held-out text metrics and lm-eval accuracies, via `llm eval`'s run_eval (results in ckpt/eval/)."""
    from llm.evaluation import run_eval, summarize

    row: dict[str, Any] = {"heldout": {}, "accuracy": {}}
    if not study.tasks and not study.heldout:
        return row
    results, _ = run_eval(ckpt, study.tasks, limit=study.limit, data_dir=study.eval_data, texts=study.heldout,
                          out=ckpt.parent.parent / "eval" / "results.json")
    flat = summarize(results)
    for text in study.heldout:
        row["heldout"][Path(text).name] = {m: flat[f"{text}/{m}"] for m in ("bits_per_byte", "token_perplexity",
                                                                               "word_perplexity")}
    for task in study.tasks:
        row["accuracy"][task] = flat.get(f"{task}/acc")
    return row


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- tables and plots

def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], study: Study) -> str:
    """One line per run: the quantities of the study, in the order of the runs."""
    texts = [Path(t).name for t in study.heldout]
    head = (["config", "router", "seed", "budget", "train loss", "val loss"]
            + [f"{t} bpb" for t in texts] + [f"{t} token ppl" for t in texts]
            + [f"{task} acc" for task in study.tasks]
            + ["params", "active params", "active experts", "tokens/s", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["config"], r["router"], str(r["seed"]), r["budget"] or "–", _fmt(r["train_loss"], ".4f"),
                  _fmt(r["val_loss"], ".4f")]
                 + [_fmt(r["heldout"][t]["bits_per_byte"], ".4f") for t in texts]
                 + [_fmt(r["heldout"][t]["token_perplexity"], ".1f") for t in texts]
                 + [_fmt(r["accuracy"][task], ".3f") for task in study.tasks]
                 + [f"{r['total_params'] / 1e6:.2f}M", f"{r['active_params'] / 1e6:.2f}M",
                    _fmt(r["active_experts"], ".2f"), _fmt(r["tokens_per_s"], ".0f"), _fmt(r["wall_s"], ".0f")])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(rows: list[dict[str, Any]], study: Study) -> str:
    """Per config: mean and sample standard deviation over seeds of the validation loss and bits per byte."""
    texts = [Path(t).name for t in study.heldout]
    head = ["config", "seeds", "val loss mean", "val loss std"] + [f"{t} bpb mean ± std" for t in texts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config in dict.fromkeys(r["config"] for r in rows):
        group = [r for r in rows if r["config"] == config]
        val = [r["val_loss"] for r in group]
        cells = [config, str(len(group)), f"{statistics.fmean(val):.4f}", _fmt(_std(val), ".4f")]
        for t in texts:
            bpb = [r["heldout"][t]["bits_per_byte"] for r in group]
            cells.append(f"{statistics.fmean(bpb):.4f} ± {_fmt(_std(bpb), '.4f')}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _std(values: list[float]) -> Optional[float]:
    return statistics.stdev(values) if len(values) > 1 else None


def plot_losses(runs: list[Run], path: Path) -> None:
    """Training loss of every run against step on one figure, validation loss as markers."""
    from matplotlib.figure import Figure

    from llm.monitor import read_metrics

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    colors = {config: f"C{i}" for i, config in enumerate(dict.fromkeys(r.config for r in runs))}
    for run in runs:
        records = read_metrics(run.dir)
        train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        ax.plot(*zip(*train_pts), color=colors[run.config], lw=1, alpha=0.8,
                label=run.config if run.seed == runs[0].seed else None)
        ax.plot(*zip(*val_pts), "o", color=colors[run.config], ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (lines: train, dots: validation)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)


def plot_budgets(rows: list[dict[str, Any]], path: Path) -> bool:
    """Bars of k_l per layer for each LapSum config (mean over seeds); False when there is none."""
    from matplotlib.figure import Figure

    lapsum = {}
    for r in rows:
        if r["k_per_layer"]:
            lapsum.setdefault(r["config"], []).append(r["k_per_layer"])
    if not lapsum:
        return False
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(lapsum)
    for i, (config, ks) in enumerate(lapsum.items()):
        mean = [statistics.fmean(layer) for layer in zip(*ks)]
        offset = (i - (len(lapsum) - 1) / 2) * width  # the group of bars centred on the layer's tick
        ax.bar([layer + offset for layer in range(len(mean))], mean, width, label=f"{config} (seeds: {len(ks)})")
    ax.set_xticks(range(len(mean)))
    ax.set_xlabel("routed layer")
    ax.set_ylabel("k_l (experts per token)")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=90)
    return True


def write_results(runs: list[Run], rows: list[dict[str, Any]], study: Study, seconds: float) -> None:
    out = study.out
    _atomic_json(out / "results.json", rows)
    plot_losses(runs, out / "loss.png")
    has_budget = plot_budgets(rows, out / "budget.png")
    command = " ".join(["python", "scripts/compare_routers.py", *sys.argv[1:]])
    md = [f"# Router study: {study.steps} steps, seeds {', '.join(map(str, study.seeds))}", "",
          f"Command: `{command}`", "", f"Corpus: {', '.join(study.corpus)}; held-out text: "
          f"{', '.join(study.heldout) or 'none'}; lm-eval tasks: {', '.join(study.tasks) or 'none'} "
          f"(limit {study.limit}); {seconds:.0f} s in this invocation.", "", table(rows, study), ""]
    if len(study.seeds) > 1:
        md += ["Spread over seeds (sample standard deviation):", "", spread(rows, study), ""]
    md += ["![loss curves](loss.png)", ""] + (["![LapSum k_l per layer](budget.png)", ""] if has_budget else [])
    (out / "results.md").write_text("\n".join(md))


# ---------------------------------------------------------------------------- command line

def parse(argv: Optional[list[str]] = None) -> Study:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", nargs="+", required=True, metavar="GLOB", help="training corpus (data.corpus)")
    p.add_argument("--steps", type=int, required=True, help="training steps of every run")
    p.add_argument("--out", required=True, type=Path, help="study directory")
    p.add_argument("--configs", nargs="+", type=Path,
                   default=[REPO / "configs" / f"{name}.yaml" for name in ROUTER_CONFIGS],
                   help="config files (default: the tiny config of every router)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed of each repetition")
    p.add_argument("--repeat", nargs="+", default=None, metavar="CONFIG",
                   help="run only these configs (file stems) at every seed, the others at the first seed only: "
                        "the seed-to-seed spread of a few configs at the cost of a few runs (default: all at all)")
    p.add_argument("--heldout", nargs="*", default=[], metavar="FILE",
                   help="UTF-8 text files the models never trained on (llm eval --text)")
    p.add_argument("--tasks", default="lambada_openai,hellaswag,winogrande", help="lm-eval tasks ('' = none)")
    p.add_argument("--limit", type=int, default=200, help="documents per lm-eval task")
    p.add_argument("--eval-data", default=None,
                   help="local lm-eval task data (default: $LLM_EVAL_DATA, else the bundled eval/sample)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides applied to every run, e.g. train.save_every=200")
    a = p.parse_args(argv)
    if a.steps <= 0:
        p.error(f"--steps {a.steps}: expected a positive number")
    eval_data = a.eval_data or os.environ.get("LLM_EVAL_DATA") or str(REPO / "eval" / "sample")
    unknown = sorted(set(a.repeat or []) - {path.stem for path in a.configs})
    if unknown:
        p.error(f"--repeat {' '.join(unknown)}: not among --configs ({', '.join(path.stem for path in a.configs)})")
    return Study(corpus=a.corpus, steps=a.steps, out=a.out.resolve(), configs=a.configs, seeds=a.seeds,
                 repeat=a.repeat,
                 heldout=a.heldout, tasks=[t for t in a.tasks.split(",") if t], limit=a.limit,
                 eval_data=eval_data, overrides=a.overrides)


def main(argv: Optional[list[str]] = None) -> int:
    from llm.checkpoint import CheckpointError
    from llm.data import DataError
    from llm.evaluation import EvalError, resolve_tasks
    from llm.evaluation.perplexity import TextError, read_text

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("llm").setLevel(logging.INFO)
    study = parse(argv)
    t0 = time.time()
    try:
        runs = plan(study)  # every config and its fairness, the tasks and the texts fail before any training
        if study.tasks:
            resolve_tasks(study.tasks, study.eval_data)
        for text in study.heldout:
            read_text(text)
        study.out.mkdir(parents=True, exist_ok=True)
        for run in runs:
            check_continuable(run)
        rows = []
        for i, run in enumerate(runs, 1):
            saved = run.dir / "row.json"
            if saved.is_file():
                log.info("[%d/%d] %s: done before, skipped", i, len(runs), run.name)
                rows.append(json.loads(saved.read_text()))
                continue
            log.info("[%d/%d] %s: training %d steps in %s", i, len(runs), run.name, study.steps, run.dir)
            rows.append(run_one(run, study))
            log.info("[%d/%d] %s: val_loss %.4f, %s s", i, len(runs), run.name, rows[-1]["val_loss"],
                     rows[-1]["wall_s"])
        write_results(runs, rows, study, time.time() - t0)
    except (ConfigError, DataError, CheckpointError, EvalError, TextError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log.info("results: %s, %s", study.out / "results.json", study.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
