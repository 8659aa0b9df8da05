"""llm.evaluation.perplexity and `llm eval --text`: the log-likelihood against a naive per-token loop,
the metrics against lm-eval's own wikitext-style task on the same document, the results
files, and one-line errors for files that cannot be scored."""
from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import load_model
from llm.evaluation import LLMEvalModel, run_eval
from tests.helpers import MAX_LEN, SAMPLE, sample_texts, write_checkpoint


def held_out_text() -> str:
    """Several windows long, with multi-byte characters (bytes != characters) and a trailing newline."""
    return sample_texts()[0] + "\nNaïve café — “quoted” 東京.\n"


def naive_loglikelihood(ckpt, text: str) -> tuple[float, int]:
    """Σ log p(token_i | its context), one float64 forward per token.

    The context, written out from the definition of rolling windows of W tokens: the targets
    are cut into consecutive windows of W tokens (the last one shorter), and each window is
    predicted from the W tokens before its end, EOS standing in before the first token (so
    the short last window also sees the end of the window before it).
    """
    loaded = load_model(ckpt, dtype=torch.float64)
    model, tok = loaded.model, loaded.tokenizer
    tokens = tok.encode(text)
    padded = [tok.eos_id] + tokens
    total = 0.0
    with torch.no_grad():
        for i, token in enumerate(tokens):
            end = min(MAX_LEN * (i // MAX_LEN + 1), len(tokens))  # the window's end, exclusive
            context = padded[max(0, end - MAX_LEN):i + 1]
            logits = model(torch.tensor([context])).logits[0, -1]  # [V]
            total += float(F.log_softmax(logits, dim=-1)[token])
    return total, len(tokens)


def wikitext_style_task(jsonl) -> dict:
    """lm-eval's wikitext task (its scoring function and metrics) on a local one-document file."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return {"task": "local_wikitext", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{page}}", "process_results": process_results,
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}


def test_text_perplexity_matches_a_naive_loop_and_lm_evals_wikitext_scoring(tmp_path, tokenizer_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer_path, router="lapsum")
    text = held_out_text()
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    results, path = run_eval(ckpt, [], texts=[str(tmp_path / "held.txt")], batch_size=3, out=tmp_path / "r.json")

    got = json.loads(path.read_text())["results"][str(tmp_path / "held.txt")]
    counts = results["text"][str(tmp_path / "held.txt")]
    loglikelihood, n_tokens = naive_loglikelihood(ckpt, text)
    assert n_tokens > 2 * MAX_LEN and n_tokens % MAX_LEN and counts["tokens"] == n_tokens  # a short last window
    assert counts["loglikelihood"] == pytest.approx(loglikelihood, rel=1e-5)
    assert got["token_perplexity,none"] == pytest.approx(torch.tensor(-loglikelihood / n_tokens).exp().item(),
                                                         rel=1e-5)
    assert counts["bytes"] == len(text.encode("utf-8")) > len(text)

    (tmp_path / "held.jsonl").write_text(json.dumps({"page": text}) + "\n", encoding="utf-8")
    reference = lm_eval.simple_evaluate(
        model=LLMEvalModel(checkpoint=str(ckpt), batch_size=3, progress=False),
        tasks=[wikitext_style_task(tmp_path / "held.jsonl")], task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0)["results"]["local_wikitext"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[f"{metric},none"] == pytest.approx(reference[f"{metric},none"], rel=1e-6), metric
    table = path.with_suffix(".md").read_text()
    assert "|bits_per_byte " in table and "|token_perplexity|" in table, table


def test_text_and_tasks_in_one_run(tmp_path, tokenizer_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer_path)
    for name, text in (("a.txt", "A short text."), ("b.txt", held_out_text())):
        (tmp_path / name).write_text(text, encoding="utf-8")
    texts = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    results, path = run_eval(ckpt, ["winogrande"], limit=4, batch_size=4, data_dir=SAMPLE, texts=texts)
    assert path == ckpt / "eval" / "results.json"
    saved = json.loads(path.read_text())
    assert set(saved["results"]) == {"winogrande", *texts}
    assert saved["llm"]["texts"] == texts and saved["llm"]["tasks"] == ["winogrande"]
    a = saved["text"][texts[0]]
    assert a["words"] == 3 and a["bytes"] == 13
    bits = -a["loglikelihood"] / math.log(2)
    assert saved["results"][texts[0]]["bits_per_byte,none"] == pytest.approx(bits / 13)


def test_unscorable_text_files_are_one_line_errors_with_status_2(tmp_path, tokenizer_path, capsys):
    from llm.cli import main

    ckpt = write_checkpoint(tmp_path / "ckpt", tokenizer_path)
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    cases = [(["--text", str(tmp_path / "missing.txt")], f"error: --text {tmp_path / 'missing.txt'}: no such file"),
             (["--text", str(tmp_path / "empty.txt")], f"error: --text {tmp_path / 'empty.txt'}: the file is empty"),
             (["--text", str(tmp_path / "latin1.txt")],
              f"error: --text {tmp_path / 'latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 3)"),
             ([], "error: nothing to evaluate: pass --tasks")]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["eval", str(ckpt), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
    assert not (ckpt / "eval").exists()
