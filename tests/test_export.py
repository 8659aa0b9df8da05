"""llm.export: every router exported, loaded with transformers alone, and checked against
`load_model`'s model (logits, greedy decoding with the cache, tokenizer ids), refusals,
sharding, and lm-eval's own `hf` model against `llm eval`."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from examples.hash_router import HashFFN, hashed_expert
from llm.checkpoint import load_model
from llm.config import Config, DataConfig
from llm.data import Tokenizer
from llm.export import ExportError, export
from llm.export.modeling import MODELING_FILE, modeling_source
from llm.routing.experts import swiglu
from llm.routing.registry import ExportCode
from tests.helpers import (EXPORT_IMPORTS, MAX_LEN, REPO, SAMPLE, SAMPLE_VOCAB, cli_status, imported_modules,
                           sample_texts)
from tests.models import tiny_config

transformers = pytest.importorskip("transformers")

# name: (routing, architecture the export must choose)
ROUTERS = {
    "dense": (dict(router="dense"), "LlamaForCausalLM"),
    "topk": (dict(router="topk", n_experts=4, k=2), "MixtralForCausalLM"),
    "switch": (dict(router="switch", n_experts=4), "RoutedForCausalLM"),
    "lapsum": (dict(router="lapsum", n_experts=4, k_mean=1.5, tau=0.05), "RoutedForCausalLM"),
    "smear": (dict(router="smear", n_experts=4, segment_len=8, reset_at_eos=True), "RoutedForCausalLM"),
    "topk_every2": (dict(router="topk", n_experts=4, k=2, every=2, d_expert=32), "RoutedForCausalLM"),
    "lapsum_every2": (dict(router="lapsum", n_experts=4, k_mean=1.5, every=2, budget="fixed"), "RoutedForCausalLM"),
}
EDGE_TEXTS = ["Hello world", " leading space", "two  spaces", "  ", "line\nbreak\n\n", "trailing ",
              "digits 12345 and 3.14", "émoji 🙂 中文 ß", "", "\ttab"]


def _load_bench():
    """scripts/bench_export.py, which holds the random-checkpoint writer and our greedy decoding."""
    spec = importlib.util.spec_from_file_location("bench_export", REPO / "scripts" / "bench_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
our_greedy = bench.our_greedy


def write_random_checkpoint(ckpt: Path, tokenizer_path: Path, routing: dict, n_layers: int = 3,
                            seed: int = 0, **model) -> Path:
    """A randomly initialised checkpoint with sharp routing (the default router init routes
    almost uniformly, which would hide a wrong expert choice or a wrong k_l)."""
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=SAMPLE_VOCAB, n_layers=n_layers, max_seq_len=MAX_LEN, init_std=0.1, **routing, **model)
    return bench.save_random_checkpoint(Config(model=cfg, data=DataConfig(seq_len=MAX_LEN)), ckpt, tokenizer_path,
                                        sharpen_routing=True)


def no_pickles(out: Path) -> None:
    for f in out.rglob("*"):
        assert f.suffix not in (".bin", ".pt", ".pth", ".pkl", ".ckpt"), f
        if f.is_file():
            assert f.read_bytes()[:1] != b"\x80", f"{f} starts like a pickle"


@pytest.mark.parametrize("name", list(ROUTERS))
@torch.no_grad()
def test_export_loads_in_transformers_with_equal_logits_and_generation(name, tmp_path, tokenizer_path):
    routing, arch = ROUTERS[name]
    # Untied: a random model with tied embeddings keeps predicting one token, which would test little.
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, routing, tie_embeddings=False)
    summary = export(ckpt, tmp_path / "hf")
    out = summary.out_dir
    assert summary.architecture == arch
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        + (["modeling_routed.py"] if arch == "RoutedForCausalLM" else []))
    no_pickles(out)
    ours = load_model(ckpt).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == arch

    ids = torch.randint(0, SAMPLE_VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    ids[0, 10] = ids[1, 20] = 2  # EOS inside a segment: SMEAR's reset_at_eos must act identically
    want, got = ours(ids).logits, hf(ids).logits
    assert (got - want).abs().max() < 1e-4

    prompt = ids[:1, :11]  # 11 tokens: generation crosses SMEAR segment boundaries mid-way
    lengths = []
    hf.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                 with_kwargs=True)
    tokens = hf.generate(prompt, max_new_tokens=24, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert lengths[0] == 11 and set(lengths[1:]) == {1}  # the prompt once, then one token per step: cached
    expected = our_greedy(ours, prompt, 24)
    assert tokens == expected[:len(tokens)] and (len(tokens) == 24 or tokens[-1] == 2)
    assert len(set(expected)) > 3  # a varied continuation, not one repeated token


def test_lapsum_export_bakes_budget_and_tau(tmp_path, tokenizer_path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, ROUTERS["lapsum"][0])
    model = load_model(ckpt).model
    config = json.loads((export(ckpt, tmp_path / "hf").out_dir / "config.json").read_text())
    ks = [layer["k"] for layer in config["ffn_layers"]]
    assert ks == pytest.approx(model.budget().tolist(), abs=0) and len(set(ks)) == 3  # learned: differ per layer
    assert sum(ks) == pytest.approx(1.5 * 3, abs=1e-12)
    assert [layer["tau"] for layer in config["ffn_layers"]] == pytest.approx([0.05] * 3)


def test_tokenizer_gives_our_ids_and_specials(tmp_path, tokenizer_path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, ROUTERS["dense"][0])
    out = export(ckpt, tmp_path / "hf").out_dir
    hf = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(tokenizer_path)
    for text in EDGE_TEXTS + sample_texts()[:20]:
        assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text), repr(text)
    assert hf("a b")["input_ids"] == ours.encode("a b")  # adds no BOS/EOS by default either
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (ours.eos_id, ours.bos_id, ours.pad_id)
    ids = ours.encode(sample_texts()[0])
    assert hf.decode(ids) == ours.decode(ids)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ours.eos_id


def test_sharded_export_loads(tmp_path, tokenizer_path):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, ROUTERS["switch"][0])
    summary = export(ckpt, tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((summary.out_dir / "model.safetensors.index.json").read_text())
    assert summary.shards > 2 and len(set(index["weight_map"].values())) == summary.shards
    assert not (summary.out_dir / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(summary.out_dir, trust_remote_code=True)
    ids = torch.arange(30)[None] % SAMPLE_VOCAB
    with torch.no_grad():
        assert (hf(ids).logits - load_model(ckpt).model(ids).logits).abs().max() < 1e-4


def test_modeling_file_imports_only_torch_and_transformers():
    roots = imported_modules(MODELING_FILE.read_text())
    assert roots <= EXPORT_IMPORTS, roots


@pytest.mark.parametrize("helpers, message", [
    ((), "export_code uses hashed_expert, which modeling_routed.py does not define"),
    ((hashed_expert, lambda ids: ids), "expected functions and classes defined at the top level"),
    ((hashed_expert, swiglu), "export_code defines swiglu, which modeling_routed.py already defines"),
], ids=["missing-helper", "lambda", "shadowing"])
def test_plugin_code_the_exported_file_cannot_run_is_refused(helpers, message):
    """A plug-in FFN that needs a name of its own module, or shadows one of the exported file's."""
    with pytest.raises(ExportError, match=message):
        modeling_source("hash", ExportCode(ffn=HashFFN, helpers=helpers))


