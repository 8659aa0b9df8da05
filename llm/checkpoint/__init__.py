"""Checkpoint layout, atomic publication, and loading a model from a checkpoint alone.

    RUN_DIR/
      config.yaml                 resolved config of the run
      checkpoints/
        latest                    name of the newest complete checkpoint
        step_0000100/
          model.safetensors       full model state dict; expert weights indexed by
                                  GLOBAL expert (w1 [E, d, f], ...), whatever ep_size trained it
                                  (checkpoints from before safetensors hold model.pt instead)
          config.yaml             resolved config (so the checkpoint alone rebuilds the model)
          tokenizer.model         the sentencepiece model
          trainer.json            step, data position, ep_size/world size at save time
          engine/                 DeepSpeed's own files (optimizer state, per rank) for exact resume
          manifest.json           every file above with its size, written last

A checkpoint is written into `step_N.tmp` and renamed into place only when complete,
so a crash mid-write never destroys the last good checkpoint. A checkpoint counts only
if it *verifies*: its manifest lists every file at its full size and trainer.json and
config.yaml read back. Resuming takes the newest checkpoint that verifies, whatever
`latest` says (`latest` is for people and scripts), and names every newer one it skipped.
Nothing here unpickles arbitrary objects: weights are safetensors, and DeepSpeed's files
are read with weights-only unpickling (`use_weights_only_loading`: tensors and a short list of DeepSpeed
types only).

Saving (`save`) and resuming (`resume_checkpoint`, `restore`) are collective: every rank
calls them. `load_model` needs nothing but the checkpoint directory.

    layout.py        names and paths in a run directory, trainer.json
    saving.py        staging, manifest, publication, pruning, leftovers
    selection.py     verification, the newest good checkpoint, resolving a path, train.resume
    weights.py       the model's own files: written, read back under today's names, `load_model`
    resuming.py      whether a checkpoint can resume this run, and restoring it
    weights_only.py  DeepSpeed's files read with weights-only unpickling
"""
from llm.checkpoint.layout import CheckpointError, is_checkpoint_dir
from llm.checkpoint.resuming import check_resumable, restore, restore_weights
from llm.checkpoint.saving import SaveFailed, remove_leftovers, save, set_aside
from llm.checkpoint.selection import list_checkpoints, newest_good, resolve, resume_checkpoint, verify
from llm.checkpoint.weights import load_model, load_weights, migrate_state, write_model_files
from llm.checkpoint.weights_only import CheckpointEngineChanged, use_weights_only_loading, weights_only_engine_class

__all__ = [
    "CheckpointEngineChanged", "CheckpointError", "check_resumable", "is_checkpoint_dir", "list_checkpoints",
    "load_model", "load_weights", "migrate_state", "newest_good", "remove_leftovers", "resolve", "restore",
    "restore_weights", "resume_checkpoint", "save", "SaveFailed", "set_aside", "use_weights_only_loading", "verify",
    "weights_only_engine_class", "write_model_files",
]
