"""The router contract: the registry, model.routing as a tagged union, configs and checkpoints
of earlier versions, `imports:`, and the Hash Layers plug-in (examples/hash_router.py)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llm.checkpoint import load_model
from llm.config import ConfigError, load_config, load_saved_config
from llm.model import build_model
from llm.routing import registry
from llm.routing.experts import swiglu
from tests.causality import assert_causal
from tests.models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
OLD = Path(__file__).parent / "fixtures" / "checkpoint-f6c83b5"  # `llm train` at commit f6c83b5: flat routing keys


def error(overrides: list[str], path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_every_builtin_router_is_registered_and_builds():
    assert set(registry.names()) >= {"dense", "switch", "topk", "lapsum", "smear", "deepspeed_topk"}
    with pytest.raises(KeyError, match="did you mean lapsum"):
        registry.get("lapsun")
    for name in ("switch", "topk", "lapsum", "smear"):
        layer = tiny_model(name, d_model=16, n_heads=2, d_ff=32, max_seq_len=16, n_experts=4).blocks[0].ffn
        assert layer.n_experts == 4 and callable(layer.shard)


def test_a_second_router_under_a_taken_name_is_refused():
    spec = registry.get("topk")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.RouterSpec(name="topk", layer=lambda cfg: None, active_experts=spec.active_experts))
    assert registry.get("topk") is spec


def test_options_of_another_router_are_one_line_errors():
    lapsum = ["model.routing.router=lapsum", "model.routing.n_experts=4"]
    assert error([*lapsum, "model.routing.topk.k=2"]) == (
        "model.routing.topk: options of router topk, but model.routing.router is lapsum")
    assert error([*lapsum, "model.routing.top_k=2"]).startswith(
        "unknown key model.routing.top_k; it is an option of router topk")
    assert error([*lapsum, "model.routing.lapsum.top_k=2"]).startswith("unknown key model.routing.lapsum.top_k")
    assert error(["model.routing.router=switch", "model.routing.switch.k=2"]) == (
        "model.routing.switch: router switch has no options of its own")
    assert error(["model.routing.router=lapsum", "model.routing.n_experts=4", "model.routing.lapsum.tau=1.5"]) == (
        "model.routing.lapsum.tau=1.5: expected 0 <= tau < 1")
    cfg = load_config(None, [*lapsum, "model.routing.lapsum.k_mean=1.25", "model.routing.lapsum.budget=fixed"])
    assert (cfg.model.routing.options.k_mean, cfg.model.routing.options.budget) == (1.25, "fixed")


def test_checkpoint_from_before_the_sections_loads(tmp_path):
    """Flat routing keys, removed keys (calibrate_tau, data.streaming) and LapSum's old
    `tau_calibrated` buffer in a legacy model.pt: the config moves into model.routing.lapsum
    and every saved tensor reaches the model unchanged."""
    raw = yaml.safe_load((OLD / "config.yaml").read_text())
    flat = raw["model"]["routing"]
    assert "k_mean" in flat and "calibrate_tau" in flat and "lapsum" not in flat  # really the old layout
    loaded = load_model(OLD)
    options = loaded.config.model.routing.options
    for key in ("k_mean", "budget", "alpha", "tau", "expansion_cap"):
        assert getattr(options, key) == flat[key], key
    assert loaded.config.model.routing.n_experts == flat["n_experts"]
    saved = torch.load(OLD / "model.pt", weights_only=True)
    state = loaded.model.state_dict()
    for key, value in saved.items():
        if key.endswith("tau_calibrated"):
            assert state[key.replace("tau_calibrated", "tau_updates")].item() == int(value.item())
        else:
            assert torch.equal(state[key], value), key
    again = tmp_path / "ckpt"
    shutil.copytree(OLD, again)
    (again / "config.yaml").write_text(yaml.safe_dump(raw | {"model": raw["model"] | {"routing": {**flat, "x": 1}}}))
    with pytest.raises(ConfigError, match="unknown key model.routing.x"):
        load_saved_config(again / "config.yaml")


def test_imports_that_do_not_import_are_one_line_errors(tmp_path):
    assert error(["imports=[examples.no_such_router]"]) == (
        "imports: cannot import examples.no_such_router (No module named 'examples.no_such_router')")


def test_imports_are_found_in_the_current_directory(tmp_path, monkeypatch):
    """A module next to the user's config registers its router before model.routing is read."""
    (tmp_path / "cwd_router.py").write_text(
        "from llm.routing.dense import DenseFFN\n"
        "from llm.routing.registry import RouterSpec, register\n"
        "register(RouterSpec(name='cwd_dense', layer=DenseFFN, active_experts=lambda cfg: 0, routed=False))\n")
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["imports=[cwd_router]", "model.routing.router=cwd_dense"])
    assert cfg.imports == ["cwd_router"] and cfg.model.routed_layers() == []
    assert registry.get("cwd_dense").layer.__name__ == "DenseFFN"


