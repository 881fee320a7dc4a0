"""Executor plugins: discovery through the ``stem.executors`` entry-point group, and selection.

An executor runs a BlockPlan. Third parties add one by installing a package that declares::

    [project.entry-points."stem.executors"]
    myexec = "my_pkg.module:MyExecutor"     # a class or zero-argument factory returning an Executor
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

__all__ = ["Executor", "ExecutorStatus", "executors", "register_executor", "get_executor", "choose_executor",
           "executor_status"]

log = logging.getLogger("stem")


class Executor:
    """Base class of executors. Subclasses set ``name`` and ``priority`` and implement ``forward``.

    ``priority``: higher wins in ``backend="auto"`` among executors usable on the device.
    ``device_types``: torch device types the executor runs on.
    """

    name: str = "?"
    priority: int = 0
    device_types: tuple[str, ...] = ("cpu", "cuda")
    description: str = ""
    returns_lse: bool = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when usable on ``device``; else why not and how to fix it."""
        if device.type not in self.device_types:
            return f"runs on {'/'.join(self.device_types)} tensors, not {device.type}"
        return None

    def unsupported_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> str | None:
        """None when this executor can run these inputs; else why not (head dim, dtype, ...)."""
        return None

    def auto_skip_reason(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> str | None:
        """Why ``backend="auto"`` should pass over this executor for inputs it can run (a slower
        path for this shape or device than an executor of lower priority), else None. Asking for
        the executor by name still runs it."""
        return None

    def forward(self, q, k, v, plan, scale: float, return_lse: bool):
        """Run the plan. q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (out (B, Hq, Lq, D) in q.dtype,
        lse float32 (B, Hq, Lq) or None)."""
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


def register_executor(executor: Executor, *, replace: bool = False) -> Executor:
    """Register an executor instance under ``executor.name``."""
    if not replace and executor.name in _REGISTRY and type(_REGISTRY[executor.name]) is not type(executor):
        raise ValueError(f"an executor named {executor.name!r} is already registered; pass replace=True")
    _REGISTRY[executor.name] = executor
    _BY_PRIORITY[:] = sorted(_REGISTRY.items(), key=lambda kv: -kv[1].priority)
    return executor


def _load_entry_points() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
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
            log.debug("stem: executor plugin %r failed to load: %s", ep.name, e)
    if not _REGISTRY and not _LOAD_ERRORS:
        log.warning(
            "stem: no executors registered through entry points; is stem-attention installed "
            "(pip install -e .)? Falling back to the built-in reference executor."
        )
        from stem_backends.reference import ReferenceExecutor

        register_executor(ReferenceExecutor())


def executors() -> dict[str, Executor]:
    """All registered executors by name (loads the entry points once)."""
    _load_entry_points()
    return dict(_REGISTRY)


def _by_priority() -> list[tuple[str, Executor]]:
    _load_entry_points()
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
    if name not in exs:
        if name in _LOAD_ERRORS:
            raise RuntimeError(f"stem backend {name!r} failed to load: {_LOAD_ERRORS[name]}")
        raise ValueError(f"unknown stem backend {name!r}; available: {['auto', *sorted(exs)]}")
    ex = exs[name]
    reason = ex.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"stem backend {name!r} is unavailable on {device}: {reason}")
    return ex


def choose_executor(q, k, v, plan, need_lse: bool = False) -> tuple[Executor, str]:
    """``backend="auto"``: the usable executor of highest priority that supports the inputs.

    Returns the executor and a one-line reason for the choice (logged at INFO by the caller).
    """
    device = q.device
    rejected = []
    for name, ex in _by_priority():
        why = ex.unavailable_reason(device) or ex.unsupported_reason(q, k, v, plan)
        if why is None:
            why = ex.auto_skip_reason(q, k, v, plan)
        if why is None and need_lse and not ex.returns_lse:
            why = "does not return the log-sum-exp"
        if why is None:
            return ex, f"auto -> {name} (priority {ex.priority})" + (
                f"; skipped: {'; '.join(rejected)}" if rejected else ""
            )
        rejected.append(f"{name}: {why}")
    raise RuntimeError(
        f"no stem executor can run these inputs on {device}:\n  " + "\n  ".join(rejected)
        + "\nRun `stem info` for details."
    )
