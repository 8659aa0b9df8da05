"""llm.evaluation: the lm-eval adapter against direct forward passes, batch-size invariance
for every router, greedy generation with the KV cache, local tasks, `llm eval`, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm.checkpoint import write_model_files
from llm.config import Config, ConfigError, DataConfig, EvalConfig, ModelConfig, ParallelConfig
from llm.data import Tokenizer
from llm.data.prepare import SPM_OPTIONS
from llm.evaluation import EvalCallback, EvalError, LLMEvalModel, local_tasks, resolve_tasks, run_eval, task_config
from llm.model import build_model
from tests.models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "eval" / "sample"
VOCAB = 512
MAX_LEN = 64
ROUTERS = {
    "dense": dict(router="dense"),
    "topk": dict(router="topk", n_experts=4, k=2),
    "lapsum": dict(router="lapsum", n_experts=4, k_mean=1.5),
    "smear": dict(router="smear", n_experts=4, segment_len=16),
}


def sample_texts() -> list[str]:
    rows = [json.loads(line) for line in (SAMPLE / "lambada_openai" / "lambada_test.jsonl").open()]
    texts = [r["text"] for r in rows]
    rows = [json.loads(line) for line in (SAMPLE / "hellaswag" / "hellaswag_val.jsonl").open()]
    texts += [r["ctx"] + " " + " ".join(r["endings"]) for r in rows]
    return texts


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    lines = [line for text in sample_texts() for line in text.split("\n") if line]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tok"),
                                   vocab_size=VOCAB, minloglevel=2, **{**SPM_OPTIONS, "num_threads": 1})
    return out / "tok.model"


@pytest.fixture(scope="module")
def tok(tokenizer_path) -> Tokenizer:
    return Tokenizer.load(tokenizer_path)


def model_config(router: str, vocab: int = VOCAB, **model) -> ModelConfig:
    return tiny_config(vocab_size=vocab, d_model=64, d_ff=128, max_seq_len=MAX_LEN, init_std=0.1,
                       **ROUTERS[router], **model)


def make_model(router: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model with sharp routing (the default router init routes almost uniformly,
    which would hide a padding or batching effect on the routing)."""
    torch.manual_seed(seed)
    model = build_model(model_config(router))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(key in name for key in ("router", "prior", "budget")):
                p.normal_(0, 0.5)
    return model.eval()


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def pairs(n: int = 12) -> list[tuple[str, str]]:
    """(context, continuation) pairs of many lengths, LAMBADA-style (last word as continuation)."""
    out = []
    for text in sample_texts()[:n]:
        words = text.split(" ")
        out.append((" ".join(words[:-1]), " " + words[-1]))
    return out


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) from one unbatched forward over the last MAX_LEN tokens."""
    ids = (context + continuation)[-(MAX_LEN + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]  # [T, V]
    logprobs = F.log_softmax(logits.double(), dim=-1)[-len(continuation):]
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


# ---------------------------------------------------------------------------- loglikelihood

def test_loglikelihood_equals_a_direct_forward_pass(tok):
    model = make_model("dense")
    lm = LLMEvalModel(model=model, tokenizer=tok, batch_size=5, progress=False)
    long_context = " ".join(sample_texts()[:3])  # far longer than MAX_LEN tokens: truncated on the left
    requests = pairs(6) + [("", "The end"), (long_context, " word"), ("A context with a trailing space ", "here"),
                           ("Question: what next?\nAnswer:", " " + long_context)]  # a continuation > MAX_LEN
    got = lm.loglikelihood(instances("loglikelihood", requests))
    for (context, continuation), (score, greedy) in zip(requests, got):
        if context == "":
            ctx, cont = [tok.eos_id], tok.encode(continuation)
        else:
            context, continuation = context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation
            ctx = tok.encode(context)
            cont = tok.encode(context + continuation)[len(ctx):]
        if len(cont) > MAX_LEN:  # scored in pieces of MAX_LEN / 2 tokens, each with its history
            tokens, step = ctx + cont, MAX_LEN // 2
            parts = [direct_loglikelihood(model, tokens[:p], tokens[p:p + step])
                     for p in range(len(ctx), len(tokens), step)]
            want, want_greedy = sum(s for s, _ in parts), all(g for _, g in parts)
        else:
            want, want_greedy = direct_loglikelihood(model, ctx, cont)
        assert score == pytest.approx(want, abs=1e-4), (context[-30:], continuation)
        assert greedy == want_greedy
    assert len(tok.encode(long_context)) > 2 * MAX_LEN


def test_greedy_flag_is_true_exactly_for_the_models_own_argmax(tok):
    model = make_model("dense")
    lm = LLMEvalModel(model=model, tokenizer=tok, progress=False)
    context = tok.encode("Once upon a time")
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1]
    best, other = int(logits.argmax()), int(logits.argmin())
    got = lm._loglikelihood_tokens([(None, context, [best]), (None, context, [other])])
    assert [greedy for _, greedy in got] == [True, False]
    assert got[0][0] == pytest.approx(float(F.log_softmax(logits, -1)[best]), abs=1e-5)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_scores_do_not_depend_on_batch_size(tok, router):
    model = make_model(router)
    requests = instances("loglikelihood", pairs(10))
    texts = instances("loglikelihood_rolling", [(t,) for t in sample_texts()[18:21]])
    results = []
    for batch_size in (1, 4, 7):
        lm = LLMEvalModel(model=model, tokenizer=tok, batch_size=batch_size, progress=False)
        results.append((lm.loglikelihood(requests), lm.loglikelihood_rolling(texts)))
    (ll1, roll1) = results[0]
    for ll, roll in results[1:]:
        assert [g for _, g in ll] == [g for _, g in ll1]
        torch.testing.assert_close(torch.tensor([s for s, _ in ll]), torch.tensor([s for s, _ in ll1]),
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(torch.tensor(roll), torch.tensor(roll1), rtol=1e-5, atol=1e-3)


def test_loglikelihood_rolling_scores_every_token_once(tok):
    model = make_model("dense")
    lm = LLMEvalModel(model=model, tokenizer=tok, batch_size=3, progress=False)
    short, long = "A short text.", " ".join(sample_texts()[:2])
    tokens = tok.encode(long)
    assert len(tokens) > 2 * MAX_LEN
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(short,), (long,)]))
    assert got[0] == pytest.approx(direct_loglikelihood(model, [tok.eos_id], tok.encode(short))[0], abs=1e-4)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, tok.eos_id, MAX_LEN, 1)]
    assert sum(len(target) for _, target in windows) == len(tokens)
    want = sum(direct_loglikelihood(model, context, target)[0] for context, target in windows)
    assert got[1] == pytest.approx(want, abs=1e-3)


# ---------------------------------------------------------------------------- generation

def naive_greedy(model, tok, prompt: list[int], max_new: int) -> list[int]:
    """Recompute the whole sequence for every new token: the reference for the cached decoder."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


