"""benchmarks.retrieval: data generator, model save/load, uniform top-k baseline, the harness end to end, and
the command line (CPU)."""

import json
import os

import pytest
import torch

import stem
from benchmarks.retrieval import (
    DataConfig,
    ModelConfig,
    RetrievalLM,
    answer_positions,
    eval_examples,
    load_model,
    run_eval,
    save_model,
    train_batch,
    uniform_topk_mask,
)
from benchmarks.retrieval.data import BOS, END, NEEDLE, QUERY

TINY = ModelConfig(d_model=64, n_layers=3, mlp_hidden=96, head_dim=16)


@pytest.fixture
def one_thread():
    """Many tiny ops: one intra-op thread is faster than two on a busy 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
DCFG = DataConfig()


def _tiny_model(seed=0):
    m = RetrievalLM(TINY)
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m.eval()


def _find_needle_value(prompt, key):
    """Independent reading of the answer: scan the haystack for NEEDLE key and read on."""
    p = prompt.tolist()
    kl, vl = DCFG.key_len, DCFG.value_len
    hits = [i for i in range(len(p) - kl - 1) if p[i] == NEEDLE and p[i + 1 : i + 1 + kl] == key]
    assert len(hits) == 1, hits
    i = hits[0] + 1 + kl
    assert p[i + vl] == END
    return p[i : i + vl], hits[0]


def test_eval_examples_deterministic_and_well_formed():
    a_ids, a_ans = eval_examples(DCFG, 600, 0.3, 4, 3, seed=7)
    b_ids, b_ans = eval_examples(DCFG, 600, 0.3, 4, 3, seed=7)
    assert torch.equal(a_ids, b_ids) and torch.equal(a_ans, b_ans)
    c_ids, _ = eval_examples(DCFG, 600, 0.3, 4, 3, seed=8)
    assert not torch.equal(a_ids, c_ids)
    assert a_ids.shape == (3, 600) and a_ans.shape == (3, DCFG.value_len)
    for s in range(3):
        prompt = a_ids[s]
        assert prompt[0] == BOS and prompt[-DCFG.query_len] == QUERY
        key = prompt[-DCFG.query_len + 1 :].tolist()
        value, pos = _find_needle_value(prompt[: -DCFG.query_len], key)
        assert value == a_ans[s].tolist()
        span = 600 - DCFG.query_len - 1 - DCFG.needle_len
        assert pos == 1 + round(0.3 * span)
        assert int((prompt == NEEDLE).sum()) == 4
        # the last key token differs between the needles (the question has one answer)
        starts = (prompt == NEEDLE).nonzero().flatten()
        assert len(set(prompt[starts + DCFG.key_len].tolist())) == 4
        # distractor text: consecutive distractor tokens follow the fixed chain (local structure)
        d = prompt[(prompt >= DCFG.dist_lo) & (prompt < DCFG.dist_lo + DCFG.n_dist)]
        assert len(set(d.tolist())) > 20


def test_train_batch_deterministic_and_targets_only_on_answers():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ids1, t1 = train_batch(DCFG, 4, 300, 3, 2, g1)
    ids2, t2 = train_batch(DCFG, 4, 300, 3, 2, g2)
    assert torch.equal(ids1, ids2) and torch.equal(t1, t2)
    mask = t1 != -100
    assert int(mask[0].sum()) == 2 * DCFG.value_len
    # every target is a value token, is the next token, and answers the query before it
    pos = mask[0].nonzero().flatten()
    assert torch.equal(pos, answer_positions(DCFG, 300, 2))
    assert torch.equal(t1[:, pos], ids1[:, pos + 1])
    assert bool(((t1[:, pos] >= DCFG.val_lo) & (t1[:, pos] < DCFG.val_lo + DCFG.n_val)).all())
    for b in range(4):
        q0 = pos[0] - DCFG.key_len + 1  # the first answer is predicted at the last key token
        key = ids1[b, q0 : q0 + DCFG.key_len].tolist()
        assert ids1[b, q0 - 1] == QUERY
        value, _ = _find_needle_value(ids1[b, : 300 - 2 * (DCFG.query_len + DCFG.value_len + 1)], key)
        assert value == t1[b, pos[: DCFG.value_len]].tolist()


def test_save_load_round_trip_identical_logits(tmp_path):
    m = _tiny_model(1)
    save_model(m, str(tmp_path), extra={"data": DCFG.to_dict()})
    m2 = load_model(str(tmp_path))
    assert m2.cfg == m.cfg and m2.data_config == DCFG.to_dict()
    ids = torch.randint(0, TINY.vocab_size, (2, 97))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    with open(tmp_path / "config.json") as f:
        meta = json.load(f)
    meta["model"]["n_layers"] = 2
    with open(tmp_path / "config.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="does not match the config"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train one"):
        load_model(str(tmp_path / "nope"))


def test_prefill_then_extend_equals_full_forward():
    m = _tiny_model(2)
    ids = torch.randint(0, TINY.vocab_size, (2, 150))
    with torch.no_grad():
        full = m(ids)
        last, cache = m(ids[:, :146], return_kv=True, last_only=True)
        ext = m.extend(ids[:, 146:], cache)
    assert torch.allclose(last[:, 0], full[:, 145], atol=1e-5, rtol=1e-5)
    assert torch.allclose(ext, full[:, 146:], atol=1e-5, rtol=1e-5)


def test_uniform_topk_mask_equal_k_and_density(gen):
    B, H, nQ = 3, 2, 40
    logits = torch.randn(B, H, nQ, nQ, generator=gen)
    cfg = stem.StemConfig(block_size=16, stride=4)
    rows, cols = torch.arange(nQ)[:, None], torch.arange(nQ)[None, :]
    causal = cols <= rows
    logits = logits.masked_fill(~causal, float("-inf"))
    target = torch.tensor([0.35, 0.5, 0.8], dtype=torch.float64)
    mask = uniform_topk_mask(logits, target, cfg)
    forced = ((cols < cfg.sink_blocks) | (cols > rows - cfg.window_blocks)) & causal
    n_causal = int(causal.sum()) * H
    for b in range(B):
        # independently: some single k reproduces row b exactly with torch.topk
        found = None
        for k in range(0, nQ + 1):
            top = torch.zeros(H, nQ, nQ, dtype=torch.bool)
            top.scatter_(-1, torch.topk(logits[b], k, dim=-1).indices, True)
            if torch.equal(mask[b], (top | forced) & causal):
                found = k
                break
        assert found is not None
        dens = float(mask[b].sum()) / n_causal
        step = (nQ - found) / (n_causal / H)  # density change of one more k
        assert abs(dens - float(target[b])) <= step + 1e-9


def test_harness_end_to_end_tiny(tmp_path, one_thread):
    m = _tiny_model(3)
    methods = ("dense", "stem", "uniform_topk", "stem_novb", "stem_a0.5", "sampled_mass")
    res = run_eval(m, lengths=(1024,), depths=(0.5,), n_needles=(2,), methods=methods, samples=2,
                   block_size=16, dense_layers=(0,), progress=False, out_dir=str(tmp_path), tag="_t")
    assert os.path.getsize(tmp_path / "retrieval_eval_t.png") > 1000
    with open(tmp_path / "retrieval_eval_t.json") as f:
        saved = json.load(f)
    assert saved["summary"] == res["summary"]
    cells = {c["method"]: c for c in saved["cells"]}
    assert set(cells) == set(methods)
    assert cells["dense"]["density"] == 1.0 and cells["dense"]["density_per_layer"] == {}
    st, un, nv = cells["stem"], cells["uniform_topk"], cells["stem_novb"]
    assert set(st["density_per_layer"]) == {"1", "2"}  # layer 0 dense
    assert 0.5 < st["density"] < 0.95  # really sparse
    for layer, ds in st["density_per_layer"].items():
        for d_s, d_u in zip(ds, un["density_per_layer"][layer]):
            assert abs(d_s - d_u) < 0.03  # uniform top-k matched to Stem's measured density
        for d_s, d_n in zip(ds, nv["density_per_layer"][layer]):
            assert abs(d_s - d_n) < 0.03
    assert cells["stem_a0.5"]["density"] < st["density"]  # stronger decay, fewer blocks
    assert abs(cells["sampled_mass"]["density"] - st["density"]) < 0.03  # same budgets, another ranking
    # the dense method's verdict equals an independent teacher-forced dense forward
    ids, ans = eval_examples(DataConfig(), 1024, 0.5, 2, 2, seed=0)
    with torch.no_grad():
        logits = m(torch.cat((ids, ans), 1))
    pred = logits[:, 1023 : 1023 + ans.shape[1]].argmax(-1)
    assert cells["dense"]["correct"] == (pred == ans).all(-1).tolist()
    assert saved["stem_configs"]["1024"]["config"]["block_size"] == 16
    assert saved["dispatch"] and "reference" in saved["dispatch"][0]
    assert "stem/1024" in saved["summary"]


def test_harness_rejects_bad_methods():
    m = _tiny_model(4)
    with pytest.raises(ValueError, match="unknown method"):
        run_eval(m, lengths=(1024,), methods=("dense", "stem_a2"), progress=False)
    with pytest.raises(ValueError, match="list 'stem' before"):
        run_eval(m, lengths=(1024,), methods=("uniform_topk", "stem"), progress=False)


# ---- the command line: python -m benchmarks.retrieval ------------------------------------------
def test_cli_missing_weights_exits_nonzero_with_the_fix(tmp_path, capsys):
    from benchmarks.retrieval.__main__ import main

    assert main(["--weights", str(tmp_path / "nope"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no model directory" in err and "Fix:" in err and "python -m benchmarks.retrieval.train" in err


def test_cli_tiny_runs_the_committed_trained_model(tmp_path, one_thread):
    from benchmarks.retrieval.__main__ import default_weights_dir, main

    assert os.path.isfile(os.path.join(default_weights_dir(), "model.safetensors"))
    rc = main(["--tiny", "--lengths", "512", "--depths", "0.5", "--needles", "1", "--samples", "4",
               "--methods", "dense", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    with open(tmp_path / "retrieval_eval.json") as f:
        res = json.load(f)
    assert res["untrained"] is False and res["weights"] == "benchmarks/retrieval/weights"  # no machine path
    assert res["command"].startswith("python -m benchmarks.retrieval --tiny")
    # a trained model retrieves; a random one scores 0 (the failure this guards against)
    assert res["summary"]["dense/512"]["accuracy"] >= 0.75


def test_cli_untrained_smoke_run_says_so(tmp_path, capsys, one_thread):
    from benchmarks.retrieval.__main__ import main

    rc = main(["--untrained", "--depths", "0.5", "--needles", "1", "--methods", "dense,stem", "--device", "cpu",
               "--out", str(tmp_path), "--tag", "_smoke", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "UNTRAINED" in captured.err and "mean nothing" in captured.err
    assert "UNTRAINED MODEL" in captured.out  # the table says it too
    with open(tmp_path / "retrieval_eval_smoke.json") as f:
        res = json.load(f)
    assert res["untrained"] is True and res["weights"] is None


def test_fp8_method_names():
    """``<method>+fp8`` keeps the base method's plan and asks for FP8 execution."""
    from benchmarks.retrieval.harness import parse_method

    m = parse_method("sampled_mass+fp8")
    assert (m.kind, m.ranking, m.precision) == ("stem", "sampled_mass", "fp8")
    assert parse_method("stem_a1.0+fp8").alpha == 1.0 and parse_method("dense+fp8").kind == "dense"
    assert parse_method("stem").precision == "native"
    with pytest.raises(ValueError, match="uniform_topk"):
        parse_method("uniform_topk+fp8")
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("stem+fp16")


