"""`llm COMMAND ...`: one small function per subcommand, registered with @command.

    llm prepare CONFIG [key=value ...] [--shard I/N]   tokenize the corpus (prints the data directory)
    llm train   CONFIG [key=value ...]   train (prepares the data first when needed)
    llm eval    CHECKPOINT --tasks a,b   lm-eval tasks on a checkpoint (prints and saves the table)
    llm eval    CHECKPOINT --text FILE   held-out perplexity of a text file (same results files)
    llm export  CHECKPOINT OUT_DIR       a Hugging Face model directory (transformers, lm-eval hf, the Hub)

Problems the user can fix (config, data, checkpoint) print `error: <one line>` and exit
with status 2; a training failure (e.g. NaN loss) exits with 1; no tracebacks for either.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from llm.checkpoint import CheckpointError
from llm.config import ConfigError, load_config
from llm.data.errors import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], Callable[[argparse.ArgumentParser], None], str]] = {}


def config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. configs/tiny-dense.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 model.routing.router=lapsum")


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = config_arguments):
    """Register `fn(args)` as `llm NAME`; `arguments(parser)` declares its arguments."""
    def register(fn):
        COMMANDS[name] = (fn, arguments, help)
        return fn
    return register


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    config_arguments(parser)
    parser.add_argument("--shard", metavar="I/N", default="0/1",
                        help="tokenize only part I of N (0 <= I < N), e.g. one per machine sharing the cache "
                             "directory; the last part to finish, or a later plain run, completes it")


@command("prepare", "tokenize the corpus into sharded token files (+ tokenizer), print the data directory",
         prepare_arguments)
def prepare_command(args: argparse.Namespace) -> None:
    from llm.data.prepare import parse_shard, prepare

    shard = parse_shard(args.shard)
    print(prepare(load_config(args.config, args.overrides), shard))


@command("train", "train a model; prepares the data first if needed, resumes per train.resume")
def train_command(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from llm.train import train

    summary = train(load_config(args.config, args.overrides))
    logging.getLogger("llm").info(
        "done: step %d, loss %s, val_loss %s, %s tokens/s, checkpoint %s", summary["step"],
        _fmt(summary["loss"]), _fmt(summary["val_loss"]), _fmt(summary["tokens_per_s"], ".0f"),
        summary["checkpoint"])
    if dist.is_initialized():
        dist.destroy_process_group()


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks: lambada_openai, hellaswag, piqa, arc_easy, arc_challenge, "
                             "winogrande read local data (eval/tasks/); other lm-eval task names use the hub")
    parser.add_argument("--text", action="append", default=[], metavar="FILE",
                        help="a UTF-8 text file to score as one document (word/byte/token perplexity, bits per "
                             "byte, as lm-eval's wikitext task); repeat for several")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    parser.add_argument("--data-dir", default=None, help="local task data (default: $LLM_EVAL_DATA)")
    parser.add_argument("--out", default=None,
                        help="results JSON (default: CHECKPOINT/eval/results.json); the table goes next to it as .md")


@command("eval", "score a checkpoint on lm-eval tasks and/or text files; print the table, save results JSON + "
                 "markdown", eval_arguments)
def eval_command(args: argparse.Namespace) -> None:
    from llm.evaluation import EvalError, TextError, main as evaluate

    try:
        evaluate(args)
    except (EvalError, TextError) as err:  # lm-eval is imported only for this command, so its error is caught here
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--max-shard-gb", type=float, default=5.0,
                        help="split model.safetensors into shards of at most this size (default 5)")


@command("export", "write a checkpoint as a Hugging Face model directory (safetensors, config, tokenizer)",
         export_arguments)
def export_command(args: argparse.Namespace) -> None:
    import importlib.util

    from llm.export import ExportError, export

    missing = [name for name in ("transformers", "safetensors") if importlib.util.find_spec(name) is None]
    if missing:  # they come with the dev extra
        print(f"error: llm export needs {' and '.join(missing)}: pip install -e '.[dev]'", file=sys.stderr)
        raise SystemExit(2)
    if args.max_shard_gb <= 0:
        print(f"error: --max-shard-gb {args.max_shard_gb}: expected > 0", file=sys.stderr)
        raise SystemExit(2)
    try:
        summary = export(args.checkpoint, args.out_dir, force=args.force,
                         max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary.out_dir)


def inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    parser.add_argument("--data", choices=("val", "train"), default="val", help="split to measure on (default val)")
    parser.add_argument("--batches", type=int, default=None, metavar="N",
                        help="batches to measure on (default train.eval_batches of the checkpoint)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (schema in README.md)")
    parser.add_argument("--plot", metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument("--over-time", action="store_true",
                        help="CHECKPOINT is a run directory: inspect every checkpoint, follow each layer over steps")


@command("inspect", "per-layer routing statistics of a checkpoint: expert budget, active experts, load, entropy",
         inspect_arguments)
def inspect_command(args: argparse.Namespace) -> None:
    from llm.inspection import run_inspect

    run_inspect(args.checkpoint, args.data, args.batches, args.json, args.plot, args.over_time)


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm", description="Pretrain routed-FFN decoders with DeepSpeed.")
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, arguments, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        arguments(p)
        p.set_defaults(run=fn)
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("llm").setLevel(logging.INFO if rank == 0 else logging.WARNING)  # ours; others stay quiet
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    from llm.train import TrainingError

    try:
        args.run(args)
    except USER_ERRORS as err:
        # One write per line: ranks share stderr, and print() would write the newline separately.
        sys.stderr.write(f"error: {prefix}{err}\n")
        return 2
    except TrainingError as err:
        sys.stderr.write(f"error: {prefix}{err}\n")
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
