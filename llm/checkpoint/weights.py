"""The files that rebuild a model on their own (weights, config, tokenizer, trainer.json):
writing them, reading the weights back under today's names, and `load_model`."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llm.checkpoint.layout import LEGACY_WEIGHTS, WEIGHTS, CheckpointError, first_line, weights_file
from llm.checkpoint.selection import resolve
from llm.config import Config, load_saved_config, save_config


def write_model_files(ckpt_dir: Path, state_dict: dict[str, torch.Tensor], cfg: Config,
                      tokenizer_path: str | Path, trainer_state: dict[str, Any]) -> None:
    """The parts of a checkpoint that rebuild the model on their own."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_weights(state_dict, ckpt_dir / WEIGHTS)
    save_config(cfg, ckpt_dir / "config.yaml")
    shutil.copyfile(tokenizer_path, ckpt_dir / "tokenizer.model")
    (ckpt_dir / "trainer.json").write_text(json.dumps(trainer_state, indent=2))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors stores each tensor once: a tied tensor (embedding = output head) is kept
    under its first name and the others are recorded as aliases in the metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in first and t.numel():
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The full state dict of a checkpoint (safetensors, or a legacy model.pt read weights-only)."""
    path = weights_file(ckpt)
    try:
        if path.name == LEGACY_WEIGHTS:
            return migrate_state(torch.load(path, map_location="cpu", weights_only=True))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {name: f.get_tensor(name) for name in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except Exception as err:  # truncated or foreign bytes: whatever the reader raises, the file is unusable
        raise CheckpointError(f"{path} is not readable: {first_line(err)}") from None
    for name, target in aliases.items():
        state[name] = state[target]
    return migrate_state(state)


# Buffers that checkpoints of earlier versions hold under another name: old suffix -> (new suffix, conversion).
# LapSum's τ controller counted whether τ had been calibrated (a bool) before it counted its updates.
_RENAMED_STATE = {".router.tau_calibrated": (".router.tau_updates", lambda t: t.long())}


def migrate_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A saved state dict of any earlier version under today's names (see `config.migrate_saved`)."""
    for old, (new, convert) in _RENAMED_STATE.items():
        for key in [k for k in state if k.endswith(old)]:
            state[key[:-len(old)] + new] = convert(state.pop(key))
    return state


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Any  # llm.data.Tokenizer
    config: Config
    path: Path
    step: int


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Loaded:
    """Rebuild the model, tokenizer and config from a checkpoint (or a run's latest)."""
    from llm.data import Tokenizer
    from llm.model import build_model

    ckpt = resolve(path)
    cfg = load_saved_config(ckpt / "config.yaml")
    model = build_model(cfg.model)
    state = load_weights(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file(ckpt)} does not match {ckpt / 'config.yaml'}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(ckpt / "tokenizer.model")
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise CheckpointError(f"{ckpt / 'tokenizer.model'} has {tokenizer.vocab_size} tokens, "
                              f"model.vocab_size is {cfg.model.vocab_size}")
    trainer = json.loads((ckpt / "trainer.json").read_text()) if (ckpt / "trainer.json").is_file() else {}
    return Loaded(model, tokenizer, cfg, ckpt, int(trainer.get("step", 0)))