def test_sampled_rows_method_names():
    """``sampled_mass_r<n>`` plans with ``sampled_rows=n``; other counts are refused."""
    from benchmarks.retrieval.harness import parse_method

    m = parse_method("sampled_mass_r8")
    assert (m.kind, m.ranking, m.rows) == ("stem", "sampled_mass", 8)
    assert parse_method("sampled_mass").rows == 4 and parse_method("sampled_mass_r8+fp8").rows == 8
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("sampled_mass_r3")


def test_sampled_rows_reach_the_planner(tmp_path, one_thread, monkeypatch):
    """The harness plans ``sampled_mass_r8`` with ``sampled_rows=8`` (and ``sampled_mass`` with 4)."""
    seen = []
    real_plan = stem.plan

    def spy(q, k, v, config=None, *args, **kwargs):
        seen.append((config.ranking, config.sampled_rows))
        return real_plan(q, k, v, config, *args, **kwargs)

    monkeypatch.setattr(stem, "plan", spy)
    run_eval(_tiny_model(3), lengths=(1024,), depths=(0.5,), n_needles=(1,),
             methods=("sampled_mass", "sampled_mass_r8"), samples=1, block_size=16, dense_layers=(0,),
             progress=False, out_dir=str(tmp_path), tag="_r")
    assert set(seen) == {("sampled_mass", 4), ("sampled_mass", 8)}
