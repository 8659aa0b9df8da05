"""The experiment schema: one typed dataclass per config section, and `Config`, their tree.

Each section checks its own values (`validate`); `Config.validate` checks what spans
sections. A field's default is the value a YAML file leaves out; the comment after a field
says what it means and which values it takes, where its name does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llm.config.errors import ConfigError, check_choice, check_positive
from llm.config.routing import RoutingConfig


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
            check_positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"model.d_model/model.n_heads={self.d_model // self.n_heads}: RoPE needs an even head size")
        check_choice("model.attention", self.attention, ("sdpa", "flash"))
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
        check_positive("data.seq_len", self.seq_len)
        check_positive("data.num_proc", self.num_proc)
        check_positive("data.tokenizer_sample_chars", self.tokenizer_sample_chars)
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
            check_positive(f"train.{key}", getattr(self, key))
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr}: expected > 0")
        if self.budget_lr < 0:
            raise ConfigError(f"train.budget_lr={self.budget_lr}: expected >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: expected >= 0")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay}: expected >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)}: expected 0 <= beta < 1")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip}: expected >= 0 (0 = no clipping)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio}: expected 0 <= ratio <= 1")
        check_choice("train.dtype", self.dtype, ("auto", "fp32", "bf16"))
        from llm.preemption import SIGNALS

        for name in self.stop_signals:
            check_choice("train.stop_signals", name, SIGNALS)
        if self.time_limit < 0:
            raise ConfigError(f"train.time_limit={self.time_limit}: expected seconds >= 0 (0 = no limit)")
        check_choice("train.lr_schedule", self.lr_schedule, ("cosine", "wsd"))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction}: expected 0 < fraction <= 1")
        check_choice("train.activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
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
        check_positive("parallel.ep_size", self.ep_size)
        check_choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("parallel.smear_merge", self.smear_merge, ("auto", "gather", "reduce"))


@dataclass
class LogConfig:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "llm-routing"
    run_name: str = ""  # empty = config name
    every: int = 10  # console / wandb scalars
    routing_every: int = 100  # per-layer routing statistics
    peak_tflops: float = 0.0  # for MFU; 0 = guess from the device (989 for H100/H200 bf16)

    def validate(self) -> None:
        check_choice("log.wandb", self.wandb, ("offline", "online", "disabled"))
        check_positive("log.every", self.every)
        check_positive("log.routing_every", self.routing_every)


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

