"""Retrieval quality benchmark for Stem: a small retrieval model trained here
(``python -m benchmarks.retrieval.train``, weights committed in ``benchmarks/retrieval/weights/``)
and a harness that scores it under dense attention, Stem and baselines at equal density
(``python -m benchmarks.retrieval``). From the repository root:

    from benchmarks.retrieval import load_model, run_eval
    model = load_model("benchmarks/retrieval/weights")
    result = run_eval(model, lengths=(4096, 8192, 16384), methods=("dense", "stem", "uniform_topk"))

Importing this package imports torch and stem only (matplotlib / tqdm when plotting / showing
progress; both optional).
"""

from .data import DataConfig, answer_positions, eval_examples, markov_text, train_batch
from .harness import DEFAULT_METHODS, auto_block_size, format_table, plot_heatmaps, run_eval, uniform_topk_mask
from .model import ModelConfig, RetrievalLM, dense_attention, load_model, save_model

__all__ = [
    "DataConfig", "answer_positions", "eval_examples", "markov_text", "train_batch",
    "DEFAULT_METHODS", "auto_block_size", "format_table", "plot_heatmaps", "run_eval", "uniform_topk_mask",
    "ModelConfig", "RetrievalLM", "dense_attention", "load_model", "save_model",
]
