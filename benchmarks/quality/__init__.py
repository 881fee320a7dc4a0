"""Quality of Stem on a real pretrained model (CPU): attention recall per layer, the output error
of each layer's attention, and whole-model next-token KL / top-1 agreement / perplexity against
dense, for Stem, its ablations, uniform top-k, XAttention's selection rule, the opt-in rankings of
``stem.ranking`` and an oracle at equal budgets.

    python -m benchmarks.quality.fetch --cache out/quality_cache      # once: download + convert
    python -m benchmarks.quality --cache out/quality_cache --out benchmarks/results
    python -m benchmarks.quality.rank_candidates --cache out/quality_cache --out benchmarks/results
    python -m benchmarks.quality.e2e --cache out/quality_cache --out benchmarks/results --part layers
    python -m benchmarks.quality.cpu_speed --cache out/quality_cache --out benchmarks/results

Modules: ``fetch`` (pinned GGUF -> safetensors checkpoint), ``capture`` (the long document and the
post-RoPE q/k/v of every layer), ``recall`` (the plans and the recall metric), ``methods`` (every
compared selection method as a plan), ``rank_candidates`` (block scores at Stem's budgets), ``e2e``
(per-layer and whole-model metrics, passkey), ``cpu_speed`` (the CPU executor against dense SDPA),
``gpu_ranking`` (the ranking kernels on a GPU).
"""
