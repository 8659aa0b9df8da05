"""`llm train` end to end through the CLI: real DeepSpeed on gloo, subprocesses, no mocks.

One tiny corpus and one `llm prepare` serve the whole module; every run is a fresh
process, as a user would start it. DeepSpeed's shm comm op compiles once (~30 s) into
TORCH_EXTENSIONS_DIR and is reused by every later process.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llm.checkpoint import load_model
from llm.monitor import read_metrics
from tests.helpers import TINY, free_port, ok, run, train_losses, val_losses, write_tiny_run

STEPS = TINY["train"]["max_steps"]  # a straight run; the resume test restarts from its checkpoint at STEPS // 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with corpus.jsonl, tiny.yaml and the prepared data cache (via `llm prepare`)."""
    root = tmp_path_factory.mktemp("train")
    write_tiny_run(root)
    proc = ok(run("prepare", "tiny.yaml", cwd=root))
    assert (Path(proc.stdout.strip().splitlines()[-1]) / "manifest.json").is_file()
    return root


@pytest.fixture(scope="module")
def straight(workdir) -> Path:
    """An uninterrupted STEPS-step run (checkpoints at STEPS/2 and STEPS), shared by several tests."""
    ok(run("train", "tiny.yaml", "train.out_dir=runs/straight", "log.wandb=offline", cwd=workdir))
    return workdir / "runs" / "straight"


