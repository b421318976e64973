"""NF4 in bitsandbytes' exact layout: bytes and values against bitsandbytes itself."""

from __future__ import annotations

import pytest
import torch

from moka_kernels import NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4
from moka_kernels import nf4 as nf4_module
from moka_kernels.nf4 import dynamic_code, unpack_nibbles

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(24, 64), (64, 64), (96, 128), (1024, 4096 // 8), (11008 // 16, 128), (48, 36)]
# element counts that 64 does not divide: a short last block (and, for 13 × 21, an odd count: a half byte)
SHORT_BLOCK_SHAPES = [(13, 21), (40, 20), (3, 100)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# bitsandbytes' device-independent reference kernel (the "default" registration), bypassing its CPU C code.
_REFERENCE_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _bnb_reference_quantize_blockwise(values: torch.Tensor, blocksize: int):
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        _REFERENCE_KEYS, values, dynamic_code(), blocksize
    )


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("shape", "blocksize"), [(s, bs) for s in SHAPES + SHORT_BLOCK_SHAPES for bs in (64, 128)], ids=str
)
def test_quantize_matches_bitsandbytes(shape, dtype, blocksize):
    w = (torch.randn(shape) * 0.02).to(dtype)
    for double_quant in (False, True):
        ours = quantize_nf4(w, blocksize, double_quant)
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(ours.packed, packed), "packed nibbles differ"
        assert ours.dtype == state.dtype and ours.shape == tuple(state.shape)
        if not double_quant:
            assert torch.equal(ours.absmax, state.absmax)
            continue
        # First-level scales, their mean and the nested fp32 scales are bit-exact with bitsandbytes.
        _, first_level = torch.ops.bitsandbytes.quantize_4bit.default(w, blocksize, "nf4", torch.uint8)
        assert torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        # The 8-bit codes of the scales equal bitsandbytes' reference kernel. Its CPU C kernel uses an
        # approximate binary search that picks a neighbouring code for ~1% of blocks; allow that.
        ref_codes, ref_nested = _bnb_reference_quantize_blockwise(first_level - state.offset, 256)
        assert torch.equal(ours.absmax, ref_codes)
        assert torch.equal(ours.nested_absmax, ref_nested)
        assert (ours.absmax.int() - state.absmax.int()).abs().max() <= 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + SHORT_BLOCK_SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["fp32-absmax", "double-quant"])
def test_dequantize_bit_exact_to_bitsandbytes(shape, dtype, double_quant):
    """Decode bitsandbytes' own quantized bytes, zero-copy, and compare bit for bit."""
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    q = NF4Tensor.from_bnb(packed, state)
    assert q.packed.data_ptr() == packed.data_ptr(), "from_bnb copied the packed bytes"
    ours = dequantize_nf4(q)
    if shape[1] % 64 == 0:
        assert torch.equal(ours, bnbF.dequantize_4bit(packed, state))
    # bitsandbytes' AVX512 CPU kernel indexes blocks per row (wrong when K % blocksize != 0), so the
    # layout's definition is its reference kernel, which CUDA follows: flat index // blocksize.
    scales = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    reference = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        _REFERENCE_KEYS, packed, scales, 64, "nf4", list(shape), dtype
    )
    assert torch.equal(ours, reference)


