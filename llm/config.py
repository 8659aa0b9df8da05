"""The experiment schema: typed dataclasses, loaded from YAML with dotted overrides.

One experiment is one `Config` tree. YAML files in `configs/` set some of its fields;
`key.path=value` arguments on the command line override them. Every key and type is
checked against the dataclasses, and every error is one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_ROUTER = "dense"  # the baseline without routed layers (llm/routing/dense.py)


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key."""


class RouterOptions:
    """Base of a router's own section, `model.routing.<router>` (a dataclass in the router's module).

    `flat_names` maps the keys that checkpoints from before the sections (all routing keys
    flat under model.routing) used for this section's fields, where the name changed.
    """

    flat_names: typing.ClassVar[dict[str, str]] = {}

    def validate(self, model: "ModelConfig", key: str) -> None:
        """Check the section against the model (`key` is model.routing.<router>)."""

    def validate_seq_len(self, seq_len: int, key: str) -> None:
        """Check the section against the training sequence length (data.seq_len)."""


@dataclass
class RoutingConfig:
    """Which FFN each block gets (docs/routing.md#router-contract): `router` names a registered
    router (`llm.routing.registry`); the keys here are shared by every router, the router's own
    options are its section `model.routing.<router>` (`options`). `router: dense` means no routing."""

    router: str = DEFAULT_ROUTER
    n_experts: int = 8
    d_expert: int = 0  # hidden size of one expert; 0 = model.d_ff
    every: int = 1  # route every n-th block (blocks every-1, 2*every-1, ...), dense elsewhere
    capacity_factor: Optional[float] = None  # the dispatcher's expert capacity; None = dropless
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    options: Optional[RouterOptions] = None  # model.routing.<router>; None = the section's defaults

    def __post_init__(self) -> None:
        if self.options is None:
            section = _router_section(self.router)
            self.options = section() if section is not None else None

    @classmethod
    def build(cls, router: str, **keys: Any) -> "RoutingConfig":
        """A routing config from shared keys and the router's own, in one call (tests, scripts)."""
        return _build_routing(routing_section(router, **keys), "model.routing.")

    @property
    def routed(self) -> bool:
        """False for the dense baseline: no block is routed."""
        from llm.routing import registry

        return registry.get(self.router).routed

    @property
    def section_key(self) -> str:
        return f"model.routing.{self.router}"

    def validate(self, model: "ModelConfig") -> None:
        from llm.routing import registry

        _choice("model.routing.router", self.router, registry.names())
        if not self.routed:
            return
        _positive("model.routing.n_experts", self.n_experts)
        _positive("model.routing.every", self.every)
        if self.d_expert < 0:
            raise ConfigError(f"model.routing.d_expert={self.d_expert}: expected >= 0 "
                              f"(0 means model.d_ff={model.d_ff})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"model.routing.capacity_factor={self.capacity_factor}: expected > 0, or null for dropless")
        if self.options is not None:
            self.options.validate(model, self.section_key)


def routing_section(router: str, **keys: Any) -> dict[str, Any]:
    """model.routing as YAML holds it, from shared keys and the router's own mixed: the latter
    go into the section `<router>` (a key named `<router>` may also hold some of them)."""
    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"router", "options"}
    own = {**keys.pop(router, {}), **{k: v for k, v in keys.items() if k not in shared}}
    raw = {"router": router, **{k: v for k, v in keys.items() if k in shared}}
    return {**raw, router: own} if own else raw


def _router_section(router: str) -> Optional[type]:
    """The dataclass of `router`'s own section, or None (no options, or not a registered router)."""
    from llm.routing import registry

    try:
        return registry.get(router).options
    except KeyError:
        return None


@dataclass
class ModelConfig:
    vocab_size: int = 8000  # also the size of the sentencepiece tokenizer `llm prepare` trains
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: str = "sdpa"  # sdpa | flash (flash-attn 2; needs CUDA and the `flash` extra)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def validate(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model/model.n_heads={self.d_model // self.n_heads}: RoPE needs an even head size")
        _choice("model.attention", self.attention, ("sdpa", "flash"))
        self.routing.validate(self)

    def routed_layers(self) -> list[int]:
        """Indices of the blocks whose FFN is routed."""
        if not self.routing.routed:
            return []
        every = self.routing.every
        return [i for i in range(self.n_layers) if (i + 1) % every == 0]


