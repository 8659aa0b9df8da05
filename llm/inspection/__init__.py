"""Where a routed model spends its experts: per-layer routing statistics (`llm inspect`).

One set of numbers per routed layer, used three ways:

- `llm inspect CHECKPOINT`: run the checkpoint on fixed batches of its own prepared data
  and print, per routed layer, the budget k_l and its share of the global budget K, how
  many experts tokens really computed (mean, p50, p90), how evenly the experts were
  loaded, the fraction of token-slots dropped by capacity and the router entropy; for
  SMEAR the mean merge weight of each expert instead. `--json` prints the same report
  (schema in README.md, "Inspecting routing"); `--plot DIR` draws it; `RUN_DIR
  --over-time` does it for every checkpoint of a run.
- `RoutingStatsCallback`: the same numbers during training, every `log.routing_every`
  steps, from the forwards the trainer runs anyway (no extra forward pass).
- The report is a plain dict, so the plots can be redrawn from saved JSON.

Statistics over many batches and ranks are built from the raw counts every routed layer
reports (`RoutingStats`, docs/routing.md#statistics): `RoutingTally` sums them, all-reduces
once and divides once at the end (`layer_row`). So p90, load CV and the dropped fraction are
those of all the tokens seen, not averages of per-batch values.

One module per job: `statistics` (the tally), `measure` (a checkpoint on its data),
`report` (text, JSON), `plots`, `command` (`llm inspect`), `callback` (during training).

This package is `inspection`, not `inspect`: a module named inspect in llm/ shadows the
standard library's `inspect` for anything that runs with llm/ on sys.path (e.g.
`python llm/cli.py`, or an IDE running one file), and torch cannot even be imported then.
"""
from llm.inspection.callback import RoutingStatsCallback
from llm.inspection.command import run_inspect
from llm.inspection.measure import inspect_checkpoint, run_checkpoints
from llm.inspection.plots import (
    figures,
    plot_active_histograms,
    plot_budget,
    plot_load_heatmap,
    plot_merge_weights,
    plot_over_time,
)
from llm.inspection.report import format_over_time, format_report, to_json

__all__ = ["RoutingStatsCallback", "figures", "format_over_time", "format_report", "inspect_checkpoint",
           "plot_active_histograms", "plot_budget", "plot_load_heatmap", "plot_merge_weights", "plot_over_time",
           "run_checkpoints", "run_inspect", "to_json"]
