"""Checkpoints as lm-evaluation-harness models, local task data, and `llm eval`.

Importing this module registers the model name `llm` with lm-eval:

    lm_eval.simple_evaluate(model="llm", model_args="checkpoint=runs/tiny-dense", tasks=[...])

`LLMEvalModel` implements lm-eval's three request types on our own model:
- loglikelihood: lm-eval's `TemplateLM` splits context/continuation (the pair is encoded
  whole and split at the context's token count; an empty context is conditioned on EOS,
  which is what ends every document in `llm prepare`'s token stream). Inputs longer than
  `model.max_seq_len` lose context tokens on the left; a continuation that is itself longer
  is scored in pieces of max_seq_len/2 tokens, each with max_seq_len/2 tokens of history.
- loglikelihood_rolling: disjoint windows of `max_seq_len` tokens (`get_rolling_token_windows`),
  each token predicted exactly once.
- generate_until: greedy decoding with the model's KV cache, stopping at EOS, a stop
  sequence or `max_gen_toks`.

Requests are sorted by length (lm-eval's `Collator`) and right-padded into batches. Scores
do not depend on the batch size: the model is causal and every router's output at position
t depends on tokens <= t of its own sequence only, so padding after the real tokens changes
nothing before it (the tests check this for dense and routed models). Exceptions, warned
about at load time: capacity-limited routing (`capacity_factor` set, or DeepSpeed's own
`deepspeed_topk` layer), where tokens compete for expert slots across the batch, and SMEAR's
`first_segment: self_stopgrad`, which reads the future of segment 0.

Tasks named like a YAML file in `eval/tasks/` read local jsonl files from the data
directory (`--data-dir` or `$LLM_EVAL_DATA`); any other name is looked up in lm-eval's
own task index (which downloads its data from the hub).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lm_eval
import lm_eval.models  # noqa: F401  (registers lm-eval's own model names before ours)
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
from tqdm import tqdm

from llm import perplexity
from llm.monitor import Callback

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parents[1] / "eval" / "tasks"
DATA_ENV = "LLM_EVAL_DATA"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class EvalError(ValueError):
    """An evaluation problem, phrased as one line (bad task, data, checkpoint or argument)."""


# ---------------------------------------------------------------------------- the lm-eval model

@register_model("llm")
class LLMEvalModel(TemplateLM):
    """One of this project's models as an lm-eval LM.

    From lm-eval: `model_args="checkpoint=PATH,batch_size=16,device=cuda,dtype=bf16"`.
    In process (evaluation during training): `LLMEvalModel(model=m, tokenizer=tok)` uses the
    given model as it is (device, dtype, weights) and never changes its train/eval mode.
    """

    def __init__(self, checkpoint: Optional[str] = None, batch_size: int | str = 16, device: Optional[str] = None,
                 dtype: Optional[str] = None, max_gen_toks: int = 256, max_batch_size: Any = None, *,
                 model: Optional[torch.nn.Module] = None, tokenizer: Any = None, progress: bool = True,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise EvalError(f"unknown model_args {', '.join(sorted(unknown))}: expected checkpoint, batch_size, "
                            f"device, dtype, max_gen_toks")
        if (checkpoint is None) == (model is None):
            raise EvalError("pass exactly one of checkpoint=PATH or an in-memory model")
        self.step = 0
        self.checkpoint: Optional[Path] = None
        if checkpoint is not None:
            model, tokenizer = self._load(checkpoint, device, dtype)
        elif tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.progress = progress
        cfg = model.cfg
        self.max_length = cfg.max_seq_len
        if tokenizer.vocab_size != cfg.vocab_size:
            where = f"{self.checkpoint}: " if self.checkpoint else ""
            raise EvalError(f"{where}tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.vocab_size}: the model was trained with another tokenizer")
        if tokenizer.eos_id < 0 and tokenizer.bos_id < 0:
            raise EvalError("the tokenizer defines neither EOS nor BOS; an empty context needs one to condition on")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_token_id
        _warn_if_batch_dependent(cfg)

    def _load(self, checkpoint: str, device: Optional[str], dtype: Optional[str]):
        from llm.checkpoint import CheckpointError, load_model
        from llm.config import ConfigError
        from llm.data import DataError

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise EvalError(f"device={device!r}: expected cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"device={device!r}: CUDA is not available on this machine")
        if dtype in (None, "auto"):
            torch_dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise EvalError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
        try:
            loaded = load_model(checkpoint, device=device, dtype=torch_dtype)
        except (CheckpointError, ConfigError, DataError) as err:
            raise EvalError(str(err)) from None
        self.checkpoint, self.step = loaded.path, loaded.step
        log.info("loaded %s (step %d) on %s in %s", loaded.path, loaded.step, device, torch_dtype)
        return loaded.model, loaded.tokenizer

    # -- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", None) or "llm-tokenizer")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if not continuation_enc:  # the continuation merged into the context's last token: score that token
            whole = self.tok_encode(context + continuation)
            context_enc, continuation_enc = whole[:-1], whole[-1:]
        return context_enc or [self.prefix_token_id], continuation_enc

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    # -- forward passes

    @torch.inference_mode()
    def _tail_logits(self, rows: list[list[int]], n: int) -> torch.Tensor:
        """Logits [B, n, V] at the last n positions of each row (rows right-padded into one batch).

        Scoring needs the logits of the continuation only, so the final hidden states are
        gathered at those positions before the vocabulary projection (a pre-hook on
        lm_head): that skips most of the projection, the largest matmul of a small model.
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        ends = torch.tensor([len(r) for r in rows])
        index = (ends[:, None] - n + torch.arange(n)).clamp(min=0).to(self._device)  # [B, n]

        def gather(module, args):
            (hidden,) = args  # [B, T, d]
            return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])),)

        handle = self.model.lm_head.register_forward_pre_hook(gather)
        try:
            return self.model(ids.to(self._device)).logits
        finally:
            handle.remove()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) for pre-tokenised (strings, context, continuation).

        A continuation longer than max_seq_len cannot be scored in one window: it is scored
        in pieces of max_seq_len/2 tokens, each seeing the max_seq_len/2 tokens before it,
        and the pieces' log-probabilities are summed.
        """
        pieces, owner, split = [], [], {}
        for i, (strings, context, continuation) in enumerate(requests):
            if len(continuation) <= self.max_length:
                pieces.append((strings, context, continuation))
                owner.append(i)
                continue
            tokens, step = context + continuation, max(1, self.max_length // 2)
            for start in range(len(context), len(tokens), step):
                pieces.append((None, tokens[:start], tokens[start:start + step]))
                owner.append(i)
            split[i] = strings
        if split:
            lm_eval.utils.warning_once(log, f"continuations longer than model.max_seq_len={self.max_length} "
                                            f"are scored in windows of {self.max_length // 2} tokens")
        totals = [[0.0, True] for _ in requests]
        for i, (score, greedy) in zip(owner, self._score(pieces, disable_tqdm)):
            totals[i][0] += score
            totals[i][1] &= greedy
        for i, strings in split.items():
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, tuple(totals[i]))
        return [(score, greedy) for score, greedy in totals]

    def _score(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_loglikelihood_tokens for continuations of at most max_seq_len tokens, batched by length."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
            group_by="contexts",  # score requests that differ only in their last token once
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1]  # left-truncated input
                    for _, context, continuation in chunk]
            width = max(len(c) for _, _, c in chunk)
            logits = self._tail_logits(rows, width)  # [B, width, V]
            for (strings, context, continuation), row_logits in zip(chunk, logits):
                n = len(continuation)
                logprobs = F.log_softmax(row_logits[width - n:].float(), dim=-1)  # [n, V]
                greedy = logprobs.argmax(-1)
                for req_strings, cont, lp in collator.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs[None]):
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    tail = lp[0, -len(cont):]  # [len(cont), V]
                    score = float(tail.gather(1, target[:, None]).sum())
                    answer = (score, bool((greedy[-len(cont):] == target).all()))
                    results.append(answer)
                    if req_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", req_strings, answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string, conditioned on EOS, in disjoint windows of max_seq_len."""
        windows, counts = [], []
        for (text,) in (r.args for r in requests):
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, context, target) for context, target in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for request, n in zip(requests, counts):
            total = sum(score for score, _ in scores[start:start + n])
            start += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence."""
        routing = self.model.cfg.routing
        if routing.router == "smear" and routing.first_segment == "self_stopgrad":
            raise EvalError("generate_until needs incremental decoding, which SMEAR with "
                            "first_segment=self_stopgrad cannot do")
        collator = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # EOS stops by id
            max_new = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                lm_eval.utils.warning_once(log, "the llm model decodes greedily; ignoring do_sample/temperature")
            if max_new > self.max_length // 2:
                lm_eval.utils.warning_once(
                    log, f"max_gen_toks={max_new} capped to {self.max_length // 2} (half of model.max_seq_len)")
                max_new = self.max_length // 2
            prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id]
                       for c in contexts]
            for context, gen_kwargs, prompt, tokens in zip(contexts, all_kwargs, prompts,
                                                           self._greedy(prompts, max_new, until)):
                text = postprocess_generated_text(self._decode_after(prompt, tokens), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy tokens after each prompt, up to max_new, EOS (excluded) or a stop sequence.

        One KV cache for the batch and no padding: all rows advance one position per step;
        a row whose prompt is longer than the shortest keeps feeding its own prompt tokens
        until they run out, so every row decodes exactly as it would alone.
        """
        lengths = [len(p) for p in prompts]
        cache = self.model.new_cache()
        pos = min(lengths)
        logits = self.model(torch.tensor([p[:pos] for p in prompts], device=self._device), cache=cache).logits[:, -1]
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = self.tokenizer.eos_id
        while True:
            best = logits.argmax(-1).tolist()
            step = []
            for b, prompt in enumerate(prompts):
                if pos < lengths[b]:
                    step.append(prompt[pos])
                    continue
                if not done[b]:
                    if best[b] == eos:
                        done[b] = True
                    else:
                        out[b].append(best[b])
                        text = self._decode_after(prompt, out[b]) if until else ""
                        done[b] = len(out[b]) >= max_new or any(s in text for s in until)
                step.append(out[b][-1] if out[b] else self.pad_id)  # finished rows feed anything
            if all(done) or pos + 1 >= self.max_length:
                return out
            logits = self.model(torch.tensor(step, device=self._device)[:, None], cache=cache).logits[:, -1]
            pos += 1

    def _decode_after(self, prompt: list[int], tokens: list[int]) -> str:
        """Text of tokens as they continue the prompt (keeps a leading space sentencepiece would drop)."""
        anchor = self.tokenizer.decode(prompt[-1:])
        text = self.tokenizer.decode(prompt[-1:] + tokens)
        return text[len(anchor):] if text.startswith(anchor) else self.tokenizer.decode(tokens)


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"{name}={value!r}: expected a positive integer") from None
    if number <= 0 or number != float(value):
        raise EvalError(f"{name}={value!r}: expected a positive integer")
    return number