def continuation_text(tok, prompt: list[int], tokens: list[int]) -> str:
    anchor = tok.decode(prompt[-1:])
    return tok.decode(prompt[-1:] + tokens)[len(anchor):]


@pytest.mark.parametrize("router", ["dense", "smear"])  # SMEAR: decoding state beyond the KV cache
def test_generate_until_equals_naive_greedy_and_stops(tok, router):
    model = make_model(router)
    # The long prompt keeps its last MAX_LEN - max_new tokens, so that the generation fits.
    prompts = ["The man", "She walked to the door and opened it slowly, then", sample_texts()[5], "A"]
    max_new = 12
    lm = LLMEvalModel(model=model, tokenizer=tok, batch_size=3, progress=False)
    got = lm.generate_until(instances("generate_until", [(p, {"until": [], "max_gen_toks": max_new}) for p in prompts]))
    expected = []
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt)[-(MAX_LEN - max_new):]
        want = continuation_text(tok, ids, naive_greedy(model, tok, ids, max_new))
        assert text == want
        expected.append(want)

    # A stop sequence taken from the middle of the greedy text cuts it there, and decoding stops early.
    prompt, full = prompts[1], expected[1]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop and stop in full
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    (text,) = lm.generate_until(instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": max_new})]))
    handle.remove()
    assert text == full.split(stop)[0]
    assert len(calls) < max_new


# ---------------------------------------------------------------------------- tasks

def test_local_tasks_mirror_lm_evals_own_definitions():
    from lm_eval.tasks._yaml_loader import load_yaml

    upstream_dir = Path(__import__("lm_eval").__file__).parent / "tasks"
    upstream_files = {"lambada_openai": "lambada/lambada_openai.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                      "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml",
                      "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml"}
    assert set(local_tasks()) == set(upstream_files)
    for name, rel in upstream_files.items():
        ours = task_config(name, SAMPLE if (SAMPLE / name).is_dir() else _fake_data_dir(name))
        theirs = load_yaml(upstream_dir / rel, resolve_func=True)
        assert ours["task"] == theirs["task"] == name
        for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list",
                    "should_decontaminate", "doc_to_decontamination_query"):
            assert _comparable(ours.get(key)) == _comparable(theirs.get(key)), (name, key)
        split = next(k for k in ("test_split", "validation_split") if theirs.get(k))
        assert ours[split] == theirs[split], name  # the same split is scored
        assert Path(ours["dataset_kwargs"]["data_files"][theirs[split]]).is_absolute()


