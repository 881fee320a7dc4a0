"""Executors and how one is chosen.

An executor runs a BlockPlan. The first-party executors (``reference``, ``sdpa``, ``triton``,
``hub``; the ``backends/`` folder, installed as ``stem_backends``) are registered in code on first
use. Third parties add one by installing a package that declares::

    [project.entry-points."stem.executors"]
    myexec = "my_pkg.module:MyExecutor"     # a class or zero-argument factory returning an Executor

Choosing: which executor runs depends only on a :class:`DispatchKey` (device, dtype, head dim,
block size, dense plan or not, log-sum-exp wanted or not). ``backend="auto"`` and named backends
are resolved once per key; the choice and its reason are cached until an executor is registered
(or :func:`clear_cache` is called), so a call pays one dictionary lookup.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Executor", "DispatchKey", "ExecutorStatus", "executors", "register_executor", "get_executor",
           "resolve", "executor_status", "clear_cache"]

log = logging.getLogger("stem")


@dataclass(frozen=True)
class DispatchKey:
    """Everything the choice of executor may depend on."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    block_size: int
    dense: bool
    need_lse: bool
    varlen: bool = False  # a packed variable-length batch (stem.varlen_attention)

    @classmethod
    def of(cls, q: torch.Tensor, plan, need_lse: bool, varlen: bool = False) -> DispatchKey:
        return cls(q.device, q.dtype, int(q.shape[-1]), int(plan.block_size), bool(plan.dense), bool(need_lse),
                   bool(varlen))


