"""Failure drills: preemption, NaNs, damaged checkpoints and hostile files, through the CLI.

One tiny prepared corpus and one uninterrupted run (`straight`) serve the module; each
drill copies that run directory and damages its copy, then runs `llm ...` as a user
would (a fresh process, real DeepSpeed on gloo). Every drill asserts that no traceback
reaches the user, that the message is one line, and that no good checkpoint is lost.
Drills that fail before DeepSpeed starts run `llm.cli.main` in this process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llm.checkpoint import CheckpointError, list_checkpoints, load_model, load_weights, newest_good, verify
from llm.monitor import read_metrics
from tests.helpers import SAMPLE, cli_status, env, ok, run, start, strict_json_lines, train_losses, write_tiny_run

STEPS = 8  # checkpoints at 4 and 8
ENGINE_FILE = "engine/step_{:07d}/mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drills")
    write_tiny_run(root, n_docs=60, max_steps=STEPS, save_every=4, eval_every=4)
    ok(run("prepare", "tiny.yaml", cwd=root))
    return root


@pytest.fixture(scope="module")
def straight(workdir) -> Path:
    ok(run("train", "tiny.yaml", "train.out_dir=runs/straight", cwd=workdir))
    return workdir / "runs" / "straight"


def copy_run(straight: Path, name: str) -> Path:
    target = straight.parent / name
    shutil.copytree(straight, target)
    return target


def user_facing(proc: subprocess.CompletedProcess, code: int) -> str:
    """The process exited with `code`, showed no traceback; returns its last stderr line."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---------------------------------------------------------------------------- damage, detected without DeepSpeed

