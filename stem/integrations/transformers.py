"""Stem in Hugging Face transformers: ``attn_implementation="stem"`` on any decoder model.

Importing this module registers an attention function and a mask function named ``"stem"``
with transformers' ``AttentionInterface`` / ``AttentionMaskInterface``. After that::

    import stem.integrations.transformers as stem_hf
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="stem")   # or
    model.set_attn_implementation("stem")                                            # or
    stem_hf.enable(model, stem_hf.StemModelConfig(dense_layers=(0, 1), alpha={5: 0.9}))

Routing (per attention call; nothing per architecture):

* prefill (q_len == kv_len, no padding)            -> ``stem.attention`` with the layer's config
* chunked prefill (q_len < kv_len, dynamic cache,
  no padding)                                       -> ``stem.attention`` with Lq < Lk (queries
                                                       are the last Lq positions)
* padded batches (left or right padding, as
  ``generate`` and pipelines make them)              -> unpadded to ``stem.varlen_attention``: each
                                                       row's tokens are one sequence, served as if
                                                       it ran alone; padded query rows get 0
* decode (q_len == 1), masks other than causal +
  padding (packed sequences, custom masks), static-
  cache prefill, sliding-window layers longer than
  the window, dropout/autograd, attention bias/
  sinks/softcap, unsupported dtypes, schedule
  disabled                                          -> transformers' own SDPA function, unchanged;
                                                       the reason is logged once at DEBUG level
                                                       (logger ``stem.integrations.transformers``)
                                                       and counted in :func:`dispatch_counts`.

The mask function is transformers' SDPA mask function: it returns ``None`` for unpadded causal
prefill and decode (so the attention function knows no mask is needed) and a boolean 4-D mask
when there is padding. For chunked prefill transformers always materialises a mask; when that
mask is a plain bottom-right causal mask (no padding, dynamic cache, no custom mask pattern) the
mask function marks the tensor (attribute ``_stem_causal_suffix``) so the attention function can
serve it with Stem without reading the mask. When the mask is causal + padding and every row's
valid tokens are contiguous, the mask function attaches the unpadding layout (attribute
``_stem_padding``: cumulative lengths and gather indices, computed once per forward pass with one
host synchronisation) and every layer unpads q/k/v with it; any other mask goes to SDPA as is.

Per-layer schedule: :class:`StemModelConfig` (base :class:`stem.StemConfig`, dense layers, per-layer
alpha, enabled flag, executor). :func:`enable` stores it on the model and on every attention module
(the layer index is ``module.layer_idx``); :func:`get_config` reads it back; :func:`disable`
restores the previous attention implementation. A model loaded with ``attn_implementation="stem"``
and never passed to :func:`enable` uses ``StemModelConfig()`` (first two layers dense, as the
authors ship).

Hub-kernel string path (``attn_implementation="<org>/stem-attention"``)
-----------------------------------------------------------------------
transformers can also load an attention function from a Hub kernel repo through the ``kernels``
package: when the loaded module exposes ``flash_attn_forward`` and ``supports_flash_attn``, it
registers ``module.flash_attn_forward`` as the attention function under the repo string and the
SDPA mask function beside it -- the same contract as :func:`stem_attention_forward` here, so a hub
build can expose ``flash_attn_forward = stem_attention_forward``. On that path transformers pairs
it with the plain SDPA mask function, so chunked-prefill masks are not marked and chunked prefill
goes to SDPA (prefill, decode and padding behave as on the local path). The repo is fetched with
``get_kernel(repo, version=1)`` (a ``v1`` branch, unless ``repo@rev`` is given) and, outside the
``kernels-community`` org, only with ``from_pretrained(..., allow_all_kernels=True)``.
Whether transformers accepts the installed ``kernels`` at all is gated by its
``KERNELS_MIN_VERSION <= kernels < KERNELS_MAX_VERSION`` (read from each release's
``transformers/utils/import_utils.py`` and ``integrations/hub_kernels.py``):

==================  ==========================  ======================================
transformers        kernels accepted            hub string with kernels 0.17.x
==================  ==========================  ======================================
<= 5.16             0.16.x                      no (no ``flash_attn_forward`` branch)
5.17                0.16.x  (>=0.16, <0.17)     no (kernels 0.17 rejected: ImportError)
5.18 - 5.19         0.17.x  (>=0.17.0, <0.18)   yes
5.20 - 5.22         0.17.x  (>=0.17.2, <0.18)   yes (kernels >= 0.17.2)
5.23 - 5.24         0.18.x  (>=0.18.2, <0.19)   no (needs kernels 0.18.2+)
==================  ==========================  ======================================

The local path (``import stem.integrations.transformers`` then ``attn_implementation="stem"``)
needs neither ``kernels`` nor the Hub and works with every transformers release that has
``AttentionInterface``/``AttentionMaskInterface`` (tested here: 5.17).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..api import attention as stem_attention
from ..config import StemConfig
from ..varlen import _varlen_attention

__all__ = [
    "NAME",
    "StemModelConfig",
    "register",
    "enable",
    "disable",
    "get_config",
    "stem_attention_forward",
    "stem_mask",
    "dispatch_counts",
    "reset_dispatch_counts",
]

NAME = "stem"
log = logging.getLogger(__name__)

_SUFFIX_TAG = "_stem_causal_suffix"  # set on a 4-D mask that is a plain bottom-right causal mask
_PADDING_TAG = "_stem_padding"  # a _Padding set on a 4-D mask that is causal + contiguous padding
_COMPILED_PADDING_TAG = "_stem_padding_compiled"  # causal + padding seen while torch.compile traces
_MODULE_ATTR = "_stem_model_config"
_PREV_ATTR = "_stem_previous_attn_implementation"
_CPU_ONLY_DTYPES = (torch.float64,)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- per-layer schedule ----------------------------------------------------------------------
@dataclass(frozen=True)
class StemModelConfig:
    """Which layers run Stem and with which hyper-parameters.

    Attributes:
        base: the StemConfig of every sparse layer (default: the paper's).
        dense_layers: layer indices kept dense (every causal block; served by SDPA inside
            ``stem.attention``). Default ``(0, 1)``, as the authors ship.
        alpha: per-layer Token Position-Decay overrides ``{layer_idx: alpha}``.
        enabled: False routes every layer to SDPA (a model-wide off switch).
        backend: the ``stem.attention`` backend ("auto" or an executor name).
        precision: the ``stem.attention`` precision, "native", "fp8" or "fp8_pv" (sparse layers of
            unpadded batches; padded batches raise ValueError with "fp8").
    """

    base: StemConfig = field(default_factory=StemConfig)
    dense_layers: tuple[int, ...] = (0, 1)
    alpha: Mapping[int, float] = field(default_factory=dict)
    enabled: bool = True
    backend: str = "auto"
    precision: str = "native"

    def __post_init__(self) -> None:
        if not isinstance(self.base, StemConfig):
            raise TypeError(f"StemModelConfig.base must be a stem.StemConfig, got {type(self.base).__name__}")
        if isinstance(self.dense_layers, (int, str)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.dense_layers
        ):
            raise ValueError(
                f"StemModelConfig.dense_layers must be a tuple of layer indices >= 0, got {self.dense_layers!r}"
            )
        dense = tuple(sorted(set(self.dense_layers)))
        if not isinstance(self.alpha, Mapping):
            raise TypeError(
                f"StemModelConfig.alpha must be a dict {{layer_idx: alpha}}, got {type(self.alpha).__name__}"
            )
        alpha = {}
        for i, a in self.alpha.items():
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ValueError(f"StemModelConfig.alpha keys must be layer indices >= 0, got {i!r}")
            alpha[i] = float(a)
        if not isinstance(self.enabled, bool):
            raise TypeError(f"StemModelConfig.enabled must be a bool, got {self.enabled!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"StemModelConfig.backend must be a string, got {type(self.backend).__name__}")
        from ..api import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"StemModelConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        both = sorted(set(dense) & set(alpha))
        if both:
            raise ValueError(
                f"StemModelConfig: layers {both} are both dense and given an alpha; a dense layer has no decay, "
                f"drop them from dense_layers or from alpha"
            )
        object.__setattr__(self, "dense_layers", dense)
        object.__setattr__(self, "alpha", MappingProxyType(alpha))
        # Build (and so validate) every per-layer StemConfig once; the attention call only looks up.
        layers = {i: self.base.replace(dense=True) for i in dense}
        for i, a in alpha.items():
            layers[i] = self.base.replace(alpha=a)
        object.__setattr__(self, "_layers", layers)

    def __hash__(self) -> int:
        return hash((self.base, self.dense_layers, tuple(sorted(self.alpha.items())), self.enabled, self.backend,
                     self.precision))

    def layer_config(self, layer_idx: int | None) -> StemConfig | None:
        """The StemConfig of layer ``layer_idx`` (None when Stem is disabled)."""
        if not self.enabled:
            return None
        if layer_idx is None:
            return self.base
        return self._layers.get(layer_idx, self.base)

    def max_layer_index(self) -> int:
        """The largest layer index the schedule names (-1 if none)."""
        return max([*self.dense_layers, *self.alpha.keys()], default=-1)

    def replace(self, **changes) -> StemModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "base": self.base.to_dict(),
            "dense_layers": list(self.dense_layers),
            "alpha": {str(i): a for i, a in sorted(self.alpha.items())},
            "enabled": self.enabled,
            "backend": self.backend,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StemModelConfig:
        d = dict(d)
        base = d.pop("base", None)
        alpha = {int(i): float(a) for i, a in d.pop("alpha", {}).items()}
        return cls(base=StemConfig.from_dict(base) if base else StemConfig(), alpha=alpha, **d)


_DEFAULT = StemModelConfig()


# ---- routing ---------------------------------------------------------------------------------
_COUNTS: Counter = Counter()
_LOGGED: set[str] = set()


def dispatch_counts() -> dict[str, int]:
    """How many eager attention calls went to Stem (``"stem"``, ``"stem:chunked"``,
    ``"stem:padded"``) or SDPA (``"sdpa:<reason>"``) since the last :func:`reset_dispatch_counts`.
    Calls inside a ``torch.compile``d graph are not counted (a counter there would force a
    recompilation per call); ``torch._dynamo.explain`` shows their ``stem::`` ops instead."""
    return dict(_COUNTS)


def reset_dispatch_counts() -> None:
    _COUNTS.clear()


def _fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs, cfg) -> str | None:
    """None when Stem serves this call; else a short reason (the SDPA function serves it)."""
    if cfg is None:
        return "stem disabled for this model (StemModelConfig.enabled=False)"
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len == 1:
        return "decode (q_len == 1)"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "non-causal attention"
    if dropout and dropout > 0.0:
        return "attention dropout (training)"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "autograd (Stem executors are forward-only; run under torch.no_grad())"
    for name in ("position_bias", "s_aux", "sinks", "softcap"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported by Stem"
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None and kv_len > window:
        return "sliding-window layer longer than its window"
    if query.dtype not in _DTYPES and not (query.dtype in _CPU_ONLY_DTYPES and query.device.type == "cpu"):
        return f"dtype {query.dtype}"
    if key.shape[-1] != query.shape[-1] or value.shape != key.shape:
        return "q/k/v head dims differ"
    if q_len > kv_len:
        return "q_len > kv_len"
    if attention_mask is not None:
        if getattr(attention_mask, _SUFFIX_TAG, False):
            return None  # a plain causal mask (chunked prefill; prefill when the mask is materialised)
        pad = getattr(attention_mask, _PADDING_TAG, None)
        if pad is not None and (pad.batch, pad.q_len, pad.kv_len) == (query.shape[0], q_len, kv_len):
            return None  # causal + padding: served unpadded
        if getattr(attention_mask, _COMPILED_PADDING_TAG, False):
            return "padded batch inside torch.compile (unpadding reads the lengths on the host; run padded " \
                   "prefill eagerly)"
        return "custom attention mask (not causal + padding)"
    if q_len < kv_len:
        # No mask while kv is longer: transformers skipped the mask because the cache is a
        # pre-allocated static buffer whose tail is empty (see _ignore_causal_mask_sdpa).
        return "static-cache prefill"
    return None


def _note(route: str) -> None:
    if torch.compiler.is_compiling():
        # counting inside a compiled graph would guard on the counter's value and recompile every call
        return
    _COUNTS[route] += 1
    if route not in _LOGGED:
        _LOGGED.add(route)
        log.debug("attention routed to %s", route)


def stem_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: (B, H, L, D) q, un-repeated (B, Hkv, L, D) k/v -> (B, L, H, D).

    Serves causal prefill and chunked prefill with ``stem.attention`` (layer config from
    ``module.layer_idx`` and the model's :class:`StemModelConfig`); every other call goes to
    transformers' SDPA attention function unchanged.
    """
    mcfg = getattr(module, _MODULE_ATTR, None) or _DEFAULT
    cfg = mcfg.layer_config(getattr(module, "layer_idx", None))
    why = _fallback_reason(module, query, key, value, attention_mask, dropout, is_causal, kwargs, cfg)
    if why is not None:
        _note(f"sdpa:{why}")
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    pad = getattr(attention_mask, _PADDING_TAG, None) if attention_mask is not None else None
    if pad is not None:
        if mcfg.precision != "native":
            raise ValueError(f"StemModelConfig.precision={mcfg.precision!r} does not run padded (variable-length) "
                             "batches: pass unpadded inputs (batch size 1 or equal lengths) or precision='native'")
        _note("stem:padded")
        return _padded_forward(query, key, value, pad, cfg, scaling, mcfg.backend), None
    _note("stem" if query.shape[2] == key.shape[2] else "stem:chunked")
    out = stem_attention(query, key, value, config=cfg, scale=scaling, backend=mcfg.backend, precision=mcfg.precision)
    return out.transpose(1, 2).contiguous(), None


@dataclass(frozen=True)
class _Padding:
    """How a padded batch unpacks: row b's valid keys are positions [start_b, end_b) of the kv
    window; its valid queries are the query positions inside that range (a suffix of it)."""

    batch: int
    q_len: int
    kv_len: int
    lens: tuple  # per row (len_q, len_k)
    cu_q: torch.Tensor  # int32 (B + 1,)
    cu_k: torch.Tensor
    idx_q: torch.Tensor  # int64 (total_q,): rows of query.transpose(1, 2).reshape(B * q_len, ...)
    idx_k: torch.Tensor  # int64 (total_k,): rows of key.transpose(1, 2).reshape(B * kv_len, ...)


def _padding_layout(pad_mask: torch.Tensor, q_len: int, kv_len: int) -> _Padding | None:
    """The unpadding layout of a bool (B, kv_len) padding mask, or None when some row's valid tokens
    are not contiguous (then the mask is not plain padding). One host synchronisation."""
    B = pad_mask.shape[0]
    m = pad_mask.to(torch.bool)
    n = m.sum(-1)
    first = m.to(torch.int8).argmax(-1)
    last = kv_len - 1 - m.flip(-1).to(torch.int8).argmax(-1)
    n, first, last = torch.stack([n, first, last]).tolist()  # the one host sync of a padded forward pass
    off = kv_len - q_len
    lens, iq, ik = [], [], []
    for b in range(B):
        if n[b] == 0:
            lens.append((0, 0))
            continue
        s, e = first[b], last[b] + 1
        if e - s != n[b]:
            return None  # holes inside a row: not padding
        qs = max(s, off)
        lq = max(0, e - qs)
        lens.append((lq, e - s))
        iq.append(torch.arange(qs - off, e - off) + b * q_len)
        ik.append(torch.arange(s, e) + b * kv_len)
    cu = torch.tensor([[0, 0]] + [[sum(x[0] for x in lens[: i + 1]), sum(x[1] for x in lens[: i + 1])]
                                  for i in range(B)], dtype=torch.int32)
    dev = pad_mask.device
    none = torch.zeros(0, dtype=torch.int64)
    return _Padding(B, q_len, kv_len, tuple(lens), cu[:, 0].contiguous().to(dev), cu[:, 1].contiguous().to(dev),
                    (torch.cat(iq) if iq else none).to(dev), (torch.cat(ik) if ik else none).to(dev))


def _padded_forward(query, key, value, pad: _Padding, cfg, scaling, backend) -> torch.Tensor:
    """Unpad (B, H, L, D) q/k/v with the layout, run stem.varlen_attention, pad back to (B, Lq, H, D)."""
    B, H, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    q = query.transpose(1, 2).reshape(B * Lq, H, D).index_select(0, pad.idx_q)
    k = key.transpose(1, 2).reshape(B * Lk, Hkv, D).index_select(0, pad.idx_k)
    v = value.transpose(1, 2).reshape(B * Lk, Hkv, D).index_select(0, pad.idx_k)
    mq = max((a for a, _ in pad.lens), default=0)
    mk = max((b for _, b in pad.lens), default=0)
    out = _varlen_attention(q, k, v, pad.cu_q, pad.cu_k, pad.lens, mq, mk, cfg, None, backend, scaling, False, False)
    full = out.new_zeros(B * Lq, H, D).index_copy_(0, pad.idx_q, out)
    return full.view(B, Lq, H, D)


def stem_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers mask function: the SDPA mask, with plain causal chunked-prefill masks marked.

    ``None`` (unpadded prefill, decode) and padded masks are exactly what ``sdpa_mask`` returns.
    """
    mask = sdpa_mask(
        batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )
    if (
        mask is not None
        and q_length > 1
        and mask_function is causal_mask_function  # no sliding window / packing / overlays
        and kwargs.get("local_size") is None
        and isinstance(q_offset, int)  # static caches pass a tensor offset
        and kv_offset == 0
        and q_offset + q_length == kv_length  # queries are the last q_length keys (dynamic cache)
    ):
        if attention_mask is None:
            setattr(mask, _SUFFIX_TAG, True)
        elif torch.compiler.is_compiling():
            setattr(mask, _COMPILED_PADDING_TAG, True)  # unpadding needs the lengths on the host
        elif attention_mask.dim() == 2 and attention_mask.shape[-1] >= kv_length:
            # One host sync per forward pass (the mask is built once per forward, not per layer).
            pad = _padding_layout(attention_mask[:, -kv_length:], q_length, kv_length)
            if pad is not None and all(lk == kv_length for _, lk in pad.lens):
                setattr(mask, _SUFFIX_TAG, True)  # no padding after all
            elif pad is not None:
                setattr(mask, _PADDING_TAG, pad)
    return mask


# ---- registration and model-level switches -----------------------------------------------------
def register() -> None:
    """Register ``"stem"`` with transformers (idempotent; done on import of this module)."""
    AttentionInterface.register(NAME, stem_attention_forward)
    AttentionMaskInterface.register(NAME, stem_mask)


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")]


def _coerce(config) -> StemModelConfig:
    if config is None:
        return StemModelConfig()
    if isinstance(config, StemModelConfig):
        return config
    if isinstance(config, StemConfig):
        return StemModelConfig(base=config)
    if isinstance(config, Mapping):
        return StemModelConfig.from_dict(config)
    raise TypeError(f"config must be a StemModelConfig, a StemConfig or a dict, got {type(config).__name__}")


def enable(model, config: StemModelConfig | StemConfig | dict | None = None):
    """Switch ``model`` to Stem attention with the per-layer schedule ``config`` (default:
    ``StemModelConfig()``). Returns the model. Call again to change the schedule."""
    register()
    cfg = _coerce(config)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with a `layer_idx`; Stem needs a transformers "
            f"decoder whose attention goes through AttentionInterface"
        )
    n_layers = max(m.layer_idx for m in modules) + 1
    if cfg.max_layer_index() >= n_layers:
        raise ValueError(
            f"StemModelConfig names layer {cfg.max_layer_index()} but the model has {n_layers} layers "
            f"(0..{n_layers - 1}); fix dense_layers / alpha"
        )
    current = model.config._attn_implementation
    if current != NAME:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise RuntimeError(
                f"{type(model).__name__} refused attn_implementation={NAME!r} (it does not dispatch through "
                f"transformers' AttentionInterface), so Stem cannot be enabled on it"
            )
        setattr(model, _PREV_ATTR, current)
    for m in modules:
        setattr(m, _MODULE_ATTR, cfg)
    setattr(model, _MODULE_ATTR, cfg)
    return model


def disable(model, attn_implementation: str | None = None):
    """Restore the attention implementation the model had before :func:`enable` (or
    ``attn_implementation``; "sdpa" if unknown) and drop the schedule. Returns the model."""
    target = attn_implementation or getattr(model, _PREV_ATTR, None) or "sdpa"
    if target == NAME:
        raise ValueError("disable(model, 'stem') makes no sense; pass another attn_implementation")
    model.set_attn_implementation(target)
    for m in [model, *_attention_modules(model)]:
        if _MODULE_ATTR in vars(m):
            delattr(m, _MODULE_ATTR)
    if _PREV_ATTR in vars(model):
        delattr(model, _PREV_ATTR)
    return model


def get_config(model) -> StemModelConfig | None:
    """The schedule ``model`` runs with: the one given to :func:`enable`, the default when the model
    was loaded with ``attn_implementation="stem"``, None when the model does not use Stem."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        return None
    return getattr(model, _MODULE_ATTR, None) or _DEFAULT


register()
