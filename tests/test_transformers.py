"""transformers integration (CPU, tiny random models built from configs; no downloads).

The independent reference for the sparse path is a *separate* attention function registered
here ("stem_test_ref") that calls ``stem.attention`` per layer with a per-layer StemConfig built
in this file, not through StemModelConfig; the dense path is checked against transformers' SDPA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

import stem  # noqa: E402
import stem.integrations.transformers as sh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BS, STRIDE = 16, 4  # small blocks so Stem engages (>= 56 blocks) at ~1K tokens
SPARSE_LEN = BS * 60  # 60 blocks: sparse budget (k0 = 42)
VOCAB = 128


def _common(**kw):
    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=4096,
    )
    base.update(kw)
    return base


def tiny_llama(**kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_common(**kw))).eval()


def tiny_qwen3(**kw):
    torch.manual_seed(1)
    return Qwen3ForCausalLM(Qwen3Config(**_common(**kw))).eval()


BUILDERS = {"llama": tiny_llama, "qwen3": tiny_qwen3}


def ids(n, batch=1, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, impl, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids, **kw).logits


# ---- the hand-wired reference: its own attention function, its own per-layer configs ----------
REF_CFGS: dict[int, stem.StemConfig] = {}
REF_PLANS: dict[int, stem.BlockPlan] = {}


def _ref_attention(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if q.shape[2] == 1:
        return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out, plan = stem.attention(q, k, v, config=REF_CFGS[module.layer_idx], scale=scaling, return_plan=True)
    REF_PLANS[module.layer_idx] = plan
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("stem_test_ref", _ref_attention)


@pytest.fixture(autouse=True)
def _fresh_counts():
    sh.reset_dispatch_counts()
    REF_PLANS.clear()
    yield


def sparse_schedule(alpha_layer1=0.5):
    base = stem.StemConfig(block_size=BS, stride=STRIDE)
    model_cfg = sh.StemModelConfig(base=base, dense_layers=(0,), alpha={1: alpha_layer1})
    REF_CFGS.clear()
    REF_CFGS.update({0: base.replace(dense=True), 1: base.replace(alpha=alpha_layer1)})
    return model_cfg


def all_dense():
    return sh.StemModelConfig(base=stem.StemConfig(block_size=BS, stride=STRIDE), dense_layers=(0, 1))


# ---- (a) dense schedule == SDPA -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_schedule_matches_sdpa(arch):
    model = BUILDERS[arch]()
    x = ids(SPARSE_LEN + 7)  # long enough that a sparse layer would engage; ragged last block
    ref = logits(model, x, "sdpa")
    sh.enable(model, all_dense())
    out = logits(model, x, "stem")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"stem": 2}


# ---- (b) sparse schedule == hand-wired stem.attention, != SDPA --------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sparse_schedule_matches_hand_wired(arch):
    model = BUILDERS[arch]()
    x = ids(SPARSE_LEN, seed=3)
    dense = logits(model, x, "sdpa")
    sh.enable(model, sparse_schedule())
    out = logits(model, x, "stem")
    assert sh.dispatch_counts() == {"stem": 2}
    ref = logits(model, x, "stem_test_ref")
    plan = REF_PLANS[1]
    assert not plan.dense and plan.density < 0.95, plan  # the layer really ran sparse
    assert REF_PLANS[0].dense
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert (out - dense).abs().max() > 1e-3  # and sparsity changed the result


def test_alpha_override_is_used():
    """A schedule whose layer-1 alpha differs from the reference's must not match it."""
    model = tiny_llama()
    x = ids(SPARSE_LEN, seed=4)
    sparse_schedule(alpha_layer1=0.5)  # reference configs: alpha 0.5
    sh.enable(model, sh.StemModelConfig(base=stem.StemConfig(block_size=BS, stride=STRIDE), dense_layers=(0,)))
    out = logits(model, x, "stem")  # alpha 0.7 (base)
    ref = logits(model, x, "stem_test_ref")
    assert (out - ref).abs().max() > 1e-4


# ---- (c) generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_dense_matches_sdpa(arch):
    model = BUILDERS[arch]()
    prompt = ids(40, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, min_new_tokens=8)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
    sh.enable(model, all_dense())
    with torch.no_grad():
        out = model.generate(prompt, **kw)
    assert torch.equal(out, ref)
    counts = sh.dispatch_counts()
    assert counts["stem"] == 2 and counts["sdpa:decode (q_len == 1)"] == 2 * 7, counts


# ---- (d) padded batches run Stem, each row as if alone ------------------------------------------------
def tiny_qwen2(**kw):
    torch.manual_seed(3)
    return Qwen2ForCausalLM(Qwen2Config(**_common(**kw))).eval()


def tiny_mistral(**kw):
    torch.manual_seed(4)
    return MistralForCausalLM(MistralConfig(**_common(sliding_window=None, **kw))).eval()


PADDED_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "qwen3": tiny_qwen3, "mistral": tiny_mistral}


