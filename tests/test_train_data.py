"""`llm train` meets its data: a multi-rank launch on unprepared data, damaged shards at start.

Real launchers and subprocesses, as a user runs them; the data is the tiny corpus of tests/helpers.py.
"""
from __future__ import annotations

import logging
import sys
import time

from llm.config import load_config
from llm.data import data_dir, is_prepared, prepare, read_manifest
from tests.helpers import run, write_tiny_run


def test_multi_rank_launch_on_unprepared_data_stops_at_once(tmp_path):
    config = write_tiny_run(tmp_path, n_docs=40, max_steps=2)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "llm")
    t0 = time.time()
    proc = run("train", "tiny.yaml", "train.seed=7", cwd=tmp_path, launcher=torchrun, timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 180  # not a collective timeout (10 minutes)
    for rank in (0, 1):
        expected = (f"error: [rank {rank}] the data is not prepared ({data_dir(load_config(config))} is incomplete) "
                    f"and 2 ranks do not tokenize: run `llm prepare tiny.yaml train.seed=7` once before launching")
        assert expected in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the user-error status
    assert "/llm/" not in proc.stderr  # no traceback through our code (torchrun prints its own summary)
    assert not is_prepared(load_config(config))


def test_training_start_checks_shards_against_manifest(tmp_path):
    config = write_tiny_run(tmp_path, n_docs=40, max_steps=2)
    path = prepare(load_config(config))
    shard = path / read_manifest(path)["shards"]["val"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-4])
    proc = run("train", "tiny.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {shard}: ") and "truncated" in last and "Traceback" not in proc.stderr


def test_a_run_that_repeats_its_data_warns(caplog):
    from llm.train import _warn_repeats

    with caplog.at_level(logging.WARNING, logger="llm"):
        _warn_repeats(1000, 1000)
        assert not caplog.records
        _warn_repeats(2500, 1000)
    assert "reads 2,500 tokens, 2.5 epochs of the 1,000 training tokens: the data repeats" in caplog.text
