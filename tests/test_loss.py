"""llm.model.loss: chunked cross-entropy against a float64 oracle, and through the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import build_model
from llm.model.loss import chunked_cross_entropy
from tests.models import tiny_config


@pytest.mark.parametrize("chunk", [0, 7, 16, 64])
def test_chunked_loss_and_gradients_match_float64(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=gen)
    loss = chunked_cross_entropy(hidden, weight, targets, chunk)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    oracle = F.cross_entropy(h64 @ w64.t(), targets)
    oracle.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(oracle.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad, h64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w64.grad.float(), rtol=1e-5, atol=1e-6)


def test_model_loss_equals_cross_entropy_of_its_logits():
    cfg = tiny_config(vocab_size=53, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 53, (3, 13), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    full = F.cross_entropy(model(inputs).logits.flatten(0, 1), targets.flatten())
    out = model(inputs, targets=targets, loss_chunk=5)
    assert out.logits is None and out.ce.item() == pytest.approx(full.item(), rel=1e-6)
