"""Attention recall of Stem on a real pretrained model (CPU): how much of each query's dense softmax
mass falls inside the key blocks a plan keeps, for Stem, Stem without the value bonus, uniform top-k
and an oracle at equal budgets.

    python -m benchmarks.quality.fetch --cache out/quality_cache      # once: download + convert
    python -m benchmarks.quality --cache out/quality_cache --out benchmarks/results

Modules: ``fetch`` (pinned GGUF -> safetensors checkpoint), ``capture`` (the long document and the
post-RoPE q/k/v of every layer), ``recall`` (the plans and the metric).
"""
