"""The benchmarks' own code runs: bench.py --device cuda's sections in a CPU dry run (their figures need a GPU)."""


def test_gpu_bench_sections_dry_run_on_cpu(monkeypatch):
    """bench.py --device cuda's new sections run end to end (on CPU, a tiny shape): the real-shaped step plans,
    rolls out in the run's cache and takes the packed update; the report renders without a failed section."""
    import bench_common
    import bench_gpu

    monkeypatch.setattr(bench_gpu, "DEV", "cpu")
    monkeypatch.setattr(bench_common, "DEV", "cpu")
    shape = dict(hidden=16, layers=2, heads=2, kv_heads=1, head_dim=8, intermediate=32)
    g = bench_gpu.bench_gpu(shape, step_n=12, step_jobs=6, only=("decode_syncs", "noise", "real_step"), noise_v=4096)
    assert all("error" not in g[k] for k in ("decode_syncs", "noise", "real_step")), g
    m = g["real_step"]
    assert m["tokens"] > 0 and m["update_tokens"] >= 12 and m["finished"] and "choices:" in m["plan"]
    assert g["noise"]["B"] == 128 and g["noise"]["speedup"] > 0 and g["noise"]["engine_matches_reference"] == 1.0
    assert "one GRPO step's time split" in bench_gpu.gpu_report(g)
