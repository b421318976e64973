"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it goes here,
before the packages are imported: on CPU machines the Triton kernels run in the interpreter."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Relative-RMS tolerances per dtype, against an fp64 materialized reference.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp64 (flash-linear-attention's error measure)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_rms(actual, expected)
    assert err <= tol, f"{what}: relative RMS error {err:.3g} > {tol:.3g}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
