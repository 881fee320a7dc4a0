"""A small GQA causal transformer (RoPE, RMSNorm, SwiGLU) with a pluggable attention function.

The attention of every layer goes through ``attn_fn(q, k, v, layer_idx) -> out`` with q
(B, Hq, L, D) and k/v (B, Hkv, L, D) after RoPE (what a sparse-attention method sees in a real
model). The default is dense causal SDPA. Weights load from safetensors + a JSON config
(:func:`load_model`), the path a user would take.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ModelConfig", "RetrievalLM", "dense_attention", "load_model", "save_model", "AttnFn"]

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    mlp_hidden: int = 768
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int = 0) -> torch.Tensor:
    """Dense causal attention (prefill, Lq == Lk) through SDPA.

    K/V are repeated to the query heads rather than passed with ``enable_gqa``: that keeps the
    flash / cuDNN kernels eligible on every torch version (the math fallback would need
    O(L^2) memory at 16K+); the copy is small beside attention itself.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention of the last Lq positions over all Lk keys (bottom-right causal)."""
    Lq, Lk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    rows = torch.arange(Lq, device=q.device)[:, None] + (Lk - Lq)
    mask = torch.arange(Lk, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (L, head_dim/2) in float32 for absolute ``positions``."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    ang = positions.double()[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, L, D); computed in float32."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int) -> None:
        super().__init__()
        self.idx = idx
        self.cfg = cfg
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=False)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.w_gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.w_down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, L, _ = x.shape
        hd = self.cfg.head_dim
        h = self.attn_norm(x)
        q = self.wq(h).view(B, L, self.cfg.n_heads, hd).transpose(1, 2)
        k = self.wk(h).view(B, L, self.cfg.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(h).view(B, L, self.cfg.n_kv_heads, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = attn_out.shape
        x = x + self.wo(attn_out.transpose(1, 2).reshape(B, L, -1))
        h = self.mlp_norm(x)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class RetrievalLM(nn.Module):
    """Decoder-only LM. ``forward(ids, attn_fn=None)`` -> logits (B, L, vocab) in float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, out_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)

    def forward(
        self,
        ids: torch.Tensor,
        attn_fn: AttnFn | None = None,
        *,
        return_kv: bool = False,
        last_only: bool = False,
    ):
        """Prefill ``ids`` (B, L). ``attn_fn`` defaults to dense causal SDPA.

        With ``return_kv`` also returns the per-layer (k, v) after RoPE, for :meth:`extend`;
        with ``last_only`` the logits are those of the last position only, (B, 1, vocab).
        """
        attn_fn = dense_attention if attn_fn is None else attn_fn
        L = ids.shape[1]
        cos, sin = rope_tables(torch.arange(L, device=ids.device), self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(ids)
        cache = []
        for layer in self.layers:
            q, k, v = layer.qkv(x, cos, sin)
            if return_kv:
                cache.append((k, v))
            x = layer.finish(x, attn_fn(q, k, v, layer.idx))
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.norm(x)).float()
        return (logits, cache) if return_kv else logits

    def extend(self, ids: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Process ``ids`` (B, A) after a prefill whose K/V are ``cache``, with dense attention
        (the decode phase; teacher-forced, so exact-match equals greedy decoding)."""
        P = cache[0][0].shape[2]
        A = ids.shape[1]
        pos = torch.arange(P, P + A, device=ids.device)
        cos, sin = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed(ids)
        for layer, (kc, vc) in zip(self.layers, cache):
            q, k, v = layer.qkv(x, cos, sin)
            k = torch.cat((kc, k.to(kc.dtype)), 2)
            v = torch.cat((vc, v.to(vc.dtype)), 2)
            x = layer.finish(x, _decode_attention(q.to(k.dtype), k, v))
        return self.head(self.norm(x)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def save_model(model: RetrievalLM, path: str, *, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    """Write ``path/model.safetensors`` and ``path/config.json``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "stem.eval.RetrievalLM/1"})
    cfg = {"model": model.cfg.to_dict(), "weights_dtype": str(dtype).replace("torch.", "")}
    if extra:
        cfg.update(extra)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def load_model(path: str, device: str | torch.device = "cpu") -> RetrievalLM:
    """Load a model written by :func:`save_model` (a directory with config.json + model.safetensors)."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: a model directory needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"(train one with `python -m benchmarks.retrieval.train --out DIR`)"
            )
    with open(cfg_path) as f:
        meta = json.load(f)
    if "model" not in meta:
        raise ValueError(f"{cfg_path} has no 'model' section; was it written by benchmarks.retrieval.save_model?")
    model = RetrievalLM(ModelConfig.from_dict(meta["model"]))
    state = load_file(w_path, device="cpu")
    own = model.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise ValueError(
            f"{w_path} does not match the config: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    model.data_config = meta.get("data")  # the generator settings the model was trained with (or None)
    return model.to(device).eval()