@pytest.mark.slow
def test_train_end_to_end(straight):
    files = sorted(p.name for p in straight.iterdir())
    assert files == ["checkpoints", "config.yaml", "metrics.jsonl", "wandb"], files
    assert len(list((straight / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    resolved = yaml.safe_load((straight / "config.yaml").read_text())
    assert resolved["name"] == "tiny" and resolved["train"]["max_steps"] == STEPS
    assert resolved["train"]["out_dir"] == "runs/straight"

    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0, losses  # ln(320) = 5.8 at the start
    assert sorted(val_losses(straight)) == [6, 12] and val_losses(straight)[12] < val_losses(straight)[6]
    last = [r for r in read_metrics(straight) if "loss" in r][-1]
    assert {"ce", "aux", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(last)
    assert last["tokens"] == STEPS * 8 * 32 and "mfu" not in last  # no peak FLOP/s known on CPU

    ckpts = straight / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000006", "step_0000012"]
    step = ckpts / "step_0000012"
    assert sorted(p.name for p in step.iterdir()) == ["config.yaml", "engine", "manifest.json", "model.safetensors",
                                                       "tokenizer.model", "trainer.json"]
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["step"] == STEPS and trainer["tokens"] == STEPS * 8 * 32 and trainer["world_size"] == 1

    loaded = load_model(straight)  # the checkpoint alone rebuilds the model
    assert loaded.step == STEPS and loaded.tokenizer.vocab_size == 320
    ids = torch.tensor([loaded.tokenizer.encode("the small cat sees the dog.")])
    assert loaded.model(ids).logits.shape == (1, ids.shape[1], 320)


@pytest.mark.slow
def test_throughput_switches_train_like_the_plain_run(workdir, straight):
    """Checkpointed blocks and a chunked loss give the plain run's losses; the bf16 path runs
    on CPU (as it will on a GPU) and stays within bf16 rounding of fp32."""
    one = train_losses(straight)
    ok(run("train", "tiny.yaml", "train.out_dir=runs/lean", "train.activation_checkpointing=full",
           "train.loss_chunk=48", cwd=workdir))
    lean = train_losses(workdir / "runs" / "lean")
    assert sorted(lean) == sorted(one) and all(lean[s] == pytest.approx(one[s], abs=1e-5) for s in one)
    ok(run("train", "tiny.yaml", "train.out_dir=runs/bf16", "train.dtype=bf16", "train.max_steps=6",
           "train.save_every=6", "train.eval_every=6", cwd=workdir))
    bf16 = train_losses(workdir / "runs" / "bf16")
    assert bf16[1] == pytest.approx(one[1], abs=0.02) and bf16[6] < bf16[1] - 0.3, (bf16, one)


@pytest.mark.slow
def test_resume_is_exact(workdir, straight):
    half = straight / "checkpoints" / "step_0000006"
    ok(run("train", "tiny.yaml", "train.out_dir=runs/resumed", f"train.resume={half}", cwd=workdir))
    resumed, full = train_losses(workdir / "runs" / "resumed"), train_losses(straight)
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for s in resumed:
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), (s, resumed[s], full[s])
    assert val_losses(workdir / "runs" / "resumed")[12] == pytest.approx(val_losses(straight)[12], abs=1e-6)

    # resume=auto on a finished run finds its latest checkpoint and has nothing left to do
    proc = ok(run("train", "tiny.yaml", "train.out_dir=runs/straight", cwd=workdir))
    assert "already at step 12" in proc.stderr
    assert train_losses(straight) == full


@pytest.mark.slow
def test_fresh_start_keeps_old_checkpoints(workdir, straight):
    shutil.copytree(straight, workdir / "runs" / "again")
    ok(run("train", "tiny.yaml", "train.out_dir=runs/again", "train.resume=none", "train.max_steps=2",
           "train.save_every=2", cwd=workdir))
    again = workdir / "runs" / "again"
    kept = [p for p in again.iterdir() if p.name.startswith("checkpoints.")]
    assert len(kept) == 1 and (kept[0] / "step_0000012" / "model.safetensors").is_file()
    assert (again / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert sorted(train_losses(again)) == [1, 2]
    assert train_losses(again)[1] == pytest.approx(train_losses(straight)[1], abs=1e-6)  # same seed, same start


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_checkpoint(workdir):
    proc = run("train", "tiny.yaml", "train.out_dir=runs/nan", "train.lr=1.0e+16", "train.warmup_steps=8",
               "train.save_every=1", cwd=workdir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: loss is nan at step (\d+) \(ce nan, aux 0\.0\); last good checkpoint: (\S+)", line)
    assert match, line
    step = int(match.group(1))
    assert step > 1 and match.group(2) == f"runs/nan/checkpoints/step_{step - 1:07d}", line
    run_dir = workdir / "runs" / "nan"
    assert sorted(train_losses(run_dir)) == list(range(1, step))  # the NaN step was never logged or applied
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step - 1:07d}"


def test_cli_errors_are_one_line(workdir, capsys, monkeypatch):
    """Config and data errors stop before any process group exists, so main() runs in-process here."""
    from llm.cli import main

    monkeypatch.chdir(workdir)

    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err.strip()

    assert error("train", "tiny.yaml", "train.max_step=5") == \
        "error: unknown key train.max_step; did you mean train.max_steps?"
    assert error("train", "tiny.yaml", "model.d_model=66").startswith("error: model.d_model=66 must be divisible")
    assert error("train", "tiny.yaml", "train.lr=fast") == "error: train.lr='fast': expected a number"
    assert error("train", "missing.yaml") == "error: config file missing.yaml not found"
    assert "nowhere" in error("prepare", "tiny.yaml", "data.corpus=[nowhere/*.jsonl]")


@pytest.mark.slow
def test_resume_refuses_a_different_model(workdir, straight):
    proc = run("train", "tiny.yaml", "train.out_dir=runs/straight", "model.d_ff=192", "train.max_steps=20",
               cwd=workdir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume") and "model.d_ff=192" in line, line


@pytest.mark.slow
def test_two_ranks_match_one_rank(workdir, straight):
    """torchrun, 2 gloo ranks x 4 sequences == 1 rank x 8 sequences (the same global batch)."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "llm")
    ok(run("train", "tiny.yaml", "train.out_dir=runs/dp2", "train.micro_batch_size=4", cwd=workdir,
           launcher=torchrun))
    two, one = train_losses(workdir / "runs" / "dp2"), train_losses(straight)
    assert sorted(two) == sorted(one)
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-5), (s, two[s], one[s])
    assert val_losses(workdir / "runs" / "dp2")[12] == pytest.approx(val_losses(straight)[12], abs=1e-5)
    trainer = json.loads((workdir / "runs" / "dp2" / "checkpoints" / "step_0000012" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["tokens"] == STEPS * 8 * 32


@pytest.mark.slow
def test_deepspeed_launcher(workdir, straight):
    launcher = (sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "llm")
    ok(run("train", "tiny.yaml", "train.out_dir=runs/ds2", "train.micro_batch_size=2", "train.grad_accum=2",
           "train.max_steps=4", "train.save_every=4", cwd=workdir, launcher=launcher))
    losses = train_losses(workdir / "runs" / "ds2")
    assert sorted(losses) == [1, 2, 3, 4]
    # the same global batch (2 ranks x 2 sequences x 2 accumulation steps) as `straight` at step 1
    assert losses[1] == pytest.approx(train_losses(straight)[1], abs=1e-5)
