"""A built-in synthetic long-context attention workload (the default input of ``stem demo``).

Real prefill attention has three kinds of structure that a sparse method must respect; random
q/k/v have none of them, so a random input says little about a plan's quality. This generator
plants all three, deterministically from a seed:

* attention sinks: the first few keys share a direction every query also carries;
* local structure: q and k carry slowly rotating positional features, so nearby keys score high;
* needles: a few keys far in the past match a direction carried by later queries and have large
  values (the blocks a good planner must not drop).
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_qkv"]


def synthetic_qkv(
    seq_len: int = 8192,
    *,
    batch: int = 1,
    q_heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    needles: int = 6,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q (B, Hq, L, D), k and v (B, Hkv, L, D), and a dict with the needle positions."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, D = batch, q_heads, kv_heads, seq_len, head_dim
    G = Hq // Hkv
    q = 0.6 * torch.randn(B, Hq, L, D, generator=g)
    k = 0.6 * torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g) * (0.5 + torch.rand(B, Hkv, L, 1, generator=g))
    # local structure: R slow rotary features on the first 2R dims
    R = max(2, D // 8)
    pos = torch.arange(L, dtype=torch.float32)
    freqs = 1.0 / (64.0 * 4.0 ** torch.arange(R, dtype=torch.float32) / R)
    ang = pos[:, None] * freqs[None, :]
    feat = torch.cat([ang.cos(), ang.sin()], -1) * 3.0  # (L, 2R)
    q[..., : 2 * R] += feat
    k[..., : 2 * R] += feat
    # sinks: the first 4 keys and every query share a direction
    sink_dir = torch.randn(Hkv, D, generator=g)
    sink_dir[:, : 2 * R] = 0
    sink_dir = sink_dir / sink_dir.norm(dim=-1, keepdim=True) * 4.0
    k[:, :, :4] += sink_dir[None, :, None, :]
    q += sink_dir.repeat_interleave(G, 0)[None, :, None, :] * 0.5
    # needles: a key in the first 60% of the sequence, read by a span of later queries
    positions = sorted(int(x) for x in torch.randint(4, max(5, int(0.6 * L)), (needles,), generator=g))
    for p in positions:
        d = torch.randn(Hkv, D, generator=g)
        d[:, : 2 * R] = 0
        d = d / d.norm(dim=-1, keepdim=True) * 4.0
        k[:, :, p] += d
        v[:, :, p] *= 4.0
        start = p + (L - p) // 2
        span = slice(start, min(L, start + max(16, L // 64)))
        q[:, :, span] += d.repeat_interleave(G, 0)[None, :, None, :]
    cast = {"dtype": dtype, "device": device}
    return q.to(**cast), k.to(**cast), v.to(**cast), {"needles": positions}
