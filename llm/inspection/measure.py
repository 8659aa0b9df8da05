"""Measuring a checkpoint: its routed layers on fixed batches of its own data."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch

from llm.checkpoint import CheckpointError, is_checkpoint_dir, list_checkpoints, load_model, resolve
from llm.inspection.report import MERGE, SELECT
from llm.inspection.statistics import RoutingTally
from llm.routing import registry

if TYPE_CHECKING:
    from llm.config import Config


def global_budget(cfg: "Config") -> Optional[float]:
    """K: Σ_l k_l over the routed layers (k̄ · L for LapSum, top_k · L for top-k); None for SMEAR."""
    spec = registry.get(cfg.model.routing.router)
    if not spec.selects_experts:
        return None
    return float(spec.active_experts(cfg.model) * len(cfg.model.routed_layers()))


def layer_kind(cfg: "Config") -> str:
    """`select` when each token runs a few chosen experts, `merge` when the layers merge them all."""
    return SELECT if registry.get(cfg.model.routing.router).selects_experts else MERGE


def check_routed(cfg: "Config", where: Path) -> None:
    router = cfg.model.routing.router
    if not cfg.model.routing.routed:
        routed = [name for name in registry.names() if registry.get(name).routed]
        raise CheckpointError(f"{where}: model.routing.router is {router}, a model without routed layers; "
                              f"llm inspect needs a routed checkpoint ({', '.join(routed)})")


def data_batches(cfg: "Config", ckpt: Path, split: str, n: int) -> tuple[Path, list[torch.Tensor]]:
    """`n` fixed batches (inputs [B, T]) of `split` from the data checkpoint `ckpt` (config `cfg`) names."""
    from llm.data import DataError, TokenLoader, data_dir, is_prepared

    try:
        directory = data_dir(cfg)
        ready = is_prepared(cfg)
    except DataError as err:  # e.g. the corpus files are not on this machine
        raise DataError(f"cannot locate the data of {ckpt}: {err}") from None
    if not ready:
        raise DataError(f"the data of {ckpt} is not prepared: expected {directory} "
                        f"(data.corpus={cfg.data.corpus}, data.cache_dir={cfg.data.cache_dir}); "
                        f"run `llm prepare {ckpt / 'config.yaml'}`")
    loader = TokenLoader(directory, split, cfg.data.seq_len, cfg.train.micro_batch_size)
    return directory, [inputs for inputs, _ in loader.val_batches(n)]


@torch.no_grad()
def measure(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> RoutingTally:
    """Run `batches` through `model` and tally every routed layer's stats after each forward."""
    ffns = model.routed_ffns()
    tally = RoutingTally(sorted(model.route_index))
    device = next(model.parameters()).device
    for inputs in batches:
        model(inputs.to(device))
        for j, ffn in enumerate(ffns):
            tally.add(j, ffn.stats)
    return tally


def inspect_checkpoint(path: str | Path, split: str = "val", batches: Optional[int] = None,
                       device: Optional[str] = None) -> dict[str, Any]:
    """The routing report of one checkpoint (a dict; README.md "Inspecting routing" has the schema)."""
    from llm.config import load_saved_config

    ckpt = resolve(path)
    cfg = load_saved_config(ckpt / "config.yaml")
    check_routed(cfg, ckpt)  # both checks before building the model
    directory, inputs = data_batches(cfg, ckpt, split, batches or cfg.train.eval_batches)
    loaded = load_model(ckpt, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    r = cfg.model.routing
    if registry.get(r.router).needs_process_group:
        from llm.parallel import init_distributed

        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints; stdout is the report
            init_distributed()  # its MoE layer needs a process group, even a world of 1
    tally = measure(loaded.model, inputs)
    K = global_budget(cfg)
    rows = tally.rows(K)
    model = loaded.model
    if model.budget is not None:  # the learned budget itself, in float64, not the stats' copy
        for row, k in zip(rows, model.budget().tolist()):
            row["k"], row["k_share"] = k, k / K
    return {
        "checkpoint": str(ckpt),
        "step": loaded.step,
        "router": r.router,
        "kind": layer_kind(cfg),
        "K": K,
        "k_mean": K / len(rows) if K is not None else None,
        "budget": getattr(r.options, "budget", None),
        "n_experts": r.n_experts,
        "capacity_factor": registry.get(r.router).capacity(cfg.model),
        "data": split,
        "data_dir": str(directory),
        "batches": len(inputs),
        "tokens": int(sum(x.numel() for x in inputs)),
        "layers": rows,
    }


def run_checkpoints(run_or_ckpt: str | Path) -> list[Path]:
    """Every complete checkpoint of a run, oldest first (given the run or one of its checkpoints)."""
    path = Path(run_or_ckpt)
    run = path.parent.parent if is_checkpoint_dir(path) and path.parent.name == "checkpoints" else path
    ckpts = list_checkpoints(run)
    if not ckpts:
        raise CheckpointError(f"{path}: no checkpoints found under {run / 'checkpoints'} (--over-time needs a run "
                              f"directory)")
    return ckpts
