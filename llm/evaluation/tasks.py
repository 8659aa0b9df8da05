"""Which tasks to run and where their data lives.

Tasks named like a YAML file in `eval/tasks/` read local jsonl files from the data
directory (`--data-dir`, `eval.data_dir` or `$LLM_EVAL_DATA`); any other name is looked up in
lm-eval's own task index (which downloads its data from the hub).
"""
from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from llm.evaluation.errors import EvalError

TASKS_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"
DATA_ENV = "LLM_EVAL_DATA"


def local_tasks() -> dict[str, Path]:
    """Task name -> YAML of the tasks that read local data (eval/tasks/NAME.yaml)."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def data_root(data_dir: str | Path | None, task: str = "local tasks") -> Path:
    """The local task data directory: the argument, else $LLM_EVAL_DATA."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if not chosen:
        raise EvalError(f"{task} reads its data from a local directory: pass --data-dir DIR (eval.data_dir in "
                        f"a config) or set {DATA_ENV} (laid out like eval/sample/)")
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise EvalError(f"eval data directory {path} not found")
    return path


def task_config(name: str, data_dir: str | Path | None) -> dict[str, Any]:
    """The lm-eval config dict of a local task, its data files made absolute under the data directory.

    (lm-eval resolves relative `data_files` against the current directory, not the YAML's.)
    """
    path = local_tasks().get(name)
    if path is None:
        raise EvalError(f"unknown local task {name!r}; local tasks: {', '.join(local_tasks())}")
    cfg = _load_task_yaml(path)
    root = data_root(data_dir, name)
    files = {}
    for split, rel in cfg["dataset_kwargs"]["data_files"].items():
        file = root / rel
        if not file.is_file():
            raise EvalError(f"task {name}: data file {file} not found (expected {rel} under the eval data "
                            f"directory {root})")
        files[split] = str(file)
    cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
    return cfg


def _load_task_yaml(path: Path) -> dict[str, Any]:
    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.Loader, node: yaml.Node):
        module, _, name = loader.construct_scalar(node).rpartition(".")
        return getattr(importlib.import_module(module), name)

    Loader.add_constructor("!function", function)
    return yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (SafeLoader + one tag)


@dataclass
class TaskSet:
    """Tasks ready for lm-eval: local configs (absolute data paths) and hub names, and their TaskManager."""

    names: list[str]
    specs: list[Any]
    manager: Any  # lm_eval.tasks.TaskManager
    data_dir: Optional[Path]  # where local tasks read their data; None if there are none


def resolve_tasks(names: Sequence[str], data_dir: str | Path | None = None) -> TaskSet:
    """Check task names and local data files; local names read eval/tasks/NAME.yaml, others are lm-eval's."""
    from lm_eval.tasks import TaskManager

    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise EvalError("no tasks given")
    local = local_tasks()
    hub = [n for n in names if n not in local]
    if hub:
        manager = TaskManager()  # lm-eval's own index (a few seconds to scan)
        for name in hub:
            if name not in manager.all_tasks:
                close = difflib.get_close_matches(name, list(local) + manager.all_tasks, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise EvalError(f"unknown task {name!r}: neither in eval/tasks ({', '.join(local)}) nor in "
                                f"lm-eval's task index{hint}")
    else:
        manager = TaskManager(include_defaults=False)  # skips scanning lm-eval's thousands of YAMLs
    specs = [task_config(n, data_dir) if n in local else n for n in names]
    return TaskSet(names, specs, manager, data_root(data_dir) if len(hub) < len(names) else None)