@pytest.mark.parametrize("routing, message", [
    (dict(router="topk", n_experts=4, capacity_factor=1.25), "capacity_factor=1.25: capacity-limited"),
    (dict(router="deepspeed_topk", n_experts=4), "router='deepspeed_topk' cannot be exported"),
    (dict(router="smear", n_experts=4, segment_len=8, first_segment="self_stopgrad"), "first_segment='self_stopgrad'"),
])
def test_refusals_are_one_line(routing, message, tmp_path, tokenizer_path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, routing, n_layers=2)
    assert cli_status("export", str(ckpt), str(tmp_path / "hf")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.tmp").exists()


def test_cli_refuses_non_empty_out_dir_unless_forced(tmp_path, tokenizer_path, capsys):
    ckpt = write_random_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000007", tokenizer_path,
                                   ROUTERS["dense"][0], n_layers=2)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000007")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert cli_status("export", str(tmp_path / "run"), str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not empty" in err and "--force" in err and err.count("\n") == 1
    assert cli_status("export", str(tmp_path / "run"), str(out), "--force") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(ExportError, match="is not a directory"):
        export(ckpt, out / "model.safetensors")
    assert cli_status("export", str(tmp_path / "nowhere"), str(tmp_path / "hf2")) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_lm_eval_hf_model_matches_llm_eval(tmp_path, tokenizer_path):
    import lm_eval

    from llm.evaluation import resolve_tasks, run_eval

    ckpt = write_random_checkpoint(tmp_path / "ckpt", tokenizer_path, ROUTERS["dense"][0], n_layers=2)
    out = export(ckpt, tmp_path / "hf").out_dir
    tasks = resolve_tasks(["hellaswag", "lambada_openai"], SAMPLE)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32,device=cpu",
                                     tasks=tasks.specs, task_manager=tasks.manager, limit=6, batch_size=1,
                                     bootstrap_iters=0)["results"]
    ours, _ = run_eval(ckpt, ["hellaswag", "lambada_openai"], limit=6, batch_size=4, data_dir=SAMPLE,
                       dtype="float32", device="cpu", out=tmp_path / "eval.json")
    for task, metric in (("hellaswag", "acc_norm,none"), ("lambada_openai", "perplexity,none"),
                         ("lambada_openai", "acc,none")):
        assert theirs[task][metric] == pytest.approx(ours["results"][task][metric], rel=1e-4), (task, metric)
