"""The ``hub`` executor: the prebuilt stem-attention CUDA kernel, loaded with ``kernels.get_kernel``.

Which repository: ``stem-attention/stem-attention`` unless the environment variable
``STEM_HUB_REPO`` names another (``org/name``). The kernel is loaded once per process and repo
with ``kernels.get_kernel(repo, version=1)``, which resolves, in this order:

1. ``LOCAL_KERNELS=<repo>=<path>`` (``:``-separated pairs): a local build tree, e.g. the output of
   ``python hub_kernels/build.py`` (path ``hub_kernels/stem-attention``). No network, no trust check.
2. With ``HF_HUB_OFFLINE=1``: the Hugging Face cache only (``KERNELS_CACHE`` or ``HF_HUB_CACHE``;
   ``hub_kernels/build.py --hf-cache DIR`` lays a build out there).
3. Otherwise the Hub itself (a download on first use). ``kernels`` only loads repositories of
   trusted publishers; set ``STEM_HUB_TRUST_REMOTE_CODE=1`` to allow this one repo anyway.

The loaded module picks the variant that matches this torch/CUDA: the compiled sm80/sm90 kernel
(``VARIANT == "cuda"``) or, where none matches, the torch-universal build of the Triton kernel
(``VARIANT == "universal"``). ``stem info`` shows which, or why the executor is unavailable.
``kernels`` is imported lazily (never at ``import stem``); install it with
``pip install 'stem-attention[hub]'``.
"""

from __future__ import annotations

import importlib.util
import os
import threading

import torch

from stem.dispatch import Executor

__all__ = ["HubExecutor", "DEFAULT_REPO", "REPO_ENV", "TRUST_ENV"]

DEFAULT_REPO = "stem-attention/stem-attention"
REPO_ENV = "STEM_HUB_REPO"
TRUST_ENV = "STEM_HUB_TRUST_REMOTE_CODE"
KERNEL_VERSION = 1
MIN_CAPABILITY = (8, 0)


def _explain_load_error(repo: str, e: BaseException) -> str:
    """One clear reason (and the fix) for a failed ``get_kernel``."""
    msg = str(e)
    if isinstance(e, ImportError) and "kernels" in msg and "No module" in msg:
        return "the `kernels` package is not installed: pip install 'stem-attention[hub]'"
    if isinstance(e, FileNotFoundError) and "Cannot find a build variant" in msg:
        return (
            f"no build variant of {repo} matches torch {torch.__version__} / CUDA {torch.version.cuda}; "
            f"variants found:\n{msg.split(':', 1)[-1].strip()}\n"
            f"build one here with `python hub_kernels/build.py` and set LOCAL_KERNELS={repo}=hub_kernels/stem-attention"
        )
    if "local cache" in msg or "local snapshot" in msg:
        return (
            f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: download it once online, "
            f"or set LOCAL_KERNELS={repo}=<path to a build from hub_kernels/build.py>"
        )
    if "trusted publisher" in msg or "publisher trust" in msg:
        return (
            f"untrusted kernel repository {repo}: `kernels` loads only trusted publishers; set {TRUST_ENV}=1 "
            f"to allow this repository, or use a local build via LOCAL_KERNELS={repo}=<path>"
        )
    if "does not support the current device" in msg:
        return f"the {repo} build does not support this GPU: {msg.split(': ', 1)[-1]}"
    return f"loading {repo} with kernels.get_kernel failed: {type(e).__name__}: {msg}"


