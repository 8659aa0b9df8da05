"""One of this project's checkpoints as an lm-evaluation-harness model.

Importing this module registers the model name `llm` with lm-eval:

    lm_eval.simple_evaluate(model="llm", model_args="checkpoint=runs/tiny-dense", tasks=[...])

`LLMEvalModel` implements lm-eval's three request types on our own model:
- loglikelihood: lm-eval's `TemplateLM` splits context/continuation (the pair is encoded
  whole and split at the context's token count; an empty context is conditioned on EOS,
  which is what ends every document in `llm prepare`'s token stream). Inputs longer than
  `model.max_seq_len` lose context tokens on the left; a continuation that is itself longer
  is scored in pieces of max_seq_len/2 tokens, each with max_seq_len/2 tokens of history.
- loglikelihood_rolling: disjoint windows of `max_seq_len` tokens (`get_rolling_token_windows`),
  each token predicted exactly once.
- generate_until: greedy decoding with the model's KV cache, stopping at EOS, a stop
  sequence or `max_gen_toks`.

Requests are sorted by length (lm-eval's `Collator`) and right-padded into batches. Scores
do not depend on the batch size: the model is causal and every router's output at position
t depends on tokens <= t of its own sequence only, so padding after the real tokens changes
nothing before it (the tests check this for dense and routed models). Exceptions, warned
about at load time: capacity-limited routing (`capacity_factor` set, or DeepSpeed's own
`deepspeed_topk` layer), where tokens compete for expert slots across the batch, and SMEAR's
`first_segment: self_stopgrad`, which reads the future of segment 0.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import lm_eval
import lm_eval.models  # noqa: F401  (registers lm-eval's own model names before ours)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llm.evaluation.errors import EvalError
from llm.routing import registry

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@register_model("llm")
class LLMEvalModel(TemplateLM):
    """One of this project's models as an lm-eval LM.

    From lm-eval: `model_args="checkpoint=PATH,batch_size=16,device=cuda,dtype=bf16"`.
    In process (evaluation during training): `LLMEvalModel(model=m, tokenizer=tok)` uses the
    given model as it is (device, dtype, weights) and never changes its train/eval mode.
    """

    def __init__(self, checkpoint: Optional[str] = None, batch_size: int | str = 16, device: Optional[str] = None,
                 dtype: Optional[str] = None, max_gen_toks: int = 256, *,
                 model: Optional[torch.nn.Module] = None, tokenizer: Any = None, progress: bool = True,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise EvalError(f"unknown model_args {', '.join(sorted(unknown))}: expected checkpoint, batch_size, "
                            f"device, dtype, max_gen_toks")
        if (checkpoint is None) == (model is None):
            raise EvalError("pass exactly one of checkpoint=PATH or an in-memory model")
        self.step = 0
        self.checkpoint: Optional[Path] = None
        if checkpoint is not None:
            model, tokenizer = self._load(checkpoint, device, dtype)
        elif tokenizer is None:
            raise EvalError("an in-memory model needs its tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        self.progress = progress
        cfg = model.cfg
        self.max_length = cfg.max_seq_len
        if tokenizer.vocab_size != cfg.vocab_size:
            where = f"{self.checkpoint}: " if self.checkpoint else ""
            raise EvalError(f"{where}tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                            f"{cfg.vocab_size}: the model was trained with another tokenizer")
        if tokenizer.eos_id < 0 and tokenizer.bos_id < 0:
            raise EvalError("the tokenizer defines neither EOS nor BOS; an empty context needs one to condition on")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else self.eot_token_id
        _warn_if_batch_dependent(cfg)

    def _load(self, checkpoint: str, device: Optional[str], dtype: Optional[str]):
        from llm.checkpoint import CheckpointError, load_model
        from llm.config import ConfigError
        from llm.data import DataError

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise EvalError(f"device={device!r}: expected cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise EvalError(f"device={device!r}: CUDA is not available on this machine")
        if dtype in (None, "auto"):
            torch_dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        elif dtype in DTYPES:
            torch_dtype = DTYPES[dtype]
        else:
            raise EvalError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
        try:
            loaded = load_model(checkpoint, device=device, dtype=torch_dtype)
        except (CheckpointError, ConfigError, DataError) as err:
            raise EvalError(str(err)) from None
        self.checkpoint, self.step = loaded.path, loaded.step
        log.info("loaded %s (step %d) on %s in %s", loaded.path, loaded.step, device, torch_dtype)
        return loaded.model, loaded.tokenizer

    # -- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id >= 0 else self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", None) or "llm-tokenizer")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if not continuation_enc:  # the continuation merged into the context's last token: score that token
            whole = self.tok_encode(context + continuation)
            context_enc, continuation_enc = whole[:-1], whole[-1:]
        return context_enc or [self.prefix_token_id], continuation_enc

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    # -- forward passes

    @torch.inference_mode()
    def _tail_logits(self, rows: list[list[int]], n: int) -> torch.Tensor:
        """Logits [B, n, V] at the last n positions of each row (rows right-padded into one batch).

        Scoring needs the logits of the continuation only, so the final hidden states are
        gathered at those positions before the vocabulary projection (a pre-hook on
        lm_head): that skips most of the projection, the largest matmul of a small model.
        """
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        ends = torch.tensor([len(r) for r in rows])
        index = (ends[:, None] - n + torch.arange(n)).clamp(min=0).to(self._device)  # [B, n]

        def gather(module, args):
            (hidden,) = args  # [B, T, d]
            return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])),)

        handle = self.model.lm_head.register_forward_pre_hook(gather)
        try:
            return self.model(ids.to(self._device)).logits
        finally:
            handle.remove()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) for pre-tokenised (strings, context, continuation).

        A continuation longer than max_seq_len cannot be scored in one window: it is scored
        in pieces of max_seq_len/2 tokens, each seeing the max_seq_len/2 tokens before it,
        and the pieces' log-probabilities are summed.
        """
        pieces, owner, split = [], [], {}
        for i, (strings, context, continuation) in enumerate(requests):
            if len(continuation) <= self.max_length:
                pieces.append((strings, context, continuation))
                owner.append(i)
                continue
            tokens, step = context + continuation, max(1, self.max_length // 2)
            for start in range(len(context), len(tokens), step):
                pieces.append((None, tokens[:start], tokens[start:start + step]))
                owner.append(i)
            split[i] = strings
        if split:
            lm_eval.utils.warning_once(log, f"continuations longer than model.max_seq_len={self.max_length} "
                                            f"are scored in windows of {self.max_length // 2} tokens")
        totals = [[0.0, True] for _ in requests]
        for i, (score, greedy) in zip(owner, self._score(pieces, disable_tqdm)):
            totals[i][0] += score
            totals[i][1] &= greedy
        for i, strings in split.items():
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, tuple(totals[i]))
        return [(score, greedy) for score, greedy in totals]

    def _score(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_loglikelihood_tokens for continuations of at most max_seq_len tokens, batched by length."""
        collator = Collator(
            requests,
            sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
            group_by="contexts",  # score requests that differ only in their last token once
            group_fn=lambda r: r[1] + r[2][:-1],
        )
        results = []
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress)
        for chunk in collator.get_batched(n=self.batch_size):
            rows = [(context + continuation)[-(self.max_length + 1):][:-1]  # left-truncated input
                    for _, context, continuation in chunk]
            width = max(len(c) for _, _, c in chunk)
            logits = self._tail_logits(rows, width)  # [B, width, V]
            for (strings, context, continuation), row_logits in zip(chunk, logits):
                n = len(continuation)
                logprobs = F.log_softmax(row_logits[width - n:].float(), dim=-1)  # [n, V]
                greedy = logprobs.argmax(-1)
                for req_strings, cont, lp in collator.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=logprobs[None]):
                    target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                    tail = lp[0, -len(cont):]  # [len(cont), V]
                    score = float(tail.gather(1, target[:, None]).sum())
                    answer = (score, bool((greedy[-len(cont):] == target).all()))
                    results.append(answer)
                    if req_strings is not None:
                        self.cache_hook.add_partial("loglikelihood", req_strings, answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string, conditioned on EOS, in disjoint windows of max_seq_len."""
        windows, counts = [], []
        for (text,) in (r.args for r in requests):
            pairs = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += [(None, context, target) for context, target in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for request, n in zip(requests, counts):
            total = sum(score for score, _ in scores[start:start + n])
            start += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence."""
        leak = registry.get(self.model.cfg.routing.router).future_leak(self.model.cfg)
        if leak is not None:
            raise EvalError(f"generate_until needs incremental decoding, which {leak} cannot do")
        collator = Collator([r.args for r in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)  # EOS stops by id
            max_new = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                lm_eval.utils.warning_once(log, "the llm model decodes greedily; ignoring do_sample/temperature")
            if max_new > self.max_length // 2:
                lm_eval.utils.warning_once(
                    log, f"max_gen_toks={max_new} capped to {self.max_length // 2} (half of model.max_seq_len)")
                max_new = self.max_length // 2
            prompts = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.prefix_token_id]
                       for c in contexts]
            for context, gen_kwargs, prompt, tokens in zip(contexts, all_kwargs, prompts,
                                                           self._greedy(prompts, max_new, until)):
                text = postprocess_generated_text(self._decode_after(prompt, tokens), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    @torch.inference_mode()
    def _greedy(self, prompts: list[list[int]], max_new: int, until: list[str]) -> list[list[int]]:
        """Greedy tokens after each prompt, up to max_new, EOS (excluded) or a stop sequence.

        One KV cache for the batch and no padding: all rows advance one position per step;
        a row whose prompt is longer than the shortest keeps feeding its own prompt tokens
        until they run out, so every row decodes exactly as it would alone.
        """
        lengths = [len(p) for p in prompts]
        cache = self.model.new_cache()
        pos = min(lengths)
        logits = self.model(torch.tensor([p[:pos] for p in prompts], device=self._device), cache=cache).logits[:, -1]
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = self.tokenizer.eos_id
        while True:
            best = logits.argmax(-1).tolist()
            step = []
            for b, prompt in enumerate(prompts):
                if pos < lengths[b]:
                    step.append(prompt[pos])
                    continue
                if not done[b]:
                    if best[b] == eos:
                        done[b] = True
                    else:
                        out[b].append(best[b])
                        text = self._decode_after(prompt, out[b]) if until else ""
                        done[b] = len(out[b]) >= max_new or any(s in text for s in until)
                step.append(out[b][-1] if out[b] else self.pad_id)  # finished rows feed anything
            if all(done) or pos + 1 >= self.max_length:
                return out
            logits = self.model(torch.tensor(step, device=self._device)[:, None], cache=cache).logits[:, -1]
            pos += 1

    def _decode_after(self, prompt: list[int], tokens: list[int]) -> str:
        """Text of tokens as they continue the prompt (keeps a leading space sentencepiece would drop)."""
        anchor = self.tokenizer.decode(prompt[-1:])
        text = self.tokenizer.decode(prompt[-1:] + tokens)
        return text[len(anchor):] if text.startswith(anchor) else self.tokenizer.decode(tokens)


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EvalError(f"{name}={value!r}: expected a positive integer") from None
    if number <= 0 or number != float(value):
        raise EvalError(f"{name}={value!r}: expected a positive integer")
    return number


def _warn_if_batch_dependent(cfg) -> None:
    spec = registry.get(cfg.routing.router)
    capacity = spec.capacity(cfg)
    if capacity is not None:
        log.warning("model.routing (%s, capacity_factor=%s): tokens compete for expert capacity across the batch, "
                    "so scores depend on batch size and padding", spec.name, capacity)
    leak = spec.future_leak(cfg)
    if leak is not None:
        log.warning("%s: scores see the continuation and depend on padding", leak)
