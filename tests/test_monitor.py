"""llm.monitor and the trainer's callback protocol: metrics.jsonl is strict JSON (non-finite
values included), a resumed run drops torn and later lines, MFU against a hand computation,
and the order in which the trainer calls validation, user callbacks and the checkpointer."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from llm.config import Config, LogConfig, ModelConfig
from llm.model import flops_per_token
from llm.monitor import METRICS, Monitor, peak_flops, read_metrics
from tests.helpers import ok, run, strict_json_lines, write_tiny_run


def monitor(run_dir: Path, start_step: int = 0, fresh: bool = True, peak: float | None = None, world: int = 1,
            flops: float = 1.0, enabled: bool = True) -> Monitor:
    cfg = Config(log=LogConfig(wandb="disabled"))
    return Monitor(cfg, run_dir, start_step=start_step, fresh=fresh, flops_per_token=flops, peak_flops=peak,
                   world=world, enabled=enabled)


def test_metrics_are_strict_json_with_non_finite_values_as_strings(tmp_path):
    m = monitor(tmp_path)
    m.log(1, {"loss": torch.tensor(2.5), "grad_norm": float("nan"), "up": float("inf"), "down": float("-inf"),
              "tokens": 256})
    m.log(2, {"val_loss": 1.25})
    m.close()
    assert strict_json_lines(tmp_path / METRICS) == [
        {"step": 1, "loss": 2.5, "grad_norm": "NaN", "up": "Infinity", "down": "-Infinity", "tokens": 256},
        {"step": 2, "val_loss": 1.25}]
    assert read_metrics(tmp_path) == strict_json_lines(tmp_path / METRICS)


def test_only_an_enabled_monitor_writes(tmp_path):
    m = monitor(tmp_path, enabled=False)
    m.log(1, {"loss": 1.0})
    m.close()
    assert not (tmp_path / METRICS).exists()


def test_resuming_drops_torn_and_later_lines_and_a_fresh_start_keeps_the_old_file(tmp_path, caplog):
    lines = [json.dumps({"step": s, "loss": 10.0 - s}) for s in range(1, 6)]
    (tmp_path / METRICS).write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="llm"):
        m = monitor(tmp_path, start_step=3, fresh=False)
    assert "dropping an unreadable line" in caplog.text and '{"step": 6, "lo' in caplog.text
    m.log(4, {"loss": 0.5})
    m.close()
    assert strict_json_lines(tmp_path / METRICS) == [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0},
                                                {"step": 3, "loss": 7.0}, {"step": 4, "loss": 0.5}]

    before = (tmp_path / METRICS).read_text()
    monitor(tmp_path, fresh=True).close()
    kept = list(tmp_path.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == before
    assert (tmp_path / METRICS).read_text() == ""


def test_mfu_matches_a_hand_computation(tmp_path):
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    # By hand, per token and layer: attention projections 4·64·64 = 16384, SwiGLU 3·64·128 = 24576;
    # output head 64·320 = 20480; ×6 for forward and backward: 6·(2·16384 + 2·24576 + 20480) = 614400;
    # causal attention over 32 positions: 6·2·64·32 = 24576. Together 638976 FLOPs per token.
    assert flops_per_token(cfg, seq_len=32) == 638976
    m = monitor(tmp_path, peak=1e9, world=2, flops=638976)
    m.count(1000, 0.5)
    m.count(3000, 1.5)  # 4000 tokens in 2 s
    assert m.speed() == pytest.approx({"tokens_per_s": 2000.0, "mfu": 638976 * 2000 / 2e9})
    m.count(100, 1.0)  # the window restarts after each reading
    assert m.speed()["tokens_per_s"] == pytest.approx(100.0)
    m.close()
    assert "mfu" not in monitor(tmp_path, peak=None).speed()  # no peak known: no MFU
    assert peak_flops(Config(log=LogConfig(peak_tflops=312)), torch.device("cpu"), bf16=True) == 312e12
    assert peak_flops(Config(), torch.device("cpu"), bf16=True) is None


RECORDER = """
import json, os, signal, sys
from llm.config import load_config
from llm.monitor import Callback
from llm.train import Trainer

def last_checkpoint(trainer):
    return trainer.last_checkpoint.name if trainer.last_checkpoint else None

class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append(["start", trainer.step])

    def on_step(self, trainer, step, metrics):
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        self.events.append(["step", step, trainer.val_loss, last_checkpoint(trainer), json.loads(lines[-1])])
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, trainer, step):
        self.events.append(["end", step, trainer.stopping, last_checkpoint(trainer)])

    def on_train_end(self, trainer, summary):
        self.events.append(["train_end", summary["stopped"], summary["val_loss"], summary["checkpoint"]])

recorder = Recorder()
Trainer(load_config(sys.argv[1]), [recorder]).fit()
print(json.dumps(recorder.events))
"""


@pytest.mark.slow
def test_callback_order_validation_first_checkpointer_after_the_stop_decision(tmp_path):
    """Steps 1-3 of 4, validation and checkpoints every 2; a SIGTERM during step 3's callbacks."""
    write_tiny_run(tmp_path, n_docs=40, max_steps=4, eval_every=2, save_every=2)
    proc = ok(run("tiny.yaml", cwd=tmp_path, launcher=(sys.executable, "-c", RECORDER), timeout=240))
    events = json.loads(proc.stdout.strip().splitlines()[-1])
    records = read_metrics(tmp_path / "runs" / "tiny")
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert list(val) == [2]
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000002", "step_0000003"]
    train = {r["step"]: r for r in records if "loss" in r}
    assert events == [
        ["start", 0],
        ["step", 1, None, None, train[1]],
        ["end", 1, None, None],
        # validation has run and logged before the other callbacks see step 2; no save yet
        ["step", 2, val[2], None, {"step": 2, "val_loss": val[2]}],
        ["end", 2, None, None],  # the checkpointer saves after every other callback's on_step_end
        ["step", 3, val[2], "step_0000002", train[3]],
        ["end", 3, "SIGTERM", "step_0000002"],  # the stop is decided before on_step_end; saved after
        ["train_end", "SIGTERM", val[2], "runs/tiny/checkpoints/step_0000003"],  # out_dir as configured
    ]
    assert [r["step"] for r in records] == [1, 2, 2, 3]