DAMAGES = {
    "truncated engine file": (lambda c: truncate(c / ENGINE_FILE.format(8)), ENGINE_FILE.format(8)),
    "missing engine tag dir": (lambda c: shutil.rmtree(c / "engine" / "step_0000008"), ENGINE_FILE.format(8)),
    "garbage trainer.json": (lambda c: (c / "trainer.json").write_text("{'step': 8"), "trainer.json"),
    "truncated weights": (lambda c: truncate(c / "model.safetensors"), "model.safetensors"),
    "half deleted": (lambda c: [(c / n).unlink() for n in ("manifest.json", "model.safetensors")], "no model"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_skipped(straight, damage, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", run_dir / "checkpoints")
    ckpt = run_dir / "checkpoints" / "step_0000008"
    harm, named = DAMAGES[damage]
    harm(ckpt)
    assert named in verify(ckpt)
    warnings: list[str] = []
    assert newest_good(run_dir, warnings.append) == run_dir / "checkpoints" / "step_0000004"
    assert len(warnings) == 1 and "step_0000008" in warnings[0] and named in warnings[0], warnings
    assert load_model(run_dir).step == 4  # eval and inspect fall back the same way
    with pytest.raises(CheckpointError, match="step_0000008 is damaged"):
        load_model(ckpt)


@pytest.mark.slow
def test_nothing_usable_is_an_error_not_a_fresh_start(workdir, straight, capsys, monkeypatch):
    from llm.cli import main

    broken = copy_run(straight, "broken")
    (broken / "checkpoints" / "latest").unlink()
    (broken / "checkpoints" / "step_0000008" / "trainer.json").write_text("not json")
    shutil.rmtree(broken / "checkpoints" / "step_0000004" / "engine" / "step_0000004")
    before = sorted(p.relative_to(broken) for p in broken.rglob("*"))
    monkeypatch.chdir(workdir)
    assert main(["train", "tiny.yaml", "train.out_dir=runs/broken"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no usable checkpoint in runs/broken/checkpoints"), err
    assert "step_0000008: trainer.json has 8 bytes" in err and "step_0000004: engine/step_0000004/" in err
    assert sorted(p.relative_to(broken) for p in broken.rglob("*")) == before  # nothing moved, nothing deleted

    assert main(["train", "tiny.yaml", "train.out_dir=runs/elsewhere",
                 "train.resume=runs/broken/checkpoints/step_0000008"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "step_0000008 is damaged: trainer.json has 8 bytes" in err, err


@pytest.mark.slow
def test_inspect_and_eval_on_truncated_weights(straight, capsys, tmp_path):
    ckpt = tmp_path / "step_0000008"
    shutil.copytree(straight / "checkpoints" / "step_0000008", ckpt)
    (tmp_path / "plot.png").write_text("")
    assert cli_status("inspect", str(straight), "--plot", str(tmp_path / "plot.png")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--plot" in err and "is a file" in err, err
    truncate(ckpt / "model.safetensors")
    for argv in (["inspect", str(ckpt)], ["eval", str(ckpt), "--tasks", "lambada_openai", "--data-dir", str(SAMPLE)]):
        assert cli_status(*argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.safetensors" in err and "is damaged" in err, err


# ---------------------------------------------------------------------------- drills through `llm train`

@pytest.mark.slow
def test_nan_gradient_stops_before_the_update(workdir):
    """lr=1e24: step 2 has a finite loss but an infinite gradient; nothing of it may be kept."""
    proc = run("train", "tiny.yaml", "train.out_dir=runs/nan", "train.lr=1e24", "train.warmup_steps=8",
               "train.save_every=1", cwd=workdir)
    line = user_facing(proc, 1)
    assert re.fullmatch(r"error: gradient is not finite at step 2 \(loss [0-9.]+\), the update was not applied; "
                        r"last good checkpoint: runs/nan/checkpoints/step_0000001", line), line
    run_dir = workdir / "runs" / "nan"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000001"]
    assert all(torch.isfinite(t).all() for t in load_weights(run_dir / "checkpoints" / "step_0000001").values())
    assert [r["step"] for r in strict_json_lines(run_dir / "metrics.jsonl")] == [1]


def test_save_that_cannot_write_stops_with_one_line(workdir):
    """A full disk, as the OS reports it: every file the process writes is capped at 16 KiB
    (RLIMIT_FSIZE; the weights are larger), so the first save fails mid-write. Training stops
    with one line instead of a traceback or training on unsaved, and nothing half-written is left."""
    capped = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)); sys.argv[0] = 'llm'; "
              "runpy.run_module('llm', run_name='__main__')")
    proc = run("train", "tiny.yaml", "train.out_dir=runs/full", "train.save_every=2", "log.wandb=disabled",
               cwd=workdir, launcher=(sys.executable, "-c", capped))
    line = user_facing(proc, 1)
    # DeepSpeed's torch.save hits the cap first: its C++ writer reports it without an errno.
    assert re.fullmatch(r"error: could not save the checkpoint of step 2 \(torch.save could not write \(.+\): is the "
                        r"disk full\?\); nothing was published; no checkpoint saved yet", line), line
    checkpoints = workdir / "runs" / "full" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []
    assert [r["step"] for r in strict_json_lines(workdir / "runs" / "full" / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_exact(workdir, straight):
    """SIGTERM mid-run: finish the step, save, exit 0. Then the run directory is damaged as
    preemptions and kills leave it: `latest` gone, a torn last metrics line, a half-written
    save (kill -9), a half-done prune, and a newer checkpoint with a truncated engine file.
    The same command skips the damaged checkpoint with one warning, resumes from the SIGTERM
    checkpoint and repeats the uninterrupted run exactly."""
    run_dir = workdir / "runs" / "sig"
    proc = start("train", "tiny.yaml", "train.out_dir=runs/sig", "train.save_every=100", cwd=workdir)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    line = user_facing(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 0)
    assert "SIGTERM received" in err
    match = re.search(r"stopped at step (\d+)/8 \(SIGTERM\); saved (\S+); run the same command to continue", err)
    assert match and int(match.group(1)) < STEPS, err
    stopped = int(match.group(1))
    assert match.group(2) == f"runs/sig/checkpoints/step_{stopped:07d}" and verify(workdir / match.group(2)) is None
    assert line.startswith("done: step")

    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest").unlink()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.')  # a kill in the middle of a write
    (checkpoints / f"step_{stopped + 1:07d}.tmp" / "engine").mkdir(parents=True)  # kill -9 during a save
    (checkpoints / "step_0000000.trash").mkdir()  # kill -9 during a prune
    shutil.copytree(straight / "checkpoints" / "step_0000008", checkpoints / "step_0000008")
    truncate(checkpoints / "step_0000008" / ENGINE_FILE.format(8))
    proc = ok(run("train", "tiny.yaml", "train.out_dir=runs/sig", "train.save_every=100", cwd=workdir))
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipping")]
    assert len(warning) == 1 and "step_0000008" in warning[0] and "mp_rank_00_model_states.pt has" in warning[0]
    assert f"resuming from runs/sig/checkpoints/step_{stopped:07d} at step {stopped}" in proc.stderr
    assert "dropping an unreadable line" in proc.stderr
    full, resumed = train_losses(straight), train_losses(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), (s, resumed[s], full[s])
    strict_json_lines(run_dir / "metrics.jsonl")
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(["latest", f"step_{stopped:07d}", "step_0000008"])
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{stopped:07d}", "step_0000008"]  # redone
    assert_same_weights(checkpoints / "step_0000008", straight / "checkpoints" / "step_0000008")


class _Touch:
    """Unpickling this creates a directory: what a crafted checkpoint would do with a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.slow
def test_crafted_pickle_in_engine_files_never_runs(workdir, straight, tmp_path):
    from llm.checkpoint import weights_only_engine_class

    run_dir = copy_run(straight, "crafted")
    ckpt = run_dir / "checkpoints" / "step_0000008"
    marker = tmp_path / "pwned"
    torch.save({"module": _Touch(marker)}, ckpt / ENGINE_FILE.format(8))
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the attacker fixes the sizes too
    manifest["files"][ENGINE_FILE.format(8)] = (ckpt / ENGINE_FILE.format(8)).stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        weights_only_engine_class()().load(str(ckpt / ENGINE_FILE.format(8)))
    assert not marker.exists()
    proc = run("train", "tiny.yaml", "train.out_dir=runs/crafted", "train.max_steps=9", cwd=workdir)
    line = user_facing(proc, 2)
    assert line.startswith(f"error: runs/crafted/checkpoints/step_0000008/{ENGINE_FILE.format(8)} cannot be loaded "
                           f"safely"), line
    assert not marker.exists()
    torch.load(ckpt / ENGINE_FILE.format(8), weights_only=False)  # the oracle: the file is a working attack
    assert marker.exists()


def test_weights_only_loading_refuses_an_unknown_checkpoint_engine():
    """The one DeepSpeed seam we touch: its torch checkpoint engine. Another engine type fails loudly."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from llm.checkpoint import CheckpointEngineChanged, use_weights_only_loading, weights_only_engine_class

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(None))
    use_weights_only_loading(engine)
    assert type(engine.checkpoint_engine) is weights_only_engine_class()
    assert engine.checkpoint_engine.zipfile_serialization is False  # its save settings are kept
    with pytest.raises(CheckpointEngineChanged, match="expected TorchCheckpointEngine"):
        use_weights_only_loading(SimpleNamespace(checkpoint_engine=object()))


@pytest.mark.slow
def test_time_limit_saves_and_stops(workdir):
    proc = run("train", "tiny.yaml", "train.out_dir=runs/limit", "train.max_steps=1000", "train.time_limit=1",
               cwd=workdir)
    user_facing(proc, 0)
    match = re.search(r"stopped at step (\d+)/1000 \(train.time_limit=1s\); saved (\S+);", proc.stderr)
    assert match, proc.stderr[-2000:]
    assert verify(workdir / match.group(2)) is None and match.group(2).endswith(f"step_{int(match.group(1)):07d}")


def test_second_signal_exits_at_once(tmp_path):
    """The first signal only raises the flag (a copy right after it is the same event); a
    second one later ends the process with 128 + signal."""
    script = ("import os, signal, time\n"
              "from llm.preemption import GracefulStop\n"
              "with GracefulStop(['SIGUSR1'], 0, time.monotonic()) as stop:\n"
              "    os.kill(os.getpid(), signal.SIGUSR1)\n"
              "    os.kill(os.getpid(), signal.SIGUSR1)\n"  # the same event, delivered twice
              "    print(stop.reason(), flush=True)\n"
              "    time.sleep(1.1)\n"
              "    os.kill(os.getpid(), signal.SIGUSR1)\n"
              "    time.sleep(30)\n"
              "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr
    assert proc.stdout == "SIGUSR1\n"
    assert "SIGUSR1 again: exiting now" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_are_strict_json(tmp_path):
    from llm.config import load_config
    from llm.monitor import Monitor

    cfg = load_config(None, ["log.wandb=disabled"])
    monitor = Monitor(cfg, tmp_path, start_step=0, fresh=True, flops_per_token=1.0, peak_flops=None, world=1,
                      enabled=True)
    monitor.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "aux": torch.tensor(-float("inf")), "lr": 0.5})
    monitor.close()
    assert strict_json_lines(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": "NaN", "grad_norm": "Infinity", "aux": "-Infinity", "lr": 0.5}]
    assert read_metrics(tmp_path)[0]["lr"] == 0.5