def _comparable(value):
    """Functions by where they are defined (lm-eval may load the same module twice)."""
    if callable(value):
        import inspect

        return value.__qualname__, inspect.getsourcefile(value)
    return value


def _fake_data_dir(name: str) -> Path:
    """A data dir holding only (empty) files for `name`, for config checks without the real data."""
    import tempfile

    root = Path(tempfile.mkdtemp())
    for rel in _yaml_files(name):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()
    return root


def _yaml_files(name: str) -> list[str]:
    from llm.evaluation.tasks import _load_task_yaml

    return list(_load_task_yaml(local_tasks()[name])["dataset_kwargs"]["data_files"].values())


def test_task_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_EVAL_DATA", raising=False)
    with pytest.raises(EvalError, match="lambada_openai reads its data from a local directory.*--data-dir"):
        resolve_tasks(["lambada_openai"], None)
    with pytest.raises(EvalError, match="eval data directory .* not found"):
        resolve_tasks(["lambada_openai"], tmp_path / "missing")
    with pytest.raises(EvalError, match=r"task piqa: data file .*piqa_valid.jsonl not found"):
        resolve_tasks(["lambada_openai", "piqa"], SAMPLE)
    monkeypatch.setenv("LLM_EVAL_DATA", str(SAMPLE))
    assert resolve_tasks(["hellaswag"], None).data_dir == SAMPLE.resolve()


def test_unknown_task_name_is_one_clear_line(monkeypatch):
    import lm_eval.tasks

    class Index:  # lm-eval's real index takes 7-30 s to scan; the lookup logic is what is tested here
        def __init__(self, include_defaults=True, **kwargs):
            self.all_tasks = ["hellaswag", "mmlu", "wikitext"] if include_defaults else []

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    assert resolve_tasks(["wikitext", "hellaswag"], SAMPLE).specs[0] == "wikitext"  # hub names pass through
    with pytest.raises(EvalError, match=r"unknown task 'hellaswagg'.*did you mean hellaswag\?") as err:
        resolve_tasks(["lambada_openai", "hellaswagg"], SAMPLE)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- checkpoints and `llm eval`

def write_checkpoint(path: Path, tokenizer_path: Path, router: str = "dense", vocab: int = VOCAB,
                     ep_size: int = 1) -> Path:
    """A checkpoint as training writes it (model.pt holds every expert, whatever ep_size trained it)."""
    cfg = Config(name="tiny-eval", model=model_config(router, vocab=vocab), data=DataConfig(seq_len=MAX_LEN),
                 parallel=ParallelConfig(ep_size=ep_size))
    torch.manual_seed(0)
    write_model_files(path, build_model(cfg.model).state_dict(), cfg.validate(), tokenizer_path,
                      {"step": 42, "ep_size": ep_size, "world_size": ep_size})
    return path


def test_model_argument_errors(tmp_path, tokenizer_path, tok):
    bad_vocab = write_checkpoint(tmp_path / "bad", tokenizer_path, vocab=VOCAB + 64)
    with pytest.raises(EvalError, match=f"has {VOCAB} tokens.*vocab_size is {VOCAB + 64}"):
        LLMEvalModel(checkpoint=str(bad_vocab))
    with pytest.raises(EvalError, match=f"tokenizer has {VOCAB} tokens but model.vocab_size is {VOCAB + 64}"):
        LLMEvalModel(model=build_model(model_config("dense", vocab=VOCAB + 64)), tokenizer=tok)
    with pytest.raises(EvalError, match="neither a checkpoint directory"):
        LLMEvalModel(checkpoint=str(tmp_path / "nothing"))
    ckpt = write_checkpoint(tmp_path / "ok", tokenizer_path)
    with pytest.raises(EvalError, match="batch_size='auto': expected a positive integer"):
        LLMEvalModel(checkpoint=str(ckpt), batch_size="auto")
    with pytest.raises(EvalError, match="unknown model_args pretrained"):
        LLMEvalModel(checkpoint=str(ckpt), pretrained="gpt2")
    with pytest.raises(EvalError, match="dtype='int8'"):
        LLMEvalModel(checkpoint=str(ckpt), dtype="int8")


