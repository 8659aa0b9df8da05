"""The trainer's own callbacks, one module each: validation loss and checkpointing.

`Trainer` always runs them, around the callbacks it is given: `Validation` first (so a
step's val_loss is logged before other callbacks log theirs), `Checkpointer` last (it saves
in `on_step_end`, after the ranks have agreed whether to stop).
"""
from llm.callbacks.checkpointer import Checkpointer
from llm.callbacks.validation import Validation

__all__ = ["Checkpointer", "Validation"]
