"""NF4 weights in bitsandbytes' exact 4-bit layout, without needing bitsandbytes.

Layout (bitsandbytes 0.50.x, ``quant_type="nf4"``), for a weight W of shape (N, K):

* ``packed``: uint8 of shape ``((N*K + 1) // 2, 1)``, the row-major flattening of W,
  two 4-bit codes per byte: element ``2j`` in the HIGH nibble of byte ``j``, ``2j+1`` in the low.
* ``absmax``: one scale per ``blocksize`` consecutive flat elements (the last block may be short).
  Without double quantization it is fp32. With it (``compress_statistics=True``), it is uint8:
  the real scale is ``nested_code[absmax[b]] * nested_absmax[b // 256] + offset`` (fp32).
* value = ``NF4_CODE[nibble] * absmax[flat // blocksize]`` in fp32, then cast to the output dtype.

``quantize_nf4`` reproduces ``bitsandbytes.functional.quantize_4bit`` byte for byte and
``dequantize_nf4`` reproduces ``dequantize_4bit`` bit for bit (both are tested against bitsandbytes).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4_CODE",
    "VALID_BLOCKSIZES",
    "NF4Tensor",
    "dequantize_nf4",
    "dynamic_code",
    "quantize_nf4",
]

# bitsandbytes.functional.get_4bit_type("nf4"), as float32 (QLoRA's NormalFloat-4 quantiles).
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax vector in blocks of 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


_TABLES: dict[tuple, torch.Tensor] = {}


def cached_table(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``build()``, made once per ``key`` and kept, unless it made a traced stand-in instead of a tensor: under
    ``torch.export`` (non-strict) or a fake mode, factories return FakeTensors, which a later eager call must
    never read (functools.cache kept them: an eager NF4 forward after a cold export decoded NaN). Builders
    name their device (``device="cpu"``), so a default-device context cannot put a table under another key."""
    table = _TABLES.get(key)
    if table is None:
        table = build()
        if type(table) is torch.Tensor:
            _TABLES[key] = table
    return table


def _nf4_code_cpu() -> torch.Tensor:
    return cached_table(("nf4_code",), lambda: torch.tensor(NF4_CODE, dtype=torch.float32, device="cpu"))


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), used for nested absmax (made once)."""
    return cached_table(("dynamic_code",), _dynamic_code)


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, built as ``create_dynamic_map()`` builds it.

    Built exactly as bitsandbytes builds it: float32 linspaces, means computed in float32,
    then scaled in Python floats, sorted, and stored as float32.
    """
    data: list[float] = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32, device="cpu")
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device="cpu")


