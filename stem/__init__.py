"""stem: Stem sparse attention for long-context prefill (ICML 2026).

Public surface::

    stem.StemConfig            # hyper-parameters (paper defaults)
    stem.plan(q, k, v, config) # -> stem.BlockPlan (selected key blocks per query block)
    stem.attention(q, k, v, config=..., plan=..., backend="auto")
    stem.BlockPlan             # padded-CSR plan: kv_counts, kv_indices, to_dense_mask(), save/load
    stem.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k)   # packed variable-length batches
    stem.plan_varlen(...)      # -> stem.VarlenBlockPlan (one row block per sequence)

Importing stem never imports triton or kernels.
"""

from .api import attention, last_dispatch
from .budget import block_budgets
from .config import StemConfig
from .dispatch import Executor, executor_status, executors, register_executor
from .plan import BlockPlan
from .planner import plan
from .varlen import VarlenBlockPlan, plan_varlen, varlen_attention

__version__ = "0.1.0"

__all__ = [
    "StemConfig",
    "BlockPlan",
    "plan",
    "attention",
    "VarlenBlockPlan",
    "plan_varlen",
    "varlen_attention",
    "block_budgets",
    "Executor",
    "register_executor",
    "executors",
    "executor_status",
    "last_dispatch",
    "__version__",
]
