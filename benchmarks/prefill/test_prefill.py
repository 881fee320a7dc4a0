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


def test_bench_prefill_tiny_padded_batch_and_compile(tmp_path):
    from benchmarks.prefill import __main__ as bench_prefill

    data = bench_prefill.main(["--tiny", "--out", str(tmp_path), "--no-progress", "--padded-batch", "960", "700",
                               "--compile"])
    (row,) = data["results"]
    assert row["batch_lengths"] == [960, 700] and row["length"] == 960
    assert row["stem"]["routes"] == {"stem:padded": 2}, row["stem"]["routes"]  # both layers, unpadded
    comp = row["compiled"]
    # a padded batch inside torch.compile runs (Stem leaves it to SDPA there: unpadding needs host lengths)
    assert all(comp[f"{m}_{mode}_ms"] > 0 for m in ("sdpa", "stem") for mode in ("eager", "compiled")), comp
