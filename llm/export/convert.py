"""`llm export CHECKPOINT OUT_DIR`: a checkpoint as a Hugging Face model directory.

    OUT_DIR/
      config.json                   native (llama, mixtral) or llm_routed with auto_map
      model.safetensors             or model-0000i-of-0000n.safetensors + model.safetensors.index.json
      generation_config.json        BOS/EOS/PAD ids, greedy by default
      tokenizer.json, tokenizer_config.json
      modeling_routed.py            only for llm_routed: the model code (torch + transformers only),
                                    with a router plug-in's FFN appended (llm.export.modeling)

The directory is written next to OUT_DIR and renamed into place when complete. Weights
are written in fp32, as the checkpoint holds them.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.checkpoint import load_model
from llm.export.layers import ExportError, LayerExport, export_layers
from llm.export.modeling import MODELING_FILE, modeling_source
from llm.export.native import native_architecture, native_config, native_tensors
from llm.export.tokenizer import export_tokenizer, special_ids
from llm.routing import registry

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


@dataclass
class ExportSummary:
    out_dir: Path
    architecture: str  # LlamaForCausalLM, MixtralForCausalLM or RoutedForCausalLM
    weight_bytes: int
    shards: int
    seconds: float


def routed_config(cfg, layers: list[LayerExport]) -> dict:
    """config.json of the exported modeling code (`modeling_routed.RoutedConfig`)."""
    return {
        "model_type": "llm_routed",
        "architectures": ["RoutedForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_routed.RoutedConfig",
                     "AutoModelForCausalLM": "modeling_routed.RoutedForCausalLM"},
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "ffn_layers": [layer.spec for layer in layers],
    }


def routed_tensors(model, layers: list[LayerExport]) -> dict[str, torch.Tensor]:
    """Our own parameter names: the exported modeling code mirrors the model's modules."""
    out = {"embed.weight": model.embed.weight, "norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, (block, layer) in enumerate(zip(model.blocks, layers)):
        for name, p in block.named_parameters():
            if not name.startswith("ffn."):
                out[f"blocks.{i}.{name}"] = p
        out.update({f"blocks.{i}.ffn.{name}": t for name, t in layer.tensors.items()})
    return {name: t.detach().contiguous() for name, t in out.items()}


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> int:
    """model.safetensors, or shards of at most max_shard_bytes (a larger tensor gets one alone) and an index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return 1
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return len(shards)


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty: choose another OUT_DIR or pass --force to replace it")


def export(checkpoint: str | Path, out_dir: str | Path, force: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """Write the Hugging Face model directory of a checkpoint (or a run's latest)."""
    started = time.perf_counter()
    out = Path(out_dir)
    check_out_dir(out, force)
    loaded = load_model(checkpoint)
    model, cfg = loaded.model, loaded.config.model
    layers = export_layers(model, cfg)
    arch = native_architecture(cfg)
    if arch is None:
        config, tensors = routed_config(cfg, layers), routed_tensors(model, layers)
        modeling = modeling_source(cfg.routing.router, registry.get(cfg.routing.router).export_code)
    else:
        config, tensors = native_config(cfg, arch), native_tensors(model, layers, arch)
        modeling = None  # transformers ships the model code
    ids = special_ids(loaded.tokenizer)
    config.update(ids, dtype="float32", use_cache=True)

    stage = out.with_name(out.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        shards = write_weights(tensors, stage, max_shard_bytes)
        (stage / "config.json").write_text(json.dumps(config, indent=2))
        (stage / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}, indent=2))
        export_tokenizer(loaded.tokenizer, stage)
        if modeling is not None:
            (stage / MODELING_FILE.name).write_text(modeling)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
    summary = ExportSummary(out, config["architectures"][0], sum(t.numel() * t.element_size() for t in tensors.values()),
                            shards, time.perf_counter() - started)
    log.info("exported %s (step %d) as %s: %.1f MB in %d file(s), %.1f s -> %s", loaded.path, loaded.step,
             summary.architecture, summary.weight_bytes / 1e6, shards, summary.seconds, out)
    return summary