class Executor:
    """Base class of executors. Subclasses set ``name`` and ``priority`` and implement ``forward``.

    ``priority``: higher wins in ``backend="auto"`` among executors that can run a key.
    ``device_types``: torch device types the executor runs on.
    ``returns_lse``: whether ``forward`` can return the log-sum-exp.
    ``differentiable``: whether autograd can differentiate ``forward`` (``stem.attention``
    refuses inputs that require grad otherwise).
    ``varlen``: whether ``forward_varlen`` runs packed variable-length batches.
    """

    name: str = "?"
    priority: int = 0
    device_types: tuple[str, ...] = ("cpu", "cuda")
    description: str = ""
    returns_lse: bool = True
    differentiable: bool = False
    varlen: bool = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when usable on ``device``; else why not and how to fix it."""
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        return None

    def supports(self, key: DispatchKey) -> str | None:
        """None when this executor can run inputs described by ``key``; else why not (head dim,
        dtype, block size, ...). Shapes and the plan are checked once, by the caller, before this."""
        return None

    def auto_skip_reason(self, key: DispatchKey) -> str | None:
        """Why ``backend="auto"`` should pass over this executor for a key it can run (a slower
        path for this shape or device than an executor of lower priority), else None. Asking for
        the executor by name still runs it."""
        return None

    def forward(self, q, k, v, plan, scale: float, return_lse: bool):
        """Run the plan. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (out (B, Hq, Lq, D) in q.dtype,
        lse float32 (B, Hq, Lq) or None)."""
        raise NotImplementedError

    def forward_varlen(self, q, k, v, plan, scale: float, return_lse: bool):
        """Run a :class:`stem.VarlenBlockPlan` on a packed batch. q (total_q, Hq, D), k/v
        (total_k, Hkv, D) -> (out (total_q, Hq, D) in q.dtype, lse float32 (Hq, total_q) or None)."""
        raise NotImplementedError


@dataclass
class ExecutorStatus:
    name: str
    priority: int
    usable: bool
    reason: str
    description: str


_REGISTRY: dict[str, Executor] = {}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED = False
_BY_PRIORITY: list[tuple[str, Executor]] = []  # _REGISTRY sorted by descending priority, kept in step
_CHOICES: dict[tuple[str, DispatchKey], tuple[Executor | None, str]] = {}


def clear_cache() -> None:
    """Forget every cached dispatch decision (e.g. after changing ``LOCAL_KERNELS``)."""
    _CHOICES.clear()


def register_executor(executor: Executor, *, replace: bool = False) -> Executor:
    """Register an executor instance under ``executor.name``."""
    if not replace and executor.name in _REGISTRY and type(_REGISTRY[executor.name]) is not type(executor):
        raise ValueError(f"an executor named {executor.name!r} is already registered; pass replace=True")
    _REGISTRY[executor.name] = executor
    _BY_PRIORITY[:] = sorted(_REGISTRY.items(), key=lambda kv: -kv[1].priority)
    _CHOICES.clear()
    return executor


def first_party():
    """The ``stem_backends`` package: installed with stem, or the ``backends/`` folder beside the
    ``stem`` package in a source checkout (so ``PYTHONPATH=.`` works without installing)."""
    if "stem_backends" in sys.modules or importlib.util.find_spec("stem_backends") is not None:
        return importlib.import_module("stem_backends")
    folder = Path(__file__).resolve().parent.parent / "backends"
    init = folder / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(
            "stem's executors (package stem_backends) are missing: install stem-attention (pip install -e .) "
            "or run from a source checkout that has backends/ beside stem/")
    spec = importlib.util.spec_from_file_location("stem_backends", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["stem_backends"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["stem_backends"]
        raise
    return module


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for ex in first_party().executors():
        if ex.name not in _REGISTRY:
            register_executor(ex)
    from importlib.metadata import entry_points

    for ep in entry_points(group="stem.executors"):
        if ep.name in _REGISTRY:
            continue
        try:
            obj = ep.load()
            ex = obj() if callable(obj) else obj
            if not isinstance(ex, Executor):
                raise TypeError(f"entry point {ep.value} did not produce a stem Executor")
            register_executor(ex, replace=True)
        except Exception as e:  # surfaced by `stem info` and by explicit requests
            _LOAD_ERRORS[ep.name] = f"{type(e).__name__}: {e}"
            log.debug("executor plugin %r failed to load: %s", ep.name, e)


def executors() -> dict[str, Executor]:
    """All registered executors by name (first-party and entry-point plugins, loaded once)."""
    _load()
    return dict(_REGISTRY)


def _by_priority() -> list[tuple[str, Executor]]:
    _load()
    return _BY_PRIORITY


def executor_status(device: torch.device | str) -> list[ExecutorStatus]:
    """Each executor and whether it is usable on ``device`` (and why not)."""
    device = torch.device(device)
    rows = []
    for name, ex in _by_priority():
        reason = ex.unavailable_reason(device)
        rows.append(ExecutorStatus(name, ex.priority, reason is None, reason or "usable", ex.description))
    for name, err in _LOAD_ERRORS.items():
        rows.append(ExecutorStatus(name, -1, False, f"plugin failed to load: {err}", ""))
    return rows


def get_executor(name: str, device: torch.device) -> Executor:
    """The executor ``name``, checked usable on ``device`` (else a RuntimeError saying why)."""
    exs = executors()
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name not in exs:
        if name in _LOAD_ERRORS:
            raise RuntimeError(f"stem backend {name!r} failed to load: {_LOAD_ERRORS[name]}")
        raise ValueError(f"unknown stem backend {name!r}; available: {['auto', *sorted(exs)]}")
    ex = exs[name]
    reason = ex.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"stem backend {name!r} is unavailable on {device}: {reason}")
    return ex


def _cannot_run(ex: Executor, key: DispatchKey) -> str | None:
    why = ex.unavailable_reason(key.device)
    if why is None and key.varlen and not ex.varlen:
        why = "it does not run packed variable-length batches"
    why = why or ex.supports(key)
    if why is None and key.need_lse and not ex.returns_lse:
        why = "it does not return the log-sum-exp (return_lse=True)"
    return why


def _choose_auto(key: DispatchKey) -> tuple[Executor, str]:
    rejected = []
    for name, ex in _by_priority():
        why = _cannot_run(ex, key) or ex.auto_skip_reason(key)
        if why is None:
            return ex, f"auto -> {name}" + (f" (skipped {'; '.join(rejected)})" if rejected else "")
        rejected.append(f"{name}: {why}")
    raise RuntimeError(
        f"no stem executor can run {key.dtype} inputs with head dim {key.head_dim} and block size "
        f"{key.block_size} on {key.device}:\n  " + "\n  ".join(rejected) + "\nRun `stem info` for details."
    )


def resolve(backend: str, key: DispatchKey) -> tuple[Executor, str]:
    """The executor for ``backend`` ("auto" or a name) and ``key``, with a one-line reason.

    Resolved once per (backend, key) and cached; raises (ValueError / RuntimeError naming the
    problem) when the named executor cannot run the key or none can.
    """
    hit = _CHOICES.get((backend, key))
    if hit is None:
        if backend == "auto":
            ex, why = _choose_auto(key)
        else:
            ex = get_executor(backend, key.device)
            cannot = _cannot_run(ex, key)
            if cannot is not None:
                raise ValueError(f"stem backend {backend!r} cannot run these inputs: {cannot}")
            why = f"{backend} (asked for by name)"
        hit = _CHOICES[(backend, key)] = (ex, why)
    return hit