@dataclass
class DataConfig:
    # Local files (.txt, .jsonl/.json, .parquet; globs allowed, .gz fine) or a hub dataset as "hf:NAME[:CONFIG]".
    corpus: list[str] = field(default_factory=lambda: ["data/sample/*.jsonl.gz"])
    text_field: str = "text"
    hub_split: str = "train"  # hub datasets are streamed, never downloaded whole
    max_documents: int = 0  # per corpus entry (split evenly over its files / stream shards); 0 = all
    max_tokens: int = 0  # token budget over all entries, shared per data.weights; 0 = all
    weights: list[float] = field(default_factory=list)  # mixture: one per corpus entry (needs max_tokens)
    tokenizer: str = ""  # an existing sentencepiece .model; empty = train one on the corpus
    tokenizer_sample_chars: int = 20_000_000  # text fed to sentencepiece training
    cache_dir: str = "data/cache"  # tokenizer + shards go to cache_dir/<fingerprint of corpus and tokenizer>
    seq_len: int = 128
    val_fraction: float = 0.02  # held out by whole documents
    num_proc: int = 2  # worker processes of `llm prepare`, each tokenizing one file / stream shard at a time

    def validate(self) -> None:
        if not self.corpus:
            raise ConfigError("data.corpus is empty: expected at least one file, glob or hf:NAME")
        _positive("data.seq_len", self.seq_len)
        _positive("data.num_proc", self.num_proc)
        _positive("data.tokenizer_sample_chars", self.tokenizer_sample_chars)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: expected 0 < fraction < 1")
        for key in ("max_documents", "max_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key}={getattr(self, key)}: expected >= 0 (0 = no limit)")
        if self.weights:
            if len(self.weights) != len(self.corpus) or min(self.weights) <= 0:
                raise ConfigError(f"data.weights={self.weights}: expected one positive weight per data.corpus "
                                  f"entry ({len(self.corpus)})")
            if not self.max_tokens:
                raise ConfigError("data.weights needs data.max_tokens: the weights share that token budget")


@dataclass
class TrainConfig:
    seed: int = 1234
    max_steps: int = 300
    micro_batch_size: int = 16  # sequences per rank per micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    budget_lr: float = 3e-2  # peak LR of the LapSum budget η (same schedule, no weight decay)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100  # validation loss
    eval_batches: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    out_dir: str = ""  # run directory; empty = runs/<config name>
    resume: str = "auto"  # auto (latest checkpoint in out_dir, if any) | none | a checkpoint path
    # Resume model weights, step and LR schedule but a fresh optimizer: for a checkpoint
    # whose optimizer state was split over another topology (world size / ep_size).
    resume_weights_only: bool = False
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # Signals that stop the run cleanly (finish the step, save, exit); a second one exits at once.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    # Wall-clock seconds from the start of the process after which the run saves and stops,
    # leaving room for one more step and the save (0 = no limit). Set it below the scheduler's.
    time_limit: float = 0.0
    lr_schedule: str = "cosine"  # cosine | wsd (warmup, stable at lr, then linear decay to lr * min_lr_ratio)
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps that decays
    compile: bool = False  # torch.compile each transformer block (regional: compile time does not grow with depth)
    activation_checkpointing: str = "none"  # none | full (recompute each block) | selective (keep matmul outputs)
    loss_chunk: int = 0  # tokens per cross-entropy chunk: fp32 logits never exist for the whole micro-batch; 0 = one chunk

    def validate(self) -> None:
        for key in ("max_steps", "micro_batch_size", "grad_accum", "eval_every", "eval_batches",
                    "save_every", "keep_checkpoints"):
            _positive(f"train.{key}", getattr(self, key))
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: expected > 0")
        if self.budget_lr < 0:
            raise ConfigError(f"train.budget_lr={self.budget_lr}: expected >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: expected >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio}: expected 0 <= ratio <= 1")
        _choice("train.dtype", self.dtype, ("auto", "fp32", "bf16"))
        from llm.preemption import SIGNALS

        for name in self.stop_signals:
            _choice("train.stop_signals", name, SIGNALS)
        if self.time_limit < 0:
            raise ConfigError(f"train.time_limit={self.time_limit}: expected seconds >= 0 (0 = no limit)")
        _choice("train.lr_schedule", self.lr_schedule, ("cosine", "wsd"))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction}: expected 0 < fraction <= 1")
        _choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        if self.loss_chunk < 0:
            raise ConfigError(f"train.loss_chunk={self.loss_chunk}: expected >= 0 (0 = the whole micro-batch at once)")


