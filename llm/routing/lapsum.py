"""The LapSum soft top-k operator (SPEC.md §3.1).

p_i = F((r_i − t)/α) with F the Laplace CDF and t the unique threshold with Σ_i p_i = k.
The forward pass finds t in closed form (sorted scores, prefix sums, one quadratic root
per row, no iteration); the backward pass is the closed-form O(E) vector-Jacobian product.

Finding t only needs the sorted order near t: every score above t has p > ½, so fewer
than 2k scores lie above t (and fewer than 2(E − k) below). With m = ⌊2k⌋ + 1 the
threshold lies at or above the m-th largest score, and the scores below that one enter
the closed form only through one sum. For the usual k ≪ E this replaces the full sort by
a top-m and the prefix scans by recurrences along the m window scores, which is what
makes the operator cheap on CPU. Wide windows (k and E − k both large) use the full sort
and logcumsumexp exactly as written in the SPEC.

The backward pass keeps f = dp/du = ½e^{−|u|} relative to its row maximum, so that
q = softmax(−|u|) and ∂L/∂k stay exact when every f of a row underflows (α ≪ score gaps).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.functional import pad

_LOG_HALF = math.log(0.5)
# Largest window handled by the top-m search; past it the full sort is cheaper.
_MAX_WINDOW = 16


def soft_topk(scores: Tensor, k: Tensor | float, alpha: Tensor | float = 1.0) -> Tensor:
    """LapSum soft top-k: weights p ∈ (0, 1) with Σ p = k along the last dim.

    scores: [..., E] router logits (finite), any leading dims.
    k: budget in (0, E), a float or a tensor broadcastable to scores[..., 0]
        (e.g. [] for one budget per layer, [N] for one per row); differentiable.
    alpha: scale > 0, a float or a 0-dim tensor (differentiable); smaller is harder,
        α → 0 gives the hard top-k indicator for integer k.
    Returns p with the shape of scores. Computed in float32 for half/bfloat16 scores
    (and returned in float32: rounding p to bf16 would break Σ p = k), otherwise in the
    dtype of scores. p is increasing in the score; in floating point, entries far from
    the threshold (|r − t| ≫ α) round to exactly 0 or 1.

    Validation is free for float k and alpha and for CPU tensors; for accelerator tensors
    it is an asynchronous device-side assert (no host sync), and the full sort is used
    because the window size would need the host to read k.
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    shape, n = scores.shape, scores.shape[-1]
    if isinstance(k, Tensor):
        batch = shape[:-1]
        if k.dim() > len(batch) or any(a not in (1, b) for a, b in zip(reversed(k.shape), reversed(batch))):
            raise ValueError(f"k of shape {tuple(k.shape)} does not broadcast to scores[..., 0] of shape {tuple(batch)}")
        k = k.to(scores.dtype)
        if k.device.type == "cpu":
            k_lo, k_hi = k.min().item(), k.max().item()
            if not 0.0 < k_lo <= k_hi < n:
                raise ValueError(f"soft_topk needs 0 < k < E = {n}, got k in [{k_lo}, {k_hi}]")
        else:
            torch._assert_async(((k > 0) & (k < n)).all(), f"soft_topk needs 0 < k < E = {n}")
            k_lo, k_hi = 0.0, float(n)
        # One budget per row of the flattened scores, or one for all rows.
        k = k.reshape(1, 1) if k.numel() == 1 else k.expand(batch).reshape(-1, 1)  # [N or 1, 1]
    else:
        k = k_lo = k_hi = float(k)
        if not 0.0 < k < n:
            raise ValueError(f"soft_topk needs 0 < k < E = {n}, got k = {k}")
    if isinstance(alpha, Tensor):
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a float or a 0-dim tensor, got shape {tuple(alpha.shape)}")
        alpha = alpha.to(scores.dtype)
        if alpha.device.type == "cpu":
            if not alpha.item() > 0.0:
                raise ValueError(f"soft_topk needs alpha > 0, got alpha = {alpha.item()}")
        else:
            torch._assert_async(alpha > 0, "soft_topk needs alpha > 0")
    else:
        alpha = float(alpha)
        if not alpha > 0.0:
            raise ValueError(f"soft_topk needs alpha > 0, got alpha = {alpha}")
    # Fewer than 2k scores lie above t and fewer than 2(E − k) below it.
    m_top, m_bottom = math.floor(2 * k_hi) + 1, math.floor(2 * (n - k_lo)) + 1
    window = min(m_top, m_bottom, n)
    window = window if window <= _MAX_WINDOW else None
    return _SoftTopK.apply(scores.reshape(-1, n), k, alpha, window, m_bottom < m_top).view(shape)


