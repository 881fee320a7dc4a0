"""The varlen benchmark end to end on CPU (tiny shapes): JSON written, baselines present."""

import json


def test_bench_varlen_tiny(tmp_path):
    from benchmarks.varlen import __main__ as bench

    data = bench.main(["--tiny", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("bench_varlen_*.json")
    assert json.loads(path.read_text())["results"].keys() == data["results"].keys()
    r = data["results"]
    assert r["stem_varlen"]["ms"] > 0 and r["stem_plan"]["ms"] > 0 and r["dense_per_seq"]["ms"] > 0
    assert max(data["per_sequence_rel_error"]) < 1e-5  # each prompt's rows equal stem.attention alone
    assert data["total_tokens"] == sum(data["lengths"])
