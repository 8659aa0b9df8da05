"""`llm export` on randomly initialised models: fidelity per router, time and size at 125M.

    python scripts/bench_export.py                       # tiny models of every router, then configs/gpt-125m-*.yaml
    python scripts/bench_export.py --skip-125m           # the fidelity table only
    python scripts/bench_export.py --skip-tiny --check   # the 125M table only, with a logit check
    python scripts/bench_export.py --configs configs/gpt-125m-dense.yaml --check

Fidelity (tiny models, one per router): the largest |logit| difference between
transformers' model and `llm.checkpoint.load_model`'s on the sample texts (fp32), and how
many greedy continuations generated with transformers' `generate()` (with its cache)
equal our own incremental decoding token for token. Time and size: a randomly
initialised model of each config is saved as a checkpoint and exported on CPU; the
export is timed (loading the checkpoint included); `--check` also loads the export in
transformers and compares logits. The tokenizer is the one `llm prepare` trains on the
bundled sample for the configs' vocabulary (cached in data/cache after the first run).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llm.checkpoint import load_model, write_model_files
from llm.config import Config, ModelConfig, RoutingConfig, import_modules, load_config
from llm.data import Tokenizer, prepare
from llm.export import export
from llm.model import build_model

TINY = {
    "dense": dict(router="dense"),
    "topk": dict(router="topk", n_experts=8, k=2),
    "switch": dict(router="switch", n_experts=8),
    "lapsum": dict(router="lapsum", n_experts=8, k_mean=1.5, tau=0.05),
    "smear": dict(router="smear", n_experts=8, segment_len=16, reset_at_eos=True),
    "topk every 2": dict(router="topk", n_experts=8, k=2, every=2),
    "lapsum every 2": dict(router="lapsum", n_experts=8, k_mean=1.5, every=2),
    "hash (plug-in)": dict(router="hash", n_experts=8),
}
PLUGINS = ["examples.hash_router"]  # the routers of TINY from outside the package, as a config's `imports:`


def save_random_checkpoint(cfg: Config, ckpt: Path, tokenizer: Path, sharpen_routing: bool = False) -> Path:
    """A checkpoint of a randomly initialised model (as step 0 of a run would save it).

    sharpen_routing: router, prior and budget parameters drawn from N(0, 1) instead of their
    near-uniform init, so that the experts chosen and LapSum's k_l differ between tokens and layers.
    """
    model = build_model(cfg.model)
    if sharpen_routing:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(key in name for key in ("router", "prior", "budget")):
                    p.normal_(0, 1.0)
    write_model_files(ckpt, model.state_dict(), cfg, tokenizer, {"step": 0})
    return ckpt


def our_greedy(model, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation with the project's own incremental decoding (DecodeCache)."""
    cache = model.new_cache()
    logits = model(prompt, cache=cache).logits[:, -1]
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[out[-1]]]), cache=cache).logits[:, -1]
    return out


@torch.no_grad()
def fidelity(ckpt: Path, out: Path, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
    """(max |logit difference| over the prompts, greedy continuations that agree)."""
    from transformers import AutoModelForCausalLM

    ours = load_model(ckpt).model
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    worst, agree = 0.0, 0
    for ids in prompts:
        x = torch.tensor([ids])
        worst = max(worst, float((hf(x).logits - ours(x).logits).abs().max()))
        if not new_tokens:
            continue
        prompt = x[:, : len(ids) // 2]
        got = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False)[0, prompt.shape[1]:].tolist()
        want = our_greedy(ours, prompt, new_tokens)
        agree += got == want[:len(got)]  # generate() stops early at EOS
    return worst, agree


def sample_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    root = Path(__file__).resolve().parents[1] / "eval" / "sample" / "lambada_openai" / "lambada_test.jsonl"
    texts = [json.loads(line)["text"] for line in root.open()]
    return [tok.encode(t)[:length] for t in texts[:n]]


def tiny_table(tokenizer: Path, vocab: int, work: Path) -> None:
    tok = Tokenizer.load(tokenizer)
    prompts = sample_prompts(tok, 8, 96)
    import_modules(PLUGINS)
    print("| router | architecture | max abs logit diff (fp32) | greedy continuations equal (32 tokens) |")
    print("|---|---|---|---|")
    for name, routing in TINY.items():
        torch.manual_seed(0)
        model = ModelConfig(vocab_size=vocab, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=128,
                            tie_embeddings=False, init_std=0.1, routing=RoutingConfig.build(**routing))
        cfg = Config(model=model, imports=PLUGINS)
        cfg.data.seq_len = model.max_seq_len
        cfg.validate()
        ckpt = save_random_checkpoint(cfg, work / name.replace(" ", "_"), tokenizer, sharpen_routing=True)
        summary = export(ckpt, work / (ckpt.name + "_hf"))
        worst, agree = fidelity(ckpt, summary.out_dir, prompts, 32)
        print(f"| {name} | {summary.architecture} | {worst:.2e} | {agree}/{len(prompts)} |", flush=True)


def size_table(configs: list[str], tokenizer: Path, work: Path, check: bool) -> None:
    print("| config | architecture | parameters | export size | export time |" + (" max logit diff |" if check else ""))
    print("|---|---|---|---|---|" + ("---|" if check else ""))
    for path in configs:
        cfg = load_config(path)
        torch.manual_seed(0)
        ckpt = save_random_checkpoint(cfg, work / Path(path).stem, tokenizer)
        summary = export(ckpt, work / (Path(path).stem + "_hf"))
        files = sum(f.stat().st_size for f in summary.out_dir.iterdir())
        n_params = summary.weight_bytes // 4
        row = (f"| {Path(path).name} | {summary.architecture} | {n_params / 1e6:.0f}M | {files / 1e9:.2f} GB "
               f"({summary.shards} file) | {summary.seconds:.1f} s |")
        if check:
            worst, _ = fidelity(ckpt, summary.out_dir, [list(range(1, 129))], 0)
            row += f" {worst:.2e} |"
        print(row, flush=True)
        shutil.rmtree(ckpt)
        shutil.rmtree(summary.out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=sorted(glob.glob("configs/gpt-125m-*.yaml")))
    parser.add_argument("--skip-125m", action="store_true", help="only the fidelity table of the tiny models")
    parser.add_argument("--skip-tiny", action="store_true", help="only the time and size table of --configs")
    parser.add_argument("--check", action="store_true", help="also compare logits of the 125M exports")
    args = parser.parse_args()
    base = load_config(args.configs[0]) if args.configs else load_config("configs/gpt-125m-dense.yaml")
    base.data.num_proc = min(base.data.num_proc, os.cpu_count() or 1)  # the configs ask for a GPU node's 16
    t0 = time.perf_counter()
    tokenizer = prepare(base) / "tokenizer.model"
    print(f"tokenizer: {tokenizer} ({time.perf_counter() - t0:.0f} s)\n")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_tiny:
            tiny_table(tokenizer, base.model.vocab_size, Path(tmp))
            print()
        if not args.skip_125m:
            size_table(args.configs, tokenizer, Path(tmp), args.check)


if __name__ == "__main__":
    main()
