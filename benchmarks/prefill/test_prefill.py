"""The prefill (TTFT) benchmark end to end on a tiny CPU model."""

import json


def test_bench_prefill_tiny(tmp_path):
    from benchmarks.prefill import __main__ as bench_prefill

    res = bench_prefill.main(["--tiny", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "bench_prefill.json").read_text())
    assert (tmp_path / "bench_prefill.png").stat().st_size > 0
    assert data == res
    assert data["device"]["type"] == "cpu" and data["scaled"]["to_layers"] == data["model"]["num_hidden_layers_full"]
    rows = {r["length"]: r for r in data["results"]}
    assert set(rows) == set(data["lengths"])
    long = rows[max(rows)]
    for method in ("sdpa", "stem"):
        m = long[method]
        assert m["ttft_ms"] > 0 and 0 < m["attn_ms"] < m["ttft_ms"] and 0 < m["attn_share"] < 1
    assert long["stem"]["sparse_layer_density"] and max(long["stem"]["sparse_layer_density"]) < 1.0
    assert long["stem"]["routes"].get("stem", 0) > 0
