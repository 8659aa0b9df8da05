"""DeepSpeed's checkpoint files read with weights-only unpickling: the one DeepSpeed internal
that checkpointing touches, behind a check that fails when DeepSpeed changes it."""
from __future__ import annotations

import functools

import torch

from llm.checkpoint.layout import CheckpointError, first_line


class CheckpointEngineChanged(RuntimeError):
    """The installed DeepSpeed no longer reads its files through the seam we secure."""


def use_weights_only_loading(engine) -> None:
    """Make `engine.load_checkpoint` read its files with weights-only unpickling.

    DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, so a
    crafted file under `engine/` would run code on resume. Every file DeepSpeed reads
    while resuming goes through `engine.checkpoint_engine.load`: this is the one place we
    touch a DeepSpeed internal, and it refuses to run on a DeepSpeed whose seam differs.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    safe_class = weights_only_engine_class()
    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is safe_class:
        return
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointEngineChanged(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}, expected TorchCheckpointEngine: "
            f"resuming would load its files without weights-only unpickling")
    safe = safe_class.__new__(safe_class)
    safe.__dict__.update(current.__dict__)  # same save settings; only `load` differs
    engine.checkpoint_engine = safe


@functools.cache
def weights_only_engine_class() -> type:
    """Built on first use, so that reading a checkpoint's weights does not import DeepSpeed."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, reading with `torch.load(weights_only=True)`."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except FileNotFoundError:
                    raise CheckpointError(f"{path} not found") from None
                except Exception as err:  # a refused global, truncation, foreign bytes: never run it
                    raise CheckpointError(f"{path} cannot be loaded safely: {first_line(err)}") from None

    return WeightsOnlyCheckpointEngine


def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoint files (ZeRO stage enum,
    loss scaler, partition addresses): plain data, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
