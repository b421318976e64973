"""The benchmark scripts keep working: a tiny CPU run (timings are not checked here; speed lives in benchmarks)."""

from __future__ import annotations

import json

from benchmarks import kernel_bench


def test_kernel_bench_smoke_writes_rows_with_conditions(tmp_path, monkeypatch):
    monkeypatch.delenv("MOKA_BACKEND", raising=False)
    out = tmp_path / "kb.json"
    assert kernel_bench.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "git_sha", "date"} <= set(data["conditions"])
    providers = {r["provider"] for r in data["rows"]}
    assert {"dense_linear", "moka_nf4", "moka_nf4_train", "lokr_materialized_dense_train"} <= providers
    assert all(r["ms"] > 0 for r in data["rows"])


def test_kernel_bench_without_gpu_fails_with_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert kernel_bench.main(["--out", "/nonexistent/x.json"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
