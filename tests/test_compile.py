"""torch.compile: stem.attention / stem.varlen_attention / a transformers model with
attn_implementation="stem" trace with no graph break, and compiled results equal eager ones.

The eager path is the reference here (it is itself checked against float64 elsewhere); the fake
(meta) implementations of the stem:: ops are checked against the real output shapes directly.
"""

from __future__ import annotations

import pytest
import torch

import stem
from tests.reference import rand_qkv

CFG = stem.StemConfig(block_size=16, stride=4)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def breaks(fn, *args):
    ex = torch._dynamo.explain(fn)(*args)
    return ex.graph_break_count, [str(b.reason)[:200] for b in ex.break_reasons]


@pytest.mark.parametrize("Lq,Lk,config,lse", [
    (1000, 1000, CFG, False),  # sparse prefill
    (600, 1000, CFG, True),  # chunked prefill, with the log-sum-exp
    (300, 300, CFG, False),  # a dense budget (short): one op, the dense executor
    (1000, 1000, CFG.replace(dense=True), True),
])
def test_attention_compiles_without_breaks_and_matches_eager(gen, Lq, Lk, config, lse):
    q, k, v = rand_qkv(gen, 1, 4, 2, Lq, Lk, 16)

    def f(q, k, v):
        return stem.attention(q, k, v, config=config, return_lse=lse)

    n, why = breaks(f, q, k, v)
    assert n == 0, why
    got = torch.compile(f, fullgraph=True)(q, k, v)
    want = f(q, k, v)
    for a, b in zip(got if lse else (got,), want if lse else (want,)):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_varlen_compiles_without_breaks_and_matches_eager(gen):
    lens = [(1000, 1000), (40, 40), (300, 950)]
    q = torch.randn(sum(a for a, _ in lens), 4, 16, generator=gen)
    k = torch.randn(sum(b for _, b in lens), 2, 16, generator=gen)
    v = torch.randn(k.shape, generator=gen)
    cq = torch.tensor([0, 1000, 1040, 1340], dtype=torch.int32)
    ck = torch.tensor([0, 1000, 1040, 1990], dtype=torch.int32)

    def f(q, k, v, cq, ck):
        return stem.varlen_attention(q, k, v, cq, ck, 1000, 1000, config=CFG, return_lse=True)

    n, why = breaks(f, q, k, v, cq, ck)
    assert n == 0, why
    out, lse = torch.compile(f, fullgraph=True)(q, k, v, cq, ck)
    ref, ref_lse = f(q, k, v, cq, ck)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_fake_shapes_equal_real_shapes(gen):
    """The fake implementations promise the shapes the real ops return (W included)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from stem.ops import config_fields, config_json

    cases = [(1000, 1000, 0), (600, 1000, 400), (1, 1000, 999), (700, 3000, 2300), (300, 300, 0)]
    for alpha, ranking in ((1.0, "stem"), (0.5, "stem"), (0.7, "sampled_mass")):
        cfg = CFG.replace(alpha=alpha, ranking=ranking)
        for Lq, Lk, off in cases:
            q, k, v = rand_qkv(gen, 1, 2, 1, Lq, Lk, 8)
            real = torch.ops.stem.plan(q, k, v, config_json(config_fields(cfg)), off, "auto")
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = torch.ops.stem.plan(*(mode.from_tensor(t) for t in (q, k, v)), config_json(config_fields(cfg)),
                                           off, "auto")
            assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real], (Lq, Lk, off, alpha)


def test_plan_objects_are_refused_inside_compile(gen):
    q, k, v = rand_qkv(gen, 1, 2, 1, 1000, 1000, 8)
    plan = stem.plan(q, k, v, CFG)
    with pytest.raises(Exception, match="not supported inside torch.compile"):
        torch.compile(lambda q: stem.attention(q, k, v, plan=plan), fullgraph=True)(q)
    with pytest.raises(Exception, match="max_seqlen_q and max_seqlen_k"):
        cu = torch.tensor([0, 1000], dtype=torch.int32)
        torch.compile(lambda q: stem.varlen_attention(q, k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu),
                      fullgraph=True)(q[0].transpose(0, 1))


def test_transformers_prefill_compiles_without_breaks():
    transformers = pytest.importorskip("transformers")
    import stem.integrations.transformers as sh

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sh.enable(model, sh.StemModelConfig(base=CFG, dense_layers=(0,)))
    x = torch.randint(0, 128, (1, 1000), generator=torch.Generator().manual_seed(1))

    def prefill(x):
        return model(x, use_cache=True).logits  # with a cache: no packed-sequence detection

    sh.reset_dispatch_counts()
    with torch.no_grad():
        ex = torch._dynamo.explain(prefill)(x)
        assert ex.graph_break_count == 0, [str(b.reason)[:200] for b in ex.break_reasons]
        code = "".join(g.code for g in ex.graphs)
        assert code.count("torch.ops.stem.execute") == 2 and code.count("torch.ops.stem.plan") == 1, code[:2000]
        compiled = torch.compile(prefill, fullgraph=True)
        got = compiled(x)
        want = prefill(x)
        from torch._dynamo.utils import counters

        counters.clear()
        for _ in range(3):  # repeated calls reuse the graph: nothing in the traced path guards on state
            compiled(x)
        assert not counters["recompiles"], dict(counters["recompiles"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sh.dispatch_counts() == {"stem": 2}, sh.dispatch_counts()  # the eager call only
