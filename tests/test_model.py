"""llm.model: the dense transformer (shapes, causality, KV cache, learning, FLOP count)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import build_model, flops_per_token
from tests.causality import assert_causal
from tests.models import tiny_config, tiny_model

VOCAB = 97


def model_and_ids(seed: int = 0, batch: int = 2, length: int = 16, **kw):
    model = tiny_model(seed=seed, vocab_size=VOCAB, **kw)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model, ids


def test_shapes_and_dense_aux_loss():
    model, ids = model_and_ids()
    out = model(ids)
    assert out.logits.shape == (2, 16, VOCAB) and out.logits.dtype == torch.float32
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert model.budget is None and model.routed_ffns() == []
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_same_seed_same_weights():
    a, _ = model_and_ids(seed=3)
    b, _ = model_and_ids(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_tied_embeddings():
    model, _ = model_and_ids()
    assert model.lm_head.weight is model.embed.weight
    untied, _ = model_and_ids(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed.weight


def test_dense_model_is_causal():
    model, ids = model_and_ids(length=24)
    assert_causal(model, ids, positions=[0, 5, 11, 22], vocab_size=VOCAB)


def test_kv_cache_decoding_equals_full_forward():
    model, ids = model_and_ids(length=20)
    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        steps = [model(ids[:, :7], cache).logits]  # a prompt, then one token at a time
        steps += [model(ids[:, t:t + 1], cache).logits for t in range(7, 12)]
        steps.append(model(ids[:, 12:], cache).logits)  # several new tokens after a cache
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tiny_model_overfits_one_batch():
    model, ids = model_and_ids(batch=4, length=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(60):
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.3)
    assert loss.item() < 0.2, loss.item()


def test_flops_per_token():
    cfg = tiny_config(vocab_size=VOCAB)
    model = build_model(cfg)
    d, L, T = cfg.d_model, cfg.n_layers, 16
    # 6 FLOPs per parameter per token (forward 2, backward 4) for every matrix a token passes
    # through, the tied embedding counted once as the output head; norms (2L+1 vectors) are
    # left out; plus causal attention 6·L·d·T.
    assert flops_per_token(cfg, T) == 6 * (model.num_params(exclude_embedding=False) - (2 * L + 1) * d) + 6 * L * d * T
    assert flops_per_token(cfg, 2 * T) - flops_per_token(cfg, T) == 6 * L * d * T

    def routed(router: str, **kw) -> float:
        return flops_per_token(tiny_config(router, vocab_size=VOCAB, n_experts=8, **kw), T)

    assert routed("switch") == routed("topk", k=1)
    assert routed("topk", k=2) > routed("switch")
    assert routed("lapsum", k_mean=1.5) == pytest.approx((routed("topk", k=1) + routed("topk", k=2)) / 2)


def test_smear_flops_count_the_merge():
    """SMEAR's extra FLOPs over a dense block, as torch's FLOP counter measures a training step:
    the merge of E experts per segment of S tokens, E/S of an expert per token."""
    from torch.utils.flop_counter import FlopCounterMode

    T, segment = 64, 16

    def block_flops(cfg) -> float:  # per token, of one block's forward and backward (matmuls)
        cfg.max_seq_len = T
        model = build_model(cfg)
        ids = torch.randint(0, VOCAB, (2, T))
        with FlopCounterMode(display=False) as counter:
            out = model(ids, targets=ids)
            (out.ce + out.aux_loss).backward()
        return sum(counter.get_flop_counts()["Transformer.blocks.0"].values()) / (2 * T)

    dense, smear = tiny_config(vocab_size=VOCAB), tiny_config("smear", vocab_size=VOCAB, n_experts=8, segment_len=segment)
    measured = block_flops(smear) - block_flops(dense)
    counted = (flops_per_token(smear, T) - flops_per_token(dense, T)) / smear.n_layers
    router = 6 * smear.d_model * 8  # counted per token; SMEAR routes once per segment
    assert counted - router <= measured <= counted
    assert measured > 0.9 * 6 * (8 / segment) * 3 * smear.d_model * smear.d_ff  # the merge is most of it


def test_norm_and_rope_keep_float64():
    """A float64 model must compute in float64: whole-model oracles compare at ~1e-12."""
    from llm.model.transformer import RMSNorm, apply_rope, rope_tables

    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 8, dtype=torch.float64)  # [B, T, H, hd]
    norm = RMSNorm(8, 1e-6).double()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    y = norm(x)
    assert y.dtype == torch.float64 and (y - expected).abs().max() < 1e-14
    cos, sin = (t.double() for t in rope_tables(8, 5, 10000.0))  # [T, hd/2]
    x1, x2 = x[..., :4], x[..., 4:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = apply_rope(x, cos, sin)
    assert rotated.dtype == torch.float64
    assert (rotated - torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)).abs().max() < 1e-14
