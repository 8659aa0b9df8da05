"""`llm inspect`: measure, print, plot."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from llm.config import ConfigError
from llm.inspection.measure import inspect_checkpoint, run_checkpoints
from llm.inspection.plots import figures, plot_over_time, save_figures
from llm.inspection.report import format_over_time, format_report, to_json

log = logging.getLogger("llm")


def run_inspect(path: str, data: str = "val", batches: Optional[int] = None, as_json: bool = False,
                plot_dir: Optional[str] = None, over_time: bool = False) -> None:
    """`llm inspect`: print the table (or JSON) and draw the plots."""
    if batches is not None and batches < 1:
        raise ConfigError(f"--batches {batches}: expected a positive number of batches")
    if plot_dir and Path(plot_dir).exists() and not Path(plot_dir).is_dir():
        raise ConfigError(f"--plot {plot_dir}: is a file; expected a directory to write the PNG figures into")
    if over_time:
        ckpts = run_checkpoints(path)
        reports = []
        for i, ckpt in enumerate(ckpts):
            log.info("inspecting %s (%d/%d)", ckpt, i + 1, len(ckpts))
            reports.append(inspect_checkpoint(ckpt, data, batches))
        if as_json:
            print(to_json({"run": str(Path(ckpts[0]).parent.parent), "router": reports[0]["router"],
                           "K": reports[0]["K"], "checkpoints": reports}))
        else:
            print(format_over_time(reports))
            print()
            print(format_report(reports[-1]))
        if plot_dir:
            figs = {"over_time": plot_over_time(reports), **figures(reports[-1])}
            for p in save_figures(figs, plot_dir):
                log.info("wrote %s", p)
        return
    report = inspect_checkpoint(path, data, batches)
    print(to_json(report) if as_json else format_report(report))
    if plot_dir:
        for p in save_figures(figures(report), plot_dir):
            log.info("wrote %s", p)