def padded_batch(lengths, side, seed):
    """(input_ids, attention_mask, position_ids) of prompts of ``lengths`` padded on ``side``."""
    L = max(lengths)
    x = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        x[i, sl] = ids(n, seed=seed + i)[0]
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return x, mask, pos


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", list(PADDED_BUILDERS))
def test_padded_batch_runs_stem_and_matches_each_prompt_alone(arch, side):
    model = PADDED_BUILDERS[arch]()
    lengths = [SPARSE_LEN + 37, 200, SPARSE_LEN + 130]  # sparse, dense (short) and sparse rows
    x, mask, pos = padded_batch(lengths, side, seed=20)
    sh.enable(model, sparse_schedule())
    out = logits(model, x, "stem", attention_mask=mask, position_ids=pos)
    assert sh.dispatch_counts() == {"stem:padded": 2}, sh.dispatch_counts()
    dense = logits(model, x, "sdpa", attention_mask=mask, position_ids=pos)
    L = x.shape[1]
    for i, n in enumerate(lengths):
        sl = slice(L - n, L) if side == "left" else slice(0, n)
        sh.reset_dispatch_counts()
        alone = logits(model, x[i : i + 1, sl], "stem")
        assert sh.dispatch_counts() == {"stem": 2}
        torch.testing.assert_close(out[i, sl], alone[0], rtol=1e-5, atol=1e-5)
        if n > SPARSE_LEN:  # the sparse rows really ran sparse
            assert (out[i, sl] - dense[i, sl]).abs().max() > 1e-4


def test_generate_on_a_padded_batch_matches_one_prompt_at_a_time():
    model = tiny_llama()
    lengths = [SPARSE_LEN + 20, 150]
    x, mask, _ = padded_batch(lengths, "left", seed=30)
    sh.enable(model, sparse_schedule())
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = model.generate(x, attention_mask=mask, **kw)
    counts = sh.dispatch_counts()
    assert counts["stem:padded"] == 2 and counts["sdpa:decode (q_len == 1)"] == 2 * 4, counts
    L = x.shape[1]
    for i, n in enumerate(lengths):
        with torch.no_grad():
            one = model.generate(x[i : i + 1, L - n :], **kw)
        assert torch.equal(batch[i, L:], one[0, n:]), (i, batch[i, L:], one[0, n:])


def test_padding_with_holes_is_not_padding():
    """A row whose valid tokens are not contiguous is a custom mask: SDPA serves it, exactly."""
    model = tiny_llama()
    x = ids(96, batch=2, seed=6)
    mask = torch.ones_like(x)
    mask[1, 40:45] = 0
    ref = logits(model, x, "sdpa", attention_mask=mask)
    sh.enable(model, sparse_schedule())
    out = logits(model, x, "stem", attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert sh.dispatch_counts() == {"sdpa:custom attention mask (not causal + padding)": 2}
    sh.reset_dispatch_counts()
    logits(model, x, "stem", attention_mask=torch.ones_like(x))  # an all-ones mask is no padding
    assert sh.dispatch_counts() == {"stem": 2}


def test_packed_sequences_fall_back():
    """position_ids that restart mark packed sequences: transformers builds a block mask -> SDPA."""
    model = tiny_llama()
    x = ids(64, seed=13)
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None]
    ref = logits(model, x, "sdpa", position_ids=pos, use_cache=False)  # transformers packs only without cache
    sh.enable(model, all_dense())
    out = logits(model, x, "stem", position_ids=pos, use_cache=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert sh.dispatch_counts() == {"sdpa:custom attention mask (not causal + padding)": 2}


def test_sliding_window_layer_falls_back():
    torch.manual_seed(2)
    model = MistralForCausalLM(MistralConfig(**_common(sliding_window=32))).eval()
    x = ids(80, seed=7)
    ref = logits(model, x, "sdpa")
    sh.enable(model, all_dense())
    out = logits(model, x, "stem")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert sh.dispatch_counts() == {"sdpa:sliding-window layer longer than its window": 2}


# ---- (e) the ways in ------------------------------------------------------------------------------
def test_set_attn_implementation_and_from_pretrained(tmp_path):
    model = tiny_llama()
    x = ids(64, seed=8)
    ref = logits(model, x, "sdpa")
    model.set_attn_implementation("stem")  # default schedule, nothing stored on the model
    assert sh.get_config(model) == sh.StemModelConfig()
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # 64 tokens: dense budget
    assert sh.dispatch_counts() == {"stem": 2}

    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="stem").eval()
    assert loaded.config._attn_implementation == "stem"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref, rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"stem": 4}


def test_enable_get_config_disable():
    model = tiny_llama()
    assert sh.get_config(model) is None
    cfg = sparse_schedule()
    assert sh.enable(model, cfg) is model
    assert sh.get_config(model) is cfg
    assert model.config._attn_implementation == "stem"
    assert all(m._stem_model_config is cfg for m in (layer.self_attn for layer in model.model.layers))
    assert cfg.layer_config(0).dense and cfg.layer_config(1).alpha == 0.5 and not cfg.layer_config(1).dense
    # a StemConfig alone becomes the base of the default schedule
    sh.enable(model, stem.StemConfig(block_size=32))
    assert sh.get_config(model).base.block_size == 32 and sh.get_config(model).dense_layers == (0, 1)
    sh.disable(model)
    assert model.config._attn_implementation == "sdpa" and sh.get_config(model) is None
    assert not hasattr(model.model.layers[0].self_attn, "_stem_model_config")
    # disabled schedule: every call goes to SDPA
    sh.enable(model, cfg.replace(enabled=False))
    logits(model, ids(32), "stem")
    assert sh.dispatch_counts() == {"sdpa:stem disabled for this model (StemModelConfig.enabled=False)": 2}