def _warn_if_batch_dependent(cfg) -> None:
    routing = cfg.routing
    if routing.router == "dense":
        return
    if routing.router == "deepspeed_topk" or routing.capacity_factor is not None:
        log.warning("model.routing (%s, capacity_factor=%s): tokens compete for expert capacity across the batch, "
                    "so scores depend on batch size and padding", routing.router,
                    routing.ds_capacity_factor if routing.router == "deepspeed_topk" else routing.capacity_factor)
    if routing.router == "smear" and routing.first_segment == "self_stopgrad":
        log.warning("SMEAR first_segment=self_stopgrad routes segment 0 on its own future tokens: "
                    "scores see the continuation and depend on padding")


# ---------------------------------------------------------------------------- tasks

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


# ---------------------------------------------------------------------------- running

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


# ---------------------------------------------------------------------------- command line

def main(args) -> None:
    """`llm eval` from its parsed arguments (declared in llm/cli.py); EvalError propagates."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # our own lines and the table say what matters
    results, path = run_eval(args.checkpoint, args.tasks.split(",") if args.tasks else [], limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                             dtype=args.dtype, data_dir=args.data_dir, out=args.out, texts=args.text)
    print(markdown(results))
    print(f"results: {path} and {path.with_suffix('.md')} ({results['llm']['seconds']:.0f} s)")


# ---------------------------------------------------------------------------- during training

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