def _code_on(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    return code if code.device == device else code.to(device)


@dataclass(frozen=True)
class NF4Tensor:
    """A frozen weight of logical shape ``shape`` = (N, K) stored in bitsandbytes' NF4 layout.

    This is a plain container (not a ``torch.Tensor`` subclass); the kernels read its fields.

    Attributes:
        packed: uint8 ``((N*K + 1) // 2, 1)``; two codes per byte, even element in the high nibble.
        absmax: fp32 ``(n_blocks,)`` scales, or uint8 ``(n_blocks,)`` codes when double-quantized.
        shape: logical (N, K).
        dtype: dtype that ``dequantize_nf4`` returns by default (bitsandbytes' ``quant_state.dtype``).
        blocksize: elements per absmax block.
        nested_absmax: fp32 ``(ceil(n_blocks / 256),)`` second-level scales (double quant only).
        nested_code: fp32 ``(256,)`` the 8-bit dynamic map (double quant only).
        offset: fp32 0-d mean that was subtracted from absmax before nesting (double quant only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or not all(
            isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in self.shape
        ):
            raise ValueError(f"shape: expected the logical (N, K) as two integers, got {self.shape!r}")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype (dequantize's default), got {self.dtype!r}")
        n_rows, n_cols = self.shape
        if n_rows < 1 or n_cols < 1:
            raise ValueError(f"shape: expected two dimensions >= 1, got {tuple(self.shape)}")
        if not isinstance(self.blocksize, numbers.Integral) or isinstance(self.blocksize, bool):
            raise TypeError(f"blocksize: expected an integer, got {self.blocksize!r}")
        numel = n_rows * n_cols
        if self.blocksize <= 0 or self.blocksize % 2:
            raise ValueError(
                f"blocksize: expected a positive even element count per block for shape {tuple(self.shape)}, "
                f"got {self.blocksize}"
            )
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed: expected uint8 with {(numel + 1) // 2} bytes for shape {tuple(self.shape)}, "
                f"got {self.packed.dtype} with {self.packed.numel()} elements"
            )
        n_blocks = -(-numel // self.blocksize)  # the last block may be short, as bitsandbytes' is
        if self.absmax.numel() != n_blocks:
            raise ValueError(f"absmax: expected {n_blocks} block scales, got {self.absmax.numel()}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8 or self.nested_code is None or self.offset is None:
                raise ValueError("absmax: a double-quantized NF4Tensor needs uint8 absmax, nested_code and offset")
            # The decode indexes these by code and by block group; a wrong size would read past them.
            expected = {"nested_code": (256,), "nested_absmax": (-(-n_blocks // 256),), "offset": ()}
            for name, size in expected.items():
                got = getattr(self, name).shape
                if tuple(got) != size and not (name == "offset" and tuple(got) == (1,)):
                    raise ValueError(f"{name}: expected shape {size} for {n_blocks} blocks, got {tuple(got)}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax: expected float32 without double quantization, got {self.absmax.dtype}")
        for name in ("absmax", "nested_absmax", "nested_code", "offset"):
            field_tensor = getattr(self, name)
            if field_tensor is not None and field_tensor.device != self.packed.device:
                # the kernels read every field through a pointer on the packed bytes' device
                raise ValueError(f"{name}: expected device {self.packed.device} (packed's), got {field_tensor.device}")

    # -- properties --------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves 8-bit quantized (bitsandbytes' ``compress_statistics``)."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        """The device of the packed bytes (every field lives there)."""
        return self.packed.device

    @property
    def out_features(self) -> int:
        """N, the logical number of rows."""
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """K, the logical number of columns."""
        return self.shape[1]

    def numel(self) -> int:
        """N·K, the logical element count."""
        return self.shape[0] * self.shape[1]

    def nbytes(self) -> int:
        """Bytes of storage (packed codes plus all statistics)."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # -- conversions -------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> NF4Tensor:
        """Move every field to ``device`` (no copy when already there)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            offset=move(self.offset),
        )

    def block_scales(self) -> torch.Tensor:
        """The fp32 scale of every block, undoing double quantization exactly as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax
        assert self.nested_code is not None and self.nested_absmax is not None and self.offset is not None
        n_blocks = self.absmax.numel()
        scales = _code_on(self.nested_code, self.device)[self.absmax.reshape(-1).long()]
        nested = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n_blocks]
        return scales * nested + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequantize_nf4(self, dtype)``: the dense (N, K) weight."""
        return dequantize_nf4(self, dtype)

    def __repr__(self) -> str:
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state: Any | None = None) -> NF4Tensor:
        """View a bitsandbytes ``Params4bit`` (or packed tensor + ``QuantState``) as an NF4Tensor.

        The packed bytes are not copied: ``packed`` is a uint8 view of ``weight``'s storage.
        bitsandbytes is not imported; any object with QuantState's attributes works.

        Raises:
            ValueError: if the state is not NF4, or if bitsandbytes' CPU inference path has
                repacked the weight in place (``quant_state.packing_format_for_cpu``), which
                changes the byte order and rounds the scales to bf16.
        """
        quant_state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("quant_state: expected a bitsandbytes QuantState (the weight is not quantized yet)")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                "weight: expected bitsandbytes' standard 4-bit layout, but its CPU inference path has "
                "repacked it in place (quant_state.packing_format_for_cpu=True; this happens in eval/no-grad "
                "forwards on AVX512-BF16 CPUs, and a model from_pretrained returns is in eval mode), and these "
                "bytes cannot be read back: reload the model, then patch it before any such forward or set "
                "`support_avx512bf16_for_cpu = False` on its Linear4bit layers right after loading."
            )
        if quant_state.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type: expected 'nf4', got {quant_state.quant_type!r}")
        shape = tuple(int(s) for s in quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape: expected a 2-D (N, K) weight, got {shape}")
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        packed = packed.view(torch.uint8).reshape(-1, 1)
        if quant_state.nested:
            state2 = quant_state.state2
            if state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"quant_state.state2.blocksize: expected 256, got {state2.blocksize}")
            return cls(
                packed=packed,
                absmax=quant_state.absmax,
                shape=shape,
                dtype=quant_state.dtype,
                blocksize=int(quant_state.blocksize),
                nested_absmax=state2.absmax,
                nested_code=state2.code,
                offset=quant_state.offset,
            )
        return cls(
            packed=packed,
            absmax=quant_state.absmax,
            shape=shape,
            dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize),
        )


def _blockwise_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and values scaled into [-1, 1], as bitsandbytes' reference op computes them."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a 2-D weight to NF4 exactly as ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.

    Args:
        w: (N, K) fp32/fp16/bf16 weight.
        blocksize: elements per absmax block; one of 32, 64, ..., 4096 (the last block is short when it
            does not divide N*K, as bitsandbytes makes it).
        double_quant: also quantize the block scales to 8 bits (``compress_statistics=True``).

    Returns:
        The NF4Tensor, with ``dtype`` = ``w.dtype``.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w: expected a 2-D (N, K) tensor, got {getattr(w, 'shape', type(w))}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"w: expected float32, float16 or bfloat16, got {w.dtype}")
    if not isinstance(blocksize, numbers.Integral) or isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    blocksize = int(blocksize)  # a NumPy integer too
    numpy_bool = type(double_quant).__module__ == "numpy" and type(double_quant).__name__ in ("bool", "bool_")
    if not (isinstance(double_quant, bool) or numpy_bool):
        raise TypeError(f"double_quant: expected a bool, got {double_quant!r}")
    double_quant = bool(double_quant)
    if w.numel() == 0:
        raise ValueError(f"w: expected a non-empty weight, got shape {tuple(w.shape)}")
    if w.device.type != "meta" and not torch.isfinite(w).all():
        # NF4 has no inf/nan: a block's absmax would be inf (all its values NaN), and with double
        # quantization the mean of the scales too, every block of the weight (bitsandbytes does the same).
        bad = torch.nonzero(~torch.isfinite(w))[0].tolist()
        raise ValueError(f"w: expected finite values, got {w[tuple(bad)].item()} at {tuple(bad)}")
    flat = w.detach().reshape(-1).float()
    absmax, scaled = _blockwise_absmax_and_scaled(flat, blocksize)
    nibbles = _nearest_code(scaled, _code_on(_nf4_code_cpu(), w.device))
    if nibbles.numel() % 2:  # an odd element count: the last byte's low nibble codes 0.0, as in bitsandbytes
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=NF4_CODE.index(0.0))
    packed = ((nibbles[::2] << 4) | nibbles[1::2]).unsqueeze(1)
    if not double_quant:
        return NF4Tensor(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize)
    offset = absmax.mean()
    nested_code = _code_on(dynamic_code(), w.device)
    nested_absmax, nested_scaled = _blockwise_absmax_and_scaled(absmax - offset, NESTED_BLOCKSIZE)
    return NF4Tensor(
        packed=packed,
        absmax=_nearest_code(nested_scaled, nested_code),
        shape=tuple(w.shape),
        dtype=w.dtype,
        blocksize=blocksize,
        nested_absmax=nested_absmax,
        nested_code=nested_code.clone(),
        offset=offset,
    )


# Packed bytes decoded per step of dequantize_nf4 (4 MiB of int32 indices and 8 MiB of fp32 values).
DECODE_CHUNK_BYTES = 1 << 20


def _byte_pair_table_cpu() -> torch.Tensor:
    def build() -> torch.Tensor:
        byte = torch.arange(256, device="cpu")
        return torch.stack([_nf4_code_cpu()[byte >> 4], _nf4_code_cpu()[byte & 0xF]], dim=1)

    return cached_table(("byte_pairs", torch.device("cpu")), build)


def _byte_pair_table(device: torch.device) -> torch.Tensor:
    # Kept per device: a copy from pageable host memory on every decode would synchronize a GPU each call.
    return cached_table(("byte_pairs", device), lambda: _code_on(_byte_pair_table_cpu(), device))


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes of a packed buffer, in flat element order, as int64 (length ``numel``)."""
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1)
    return nibbles[:numel].long()


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode an NF4Tensor to a dense (N, K) tensor, bit-exact to ``bitsandbytes.functional.dequantize_4bit``.

    Values are ``NF4_CODE[nibble] * scale`` in fp32, then cast to ``dtype`` (default ``q.dtype``).
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"q: expected an NF4Tensor, got {type(q).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    # One gather per byte from a 256-entry table of (high, low) code-value pairs, each pair read as one
    # int64 (a 1-D gather of 8-byte words is ~2.5× faster on CPU than index_select of 2-float rows, and
    # far faster than unpacking nibbles to int64 indices). Decoded in chunks of whole blocks straight into
    # the output, so the int32 indices and the fp32 values never exist for the whole weight at once: the
    # peak is the output plus one chunk (a full-size fp32 + int32 pass held 2.5× the fp32 weight, or 3×
    # with a bf16 output).
    pair_words = _byte_pair_table(q.device).view(torch.int64).reshape(-1)
    flat = q.packed.reshape(-1)
    scales = q.block_scales().reshape(-1, 1)
    out = torch.empty(q.numel(), dtype=dtype or q.dtype, device=q.device)
    full_blocks = q.numel() // q.blocksize
    out_blocks = out[: full_blocks * q.blocksize].view(-1, q.blocksize)
    in_place = out.dtype == torch.float32  # decode straight into the output, else through an fp32 chunk
    blocks_per_chunk = max(1, DECODE_CHUNK_BYTES // (q.blocksize // 2))
    if full_blocks < scales.shape[0]:  # a short last block (its first element is even: a byte boundary)
        start = full_blocks * q.blocksize
        tail = pair_words.index_select(0, flat[start // 2 :].int()).view(torch.float32)[: q.numel() - start]
        out[start:] = tail * scales[full_blocks]
    for first in range(0, full_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, full_blocks)
        codes = flat[first * q.blocksize // 2 : last * q.blocksize // 2].int()
        if in_place:
            target = out_blocks[first:last]
            torch.index_select(pair_words, 0, codes, out=target.view(-1).view(torch.int64))
            target.mul_(scales[first:last])
        else:
            values = pair_words.index_select(0, codes).view(torch.float32).view(-1, q.blocksize)
            out_blocks[first:last] = values.mul_(scales[first:last])
            del values  # before the next chunk is allocated
        del codes
    return out.view(q.shape)