def test_round_trip_error_is_nf4_sized():
    w = torch.randn(1024, 1024)
    q = quantize_nf4(w)
    rel = ((dequantize_nf4(q, torch.float32) - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.15, rel  # NF4 on Gaussian weights: ~9% relative error
    assert q.nbytes() < w.numel() * 0.52  # 0.5 + 1/64 + 4/(64*256) bytes per weight


def test_nibble_order_high_first():
    # Codes 0..15 in a row: byte j must hold (2j << 4) | (2j + 1).
    w = torch.tensor(NF4_CODE, dtype=torch.float32).repeat(4).reshape(1, 64)
    q = quantize_nf4(w, blocksize=64, double_quant=False)
    assert q.packed.reshape(-1)[:8].tolist() == [(2 * j << 4) | (2 * j + 1) for j in range(8)]
    assert torch.equal(unpack_nibbles(q.packed, 64)[:16], torch.arange(16))


def test_linear4bit_from_bnb_zero_copy():
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4", compress_statistics=True).to("cpu")
    q = NF4Tensor.from_bnb(layer.weight)
    assert q.packed.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_bytes", [32, 96, 1 << 20], ids=["one-block", "3-blocks", "default"])
def test_chunked_decode_equals_bitsandbytes(monkeypatch, dtype, chunk_bytes):
    """dequantize_nf4 decodes in chunks of whole blocks; every chunking gives bitsandbytes' bytes exactly."""
    monkeypatch.setattr(nf4_module, "DECODE_CHUNK_BYTES", chunk_bytes)
    w = (torch.randn(40, 128) * 0.02).to(dtype)  # 80 blocks of 64: the 3-block chunks leave a short last one
    packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = dequantize_nf4(NF4Tensor.from_bnb(packed, state))
    assert ours.dtype == dtype
    assert torch.equal(ours, bnbF.dequantize_4bit(packed, state))
    # fp32 values, then one cast: the fp32 decode rounds to the same output.
    assert torch.equal(dequantize_nf4(NF4Tensor.from_bnb(packed, state), torch.float32).to(dtype), ours)


def test_decode_table_is_copied_to_a_device_once():
    """dequantize_nf4's byte-pair table is cached per device: a host-to-device copy from pageable memory on
    every decode would synchronize a GPU on every call (checked here with the meta device)."""
    from moka_kernels.nf4 import _byte_pair_table

    meta = torch.device("meta")
    assert _byte_pair_table(meta) is _byte_pair_table(meta) and _byte_pair_table(meta).device == meta


def test_a_cold_trace_leaves_no_fake_decode_table_for_eager_calls(monkeypatch):
    """Non-strict torch.export traces with FakeTensors: a decode table first built then must not be kept, or
    the next eager NF4 forward reads the stand-in (it decoded NaN when functools.cache kept it)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moka import NF4Linear
    from moka_kernels.nf4_linear import nf4_linear_reference

    torch.manual_seed(0)
    layer = NF4Linear(quantize_nf4(torch.randn(64, 64), 64, True))
    x = torch.randn(3, 64)
    reference = nf4_linear_reference(x, layer.nf4_weight)
    monkeypatch.setattr(nf4_module, "_TABLES", {})  # cold: every table is built during the trace
    with FakeTensorMode():
        assert type(nf4_module._byte_pair_table(torch.device("cpu"))) is not torch.Tensor
    assert nf4_module._TABLES == {}

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, inputs):
            return self.layer(inputs)

    torch.export.export(Holder(), (x,), strict=False)
    assert all(type(t) is torch.Tensor for t in nf4_module._TABLES.values())
    torch.testing.assert_close(layer(x), reference)


def test_decode_tables_ignore_a_default_device_context(monkeypatch):
    """Tables are built on the device their key names: a first decode inside ``with torch.device("meta")`` (or
    after set_default_device("cuda")) must not leave a meta/CUDA table under the CPU key."""
    w = torch.randn(8, 64)
    q = quantize_nf4(w, 64, True)
    expected = dequantize_nf4(q)
    monkeypatch.setattr(nf4_module, "_TABLES", {})
    with torch.device("meta"):
        assert nf4_module._byte_pair_table(torch.device("cpu")).device.type == "cpu"
        assert nf4_module.dynamic_code().device.type == "cpu"
    assert all(t.device.type == "cpu" for t in nf4_module._TABLES.values())
    assert torch.equal(dequantize_nf4(q), expected)


def test_values_exactly_between_two_codes_round_as_bitsandbytes_does():
    """Ties at the code midpoints go the way bitsandbytes sends them, byte for byte."""
    code = torch.tensor(NF4_CODE)
    midpoints = (code[:-1] + code[1:]) / 2
    w = torch.zeros(1, 64)
    w[0, 0] = 1.0  # the block's absmax: the midpoints stay exact after scaling
    w[0, 1:16], w[0, 16:31] = midpoints, -midpoints
    q = quantize_nf4(w, 64, False)
    packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.packed.reshape(-1), packed.reshape(-1).view(torch.uint8))