# ---------------------------------------------------------------------------- the Hash Layers plug-in

def hash_model(n_layers: int = 2) -> torch.nn.Module:
    cfg = load_config(ROOT / "configs" / "tiny-hash.yaml", [
        "model.vocab_size=50", "model.d_model=16", "model.n_heads=2", "model.d_ff=24", "model.routing.d_expert=24",
        f"model.n_layers={n_layers}", "model.max_seq_len=32", "data.seq_len=32", "model.routing.n_experts=4"]).model
    torch.manual_seed(0)
    return build_model(cfg).double()


def test_hash_layer_runs_each_token_through_its_hashed_expert():
    """Oracle: a float64 loop over tokens, expert = Knuth hash of the id, weight 1."""
    from examples.hash_router import hashed_expert

    layer = hash_model().blocks[0].ffn
    ids = torch.randint(0, 50, (2, 9))
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    y, aux = layer(x, type("Ctx", (), {"input_ids": ids, "k": None})())
    ex = layer.experts
    for b in range(2):
        for t in range(9):
            e = int((int(ids[b, t]) * 2654435761 % 2 ** 32) % 4)
            assert e == int(hashed_expert(ids[b, t], 4, 0))
            torch.testing.assert_close(y[b, t], swiglu(x[b, t], ex.w1[e], ex.w3[e], ex.w2[e]), rtol=1e-12, atol=1e-12)
    assert aux.item() == 0.0
    c = layer.stats.counts
    assert c["computed"].tolist() == torch.bincount(hashed_expert(ids, 4, 0).flatten(), minlength=4).tolist()
    assert c["active_hist"].tolist() == [0, 18]  # every token computed its one expert


def test_hash_router_is_causal():
    model = hash_model(n_layers=3)
    assert_causal(model, torch.randint(0, 50, (2, 20)), [0, 7, 19], 50)


def test_hash_plugin_trains_inspects_evaluates_and_exports(tmp_path):
    """`llm train` with `imports:`, then the checkpoint alone brings the plug-in back: `llm inspect`,
    `llm eval --text` (against a direct forward of `load_model`), `llm export` (transformers' model
    against `load_model`'s: logits, and cached greedy decoding against a full forward)."""
    import json

    from tests.helpers import EXPORT_IMPORTS, TINY, imported_modules, make_corpus, ok, run

    make_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    cfg = json.loads(json.dumps(TINY))
    cfg["imports"] = ["examples.hash_router"]
    cfg["model"]["routing"] = {"router": "hash", "n_experts": 4, "d_expert": 32, "hash": {"seed": 3}}
    cfg["data"].update(corpus=[str(tmp_path / "corpus.jsonl")], cache_dir=str(tmp_path / "cache"))
    cfg["train"].update(max_steps=4, save_every=4, eval_every=4, out_dir=str(tmp_path / "run"))
    (tmp_path / "hash.yaml").write_text(yaml.safe_dump(cfg))
    ok(run("train", "hash.yaml", cwd=tmp_path))
    report = json.loads(ok(run("inspect", "run", "--json", "--batches", "2", cwd=tmp_path)).stdout)
    assert report["router"] == "hash" and len(report["layers"]) == 2
    assert all(layer["active_mean"] == 1.0 for layer in report["layers"])  # one hashed expert per token

    text = tmp_path / "held_out.txt"
    text.write_text("the small cat sees the old dog.")
    ok(run("eval", "run", "--text", str(text), "--out", str(tmp_path / "eval.json"), cwd=tmp_path))
    (scores,) = json.loads((tmp_path / "eval.json").read_text())["results"].values()
    loaded = load_model(tmp_path / "run")  # imports the plug-in again, from the checkpoint's config
    tokens = loaded.tokenizer.encode(text.read_text())
    ids = torch.tensor([[loaded.tokenizer.eos_id] + tokens])  # the first token is conditioned on EOS
    with torch.no_grad():
        logits = loaded.model(ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="mean").item()
    assert scores["token_perplexity,none"] == pytest.approx(math.exp(nll), rel=1e-4)

    # The plug-in's FFN travels in the exported modeling file, which needs neither llm nor examples.
    ok(run("export", "run", str(tmp_path / "hf"), cwd=tmp_path))
    assert imported_modules((tmp_path / "hf" / "modeling_routed.py").read_text()) <= EXPORT_IMPORTS
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (hf(ids).logits - loaded.model(ids).logits).abs().max() < 1e-4
        lengths = []
        hf.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                     with_kwargs=True)
        # Each cached step sees only its new token's id, which is all hash routing reads.
        out = hf.generate(ids[:, :5], max_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        full = loaded.model(out.sequences).logits[:, 4:-1]  # what a full forward predicts after each prefix
    assert lengths[0] == 5 and set(lengths[1:]) == {1} and len(out.logits) == 12
    assert (torch.stack(out.logits, 1) - full).abs().max() < 1e-4
    assert out.sequences[0, 5:].tolist() == full[0].argmax(-1).tolist()
