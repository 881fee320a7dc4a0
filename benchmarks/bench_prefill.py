"""Prefill (TTFT) benchmark of a Llama-3.1-8B-shaped model: SDPA vs Stem. Same as
`stem bench --model-shape llama3-8b`; see stem/bench_prefill.py for the options."""

import sys

from stem.bench_prefill import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
