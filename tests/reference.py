"""An independent, literal float64 implementation of the method (loops, no factorisation).

Written from the method's definition (docs/method.md) alone, as plainly as possible, to check the package's planner and
executors. Slow; use at small sizes only.
"""

from __future__ import annotations

import math

import torch


def spec_budget(n: int, alpha: float, k_rate: float = 0.1, k_bias: int = 30) -> list[int]:
    if n < 56:
        k0 = n
    elif n < 160:
        k0 = math.floor(0.2 * n + 30)
    else:
        k0 = math.floor(k_rate * n) + k_bias
    out = []
    r = torch.linspace(k0, alpha * k0, max(n - k0, 0), dtype=torch.float64) if n > k0 else None
    for i in range(n):
        if i < k0:
            out.append(k0)
        else:
            out.append(int(min(max(math.floor(float(r[i - k0])), 1), k0)))
    return out


def spec_logits(q, k, v, cfg) -> torch.Tensor:
    """Literal block logits for prefill (Lq == Lk): (B, Hq, n, n) float64, -inf non-causal."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bs, S = cfg.block_size, cfg.stride
    n = math.ceil(L / bs)
    Lp = n * bs
    pad = Lp - L
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad))
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad))
    M = Lp // S
    scale = 1.0 / (math.sqrt(D) * S * cfg.norm)
    out = torch.full((B, Hq, n, n), float("-inf"), dtype=torch.float64)
    n_valid = math.ceil(L / S)
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            # value bonus
            u = torch.stack([vp[b, hk, S * g:S * g + S].norm(dim=-1).max() for g in range(M)])
            z = torch.log(u + 1e-6)
            zv = z[:n_valid]
            z = (z - zv.mean()) / (zv.std() + 1e-6)
            bonus = cfg.value_weight * torch.relu(z)
            bonus[n_valid:] = 0.0
            # strided antidiagonal scores, literally
            s = torch.zeros(M, M, dtype=torch.float64)
            for i in range(S):
                s += qp[b, h, (S - 1 - i)::S] @ kp[b, hk, i::S].T
            score = s * scale + bonus[None, :]
            c = bs // S
            for i in range(n):
                for j in range(i + 1):
                    out[b, h, i, j] = score[i * c:(i + 1) * c, j * c:(j + 1) * c].mean()
    return out


def spec_selection(logits: torch.Tensor, cfg) -> list:
    """Selected key-block sets per (b, h, i), from literal logits (B, Hq, n, n)."""
    B, H, n, _ = logits.shape
    budgets = spec_budget(n, cfg.alpha, cfg.k_rate, cfg.k_bias)
    sets = []
    for b in range(B):
        for h in range(H):
            for i in range(n):
                row = logits[b, h, i, : i + 1]
                kk = min(budgets[i], i + 1)
                top = set(torch.topk(row, kk).indices.tolist())
                top |= {j for j in range(min(cfg.sink_blocks, i + 1))}
                top |= {j for j in range(max(0, i - cfg.window_blocks + 1), i + 1)}
                sets.append(((b, h, i), sorted(top)))
    return sets


def dense_causal_attention64(q, k, v, scale=None) -> torch.Tensor:
    """float64 dense causal attention with bottom-right alignment (queries = last Lq positions)."""
    B, Hq = q.shape[:2]
    one_block = torch.ones(B, Hq, 1, 1, dtype=torch.bool)  # one block holding every position
    return masked_attention64(q, k, v, one_block, k.shape[2], scale)


def masked_attention64(q, k, v, block_mask, block_size, scale=None) -> torch.Tensor:
    """float64 attention restricted to a bool (B, Hq, nQ, nK) block mask (prefill or chunked)."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(Hq // Hkv, 1)
    v = v.repeat_interleave(Hq // Hkv, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    qpos = torch.arange(Lq, device=q.device) + (Lk - Lq)
    kpos = torch.arange(Lk, device=q.device)
    qbo = (Lk - Lq) // block_size
    qb = qpos // block_size - qbo
    kb = kpos // block_size
    allowed = block_mask[:, :, qb][:, :, :, kb] & (kpos[None, :] <= qpos[:, None])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def rand_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, value_spread=True):
    """Random q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) from ``gen``; with ``value_spread`` the value
    rows get varied norms, so that the value bonus matters."""
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=gen)
    if value_spread:
        v = v * (0.2 + 3 * torch.rand(B, Hkv, Lk, 1, generator=gen))
    return q, k, v.to(dtype)
