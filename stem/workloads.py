"""A built-in synthetic long-context attention workload (the input of ``stem demo``) and the
report that checks a plan against it.

Real prefill attention has three kinds of structure that a sparse method must respect; random
q/k/v have none of them, so a random input says little about a plan's quality. This generator
plants all three, deterministically from a seed:

* attention sinks: the first few keys share a direction every query also carries;
* local structure: q and k carry slowly rotating positional features, so nearby keys score high;
* needles: a few short runs of keys far in the past (``NEEDLE_LEN`` tokens each) carry a
  direction that a known span of later query rows (the needle's *readers*) carries strongly, so
  that the needle holds most of those rows' dense softmax mass; their values are large too. These
  are the blocks a good planner must not drop, and :func:`needle_report` measures whether it did.

A needle starts at a multiple of ``NEEDLE_LEN`` (16), so it lies inside one key block for every
block size the library accepts (powers of two in [16, 256]).
"""

from __future__ import annotations

import math

import torch

__all__ = ["NEEDLE_LEN", "needle_report", "synthetic_qkv"]

NEEDLE_LEN = 16  # tokens per needle; needles start at multiples of it
_KEY_NORM = 8.0  # norm of the needle direction added to the needle's keys
_QUERY_NORM = 10.0  # norm of the same direction added to its readers' queries (logit +10 at any D)