def test_bad_schedules_raise():
    model = tiny_llama()
    with pytest.raises(ValueError, match="names layer 5 but the model has 2 layers"):
        sh.enable(model, sh.StemModelConfig(dense_layers=(5,)))
    with pytest.raises(ValueError, match="dense_layers"):
        sh.StemModelConfig(dense_layers=(-1,))
    with pytest.raises(ValueError, match="alpha"):
        sh.StemModelConfig(dense_layers=(0,), alpha={1: 1.5})
    with pytest.raises(ValueError, match="both dense and given an alpha"):
        sh.StemModelConfig(alpha={1: 0.5})
    with pytest.raises(TypeError, match="StemModelConfig, a StemConfig or a dict"):
        sh.enable(model, 0.7)
    d = sparse_schedule().to_dict()
    assert sh.StemModelConfig.from_dict(json.loads(json.dumps(d))) == sparse_schedule()


def test_register_is_idempotent_and_import_is_lazy():
    sh.register()
    sh.register()
    assert AttentionInterface._global_mapping["stem"] is sh.stem_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionMaskInterface._global_mapping["stem"] is sh.stem_mask
    # registration happens on import (checked in-process above: this module only imported it);
    # `import stem` itself must not import transformers
    code = "import sys, stem; assert 'transformers' not in sys.modules, 'import stem pulled in transformers'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# ---- (f) chunked prefill ------------------------------------------------------------------------------
def test_chunked_prefill_dense_matches_full_sdpa():
    model = tiny_llama()
    x = ids(300, seed=9)
    full = logits(model, x, "sdpa")
    sh.enable(model, all_dense())
    with torch.no_grad():
        first = model(x[:, :200], use_cache=True)
        second = model(x[:, 200:], past_key_values=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(second, full[:, 200:], rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"stem": 2, "stem:chunked": 2}


def test_chunked_prefill_sparse_matches_hand_wired():
    model = tiny_llama()
    x = ids(BS * 64, seed=10)
    cut = BS * 50 + 3  # first chunk below the sparse threshold; the second completes 64 blocks

    def run(impl):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            first = model(x[:, :cut], use_cache=True)
            return model(x[:, cut:], past_key_values=first.past_key_values, use_cache=True).logits

    sh.enable(model, sparse_schedule())
    out = run("stem")
    assert sh.dispatch_counts() == {"stem": 2, "stem:chunked": 2}
    ref = run("stem_test_ref")
    plan = REF_PLANS[1]
    assert plan.q_len == x.shape[1] - cut and plan.kv_len == x.shape[1]
    assert not plan.dense and plan.density < 0.95, plan
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_static_cache_prefill_falls_back():
    from transformers import StaticCache

    model = tiny_llama()
    x = ids(40, seed=11)
    ref = logits(model, x, "sdpa")
    sh.enable(model, all_dense())
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        out = model(x, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"sdpa:static-cache prefill": 2}


# ---- the hub-kernel string path (transformers' loader, with the Hub and version gate stubbed) -----
def test_hub_string_path_routes_to_stem(monkeypatch):
    import types

    from transformers.integrations import hub_kernels

    fake = types.ModuleType("stem_attention_hub")
    fake.flash_attn_forward = sh.stem_attention_forward
    fake.supports_flash_attn = True
    asked = {}

    def fake_get_kernel(repo_id, revision=None, version=None, allow_all_kernels=False):
        asked.update(repo_id=repo_id, version=version, allow_all_kernels=allow_all_kernels)
        return fake

    monkeypatch.setattr(hub_kernels, "is_kernels_available", lambda *a, **k: True)
    monkeypatch.setattr(hub_kernels, "get_kernel", fake_get_kernel)
    model = tiny_llama()
    x = ids(48, seed=12)
    ref = logits(model, x, "sdpa")
    model.set_attn_implementation("stem-org/stem-attention", allow_all_kernels=True)
    assert asked == {"repo_id": "stem-org/stem-attention", "version": 1, "allow_all_kernels": True}
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"stem": 2}


# ---- fallback logging ------------------------------------------------------------------------------
def test_fallback_reason_logged_once_at_debug(caplog):
    model = tiny_llama()
    sh.enable(model, all_dense())
    sh._LOGGED.discard("sdpa:decode (q_len == 1)")
    with caplog.at_level("DEBUG", logger="stem.integrations.transformers"):
        with torch.no_grad():
            model.generate(ids(20), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "stem.integrations.transformers"]
    assert msgs.count("attention routed to sdpa:decode (q_len == 1)") == 1, msgs
    assert all(r.levelname == "DEBUG" for r in caplog.records if r.name == "stem.integrations.transformers")
