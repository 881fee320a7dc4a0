"""Dense executor: plans that keep every causal block run through torch SDPA (cuDNN/flash on GPU).

Only serves dense plans (``plan.dense``); ``backend="auto"`` picks it for them so that short inputs
and dense layers are never slower than dense attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stem.dispatch import Executor

__all__ = ["DenseSDPAExecutor"]


# cuDNN first; SDPA falls through the list where a backend cannot serve the inputs.
_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ORDER_IDS = [int(b) for b in _CUDA_ORDER]


class _CudnnFirst:
    """SDPA's backend priority set to ``_CUDA_ORDER`` inside, the previous order restored on exit;
    which backends are enabled stays as the caller set it. About 0.3 us of host time against about
    17 us for ``torch.nn.attention.sdpa_kernel``, which showed in the dense path's time at 16K."""

    def __enter__(self):
        self.prev = torch._C._get_sdp_priority_order()
        torch._C._set_sdp_priority_order(_ORDER_IDS + [b for b in self.prev if b not in _ORDER_IDS])

    def __exit__(self, *exc):
        torch._C._set_sdp_priority_order(self.prev)


if hasattr(torch._C, "_set_sdp_priority_order"):
    _cudnn_first = _CudnnFirst
else:  # a torch without the priority switch
    def _cudnn_first():
        return sdpa_kernel(_CUDA_ORDER, set_priority=True)


class DenseSDPAExecutor(Executor):
    name = "sdpa"
    priority = 100  # above every sparse executor: for a dense plan nothing beats the dense kernel
    device_types = ("cpu", "cuda")
    description = "torch SDPA for plans that keep every causal block (dense layers, short inputs)"
    returns_lse = True  # on CPU (see supports)
    differentiable = True
    varlen = True  # one SDPA call per sequence (a packed batch whose every sequence is dense)

    def supports(self, key):
        if not key.dense:
            return "plan is sparse (sdpa serves dense plans only)"
        if key.need_lse and key.device.type != "cpu":
            return "dense SDPA returns no log-sum-exp on CUDA (the sparse executors run dense plans with it)"
        return None

    def forward(self, q, k, v, plan, scale, return_lse):
        if return_lse:
            return _forward_with_lse_cpu(q, k, v, plan, scale)
        if q.is_cuda:
            # cuDNN first: on H200 (torch 2.11) the default order ran an 8K causal prefill in 1.40 ms
            # against cuDNN's 1.04 ms.
            with _cudnn_first():
                return self._forward(q, k, v, plan, scale)
        return self._forward(q, k, v, plan, scale)

    def forward_varlen(self, q, k, v, plan, scale, return_lse):
        from stem_backends.reference import run_varlen_per_sequence

        return run_varlen_per_sequence(self.forward, q, k, v, plan, scale, return_lse)

    def _forward(self, q, k, v, plan, scale):
        Lq, Lk = q.shape[2], k.shape[2]
        gqa = q.shape[1] != k.shape[1]
        if plan.q_offset != Lk - Lq:  # queries in the middle: keys after the last query are never seen
            end = plan.q_offset + Lq
            k, v, Lk = k[:, :, :end], v[:, :, :end], end
        if Lq == Lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa), None
        # Chunked prefill: queries are the last Lq positions -> bottom-right aligned causal mask.
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(Lq, Lk)
        if gqa:  # the lower-right bias object does not take enable_gqa on every torch version
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


def _forward_with_lse_cpu(q, k, v, plan, scale):
    """Dense causal attention with its natural-log LSE on CPU, in one fused kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``): out (B, Hq, Lq, D), lse (B, Hq, Lq)
    float32 (float64 for float64 inputs)."""
    Lq = q.shape[2]
    end = plan.q_offset + Lq  # keys after the last query are never seen
    k, v = k[:, :, :end], v[:, :, :end]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    mask = None
    if end != Lq:  # queries are the last Lq of `end` keys: bottom-right causal mask
        allowed = torch.ones(Lq, end, dtype=torch.bool, device=q.device).tril(end - Lq)
        mask = torch.zeros(Lq, end, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)

