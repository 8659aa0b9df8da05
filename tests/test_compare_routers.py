"""scripts/compare_routers.py end to end at a tiny step count: one row per run, runs that differ
only in the FFN, LapSum's budget invariant in the table, and a killed study that resumes to the
same numbers (finished runs skipped, a half-finished run continued from its checkpoint)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO, SAMPLE, env, make_corpus, ok

TINY = ["model.vocab_size=320", "model.d_model=64", "model.n_layers=2", "model.d_ff=128", "model.max_seq_len=64",
        "data.seq_len=32", "data.num_proc=1", "train.micro_batch_size=4", "train.warmup_steps=1",
        "train.eval_batches=2", "train.eval_every=1", "train.save_every=1", "log.every=1"]
CONFIGS = ["tiny-dense", "tiny-lapsum"]


def study(root: Path) -> subprocess.CompletedProcess:
    args = ["--corpus", str(root / "corpus.jsonl"), "--steps", "2", "--out", str(root / "study"),
            "--configs", *[str(REPO / "configs" / f"{c}.yaml") for c in CONFIGS],
            "--heldout", str(root / "held.txt"), "--tasks", "winogrande", "--limit", "2",
            "--eval-data", str(SAMPLE), "--set", *TINY, f"data.cache_dir={root / 'cache'}"]
    return subprocess.run([sys.executable, str(REPO / "scripts" / "compare_routers.py"), *args], cwd=root,
                          env=env(), capture_output=True, text=True, timeout=300)


def shared_settings(run_dir: Path) -> dict:
    """The run's saved config without what a study may vary: the FFN, names, places and logging."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"].pop("routing")
    for key in ("name", "log", "eval"):
        cfg.pop(key)
    cfg["train"].pop("out_dir")
    return cfg


def test_study_end_to_end_and_resume(tmp_path):
    make_corpus(tmp_path / "corpus.jsonl", n_docs=60)
    (tmp_path / "held.txt").write_text("The quiet rabbit visits the bright river. Never seen in training: ünïcode.\n")
    ok(study(tmp_path))
    out = tmp_path / "study"
    rows = json.loads((out / "results.json").read_text())
    assert [(r["config"], r["router"], r["budget"]) for r in rows] == [("tiny-dense", "dense", None),
                                                                       ("tiny-lapsum", "lapsum", "learned")]
    for r in rows:
        assert r["val_loss"] > 0 and r["tokens_per_s"] > 0 and 0 < r["heldout"]["held.txt"]["bits_per_byte"] < 20
        assert 0 <= r["accuracy"]["winogrande"] <= 1 and r["active_params"] <= r["total_params"]
    dense, lapsum = rows
    assert dense["active_experts"] is None and 1 <= lapsum["active_experts"] <= 3
    assert abs(sum(lapsum["k_per_layer"]) - 1.5 * 2) < 1e-9  # Σ k_l = K = k̄ · L, as the budget guarantees
    runs = {c: out / "runs" / f"{c}-s0" for c in CONFIGS}
    assert shared_settings(runs["tiny-dense"]) == shared_settings(runs["tiny-lapsum"])
    table = (out / "results.md").read_text()
    assert all(f"| {c} |" in table for c in CONFIGS) and (out / "loss.png").is_file() and (out / "budget.png").is_file()

    # Kill-like state: the LapSum run lost its row and its last checkpoint; the dense run is done.
    ckpts = runs["tiny-lapsum"] / "checkpoints"
    (runs["tiny-lapsum"] / "row.json").unlink()
    shutil.rmtree(ckpts / "step_0000002")
    (ckpts / "latest").write_text("step_0000001")
    dense_row = (runs["tiny-dense"] / "row.json").stat().st_mtime_ns
    proc = ok(study(tmp_path))
    assert "tiny-dense-s0: done before, skipped" in proc.stderr
    assert "resuming from" in proc.stderr and "at step 1" in proc.stderr
    assert (runs["tiny-dense"] / "row.json").stat().st_mtime_ns == dense_row
    again = json.loads((out / "results.json").read_text())
    for key in ("train_loss", "val_loss", "k_per_layer", "heldout", "active_experts"):
        assert again[1][key] == lapsum[key], key  # resuming is exact


def test_configs_that_differ_outside_the_ffn_or_from_an_earlier_start_are_refused(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_routers", REPO / "scripts" / "compare_routers.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up
    spec.loader.exec_module(script)
    other = yaml.safe_load((REPO / "configs" / "tiny-topk.yaml").read_text())
    other["train"]["lr"] = 1.0e-3
    (tmp_path / "tiny-topk-lr.yaml").write_text(yaml.safe_dump(other))
    argv = ["--corpus", "corpus.jsonl", "--steps", "2", "--out", str(tmp_path / "study"), "--tasks", "",
            "--configs", str(REPO / "configs" / "tiny-dense.yaml"), str(tmp_path / "tiny-topk-lr.yaml")]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tiny-topk-lr and tiny-dense differ in train.lr (0.001 vs 0.003)"), err
    assert "\n" not in err and not (tmp_path / "study").exists()

    # A run directory left by a study with another step count is refused, not skipped or extended.
    from llm.config import save_config

    argv = ["--corpus", "corpus.jsonl", "--steps", "2", "--out", str(tmp_path / "study"), "--tasks", "",
            "--configs", str(REPO / "configs" / "tiny-dense.yaml")]
    (earlier,) = script.plan(script.parse(argv))
    earlier.cfg.train.max_steps = 5
    run_dir = earlier.dir
    run_dir.mkdir(parents=True)
    save_config(earlier.cfg, run_dir / "config.yaml")
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run_dir} was started with train.max_steps=5, this study has 2"), err
