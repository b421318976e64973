"""pytest-benchmark view of the layer benchmarks: ``pytest benchmarks/ --benchmark-only``.

Same providers as ``python -m benchmarks.run``, timed differently: wall clock per call (host time included,
synchronized on CUDA), no L2 flush, and fwd / fwd+bwd only (no backward-alone mode); the published numbers are
``benchmarks.run``'s. ``MOKA_BENCH_SMOKE=1`` shrinks the shapes (CI runs this
file with ``--benchmark-disable``, once per case, to keep it working).
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.providers import build_case

SMOKE = os.environ.get("MOKA_BENCH_SMOKE") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
LAYERS = [(48, 64)] if SMOKE else ([(4096, 4096), (14336, 4096)] if DEVICE.type == "cuda" else [(2048, 2048)])
TOKENS = [16] if SMOKE else [16, 512]
PROVIDERS = [
    ("dense_linear", "dense"),
    ("ours_nf4", "nf4"),
    ("moka_torch", "dense"),
    ("moka_torch", "nf4"),
    ("lokr_materialized", "dense"),
    ("lora_r16", "dense"),
] + ([("moka_triton", "nf4")] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("n_out", "k_in"), LAYERS, ids=str)
@pytest.mark.parametrize(("provider", "base"), PROVIDERS, ids=[f"{p}[{b}]" for p, b in PROVIDERS])
def test_layer(benchmark, provider, base, n_out, k_in, tokens, mode, monkeypatch):
    case = build_case(provider, n_out, k_in, DEVICE, DTYPE, r=4, base=base)
    if case.backend:
        monkeypatch.setenv("MOKA_BACKEND", case.backend)
    x = torch.randn(tokens, k_in, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(tokens, n_out, device=DEVICE, dtype=DTYPE)
    benchmark.extra_info.update(provider=provider, base=base, trainable=case.trainable, device=str(DEVICE))
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    xg = x.requires_grad_(mode != "fwd")
    grads = [p for p in [xg, *case.params] if p.requires_grad]

    def call():
        # Each round ends when the GPU has finished (pytest-benchmark itself never synchronizes), with the
        # gradients cleared so they are written, not accumulated (as benchmarks.run does).
        if mode == "fwd":
            with torch.no_grad():
                out = case.forward(x)
        else:
            for p in grads:
                p.grad = None
            out = case.forward(xg)
            out.backward(dy)
        sync()
        return out

    out = benchmark.pedantic(call, rounds=5 if SMOKE else 20, warmup_rounds=1)
    assert out.shape == (tokens, n_out)
