"""What only a GPU runs: grouped GEMM and SDPA kernels in bf16, compiled blocks in bf16.
Skipped without CUDA; `scripts/gpu_check.sh` runs this file on a GPU machine."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.config import TrainConfig
from llm.model import build_model
from llm.model.transformer import Attention
from llm.parallel.blocks import apply_block_options
from llm.routing.experts import Experts, swiglu
from tests.causality import assert_causal
from tests.models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def test_grouped_gemm_bf16_matches_per_expert_fp32():
    torch.manual_seed(0)
    experts = Experts(8, 256, 512, 0.02, 0.02).to(CUDA, torch.bfloat16)
    counts = torch.tensor([0, 100, 3, 57, 0, 200, 1, 151], device=CUDA)  # empty experts included
    x = torch.randn(int(counts.sum()), 256, device=CUDA, dtype=torch.bfloat16)
    y = experts(x, counts)
    ref = torch.cat([swiglu(xe.float(), experts.w1[e].float(), experts.w3[e].float(), experts.w2[e].float())
                     for e, xe in enumerate(x.split(counts.tolist()))])
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-3)


def test_sdpa_bf16_matches_fp32_math_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 8, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))  # [B, T, H, hd]
    y = Attention._sdpa(q, k, v, past=0)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / 8.0
    scores = scores.masked_fill(torch.ones(512, 512, dtype=torch.bool, device=CUDA).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("router", ["dense", "switch", "topk", "lapsum", "smear"])
def test_compiled_bf16_blocks_match_eager(router):
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # expert dropout draws eager's random numbers
    cfg = tiny_config(router, vocab_size=512, d_model=128, n_layers=2, n_heads=4, d_ff=512, max_seq_len=256,
                      n_experts=8, **({"segment_len": 64} if router == "smear" else {}))
    ids = torch.randint(0, 512, (4, 257), device=CUDA, generator=torch.Generator(CUDA).manual_seed(0))
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = apply_block_options(build_model(cfg), TrainConfig(compile=compile_)).to(CUDA, torch.bfloat16)
        torch.manual_seed(1)
        out = model(ids[:, :-1], targets=ids[:, 1:])
        (out.ce + out.aux_loss).backward()
        results.append((out.ce.item(), model.embed.weight.grad.float()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=5e-2, atol=1e-3)
    assert_causal(model, ids[:2, :128], positions=[5, 100], vocab_size=512, tol=1e-2)
    torch._dynamo.reset()
