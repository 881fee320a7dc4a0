"""First-party stem executors and planner kernels (installed as ``stem_backends``).

One module or sub-package per executor, each with its kernels beside it:

* ``reference`` — the exact executor (any device; the tests' oracle);
* ``cpu_gather`` — the CPU default for sparse plans: gathered key blocks through torch's fused CPU
  attention kernel;
* ``sdpa`` — dense plans through torch SDPA (cuDNN / flash);
* ``triton/`` — the Triton executor, the Triton pooling kernel of the planner and the kernel of the
  opt-in ``qmean_lse`` block ranking;
* ``hub`` — the prebuilt CUDA kernel (``hub_kernels/``) loaded with ``kernels.get_kernel``.

``stem.dispatch`` registers them in code (:func:`executors`, :func:`register_planners`), so a source
checkout works without installing; third-party plugins use the ``stem.executors`` and
``stem.planners`` entry-point groups. Nothing here imports triton or kernels at import time: each
executor imports its toolkit lazily and reports when it is missing.
"""

from __future__ import annotations

__all__ = ["executors", "register_planners"]


def executors() -> list:
    """Fresh instances of the first-party executors."""
    from .cpu_gather import CPUGatherExecutor
    from .hub import HubExecutor
    from .reference import ReferenceExecutor
    from .sdpa import DenseSDPAExecutor
    from .triton.executor import TritonExecutor

    return [ReferenceExecutor(), CPUGatherExecutor(), DenseSDPAExecutor(), TritonExecutor(), HubExecutor()]


def register_planners() -> None:
    """Register the first-party planner kernels with ``stem.planner``."""
    from .triton.planner import register
    from .triton.ranking import register as register_ranking

    register()
    register_ranking()
