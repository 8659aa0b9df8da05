"""scripts/bench_train.py at a tiny size, in its own process (it joins a process group)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, env


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_train.py"), "--routers", "dense", "lapsum",
         "--variants", "bare", "trainer", "ckpt full", "--d-model", "16", "--layers", "2", "--heads", "2",
         "--vocab", "64", "--batch", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--loss-chunk", "8",
         "--set", "train.grad_clip=0.05", "--json", str(out)],  # a clip that binds at every step
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["router"], r["variant"]) for r in rows] == [
        (router, v) for router in ("dense", "lapsum") for v in ("bare", "trainer", "ckpt full")]
    for router in ("dense", "lapsum"):
        bare, trainer, ckpt = (r for r in rows if r["router"] == router)
        # Same weights and batches: on one process the DeepSpeed step (clipping included) trains
        # bit for bit as the bare loop of torch's AdamW and clip_grad_norm_.
        assert trainer["first_loss"] == bare["first_loss"]
        assert trainer["last_loss"] == bare["last_loss"] and trainer["last_loss"] != trainer["first_loss"]
        assert ckpt["last_loss"] == trainer["last_loss"]
        assert trainer["vs_trainer"] == 1.0 and all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)


def test_bench_train_bad_override_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_train.py"), "--set", "train.grad_clip=-1"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: train.grad_clip"), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_gpu_check_script_parses_and_lists_its_parts(tmp_path):
    script = REPO / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--dry-run"], cwd=REPO, env={**env(), "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    parts = [line.split(":")[0][3:] for line in proc.stdout.splitlines() if line.startswith("== ")]
    models = ("dense", "topk2", "lapsum", "smear")
    assert parts == ["install", "device", *(f"train_{m}" for m in models), "cuda_tests", "routing", "smear_bf16"]
    for model in models:
        assert (REPO / "configs" / f"gpt-125m-{model}.yaml").is_file() and f"gpt-125m-{model}.yaml" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # a dry run runs nothing

    # The two calls that fit a device session: the training figures first, then tests and kernels.
    def dry(*groups: str) -> list[str]:
        out = subprocess.run(["bash", str(script), "--dry-run", *groups], cwd=REPO, env={**env(), "OUT": str(tmp_path)},
                             capture_output=True, text=True, timeout=60).stdout
        return [line.split(":")[0][3:] for line in out.splitlines() if line.startswith("== ")]

    assert dry("train") == ["install", "device", *(f"train_{m}" for m in models)]
    assert dry("tests", "bench") == ["install", "device", "cuda_tests", "routing", "smear_bf16"]
    bad = subprocess.run(["bash", str(script), "--dry-run", "everything"], cwd=REPO, env={**env(), "OUT": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown part 'everything'")
