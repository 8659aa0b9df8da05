"""llm.config: every key and value checked, one-line errors naming the key, overrides, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest

from llm.config import Config, ConfigError, load_config, save_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def error(overrides: list[str], path: str | Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.out_dir == Path("runs") / path.stem


def test_unknown_key_suggests_the_closest():
    assert error(["train.max_step=5"]) == "unknown key train.max_step; did you mean train.max_steps?"
    assert error(["modle.d_model=64"]) == "unknown key modle; did you mean model?"
    assert error(["model.routing.n_expert=4"]).endswith("did you mean model.routing.n_experts?")
    assert "valid keys:" in error(["train.zzz=1"])


def test_wrong_types_name_the_key():
    assert error(["model.d_model=wide"]) == "model.d_model='wide': expected an integer"
    assert error(["model.d_model=64.5"]) == "model.d_model=64.5: expected an integer"
    assert error(["train.lr=fast"]) == "train.lr='fast': expected a number"
    assert error(["model.tie_embeddings=1"]) == "model.tie_embeddings=1: expected true or false"
    assert error(["train=5"]) == "train: expected a mapping, got 5"
    assert error(["train.max_steps.x=1"], REPO / "configs" / "tiny-dense.yaml") == \
        "override train.max_steps.x: max_steps is a value, not a section"


def test_impossible_values():
    assert error(["model.d_model=66"]) == "model.d_model=66 must be divisible by model.n_heads=4"
    assert "RoPE needs an even head size" in error(["model.d_model=12", "model.n_heads=4"])
    assert error(["train.max_steps=0"]) == "train.max_steps=0: expected a positive number"
    assert error(["data.seq_len=256"]) == "data.seq_len=256 exceeds model.max_seq_len=128"
    assert error(["log.wandb=sometimes"]) == "log.wandb='sometimes': expected one of offline, online, disabled"
    assert "needs a routed model" in error(["parallel.ep_size=2"])
    assert "must divide" in error(["model.routing.router=topk", "model.routing.n_experts=6", "parallel.ep_size=4"])


def test_infeasible_lapsum_budget():
    base = ["model.routing.router=lapsum", "model.n_layers=4", "model.routing.n_experts=4"]
    message = error(base + ["model.routing.lapsum.k_mean=2.0"])
    assert message.startswith("model.routing.lapsum.k_mean=2.0 with 4 routed layers allows k_l up to 5")
    assert "n_experts=4" in message
    assert "expected >= 1" in error(base + ["model.routing.lapsum.k_mean=0.5"])
    load_config(None, base + ["model.routing.lapsum.k_mean=1.5", "model.routing.lapsum.budget=fixed"])  # fixed: k_l = 1.5 < 4


def test_override_parsing(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-dense.yaml", [
        "train.max_steps=7",
        "train.lr=0.01",
        "model.routing.capacity_factor=null",
        "data.corpus=[a/*.txt, b.jsonl]",
        "data.tokenizer=",  # empty value = empty string
        "log.run_name=x=y",  # only the first '=' separates key and value
        "train.out_dir=" + str(tmp_path / "run"),
    ])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.01
    # YAML 1.1 reads 3e-4 as a string; a float key still takes it as a number.
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
    assert cfg.model.routing.capacity_factor is None
    assert cfg.data.corpus == ["a/*.txt", "b.jsonl"]
    assert cfg.data.tokenizer == "" and cfg.log.run_name == "x=y"
    assert cfg.out_dir == tmp_path / "run"
    assert load_config(None, ["data.corpus=one.txt"]).data.corpus == ["one.txt"]  # a scalar becomes a list
    assert error(["train.max_steps"]) == "override 'train.max_steps': expected key.path=value"
    assert error([], tmp_path / "nope.yaml") == f"config file {tmp_path / 'nope.yaml'} not found"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert error([], bad).startswith(f"{bad}: not valid YAML")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny-dense.yaml",
                      ["model.routing.router=lapsum", "model.routing.lapsum.k_mean=1.25", "train.max_steps=9"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert again.name == "tiny-dense"  # the saved name wins over the file's stem


def test_defaults_are_valid():
    assert Config().validate() == Config()


def test_list_override_keeps_glob_brackets():
    cfg = load_config(None, ["data.corpus=[a/x-0[0-2].gz, 'b, c.txt', d/*.jsonl]", "eval.tasks=[piqa]"])
    assert cfg.data.corpus == ["a/x-0[0-2].gz", "b, c.txt", "d/*.jsonl"]
    assert cfg.eval.tasks == ["piqa"]
    assert error(["data.corpus=[a/x-0[0-2].gz"]).startswith("override data.corpus=[a/x-0[0-2].gz: not valid YAML")


def test_smear_segment_must_be_shorter_than_the_sequence():
    smear = ["model.routing.router=smear", "data.seq_len=64"]
    assert load_config(None, [*smear, "model.routing.smear.segment_len=63"]).model.routing.options.segment_len == 63
    assert error([*smear, "model.routing.smear.segment_len=64"]).startswith(
        "model.routing.smear.segment_len=64 must be < data.seq_len=64")


def test_stop_settings():
    assert error(["train.stop_signals=[SIGKILL]"]).startswith("train.stop_signals='SIGKILL': expected one of SIGTERM")
    assert error(["train.time_limit=-1"]).startswith("train.time_limit=-1.0: expected seconds >= 0")


def test_optimizer_settings():
    assert load_config(None, ["train.grad_clip=0", "train.weight_decay=0", "train.beta1=0"]).train.grad_clip == 0
    assert error(["train.grad_clip=-1"]) == "train.grad_clip=-1.0: expected >= 0 (0 = no clipping)"
    assert error(["train.weight_decay=-0.1"]) == "train.weight_decay=-0.1: expected >= 0"
    assert error(["train.beta2=1"]) == "train.beta2=1.0: expected 0 <= beta < 1"
    assert error(["train.beta1=-0.5"]) == "train.beta1=-0.5: expected 0 <= beta < 1"


def test_throughput_keys():
    cfg = load_config(None, ["train.compile=true", "train.activation_checkpointing=selective",
                             "train.loss_chunk=1024", "train.lr_schedule=wsd", "train.decay_fraction=0.1"])
    assert cfg.train.compile and cfg.train.activation_checkpointing == "selective" and cfg.train.loss_chunk == 1024
    assert error(["train.activation_checkpointing=some"]) == \
        "train.activation_checkpointing='some': expected one of none, full, selective"
    assert error(["train.compile=yes please"]) == "train.compile='yes please': expected true or false"
    assert error(["train.lr_schedule=linear"]) == "train.lr_schedule='linear': expected one of cosine, wsd"
    assert error(["train.decay_fraction=0"]) == "train.decay_fraction=0.0: expected 0 < fraction <= 1"
    assert error(["train.loss_chunk=-1"]).startswith("train.loss_chunk=-1: expected >= 0")
