"""Downstream evaluation during training: `EvalCallback` runs lm-eval tasks every `eval.every` steps."""
from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any, Iterator

import numpy as np
import torch

from llm.evaluation.adapter import LLMEvalModel
from llm.evaluation.errors import EvalError
from llm.evaluation.runner import evaluate, summarize
from llm.evaluation.tasks import resolve_tasks
from llm.monitor import Callback

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Evaluation must not move the training run's random streams."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO chatter and datasets' progress bars off, for evaluation inside a training log."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


class EvalCallback(Callback):
    """lm-eval tasks every `eval.every` steps during training.

    Runs `eval.tasks` on `eval.limit` documents each with the plain model (`trainer.model`)
    in eval mode, puts it back in the mode it was in, restores every RNG, and logs the
    scores through `trainer.log` (console, metrics.jsonl, wandb) as `eval/TASK/METRIC`.
    Only global rank 0 evaluates, unless experts are spread over ranks (parallel.ep_size > 1):
    the forward then needs every rank for its all-to-all, so all ranks run the same
    requests. The other ranks wait for rank 0 at their next collective, so keep eval.limit
    small enough to finish within the process group's timeout.
    """

    def __init__(self, cfg, tokenizer=None):
        """cfg: EvalConfig; tokenizer: the run's Tokenizer (default: loaded from `trainer.tokenizer_path`)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tasks = None
        if cfg.every:  # bad task names or missing data fail when the run starts, as config errors
            from llm.config import ConfigError

            try:
                self.tasks = resolve_tasks(cfg.tasks, cfg.data_dir or None)
            except EvalError as err:
                raise ConfigError(f"eval.tasks={','.join(cfg.tasks)}: {err}") from None

    def on_train_start(self, trainer) -> None:
        if self.tokenizer is None and self.cfg.every:
            from llm.data import Tokenizer

            self.tokenizer = Tokenizer.load(trainer.tokenizer_path)

    def on_step(self, trainer, step: int, metrics: dict[str, Any]) -> None:
        if not self.cfg.every or step % self.cfg.every:
            return
        from llm.parallel import is_main

        main = is_main()
        if not main and trainer.cfg.parallel.ep_size == 1:
            return
        scores = self.run(trainer.model, self.tokenizer)
        if main:
            log.info("step %d lm-eval (limit %s): %s", step, self.cfg.limit or "none",
                     "  ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in scores.items()))
            trainer.log(step, scores)

    def run(self, model: torch.nn.Module, tokenizer) -> dict[str, float]:
        """{eval/TASK/METRIC: value} for the model as it is now; leaves its mode and the RNGs as they were."""
        was_training = model.training
        model.eval()
        t0 = time.time()
        try:
            with _preserved_rng(), _quiet():
                lm = LLMEvalModel(model=model, tokenizer=tokenizer, batch_size=self.cfg.batch_size, progress=False)
                results = evaluate(lm, self.tasks, limit=self.cfg.limit or None, seed=None)
        finally:
            model.train(was_training)
        scores = {f"eval/{k}": v for k, v in summarize(results).items()}
        scores["eval/seconds"] = time.time() - t0
        return scores
