"""The ``hub`` executor: the prebuilt stem-attention CUDA kernel, loaded with ``kernels.get_kernel``.

Which repository: ``stem-attention/stem-attention`` unless the environment variable
``STEM_HUB_REPO`` names another (``org/name``). The kernel is loaded once per executor, on first
use, with ``kernels.get_kernel(repo, version=1)``, which resolves, in this order:

1. ``LOCAL_KERNELS=<repo>=<path>`` (``:``-separated pairs): a local build tree, e.g. the output of
   ``python hub_kernels/build.py`` (path ``hub_kernels/stem-attention``). No network, no trust check.
2. With ``HF_HUB_OFFLINE=1``: the Hugging Face cache only (``KERNELS_CACHE`` or ``HF_HUB_CACHE``;
   ``hub_kernels/build.py --hf-cache DIR`` lays a build out there).
3. Otherwise the Hub itself (a download on first use). ``kernels`` only loads repositories of
   trusted publishers; set ``STEM_HUB_TRUST_REMOTE_CODE=1`` to allow this one repo anyway.

These environment variables are read when the kernel loads, once; ``reset()`` forgets the loaded
kernel so that the next use loads it again. What the kernel supports and which of its kernels
runs a call (sm90 or sm80) is the loaded module's own answer (``supports`` / ``kernel_for``, from
the kernel's csrc/supported.h): this executor keeps no table of its own. ``kernels`` is imported
lazily (never at ``import stem``); install it with ``pip install 'stem-attention[hub]'``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from pathlib import Path

import torch

from stem.dispatch import Executor, clear_cache

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
    # Above Triton (50) where the compiled kernel runs its sm90 (wgmma + TMA) path: 1.19-1.28x the
    # Triton executor on an H200 (benchmarks/NOTES.md). Its sm80 (mma.sync) path ran at 0.58x
    # Triton, so `auto` passes over the hub where the kernel would run that path (auto_skip_reason).
    priority = 60
    device_types = ("cuda",)
    returns_lse = True

    def __init__(self, repo: str | None = None, version: int = KERNEL_VERSION):
        self._repo = repo
        self.version = version
        self._loaded: tuple[object | None, str | None] | None = None  # (module, None) or (None, reason)
        self._loaded_repo: str | None = None
        self._lock = threading.Lock()  # taken only while the kernel loads
        self._device_reasons: dict[torch.device, str | None] = {}

    @property
    def repo(self) -> str:
        """The repository loaded, or (before loading) the one that would be."""
        return self._loaded_repo or self._repo or os.environ.get(REPO_ENV) or DEFAULT_REPO

    @property
    def description(self) -> str:  # type: ignore[override]
        loaded = self._loaded
        mod = loaded[0] if loaded is not None else None
        where = ""
        if mod is not None and getattr(mod, "__file__", None):
            # the variant folder: build/<variant>/__init__.py or build/<variant>/<package>/__init__.py
            folders = [p.name for p in Path(mod.__file__).parents][:2]
            variant = next((f for f in folders if re.match(r"torch\d+-", f)), folders[0])
            where = f"; loaded build: {variant}"
        return f"prebuilt block-sparse flash attention from the kernel hub ({self.repo}, kernels.get_kernel){where}"

    # ---- loading --------------------------------------------------------------------------
    def load(self):
        """(module, None) or (None, reason): loaded on the first call, then the same answer."""
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_uncached()
            return self._loaded

    def reset(self) -> None:
        """Forget the loaded kernel and the dispatch decisions made with it: the next use reads the
        environment and loads again (the kernel's compiled library stays loaded in the process)."""
        with self._lock:
            self._loaded = None
            self._loaded_repo = None
            self._device_reasons = {}
        clear_cache()

    def _load_uncached(self):
        repo = self._repo or os.environ.get(REPO_ENV) or DEFAULT_REPO
        self._loaded_repo = repo
        try:
            from kernels import get_kernel
        except ImportError as e:
            return None, _explain_load_error(repo, ImportError(f"No module named 'kernels' ({e})"))
        trust = [repo] if os.environ.get(TRUST_ENV, "") not in ("", "0") else False
        try:
            mod = get_kernel(repo, version=self.version, trust_remote_code=trust)
        except Exception as e:  # every failure becomes a reason shown by `stem info`
            return None, _explain_load_error(repo, e)
        needed = ("block_sparse_attn_fwd", "supports", "kernel_for")
        missing = [n for n in needed if not callable(getattr(mod, n, None))]
        if missing:
            return None, (f"the kernel loaded from {repo} has no {', '.join(missing)} "
                          "(not a stem-attention build, or one older than this stem)")
        return mod, None

    # ---- Executor API ---------------------------------------------------------------------
    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        try:
            return self._device_reasons[device]
        except KeyError:
            pass
        reason = self._unavailable_reason(device)
        self._device_reasons[device] = reason
        return reason

    def _unavailable_reason(self, device: torch.device) -> str | None:
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

    def supports(self, key) -> str | None:
        """None when the loaded kernel runs ``key`` (a ``stem.dispatch.DispatchKey``); else why not.
        (Asked once per key: stem.dispatch caches the decision.)"""
        mod, reason = self.load()
        if mod is None:
            return reason
        why = mod.supports(key.dtype, key.head_dim, key.block_size, key.device)
        return None if why is None else f"{why} (hub kernel)"

    def auto_skip_reason(self, key) -> str | None:
        """Why ``backend="auto"`` passes over the hub for ``key``: the kernel would run its sm80
        path there, or its sm90 path at head dim 64; both are slower than the triton executor."""
        mod, reason = self.load()
        if mod is None:
            return reason
        try:
            kernel = mod.kernel_for(key.dtype, key.head_dim, key.block_size, key.device)
        except ValueError as e:  # not supported at all (supports() says the same)
            answer = f"{e} (hub kernel)"
        else:
            answer = None if kernel == "sm90" else (
                f"the hub kernel would run its {kernel} path here (its sm90 path needs compute capability 9.0, "
                "head dim 64, 128 or 256 and 128- or 256-token blocks), which is slower than triton")
            if kernel == "sm90" and key.head_dim <= 64:
                # H200, same plans: Hq 14 / Hkv 2 at 128K 18.0 ms against triton's 15.4, at 32K 1.92
                # against 1.73 (benchmarks/results/bench_attention_matrix1_NVIDIA_H200.json)
                answer = "at head dim 64 the hub kernel's sm90 path is slower than triton"
        return answer

    @property
    def varlen(self) -> bool:  # type: ignore[override]
        """Packed batches run where the loaded kernel has the varlen op (builds from this source)."""
        mod, _ = self.load()
        return mod is not None and hasattr(mod, "block_sparse_attn_varlen_fwd")

    def forward_varlen(self, q, k, v, plan, scale, return_lse):
        mod, reason = self.load()
        if mod is None:
            raise RuntimeError(f"stem backend 'hub' is unavailable: {reason}")
        return mod.block_sparse_attn_varlen_fwd(
            q, k, v, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.kv_counts, plan.kv_indices, plan.block_size, scale,
            return_lse)

    def fp8_unsupported_reason(self, q, block_size: int) -> str | None:
        """None when the loaded kernel's FP8 path runs q's shape with plan blocks of ``block_size``
        on q's device; else why not (used by ``stem.attention(..., precision="fp8")``)."""
        why = self.unavailable_reason(q.device)
        if why is not None:
            return why
        mod, _ = self.load()
        if not callable(getattr(mod, "supports_fp8", None)):
            return "the loaded hub kernel has no FP8 path (a build older than this stem)"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the FP8 path takes float16 or bfloat16 q/k/v, got {q.dtype}"
        why = mod.supports_fp8(q.shape[-1], block_size, q.device)
        return None if why is None else f"{why} (hub kernel, FP8)"

    def forward(self, q, k, v, plan, scale, return_lse, precision: str = "native"):
        mod, reason = self.load()
        if mod is None:
            raise RuntimeError(f"stem backend 'hub' is unavailable: {reason}")
        if precision in ("fp8", "fp8_pv"):
            return self._forward_fp8(mod, q, k, v, plan, scale, return_lse, pv_only=precision == "fp8_pv")
        return mod.block_sparse_attn_fwd(
            q, k, v, plan.kv_counts, plan.kv_indices, plan.block_size, plan.q_offset, scale, return_lse
        )

    @staticmethod
    def quantize_fp8(q, k, v, block_size: int, pv_only: bool = False):
        """The FP8 op's operands: ``(q8, q_scale, k8, k_scale, vt8, v_scale, k_mean)``. Q per row; K
        minus its per-channel mean (``k_mean``), per 128-key tile; V per channel, transposed, keys in
        the kernel's fragment order, padded to whole plan blocks of ``block_size``. ``pv_only``: only
        V is quantised; q and k are returned as they are (Q K^T runs in their dtype) with empty
        scales. Three launches, no host synchronisation."""
        from stem_backends.triton.fp8 import P_SCALE, quantize_kv, quantize_rows

        k8, vt8, ks, vs, kmean = quantize_kv(k, v, 128, block_size, not pv_only, v_per_channel=True,
                                             permute32=True)
        if pv_only:  # the 16-bit q, k themselves; their scales are not read
            q8, k8 = q.contiguous(), k.contiguous()
            qs = ks = torch.empty(0, 0, 0, dtype=torch.float32, device=q.device)
        else:
            q8, qs = quantize_rows(q)
        # the kernel divides by the sum of the same scaled p it multiplies V by, so the P scale the
        # quantiser folded into vs (for the Triton kernel) is taken back out: v ~ v8 * (vs * P_SCALE)
        return q8, qs, k8, ks, vt8, vs * P_SCALE, kmean

    @classmethod
    def _forward_fp8(cls, mod, q, k, v, plan, scale, return_lse, pv_only=False):
        """Quantise (``quantize_fp8``), then the FP8 kernel."""
        q8, qs, k8, ks, vt8, vs, kmean = cls.quantize_fp8(q, k, v, plan.block_size, pv_only)
        out, lse = mod.block_sparse_attn_fp8_fwd(q8, k8, vt8, qs, ks, vs, plan.kv_counts, plan.kv_indices,
                                                 plan.block_size, plan.q_offset, k.shape[2], scale, return_lse,
                                                 q.dtype)
        if return_lse and not pv_only:
            # the kernel's scores are against K minus its mean: every row's lse is short by q . mean
            B, Hq, Lq, D = q.shape
            Hkv = k.shape[1]
            shift = torch.einsum("bhgld,bhd->bhgl", q.view(B, Hkv, Hq // Hkv, Lq, D).float(), kmean)
            lse = lse + shift.reshape(B, Hq, Lq) * scale
        return out, lse