@dataclass
class ParallelConfig:
    ep_size: int = 1  # expert-parallel ranks; each holds n_experts / ep_size experts per layer
    zero_stage: int = 0
    # SMEAR under expert parallelism: all-gather the experts (gather) or reduce-scatter
    # partial merges (reduce); auto picks the one that moves fewer numbers. Same result.
    smear_merge: str = "auto"

    def validate(self) -> None:
        _positive("parallel.ep_size", self.ep_size)
        _choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice("parallel.smear_merge", self.smear_merge, ("auto", "gather", "reduce"))


@dataclass
class LogConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "llm-routing"
    run_name: str = ""  # empty = config name
    every: int = 10  # console / wandb scalars
    routing_every: int = 100  # per-layer routing statistics
    peak_tflops: float = 0.0  # for MFU; 0 = guess from the device (989 for H100/H200 bf16)

    def validate(self) -> None:
        _choice("log.wandb", self.wandb, ("offline", "online", "disabled"))
        _positive("log.every", self.every)
        _positive("log.routing_every", self.routing_every)


@dataclass
class EvalConfig:
    """Downstream (lm-eval) evaluation during training."""

    every: int = 0  # 0 = off
    tasks: list[str] = field(default_factory=lambda: ["lambada_openai"])
    limit: int = 100
    data_dir: str = ""  # local task data; empty = $LLM_EVAL_DATA
    batch_size: int = 16

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every}: expected >= 0 (0 = off)")


@dataclass
class Config:
    name: str = "run"
    # Python modules imported before anything else is read (plug-in routers register themselves):
    # found on sys.path, with the current directory first (README "Adding a router").
    imports: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        self.log.validate()
        self.eval.validate()
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        routing = self.model.routing
        if routing.options is not None:
            routing.options.validate_seq_len(self.data.seq_len, routing.section_key)
        if routing.routed:
            if routing.n_experts % self.parallel.ep_size:
                raise ConfigError(f"parallel.ep_size={self.parallel.ep_size} must divide "
                                  f"model.routing.n_experts={routing.n_experts}")
            if self.parallel.zero_stage == 3:
                raise ConfigError("parallel.zero_stage=3: DeepSpeed does not support ZeRO-3 with MoE layers; "
                                  "expected 0, 1 or 2")
        elif self.parallel.ep_size != 1:
            raise ConfigError(f"parallel.ep_size={self.parallel.ep_size} needs a routed model "
                              f"(model.routing.router is dense)")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or f"runs/{self.name}")


# ---------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML experiment, apply `a.b=value` overrides, check every key and value."""
    raw: dict[str, Any] = _read_yaml(path) if path is not None else {}
    raw.setdefault("name", Path(path).stem if path is not None else "run")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        _set_dotted(raw, key.strip(), parse_override_value(key.strip(), value))
    return from_dict(raw).validate()


def load_saved_config(path: str | Path) -> Config:
    """A checkpoint's config.yaml, written by this version or an earlier one (`migrate_saved`)."""
    raw = _read_yaml(path)
    raw.setdefault("name", Path(path).stem)
    return from_dict(migrate_saved(raw)).validate()


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


# Keys that saved configs of earlier versions hold and that no longer exist.
_REMOVED_KEYS = (("model", "routing", "calibrate_tau"), ("data", "streaming"))


