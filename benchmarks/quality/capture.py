"""The long English document and the post-RoPE q, k, v of every attention layer of one dense forward.

Document: three different licence texts from ``/usr/share/common-licenses`` (Debian's base-files),
then sections of the Python language reference (``pydoc_data.topics``, sorted by topic name), joined
by blank lines and cut at ``length`` tokens. Each source is recorded with its sha256 and the number
of its tokens used, so a run can be reproduced (or shown to differ) elsewhere.

Capture: a custom attention function registered with transformers' ``AttentionInterface`` records
``query`` (B, Hq, L, D) and ``key``, ``value`` (B, Hkv, L, D) as each attention layer hands them to
its attention function (after RoPE; K/V not repeated for GQA), then calls transformers' own SDPA
function, so the forward is the ordinary dense one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

__all__ = ["LICENSE_DIR", "LICENSES", "ATTN_NAME", "build_document", "capture_qkv"]

LICENSE_DIR = "/usr/share/common-licenses"
LICENSES = ("Apache-2.0", "BSD", "CC0-1.0")
ATTN_NAME = "stem_quality_record"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sources(license_dir: str) -> list[tuple[str, str]]:
    import pydoc_data.topics

    out = []
    for name in LICENSES:
        path = Path(license_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (the document needs the licence texts {LICENSES})")
        out.append((f"common-licenses/{name}", path.read_text(encoding="utf-8")))
    topics = pydoc_data.topics.topics
    out += [(f"pydoc_data.topics[{key!r}]", topics[key]) for key in sorted(topics)]
    return out


def build_document(tokenizer, length: int = 8192, license_dir: str = LICENSE_DIR) -> tuple[torch.Tensor, list[dict]]:
    """Token ids (1, length) and the list of sources used (name, sha256, tokens used / total)."""
    ids: list[int] = []
    used = []
    for name, text in _sources(license_dir):
        if len(ids) >= length:
            break
        piece = tokenizer(("\n\n" if ids else "") + text.strip(), add_special_tokens=False)["input_ids"]
        take = min(len(piece), length - len(ids))
        ids += piece[:take]
        used.append({"source": name, "sha256": _sha(text), "tokens_used": take, "tokens_total": len(piece)})
    if len(ids) < length:
        raise ValueError(f"the sources give only {len(ids)} tokens, {length} wanted")
    return torch.tensor([ids], dtype=torch.long), used


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record(module, query, key, value, attention_mask, *args, **kwargs):
        store = getattr(module, "_stem_quality_store", None)
        if store is not None:
            store[module.layer_idx] = tuple(t.detach().clone() for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, record)


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """One dense forward; returns ([(q, k, v) per layer], logits). The model's attention
    implementation is switched to the recording one for the call and restored after."""
    _register()
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not layers:
        raise ValueError("found no attention modules (modules with layer_idx and o_proj)")
    store: dict[int, tuple] = {}
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    for m in layers:
        m._stem_quality_store = store
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for m in layers:
            del m._stem_quality_store
        model.set_attn_implementation(before)
    missing = sorted({m.layer_idx for m in layers} - set(store))
    if missing:
        raise RuntimeError(f"attention layers {missing} were not captured")
    return [store[i] for i in sorted(store)], logits
