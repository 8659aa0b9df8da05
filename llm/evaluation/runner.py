"""Running lm-eval and text perplexity on a model, and `llm eval`'s results files.

`run_eval` checks every task name, task data file and text file before the checkpoint
loads, then writes lm-eval's results dict as JSON and its table as markdown next to it;
text files are rows of the same table (see `perplexity`).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lm_eval
import numpy as np
from lm_eval.utils import make_table

from llm.evaluation import perplexity
from llm.evaluation.adapter import LLMEvalModel
from llm.evaluation.errors import EvalError
from llm.evaluation.tasks import TaskSet, resolve_tasks

def evaluate(lm: LLMEvalModel, tasks: TaskSet, limit: Optional[int] = None, num_fewshot: Optional[int] = None,
             seed: Optional[int] = 1234) -> dict[str, Any]:
    """Run lm-eval and return its results dict (no bootstrap stderr, no per-sample logs).

    seed=None leaves the global RNGs alone (lm-eval would otherwise reseed them).
    """
    seeds = dict(random_seed=0, numpy_random_seed=seed, torch_random_seed=seed) if seed is not None else dict(
        random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks.specs, task_manager=tasks.manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=0, log_samples=False, fewshot_random_seed=1234, **seeds)


def summarize(results: dict[str, Any]) -> dict[str, float]:
    """Flat {task/metric: value} of lm-eval results (stderr and aliases left out), for loggers."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "acc,none"; "alias" and "sample_len" are not metrics
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}/{filt}"] = float(value)
    return flat


def markdown(results: dict[str, Any]) -> str:
    """lm-eval's results table (and its groups table when there are groups)."""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def run_eval(checkpoint: str | Path, tasks: Sequence[str], limit: Optional[int] = None,
             num_fewshot: Optional[int] = None, batch_size: int = 32, device: Optional[str] = None,
             dtype: Optional[str] = None, data_dir: str | Path | None = None,
             out: str | Path | None = None, texts: Sequence[str | Path] = ()) -> tuple[dict[str, Any], Path]:
    """`llm eval`: evaluate a checkpoint on lm-eval tasks and/or the perplexity of text files, write
    results JSON + markdown table, return (results, JSON path)."""
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit {limit}: expected a positive number of documents per task")
    if num_fewshot is not None and num_fewshot < 0:
        raise EvalError(f"--num-fewshot {num_fewshot}: expected >= 0")
    if not tasks and not texts:
        raise EvalError("nothing to evaluate: pass --tasks TASKS and/or --text FILE")
    # bad task names, missing task data and unreadable text files fail before the model loads
    task_set = resolve_tasks(tasks, data_dir) if tasks else None
    documents = [perplexity.read_text(path) for path in texts]
    t0 = time.time()
    lm = LLMEvalModel(checkpoint=str(checkpoint), batch_size=batch_size, device=device, dtype=dtype)
    results = evaluate(lm, task_set, limit=limit, num_fewshot=num_fewshot) if task_set else {}
    perplexity.add_results(results, documents, perplexity.score(lm, documents))
    seconds = time.time() - t0
    results["llm"] = {
        "checkpoint": str(lm.checkpoint), "step": lm.step, "tasks": task_set.names if task_set else [],
        "texts": [d.name for d in documents], "limit": limit,
        "num_fewshot": num_fewshot, "batch_size": lm.batch_size, "device": str(lm.device),
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "data_dir": str(task_set.data_dir) if task_set and task_set.data_dir else None,
        "seconds": round(seconds, 1),
    }
    json_path = Path(out) if out else lm.checkpoint / "eval" / "results.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable, ensure_ascii=False))
    header = f"{lm.checkpoint} (step {lm.step}), limit {limit}, {seconds:.0f} s\n\n"
    json_path.with_suffix(".md").write_text(header + markdown(results))
    return results, json_path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, set):
        return sorted(obj)
    return getattr(obj, "__name__", None) or str(obj)


def main(args) -> None:
    """`llm eval` from its parsed arguments (declared in llm/cli.py); EvalError propagates."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # our own lines and the table say what matters
    results, path = run_eval(args.checkpoint, args.tasks.split(",") if args.tasks else [], limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                             dtype=args.dtype, data_dir=args.data_dir, out=args.out, texts=args.text)
    print(markdown(results))
    print(f"results: {path} and {path.with_suffix('.md')} ({results['llm']['seconds']:.0f} s)")