def _reader_len(seq_len: int) -> int:
    return 64 * max(1, seq_len // 4096)


def _place_needles(seq_len: int, needles: int, g: torch.Generator) -> list[tuple[int, int, int]]:
    """(needle start, reader start, reader end) of each needle, sorted, reader spans disjoint.

    Needles lie in [max(16, L / 16), 0.6 L) (past the sink blocks of a 128-block plan), one in the
    first half of each of ``needles`` equal segments (so they are spread out). The readers of a
    needle start half-way from the needle's end to the end of the sequence, at a multiple of 64
    where that is still after the needle (and never before the previous needle's readers end), and
    span ``64 * max(1, L // 4096)`` rows (fewer at the end of the sequence). Lengths too short for
    a needle and its readers get fewer (or no) needles.
    """
    lo = max(1, seq_len // 16 // NEEDLE_LEN)  # needle slots: start = slot * NEEDLE_LEN
    hi = int(0.6 * seq_len) // NEEDLE_LEN
    if needles <= 0 or hi <= lo:
        return []
    seg = (hi - lo) / needles
    out: list[tuple[int, int, int]] = []
    for i in range(needles):
        a = lo + int(i * seg)
        b = max(a + 1, lo + int(i * seg + seg / 2))
        p = NEEDLE_LEN * int(torch.randint(a, b, (1,), generator=g))
        end = p + NEEDLE_LEN
        start = end + (seq_len - end) // 2
        start = max(start - start % 64, end, out[-1][2] if out else 0)  # after the previous readers
        stop = min(seq_len, start + _reader_len(seq_len))
        if stop <= start:
            continue  # no room left for its readers
        out.append((p, start, stop))
    return out


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
    """q (B, Hq, L, D), k and v (B, Hkv, L, D), and a dict describing the needles.

    The dict holds ``needles`` (start positions), ``needle_len`` (tokens per needle) and
    ``readers``: one ``(start, end)`` span of query positions per needle (end exclusive), the rows
    whose queries carry that needle's direction. Every query head reads every needle.

    Raises ValueError for a length < 1, heads that do not divide, or a head dim < 8.
    """
    if seq_len < 1:
        raise ValueError(f"synthetic_qkv needs seq_len >= 1, got {seq_len}")
    if kv_heads < 1 or q_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"synthetic_qkv needs q_heads a multiple of kv_heads, got {q_heads} and {kv_heads}")
    if head_dim < 8:
        raise ValueError(f"synthetic_qkv needs head_dim >= 8, got {head_dim}")
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
    # needles: NEEDLE_LEN keys sharing a direction (outside the positional dims), read by a span of
    # later queries that carry the same direction strongly enough to give it most of their mass
    placed = _place_needles(L, needles, g)
    qk_scale = math.sqrt(D / 64.0)  # the same logits at any head dim
    for p, r0, r1 in placed:
        d = torch.randn(Hkv, D, generator=g)
        d[:, : 2 * R] = 0
        d = d / d.norm(dim=-1, keepdim=True)
        k[:, :, p : p + NEEDLE_LEN] += _KEY_NORM * qk_scale**0.5 * d[None, :, None, :]
        v[:, :, p : p + NEEDLE_LEN] *= 3.0
        q[:, :, r0:r1] += _QUERY_NORM * qk_scale**0.5 * d.repeat_interleave(G, 0)[None, :, None, :]
    cast = {"dtype": dtype, "device": device}
    info = {
        "needles": [p for p, _, _ in placed],
        "needle_len": NEEDLE_LEN,
        "readers": [(r0, r1) for _, r0, r1 in placed],
    }
    return q.to(**cast), k.to(**cast), v.to(**cast), info


@torch.no_grad()
def needle_report(q: torch.Tensor, k: torch.Tensor, plan, info: dict, *, scale: float | None = None) -> dict:
    """How much of the needles' dense attention a plan keeps (batch entry 0).

    For every needle (``info`` from :func:`synthetic_qkv`) it takes the needle's reader rows and
    computes their dense causal softmax (float32, ``scale`` default 1/sqrt(D)), then reports:

    * ``dense_mass``: the mean, over query heads and reader rows, of the dense attention mass on
      the needle's key block (how strongly the readers really read it);
    * ``cells_kept`` / ``cells``: of the (query head, reader query block) cells, how many have the
      needle's key block in the plan; ``kept_fraction`` is their ratio;
    * ``kept_mass``: the mean share of the reader rows' dense attention mass that lies in blocks
      the plan keeps.

    Top level: ``needles`` (that list), ``kept_mass`` over all reader rows of all needles,
    ``missed`` (start positions of needles dropped by at least one reader cell) and ``ok``.
    q (B, Hq, Lq, D) with query row r at absolute position ``plan.q_offset + r``; k (B, Hkv, Lk, D).
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs, off = plan.block_size, plan.q_offset
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask = plan.to_dense_mask()[0]  # (Hq, nQ, nK)
    kv = k[0].float().repeat_interleave(G, 0)  # (Hq, Lk, D)
    rows_out, tot_mass, tot_rows = [], 0.0, 0
    for p, (r0, r1) in zip(info["needles"], info["readers"]):
        a0, a1 = max(r0, off), min(r1, off + Lq)  # reader positions that are query rows here
        if a1 <= a0:
            continue
        qpos = torch.arange(a0, a1, device=q.device)
        s = torch.matmul(q[0, :, a0 - off : a1 - off].float(), kv.transpose(-1, -2)) * scale  # (Hq, R, Lk)
        s.masked_fill_(torch.arange(Lk, device=k.device)[None, None, :] > qpos[None, :, None], float("-inf"))
        prob = torch.softmax(s, dim=-1)
        nb = p // bs
        dense_mass = float(prob[..., nb * bs : (nb + 1) * bs].sum(-1).mean())
        qblocks = torch.unique(qpos // bs) - plan.q_block_offset  # plan rows of the reader blocks
        cells = mask[:, qblocks, nb]  # (Hq, nReaderBlocks)
        nK = mask.shape[-1]
        block_prob = torch.nn.functional.pad(prob, (0, nK * bs - Lk)).view(Hq, len(qpos), nK, bs).sum(-1)
        kept = (block_prob * mask[:, qpos // bs - plan.q_block_offset]).sum(-1)  # (Hq, R): mass in kept blocks
        tot_mass += float(kept.sum())
        tot_rows += kept.numel()
        rows_out.append({
            "position": p,
            "key_block": nb,
            "readers": [a0, a1],
            "reader_blocks": [int(x) + plan.q_block_offset for x in qblocks],
            "dense_mass": dense_mass,
            "cells": int(cells.numel()),
            "cells_kept": int(cells.sum()),
            "kept_fraction": float(cells.float().mean()),
            "kept_mass": float(kept.mean()),
        })
    missed = [r["position"] for r in rows_out if r["cells_kept"] < r["cells"]]
    return {
        "needles": rows_out,
        "kept_mass": tot_mass / tot_rows if tot_rows else float("nan"),
        "missed": missed,
        "ok": not missed,
    }