class HubExecutor(Executor):
    name = "hub"
    # Above Triton (50) where the compiled kernel runs its sm90 (wgmma + TMA) path: 1.15-1.28x the
    # Triton executor on an H200 (benchmarks/NOTES.md). Its sm80 (mma.sync) path ran at 0.58x
    # Triton, so `auto` passes over the hub for shapes and devices without the sm90 path
    # (auto_skip_reason), and over the torch-universal variant, which is the Triton kernel itself.
    priority = 60
    device_types = ("cuda",)
    returns_lse = True

    def __init__(self, repo: str | None = None, version: int = KERNEL_VERSION):
        self._repo = repo
        self.version = version
        self._cache: dict[tuple, tuple[object | None, str | None]] = {}
        self._lock = threading.Lock()

    @property
    def repo(self) -> str:
        return self._repo or os.environ.get(REPO_ENV) or DEFAULT_REPO

    @property
    def description(self) -> str:  # type: ignore[override]
        mod = self._cached_module()
        variant = getattr(mod, "VARIANT", None) if mod is not None else None
        where = f"; loaded variant: {variant}" if variant else ""
        return f"prebuilt block-sparse flash attention from the kernel hub ({self.repo}, kernels.get_kernel){where}"

    # ---- loading --------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (self.repo, self.version, os.environ.get("LOCAL_KERNELS"), os.environ.get("HF_HUB_OFFLINE"),
                os.environ.get(TRUST_ENV))

    def _cached_module(self):
        hit = self._cache.get(self._key())
        return hit[0] if hit else None

    def load(self):
        """(module, None) or (None, reason); the result is cached per repo and environment."""
        key = self._key()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            result = self._load_uncached()
            self._cache[key] = result
            return result

    def _load_uncached(self):
        repo = self.repo
        try:
            from kernels import get_kernel
        except ImportError as e:
            return None, _explain_load_error(repo, ImportError(f"No module named 'kernels' ({e})"))
        trust = [repo] if os.environ.get(TRUST_ENV, "") not in ("", "0") else False
        try:
            mod = get_kernel(repo, version=self.version, trust_remote_code=trust)
        except Exception as e:  # every failure becomes a reason shown by `stem info`
            return None, _explain_load_error(repo, e)
        if not callable(getattr(mod, "block_sparse_attn_fwd", None)):
            return None, f"the kernel loaded from {repo} has no block_sparse_attn_fwd (not a stem-attention build?)"
        return mod, None

    # ---- Executor API ---------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        base = super().unavailable_reason(device)
        if base is not None:
            return base
        if importlib.util.find_spec("kernels") is None:
            return "the `kernels` package is not installed: pip install 'stem-attention[hub]'"
        if not torch.cuda.is_available():
            return "no CUDA device is available (torch.cuda.is_available() is False)"
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return (f"needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer, "
                    f"the device has {cap[0]}.{cap[1]}")
        _, reason = self.load()
        return reason

    def unsupported_reason(self, q, k, v, plan) -> str | None:
        mod, reason = self.load()
        if mod is None:
            return reason
        supports = getattr(mod, "supports", None)
        if supports is not None:
            why = supports(q.dtype, q.shape[-1], plan.block_size)
            if why is not None:
                return f"{why} by the {getattr(mod, 'VARIANT', 'loaded')} hub kernel"
        return None

    def auto_skip_reason(self, q, k, v, plan) -> str | None:
        mod, reason = self.load()
        if mod is None:
            return reason
        variant = getattr(mod, "VARIANT", None)
        if variant != "cuda":
            return f"the loaded hub variant is {variant!r} (the Triton kernel): the triton executor runs the same"
        kernel_for = getattr(mod, "kernel_for", None)
        if kernel_for is None:
            return "the loaded hub build predates its sm90 path (no kernel_for): its sm80 path is slower than triton"
        kernel = kernel_for(q.dtype, q.shape[-1], plan.block_size, q.device)
        if kernel != "sm90":
            return (f"the hub kernel would run its {kernel} path here (the sm90 path needs compute capability 9.0, "
                    "head dim 64 or 128 and 128- or 256-token blocks), which is slower than triton")
        return None

    def forward(self, q, k, v, plan, scale, return_lse):
        mod, reason = self.load()
        if mod is None:
            raise RuntimeError(f"stem backend 'hub' is unavailable: {reason}")
        return mod.block_sparse_attn_fwd(
            q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size, plan.q_offset, scale, return_lse
        )
