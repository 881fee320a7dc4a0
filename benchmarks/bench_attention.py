"""Attention benchmark (same as `stem bench`): python benchmarks/bench_attention.py --out DIR."""

import argparse
import sys

from stem.bench import add_arguments, main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    sys.exit(main(p.parse_args()))