class _SoftTopK(torch.autograd.Function):
    """On scores [N, E] and k a float or [N or 1, 1]."""

    @staticmethod
    def forward(ctx, scores, k, alpha, window, flip):
        """window: the m of the top-m search, or None for the full sort; flip: search the
        bottom m instead (k > E/2)."""
        inv_alpha = 1.0 / alpha
        unit = isinstance(inv_alpha, float) and inv_alpha == 1.0
        if window is None:
            p, f_rel, total_rel, f_max, b = _forward_sorted(scores, k, inv_alpha, unit)
        else:
            p, f_rel, total_rel, f_max, b = _forward_window(scores, k, inv_alpha, unit, window, flip)
        u = None
        if ctx.needs_input_grad[2]:
            u = torch.addcmul(-b, scores, inv_alpha) if isinstance(inv_alpha, Tensor) else scores * inv_alpha - b
        # dp/dr = f/α = f_rel · (f_max/α): one per-row factor for the backward.
        ctx.save_for_backward(f_rel, total_rel, f_max if unit else f_max * inv_alpha, u)
        ctx.k_shape = k.shape if isinstance(k, Tensor) else None
        return p

    @staticmethod
    @once_differentiable  # f is saved as a constant: second derivatives would be wrong
    def backward(ctx, g):
        f_rel, total_rel, row_scale, u = ctx.saved_tensors
        fg = f_rel * g  # [N, E]
        g_mean = fg.sum(-1, keepdim=True) / total_rel  # ⟨q, g⟩ with q = f/S  [N, 1]
        grad_scores = grad_k = grad_alpha = None
        if ctx.needs_input_grad[2]:
            # −(S/α²) Σ g q (r − ⟨q, r⟩) = −(1/α) Σ f g (u − ⟨q, u⟩), since u = r/α − b.
            u_mean = (f_rel * u).sum(-1, keepdim=True) / total_rel
            grad_alpha = -(row_scale * (fg * (u - u_mean)).sum(-1, keepdim=True)).sum()
        if ctx.needs_input_grad[0]:
            # (S/α) q ⊙ (g − ⟨q, g⟩) = (f/α) ⊙ (g − ⟨q, g⟩); rows sum to zero.
            grad_scores = fg.addcmul_(f_rel, g_mean, value=-1.0).mul_(row_scale)
        if ctx.needs_input_grad[1]:
            grad_k = g_mean.sum_to_size(ctx.k_shape)
        return grad_scores, grad_k, grad_alpha, None, None


def _root(log_p: Tensor, log_q: Tensor, e: Tensor) -> Tensor:
    """b solving ½Q e^b − ½P e^{−b} = e on the bracketing interval (all same shape).

    log_p = log Σ_{s_j < b} e^{s_j} (−inf if empty), log_q = log Σ_{s_j ≥ b} e^{−s_j}
    (−inf if empty), e = w − #{s_j < b}. With z = |e| + sqrt(e² + PQ) the two algebraically
    equal roots are b = log z − log Q (used for e > 0) and b = log P − log z (e ≤ 0), each
    free of cancellation for its sign of e. log z is formed in log space because for
    integer k and a hard split e = 0 and PQ underflows, while b = ½(log P − log Q) is finite.
    """
    log_e = e.abs().log()
    log_z = torch.logaddexp(log_e, 0.5 * torch.logaddexp(2.0 * log_e, log_p + log_q))
    return torch.where(e > 0, log_z - log_q, log_p - log_z)


