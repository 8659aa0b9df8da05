"""`llm prepare` benchmark: wall time, tokens/s per worker and peak memory, 1 vs N files, 1 vs 2 workers.

    python scripts/bench_prepare.py --corpus 'DIR/enwiki-*.jsonl.gz' --files 1 10 --workers 1 2 \\
        --baseline-rev f6c83b5

Every run is a fresh `python -m llm prepare` process into an empty cache directory, as a user
would start it, with model.vocab_size=--vocab (a BPE tokenizer is trained in every run).
Peak memory is the largest sum of resident memory over the process and all its workers,
sampled every 0.1 s, twice: RSS (counts pages that forked workers share with their parent
once per process, as `ps` does) and PSS (shares them out: the memory actually used). CPU
seconds are those of the process and its workers (user + system): on a machine shared with
other jobs they are steadier than wall time. Tokens/s per worker is
end to end: all tokens written, divided by wall time and by the number of workers (so it
includes start-up and tokenizer training); tokens per CPU second likewise.

`--baseline-rev REV` runs the same sizes with the `llm` package of git revision REV (the
pipeline before the change) and prints the ratios. The last line extrapolates to
`--extrapolate-gb` GB of text from the marginal CPU seconds per MB between the smallest and
the largest run with the most workers (start-up and tokenizer training do not grow with the
text), as worker-hours of a dedicated core.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    pipeline: str
    files: int
    workers: int
    seconds: float
    cpu_seconds: float
    peak_rss_gb: float
    peak_pss_gb: float
    tokens: int
    text_mb: float

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.tokens / self.seconds / self.workers

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.tokens / self.cpu_seconds


def text_megabytes(files: list[str]) -> float:
    total = 0
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(name, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total / 1e6


def peak_memory(proc: subprocess.Popen) -> tuple[int, int]:
    """Wait for `proc`; return the largest summed (RSS, PSS) in bytes of it and its descendants."""
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                info = p.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:  # a worker exited between listing and reading
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.1)
    return peak_rss, peak_pss


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(pythonpath: Path, files: list[str], workers: int, vocab: int,
                cache: Path) -> tuple[float, float, tuple[int, int], int]:
    """(seconds, CPU seconds, peak (RSS, PSS) bytes, tokens) of one `llm prepare` on `files`."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    corpus = "[" + ", ".join(files) + "]"
    args = [sys.executable, "-m", "llm", "prepare", str(pythonpath / "configs" / "tiny-dense.yaml"),
            f"data.corpus={corpus}", f"model.vocab_size={vocab}", f"data.num_proc={workers}",
            f"data.cache_dir={cache}"]
    t0, cpu0 = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.Popen(args, cwd=pythonpath, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = peak_memory(proc)
    out, err = proc.communicate()
    seconds, cpu_seconds = time.perf_counter() - t0, children_cpu_seconds() - cpu0
    if proc.returncode:
        raise SystemExit(f"llm prepare failed ({pythonpath}):\n{err[-2000:]}")
    directory = Path(out.strip().splitlines()[-1])
    summary = next(p for p in (directory / "manifest.json", directory / "meta.json") if p.is_file())  # new, before
    meta = json.loads(summary.read_text())
    return seconds, cpu_seconds, peak, meta["train_tokens"] + meta["val_tokens"]


def baseline_tree(rev: str, into: Path) -> Path:
    """The `llm` package of git revision `rev`, extracted into `into`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "llm", "configs"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=os.environ.get("LLM_BENCH_CORPUS"),
                        help="glob of the corpus files (default: $LLM_BENCH_CORPUS)")
    parser.add_argument("--files", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--baseline-rev", help="git revision of the pipeline to compare with")
    parser.add_argument("--extrapolate-gb", type=float, default=100.0)
    args = parser.parse_args()
    if not args.corpus:
        raise SystemExit("error: pass --corpus GLOB or set LLM_BENCH_CORPUS")
    corpus = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(args.corpus)))
    if len(corpus) < max(args.files):
        raise SystemExit(f"error: --corpus {args.corpus} matches {len(corpus)} files, fewer than {max(args.files)}")

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, vocab {args.vocab}")
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"new": REPO}
        if args.baseline_rev:
            trees["before"] = baseline_tree(args.baseline_rev, Path(tmp))
        for n in args.files:
            files = corpus[:n]
            mb = text_megabytes(files)
            for name, tree in trees.items():
                # The baseline's worker count is datasets.map's num_proc; compare it at the largest only.
                for workers in (args.workers if name == "new" else [max(args.workers)]):
                    seconds, cpu, peak, tokens = run_prepare(tree, files, workers, args.vocab,
                                                             Path(tempfile.mkdtemp(dir=tmp)) / "cache")
                    results.append(Result(name, n, workers, seconds, cpu, peak[0] / 2**30, peak[1] / 2**30, tokens, mb))
                    r = results[-1]
                    print(f"{name:6s} files {n:2d} ({mb:6.1f} MB text), workers {workers}: {seconds:6.1f} s, "
                          f"{cpu:6.1f} CPU s, peak RSS {r.peak_rss_gb:.2f} GiB, PSS {r.peak_pss_gb:.2f} GiB, "
                          f"{tokens:,} tokens, {r.tokens_per_s_per_worker:,.0f} tokens/s per worker, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    report(results, args.extrapolate_gb)


def report(results: list[Result], gigabytes: float) -> None:
    print("\n| pipeline | files | text MB | workers | wall s | CPU s | peak RSS GiB | peak PSS GiB | tokens "
          "| tokens/s per worker | tokens per CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.pipeline} | {r.files} | {r.text_mb:.1f} | {r.workers} | {r.seconds:.1f} | {r.cpu_seconds:.1f} | "
              f"{r.peak_rss_gb:.2f} | {r.peak_pss_gb:.2f} | {r.tokens:,} | {r.tokens_per_s_per_worker:,.0f} | "
              f"{r.tokens_per_cpu_s:,.0f} |")
    for r in results:
        if r.pipeline != "before":
            continue
        new = [x for x in results if x.pipeline == "new" and x.files == r.files and x.workers == r.workers]
        if new:
            print(f"\n{r.files} files, {r.workers} workers: new / before wall time {new[0].seconds / r.seconds:.2f}, "
                  f"CPU time {new[0].cpu_seconds / r.cpu_seconds:.2f}, "
                  f"peak RSS {new[0].peak_rss_gb / r.peak_rss_gb:.2f}, "
                  f"peak PSS {new[0].peak_pss_gb / r.peak_pss_gb:.2f}")
    new = sorted((r for r in results if r.pipeline == "new"), key=lambda r: (r.workers, r.files))
    widest = [r for r in new if r.workers == new[-1].workers]
    small, large = widest[0], widest[-1]
    if large.text_mb > small.text_mb:  # the marginal cost: start-up and tokenizer training do not grow
        cpu_per_mb = (large.cpu_seconds - small.cpu_seconds) / (large.text_mb - small.text_mb)
    else:
        cpu_per_mb = large.cpu_seconds / large.text_mb
    worker_hours = cpu_per_mb * gigabytes * 1e3 / 3600
    print(f"\nextrapolated to {gigabytes:.0f} GB of text from {large.files} vs {small.files} files: "
          f"{worker_hours:.0f} worker-hours ({worker_hours / 2:.0f} h with 2 workers, "
          f"{worker_hours / 64:.1f} h with 64); "
          f"peak memory does not grow with the corpus: PSS {large.peak_pss_gb:.2f} GiB with {large.workers} "
          f"workers here")

if __name__ == "__main__":
    main()