def test_registered_with_lm_eval_and_run_eval_writes_results(tmp_path, tokenizer_path):
    import lm_eval
    from lm_eval.api.registry import get_model

    assert get_model("llm") is LLMEvalModel
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000042", tokenizer_path, router="topk",
                            ep_size=2)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000042")
    # lm-eval's own entry point with model_args, on a run directory (its latest checkpoint).
    tasks = resolve_tasks(["winogrande"], SAMPLE)
    out = lm_eval.simple_evaluate(model="llm", model_args=f"checkpoint={tmp_path / 'run'},batch_size=4",
                                  tasks=tasks.specs, task_manager=tasks.manager, limit=6, bootstrap_iters=0)
    assert 0 <= out["results"]["winogrande"]["acc,none"] <= 1
    results, path = run_eval(tmp_path / "run", ["winogrande"], limit=6, batch_size=4, data_dir=SAMPLE,
                             out=tmp_path / "res" / "w.json")
    assert path == tmp_path / "res" / "w.json" and path.with_suffix(".md").is_file()
    saved = json.loads(path.read_text())
    assert saved["results"]["winogrande"]["acc,none"] == out["results"]["winogrande"]["acc,none"]
    assert saved["llm"]["step"] == 42 and saved["llm"]["checkpoint"] == str(ckpt)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LLM_EVAL_DATA", None)
    return subprocess.run([sys.executable, "-m", "llm", "eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.slow
def test_llm_eval_end_to_end_offline(tmp_path, tokenizer_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer_path, router="lapsum")
    # From another directory, with a relative --data-dir: paths must not depend on the CWD.
    rel = os.path.relpath(SAMPLE, tmp_path)
    proc = _cli(str(ckpt), "--tasks", "lambada_openai,hellaswag", "--limit", "8", "--batch-size", "4",
                "--data-dir", rel, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("|lambada_openai|", "|hellaswag     |", "perplexity", "acc_norm"):
        assert line in proc.stdout
    results = json.loads((ckpt / "eval" / "results.json").read_text())
    assert set(results["results"]) == {"lambada_openai", "hellaswag"}
    assert results["n-samples"]["hellaswag"]["effective"] == 8
    assert results["llm"]["data_dir"] == str(SAMPLE.resolve())
    assert "|hellaswag" in (ckpt / "eval" / "results.md").read_text()



def test_llm_eval_errors_are_one_line_with_status_2(tmp_path, tokenizer_path, monkeypatch, capsys):
    from llm.cli import main

    monkeypatch.delenv("LLM_EVAL_DATA", raising=False)
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer_path)
    for args, message in [(["--tasks", "lambada_openai"], "error: lambada_openai reads its data from a local"),
                          (["--tasks", "piqa", "--data-dir", str(SAMPLE)], "error: task piqa: data file"),
                          (["--tasks", "hellaswag", "--data-dir", str(SAMPLE), "--limit", "0"],
                           "error: --limit 0: expected a positive number")]:
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(ckpt), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err


# ---------------------------------------------------------------------------- during training

LM_EVAL_IMPORTED = """
import sys
import llm.cli, llm.train
from llm.config import Config, EvalConfig
from llm.train import default_callbacks
default_callbacks(Config())
print("lm_eval" in sys.modules)
default_callbacks(Config(eval=EvalConfig(every=5, data_dir=sys.argv[1])))
print("lm_eval" in sys.modules)
"""


def test_training_without_evaluation_does_not_import_lm_eval():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", LM_EVAL_IMPORTED, str(SAMPLE)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"], out.stdout  # off: never loaded; on: the same probe sees it


def test_eval_callback_runs_every_n_steps_and_leaves_the_model_as_it_was(tok):
    model = make_model("smear").train()
    logged = []
    trainer = SimpleNamespace(model=model, cfg=Config(), log=lambda step, m: logged.append((step, m)),
                              tokenizer_path=None)
    callback = EvalCallback(EvalConfig(every=2, tasks=["lambada_openai"], limit=4, data_dir=str(SAMPLE),
                                       batch_size=3), tokenizer=tok)
    callback.on_train_start(trainer)
    callback.on_step(trainer, 1, {})
    assert logged == []
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    callback.on_step(trainer, 2, {})
    assert torch.equal(torch.rand(3), expected_next)  # the training RNG stream did not move
    assert model.training
    (step, scores), = logged
    assert step == 2 and 0 <= scores["eval/lambada_openai/acc"] <= 1 and "eval/lambada_openai/perplexity" in scores
    assert EvalCallback(EvalConfig(every=0, tasks=["nonexistent"]), tokenizer=tok).tasks is None  # off: no checks
    with pytest.raises(ConfigError, match="eval.tasks=piqa: task piqa: data file .* not found"):
        EvalCallback(EvalConfig(every=10, tasks=["piqa"], data_dir=str(SAMPLE)))  # `llm train` prints it