def _forward_sorted(scores, k, inv_alpha, unit):
    """SPEC §3.1 as written: full sort and logcumsumexp.

    Returns p and f/f_max [N, E], Σf/f_max and f_max [N, 1], and b = t/α [N, 1].
    """
    n = scores.shape[-1]
    s = scores if unit else scores * inv_alpha  # [N, E]
    w = n - k
    ss = s.sort(dim=-1).values  # ascending  [N, E]
    # All exponents are ≤ 0 because ss is sorted: A_i ∈ [1, E − i], B_i ∈ [1, i + 1].
    log_lo = ss.logcumsumexp(-1)  # log Σ_{j≤i} e^{s_j}  [N, E]
    log_hi = ss.neg().flip(-1).logcumsumexp(-1).flip(-1)  # log Σ_{j≥i} e^{−s_j}  [N, E]
    odd = torch.arange(1, 2 * n, 2, dtype=s.dtype, device=s.device)  # 2i + 1  [E]
    # 2G(s_i) = A_i − B_i + 2i + 1 increases with i; counting the entries below 2w gives
    # the searchsorted index without needing 2G to be exactly monotone after rounding.
    two_g = (ss + log_hi).exp_() - (log_lo - ss).exp_()  # 2G(s_i) − (2i + 1)  [N, E]
    i = (two_g < (2.0 * w - odd)).sum(-1, keepdim=True)  # b ∈ (s_{i−1}, s_i]  [N, 1]
    log_p = pad(log_lo, (1, 0), value=-math.inf).gather(-1, i)  # log Σ_{j<i} e^{s_j}
    log_q = pad(log_hi, (0, 1), value=-math.inf).gather(-1, i)  # log Σ_{j≥i} e^{−s_j}
    b = _root(log_p, log_q, w - i.to(s.dtype))  # [N, 1]

    u = s - b  # (r − t)/α  [N, E]
    dist = u.abs()
    dist_min = dist.amin(-1, keepdim=True)  # [N, 1]
    f_rel = torch.sub(dist_min, dist).exp_()  # f/f_max  [N, E]
    f_max = torch.rsub(dist_min, _LOG_HALF).exp_()  # [N, 1]
    f = f_rel * f_max  # ½e^{−|u|}; underflows only where the true value does  [N, E]
    p = torch.where(u > 0, 1.0 - f, f)
    return p, f_rel, f_rel.sum(-1, keepdim=True), f_max, b


