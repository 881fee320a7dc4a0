"""A short check of the Triton planner on a CUDA card: ``stem.plan`` wall time (CUDA events) and the
fraction of plan rows that differ from the earlier torch-selection planner, at 16K and 128K
(B 1, Hq 32, Hkv 8, D 128, bf16). ``python -m benchmarks.planner.quick_check``"""

import torch
from stem_backends.triton.planner import pool_triton

import stem
from stem.bench import random_qkv, time_ms
from stem.planner import plan_from_stats


def check(L: int) -> None:
    cfg = stem.StemConfig()
    q, k, v = random_qkv(1, 32, 8, L, 128, seed=L, v_scale=(0.2, 3.0))
    n = L // 128
    new = stem.plan(q, k, v, cfg, pooling="triton")
    old = plan_from_stats(pool_triton(q, k, v, cfg, 0), cfg, L, 0, n)
    differ = float((new.to_dense_mask() != old.to_dense_mask()).any(-1).float().mean())
    t_new = time_ms(lambda: stem.plan(q, k, v, cfg, pooling="triton"), 5)
    t_old = time_ms(lambda: plan_from_stats(pool_triton(q, k, v, cfg, 0), cfg, L, 0, n), 5)
    print(f"L {L}: plan new {t_new:.3f} ms, old {t_old:.3f} ms, rows differing {differ:.5f}", flush=True)


for length in (16384, 131072):
    check(length)
    torch.cuda.empty_cache()