def migrate_saved(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config of any earlier version in today's schema: removed keys dropped, and
    the flat routing keys of configs from before the router sections (every router's
    options directly under model.routing) moved into the chosen router's section."""
    for *sections, key in _REMOVED_KEYS:
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(key, None)
    routing = raw.get("model", {}).get("routing") if isinstance(raw.get("model"), dict) else None
    if isinstance(routing, dict):
        raw["model"]["routing"] = _migrate_flat_routing(routing)
    return raw


def _migrate_flat_routing(routing: dict[str, Any]) -> dict[str, Any]:
    """Flat options → `<router>: {...}`; the other routers' flat options (earlier versions saved
    all of them) are dropped. Keys no router knows stay, so that loading names them."""
    from llm.routing import registry

    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"options"}
    names = registry.names()
    if all(key in shared or key in names for key in routing):
        return routing
    router = routing.get("router", DEFAULT_ROUTER)
    out = {key: value for key, value in routing.items() if key in shared or key in names}
    own = out.setdefault(router, {}) if _router_section(router) is not None else {}
    for name in names:
        for old, new in _flat_names(name).items():
            if old in routing and name == router:
                own[new] = routing[old]
    known = {old for name in names for old in _flat_names(name)}
    out.update({key: value for key, value in routing.items() if key not in out and key not in known})
    return out


def _routing_hint(key: str, prefix: str, shared: set[str], router: str) -> str:
    """Where an unknown model.routing key belongs: a router's section, or a close valid key."""
    from llm.routing import registry

    owners = [name for name in registry.names() if key in _flat_names(name)]
    if owners:
        return f"; it is an option of router {', '.join(owners)}: {prefix}{owners[0]}.{_flat_names(owners[0])[key]}"
    valid = shared | ({router} if _router_section(router) is not None else set())
    close = difflib.get_close_matches(str(key), valid, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _flat_names(router: str) -> dict[str, str]:
    """Flat key of an earlier version → field of `router`'s section."""
    section = _router_section(router)
    if section is None:
        return {}
    return {**{f.name: f.name for f in dataclasses.fields(section)}, **section.flat_names}


def parse_override_value(key: str, text: str) -> Any:
    """A command-line value as YAML, except that `[...]` is split on its top-level commas
    itself: YAML reads the brackets of a glob inside a list (`[a/x-0[0-2].gz]`) as nesting."""
    stripped = text.strip()
    if not stripped:
        return ""
    if stripped.startswith("[") and stripped.endswith("]"):
        return [_scalar(item) for item in _split_top_level(stripped[1:-1])]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}={text}: not valid YAML ({' '.join(str(err).split())})") from None


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _scalar(item: str) -> Any:
    """One list item: a YAML scalar (number, bool, quoted string) or else the text as written."""
    try:
        value = yaml.safe_load(item)
    except yaml.YAMLError:
        return item
    return item if isinstance(value, (list, dict)) or value is None else value


def from_dict(raw: dict[str, Any]) -> Config:
    import_modules(_coerce(list[str], raw.get("imports", []), "imports"))
    return _build(Config, raw, "")


def import_modules(modules: typing.Sequence[str]) -> None:
    """Import the config's `imports`, the current directory first on the search path."""
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"imports: cannot import {module} ({err})") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config (or one of its sections) as YAML writes it: the router's options under the router's name."""
    return _sections_by_name(cfg, dataclasses.asdict(cfg))


def _sections_by_name(cfg: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, RoutingConfig):
        options = out.pop("options")
        return {**out, cfg.router: options} if options is not None else out
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = _sections_by_name(value, out[f.name])
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key {full}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _build_routing(raw: Any, prefix: str) -> RoutingConfig:
    """model.routing: the shared keys, and the section of the chosen router only."""
    from llm.routing import registry

    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {raw!r}")
    router = _coerce(str, raw.get("router", DEFAULT_ROUTER), f"{prefix}router")
    _choice(f"{prefix}router", router, registry.names())
    shared = {f.name for f in dataclasses.fields(RoutingConfig)} - {"options"}
    section = registry.get(router).options
    for key in raw:
        if key in shared or key == router and section is not None:
            continue
        if key == router:
            raise ConfigError(f"{prefix}{key}: router {key} has no options of its own")
        if key in registry.names():
            raise ConfigError(f"{prefix}{key}: options of router {key}, but {prefix}router is {router}")
        raise ConfigError(f"unknown key {prefix}{key}{_routing_hint(key, prefix, shared, router)}")
    cfg = _build(RoutingConfig, {k: v for k, v in raw.items() if k in shared}, prefix)
    if router in raw:
        cfg.options = _build(section, raw[router], f"{prefix}{router}.")
    return cfg


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is RoutingConfig:
        return _build_routing(value, key + ".")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [_coerce(item, v, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value}: expected a positive number")


def _choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, options))}")