def _forward_window(scores, k, inv_alpha, unit, m, flip):
    """The same from the top-m window (see the module docstring); same returns.

    Works in the frame s = r/α, or s = −r/α with budget E − k when flip: then the window
    is the bottom m scores and the threshold is −b; p is mapped back at the end. The
    window is kept transposed, [m, N], so that its per-row arithmetic runs along N.
    """
    n = scores.shape[-1]
    w = k if flip else n - k  # w of the flipped problem is E − (E − k) = k
    if isinstance(w, Tensor):
        w = w.t()  # [1, N or 1]
    top, idx = scores.t().topk(m, dim=0, largest=not flip)  # sorted, best first  [m, N]
    top_last = top[-1:]  # t lies beyond it (at or above in the frame)  [1, N]
    # d = s − s_last ≤ 0 off the window. Taking the difference before scaling keeps it
    # exact, so window scores give exactly e^0 = 1 and the rest's sum is exact.
    if unit:
        d = torch.rsub(scores, top_last.t()) if flip else scores - top_last.t()  # [N, E]
        h = top.neg() if flip else top  # window in the frame, descending  [m, N]
    else:
        frame_scale = -inv_alpha if flip else inv_alpha
        d = (scores - top_last.t()).mul_(frame_scale)
        h = top * frame_scale
    x = d.clamp_max_(0.0).exp_()  # e^{s − s_last} off the window, 1 on it  [N, E]
    rest = (x.sum(-1) - m).clamp_min_(0.0).unsqueeze(0)  # Σ_rest e^{s − s_last}  [1, N]

    # The SPEC's A (scores ranked at or above h_j) and B (at or below, plus the rest) at
    # each window score, by recurrences along the window: every factor e^{h_{j+1} − h_j}
    # is ≤ 1, so nothing overflows and A, B ∈ [1, E].
    step = (h[1:] - h[:-1]).exp_()  # [m − 1, N]
    one = torch.ones((), dtype=h.dtype, device=h.device)
    above, below = torch.empty_like(h), torch.empty_like(h)  # A, B  [m, N]
    above[0] = 1.0
    torch.add(rest[0], 1.0, out=below[m - 1])
    for j in range(1, m):
        torch.addcmul(one, above[j - 1], step[j - 1], out=above[j])
        torch.addcmul(one, below[m - j], step[m - 1 - j], out=below[m - 1 - j])
    # 2G(h_j) = A − B + 2i + 1 with i the ascending rank. G falls along the window; every
    # score off it has 2G < 2w, and counting the window's ones locates b. When the window
    # is not the whole row b ≥ h_last, so at least one qualifies even after rounding.
    rank = torch.arange(2 * n - 1, 2 * (n - m), -2, dtype=h.dtype, device=h.device).unsqueeze(1)  # 2i + 1  [m, 1]
    c = ((above - below) < (2.0 * w - rank)).sum(0, keepdim=True)  # [1, N]
    if m < n:
        c.clamp_(min=1)
    # b ∈ (h[m − c], h[m − c − 1]]; the padding gives Q = 0 when c = m (b above every
    # score) and P = 0 when c = 0 (b below every score, only if the window is the row).
    lo = m - c  # [1, N]
    log_p = pad(below.log_().add_(h), (0, 0, 0, 1), value=-math.inf).gather(0, lo)  # log Σ_{s<b} e^s
    log_q = pad(above.log_().sub_(h), (0, 0, 1, 0), value=-math.inf).gather(0, lo)  # log Σ_{s≥b} e^−s
    b = _root(log_p, log_q, (w - (n - m)) - c.to(h.dtype))  # [1, N]

    u_win = h - b  # [m, N]
    dist = u_win.abs()
    # The score nearest to b, hence the largest f, is in the window.
    dist_min = dist.amin(0, keepdim=True)  # [1, N]
    f_max = torch.rsub(dist_min, _LOG_HALF).exp_()  # [1, N]
    f_rel_win = torch.sub(dist_min, dist).exp_()  # f/f_max  [m, N]
    f_win = f_rel_win * f_max  # ½e^{−|u|}  [m, N]
    # p on the window in the original frame, where u has the opposite sign if flipped.
    p_win = torch.where(u_win < 0 if flip else u_win > 0, 1.0 - f_win, f_win)  # [m, N]
    # Off the window u = d + h_last − b ≤ 0, so f = x · ½e^{h_last − b}: the last window
    # entries already hold that factor, absolute and relative.
    total_rel = torch.addcmul(f_rel_win.sum(0, keepdim=True), rest, f_rel_win[-1:])  # [1, N]
    f_rel = (x * f_rel_win[-1:].t()).scatter_(-1, idx.t(), f_rel_win.t())  # [N, E]
    f = x.mul_(f_win[-1:].t())  # f off the window  [N, E]
    p = torch.rsub(f, 1.0) if flip else f  # off the window the original u is ≥ 0 if flipped
    p.scatter_(-1, idx.t(), p_win.t())
    return p, f_rel, total_rel.t(), f_max.t(), (-b if flip else b).t()
