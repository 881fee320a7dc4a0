"""Where FP8 attention's error comes from on a real model: each e4m3 rounding of the FP8 path,
alone and together, emulated on the q, k, v of one dense forward (CPU; the roundings in float64,
the attention in float32, whose own error, ~1e-6, is far below the roundings studied).

    python -m benchmarks.quality.fp8_error [--model smollm2] [--length 8192] [--first-layer 2]
        [--out benchmarks/results]

Each variant is the dense causal attention of every head of a layer with some operands rounded
the way the FP8 kernels round them, compared with unrounded attention (relative L2 error of
the layer's output, then the mean and the largest over layers):

- ``q``: Q in e4m3, one scale per row (row max -> 448).
- ``k``: K minus its per-channel mean (the softmax is unchanged by it), e4m3, one scale per 128
  keys; ``k_no_smoothing``: the same without the mean subtraction.
- ``v``: V in e4m3, one scale per channel.
- ``p``: the probabilities as e4m3 of ``p * 256`` (p relative to the row max; the normaliser is
  the sum of the unrounded p, as in the kernels; the Triton FP8 kernel's scale, the Hub kernel's
  is 64, which differs only in e4m3's subnormal range: see ``emulate``).
- ``fp8``: all of the above together (the Hub kernel's scheme, up to the P scale); ``bf16``: q, k, v and p rounded
  to bfloat16 instead (what the native kernels round).
- ``qk_hadamard`` / ``fp8_hadamard``: Q and K both multiplied by the same orthonormal Hadamard
  matrix H before they are rounded (``(q H)(k H)^T = q k^T``: the scores are unchanged, but a dot
  product carried by a few channels is spread over all of them, so the rounding errors average
  out); only Q and K rounded, or everything.
- ``fp8_pv``: Q and K in bfloat16, P and V as above (``precision="fp8_pv"``).

Writes ``quality_fp8_error_<model>_<length>.json`` into ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

E4M3_MAX = 448.0
VARIANTS = ("q", "k", "k_no_smoothing", "v", "p", "fp8", "bf16", "qk", "qk_hadamard", "fp8_hadamard", "fp8_pv")


def hadamard(d: int, dtype=torch.float64) -> torch.Tensor:
    """The d x d orthonormal Hadamard matrix (Sylvester's construction; d a power of two)."""
    if d & (d - 1):
        raise ValueError(f"head dim {d} is not a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / d ** 0.5


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """-> e4m3 (round to nearest even, saturating) -> x's dtype."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def _scaled(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return e4m3(x / s) * s


def round_q(q):  # (H, L, D): one scale per row
    return _scaled(q, q.abs().amax(-1, keepdim=True))


def round_k(k, smooth: bool = True, tile: int = 128):  # (H, L, D): per 128-key tile, after the mean
    mean = k.mean(1, keepdim=True) if smooth else torch.zeros_like(k[:, :1])
    kc = k - mean
    H, L, D = kc.shape
    pad = -L % tile
    kp = torch.nn.functional.pad(kc, (0, 0, 0, pad)).view(H, -1, tile, D)
    out = _scaled(kp, kp.abs().amax((-1, -2), keepdim=True)).view(H, -1, D)[:, :L]
    return out + mean  # the mean shifts every score of a row equally: adding it back changes nothing


def round_v(v):  # (H, L, D): one scale per channel
    return _scaled(v, v.abs().amax(1, keepdim=True))


def attention(q, k, v, scale: float, p_round=None, rows: int = 1024, allowed=None) -> torch.Tensor:
    """Causal attention of q (Hq, L, D) against k, v (Hkv, L, D) in their dtype, chunked over rows;
    ``p_round`` rounds the row-max-relative probabilities before P V (normaliser unrounded).
    ``allowed(h, r0, r1)``: optional (r1 - r0, r1) bool mask of the keys head h's rows r0..r1 - 1
    may see besides causality (a sparse plan's blocks); every row must keep one key."""
    Hq, L, _ = q.shape
    G = Hq // k.shape[0]
    out = torch.empty_like(q)
    pos = torch.arange(L, device=q.device)
    for h in range(Hq):
        kh, vh = k[h // G], v[h // G]
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            s = (q[h, r0:r1] @ kh[:r1].T) * scale
            s.masked_fill_(pos[None, :r1] > pos[r0:r1, None], float("-inf"))
            if allowed is not None:
                s.masked_fill_(~allowed(h, r0, r1), float("-inf"))
            p = torch.exp(s - s.amax(-1, keepdim=True))
            den = p.sum(-1, keepdim=True)
            if p_round is not None:
                p = p_round(p)
            out[h, r0:r1] = (p @ vh[:r1]) / den
    return out


# The Hub kernel stores e4m3 probabilities as p * 64 (kPShift in its block_sparse_attn_sm90.cuh),
# the Triton FP8 kernel as p * 256.
HUB_P_SCALE = 64.0


def p_e4m3(p: torch.Tensor, p_scale: float = 256.0) -> torch.Tensor:
    """The kernels' e4m3 probabilities: e4m3(p * p_scale) / p_scale (p relative to the row max)."""
    return e4m3(p * p_scale) / p_scale


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def emulate(q, k, v, scale: float, precision: str, allowed=None) -> torch.Tensor:
    """Attention of q (Hq, L, D), k, v (Hkv, L, D) with the operands rounded as
    ``stem.attention(precision=precision)`` rounds them on the Hub kernel (``"fp8"``: Q, K, V and P
    in e4m3; ``"fp8_pv"``: Q and K in bfloat16, V and P in e4m3 as p * ``HUB_P_SCALE``), the rest
    in float32. One difference from the kernel: P is rounded relative to the row's final max, the
    kernel's to its running max, which it raises lazily (at most 2^2.75 below the final max: the
    same relative rounding, except in e4m3's subnormal range)."""
    q, k, v = q.double(), k.double(), v.double()
    if precision == "fp8":
        q, k = round_q(q), round_k(k)
    elif precision == "fp8_pv":
        q, k = bf16(q), bf16(k)
    else:
        raise ValueError(f"precision {precision!r}: expected 'fp8' or 'fp8_pv'")
    return attention(q.float(), k.float(), round_v(v).float(), scale, lambda p: p_e4m3(p, HUB_P_SCALE),
                     allowed=allowed)


def layer_errors(q, k, v, scale: float) -> dict[str, float]:
    """Relative L2 error of each variant's output for one layer (q (Hq, L, D), k, v (Hkv, L, D))."""
    q, k, v = q.double(), k.double(), v.double()
    f = lambda x: x.float()  # noqa: E731
    exact = attention(f(q), f(k), f(v), scale).double()
    norm = exact.norm()
    bf = lambda x: bf16(x).float()  # noqa: E731
    p8 = p_e4m3
    rq, rk, rv = f(round_q(q)), f(round_k(k)), f(round_v(v))
    H = hadamard(q.shape[-1])
    hq, hk = f(round_q(q @ H)), f(round_k(k @ H))
    runs = {
        "q": (rq, f(k), f(v), None),
        "k": (f(q), rk, f(v), None),
        "k_no_smoothing": (f(q), f(round_k(k, smooth=False)), f(v), None),
        "v": (f(q), f(k), rv, None),
        "p": (f(q), f(k), f(v), p8),
        "fp8": (rq, rk, rv, p8),
        "bf16": (bf(q), bf(k), bf(v), bf),
        "qk": (rq, rk, f(v), None),
        "qk_hadamard": (hq, hk, f(v), None),
        "fp8_hadamard": (hq, hk, rv, p8),
        "fp8_pv": (bf(q), bf(k), rv, p8),  # precision="fp8_pv": Q K^T in bf16, P and V in e4m3
    }
    return {name: float((attention(a, b, c, scale, pr).double() - exact).norm() / norm)
            for name, (a, b, c, pr) in runs.items()}


def main(argv: list[str] | None = None) -> int:
    from .capture import build_document, capture_qkv
    from .fetch import DEFAULT_CACHE, MODELS, load_model

    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality.fp8_error", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--first-layer", type=int, default=2, help="layers below it are left out (dense in the study)")
    ap.add_argument("--every", type=int, default=1, help="only every n-th layer from --first-layer on")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok, source = load_model(args.cache, args.model)
    ids, sources = build_document(tok, args.length)
    with torch.no_grad():
        qkv, _ = capture_qkv(model, ids)
    scale = qkv[0][0].shape[-1] ** -0.5
    per_layer = {}
    for i, (q, k, v) in enumerate(qkv):
        if i < args.first_layer or (i - args.first_layer) % args.every:
            continue
        per_layer[i] = layer_errors(q[0], k[0], v[0], scale)
        print(f"layer {i:2d} " + " ".join(f"{n} {e:.4f}" for n, e in per_layer[i].items()), flush=True)
    summary = {n: {"mean": sum(r[n] for r in per_layer.values()) / len(per_layer),
                   "max": max(r[n] for r in per_layer.values())} for n in VARIANTS}
    res = {"model": source["model"], "gguf_sha256": source["gguf_sha256"], "length": args.length,
           "head_dim": qkv[0][0].shape[-1], "text_sources": sources, "torch": torch.__version__,
           "command": " ".join(["python -m benchmarks.quality.fp8_error", *(sys.argv[1:] if argv is None else argv)]),
           "summary": summary, "per_layer": per_layer, "seconds": time.time() - t0}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"quality_fp8_error_{args.model}_{args.length // 1024}k.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"{'variant':>15} {'mean rel. error':>16} {'max over layers':>16}")
    for n in VARIANTS:
        print(f"{n:>15} {summary[n]['mean']:16.4f} {summary[n]['max']:16.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
