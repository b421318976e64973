"""MoKAConfig and the automatic choice of Kronecker factor shapes."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moka_kernels.dispatch import is_finite_real

__all__ = ["LLAMA_TARGET_MODULES", "ComponentShape", "MoKAConfig", "auto_component_shapes"]

# (a1, a2, b1, b2): A_i is a1×a2, B_i is b1×b2, a1·b1 = out_features, a2·b2 = in_features.
ComponentShape = tuple[int, int, int, int]

LLAMA_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("moka", "moka_s")
# The dtypes MoKA computes in (bases and factors); float8 counts as floating point in torch but is not one.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INITS = ("zero_b", "zero_a")


def _as_int(value: Any) -> Any:
    """A NumPy or other integral scalar as a Python int (JSON writes only those); anything else (bools
    included, which are not sizes) as it was, for the caller's check to refuse."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def require_bool(value: Any, name: str) -> None:
    """A flag must be True or False: a truthy string such as "False" would silently mean True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def auto_component_shapes(
    out_features: int, in_features: int, num_components: int, variant: str = "moka"
) -> list[ComponentShape]:
    """Pick up to ``num_components`` distinct factorizations of an (out × in) layer, most balanced first.

    * ``moka``: A is a1×a2, B is b1×b2. Balanced means equal parameters in both factors
      (a1·a2 ≈ b1·b2 ≈ √(out·in)), then near-square factors. These are the paper's shapes:
      five 4096-parameter factors per 4096² layer (64×64, 32×128, 128×32, ...).
    * ``moka_s``: A is the identity I_k (k divides both dims) and B is (out/k)×(in/k), so ΔW is
      block-diagonal. k is chosen near (out·in)^(1/4), making B about √(out·in) parameters.

    Trivial shapes where one factor is a single scalar are excluded. Returns fewer than
    ``num_components`` shapes only when the layer has fewer distinct ones (the caller warns).
    """
    for name, value in (
        ("out_features", out_features),
        ("in_features", in_features),
        ("num_components", num_components),
    ):
        value = _as_int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    n_out, k_in, num_components = _as_int(out_features), _as_int(in_features), _as_int(num_components)
    if variant == "moka_s":
        target = math.log(n_out * k_in) / 4
        ks = [k for k in _divisors(math.gcd(n_out, k_in)) if k > 1 and (n_out // k) * (k_in // k) > 1]
        ks.sort(key=lambda k: (round(abs(math.log(k) - target), 9), k))
        return [(k, k, n_out // k, k_in // k) for k in ks[:num_components]]
    candidates: list[tuple[tuple[float, float, int, int], ComponentShape]] = []
    for a1 in _divisors(n_out):
        for a2 in _divisors(k_in):
            b1, b2 = n_out // a1, k_in // a2
            if a1 * a2 == 1 or b1 * b2 == 1:
                continue
            balance = abs(math.log(a1 * a2) - math.log(b1 * b2))
            squareness = abs(math.log(a1 / a2)) + abs(math.log(b1 / b2))
            candidates.append(((round(balance, 9), round(squareness, 9), a1, a2), (a1, a2, b1, b2)))
    candidates.sort()
    return [shape for _, shape in candidates[:num_components]]


_DEFAULT_NUM_COMPONENTS = 5


@dataclass
class MoKAConfig:
    """How to attach MoKA adapters to linear layers.

    Args:
        num_components: r, the number of Kronecker components per layer (the paper uses 5).
        components: explicit (a1, a2, b1, b2) per component; overrides the automatic choice and sets
            ``num_components`` to its length (a ``num_components`` other than the default 5 must agree).
            Every patched layer must then have out = a1·b1 and in = a2·b2 for every component.
        scale: the fixed scale s on the adapter's output.
        dropout: dropout probability on the adapter's input (training only).
        gate: learn the softmax gate g; ``False`` is the ablation with fixed α_i = 1/r.
        variant: ``"moka"`` (both factors learned) or ``"moka_s"`` (A_i = I_k, block-diagonal ΔW).
        target_modules: module-name suffixes to adapt (e.g. ``"q_proj"``), or one regular expression
            string matched with ``re.fullmatch`` against the full module name.
        init: which factor starts at zero so that ΔW = 0 at step 0: ``"zero_b"`` (B_i = 0, A_i
            Kaiming-uniform) or ``"zero_a"``. ``moka_s`` always zeroes B (A is the identity).
        adapter_dtype: dtype of the adapter parameters; ``None`` means float32 (float64 for a
            float64 base), as PEFT does. On a bf16/fp16 model the fp32 factors are rounded to the
            compute dtype inside the op (on a GPU: one copy launch per layer call for all factors) and
            their gradients come back in fp32; ``adapter_dtype=torch.bfloat16`` keeps bf16 factors.
        on_too_few_shapes: ``"warn"`` (default): a layer with fewer distinct factorizations than
            ``num_components`` gets as many components as it has, with a warning; ``"error"`` raises.
    """

    num_components: int = _DEFAULT_NUM_COMPONENTS
    components: list[ComponentShape] | None = None
    scale: float = 1.0
    dropout: float = 0.0
    gate: bool = True
    variant: str = "moka"
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    init: str = "zero_b"
    adapter_dtype: torch.dtype | None = None
    on_too_few_shapes: str = "warn"

    def __post_init__(self) -> None:
        self.num_components = _as_int(self.num_components)  # NumPy ints too, stored as int (JSON)
        if isinstance(self.num_components, bool) or not isinstance(self.num_components, int) or self.num_components < 1:
            raise ValueError(f"num_components: expected an integer >= 1, got {self.num_components!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        if self.on_too_few_shapes not in ("warn", "error"):
            raise ValueError(f"on_too_few_shapes: expected 'warn' or 'error', got {self.on_too_few_shapes!r}")
        if not (is_finite_real(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not is_finite_real(self.scale):
            raise ValueError(f"scale: expected a finite real number, got {self.scale!r}")
        self.scale = float(self.scale)  # a NumPy scalar would not serialize to JSON
        if not isinstance(self.gate, bool):
            raise ValueError(f"gate: expected True or False, got {self.gate!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"adapter_dtype: expected one of torch.float16, torch.bfloat16, torch.float32, torch.float64 or None, "
                f"got {self.adapter_dtype!r}"
            )
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules: invalid regular expression {self.target_modules!r}: {err}") from err
        elif (
            not isinstance(self.target_modules, (list, tuple, set, frozenset))
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ValueError(
                f"target_modules: expected a non-empty list of names or a regex, got {self.target_modules!r}"
            )
        elif isinstance(self.target_modules, (set, frozenset)):
            self.target_modules = sorted(self.target_modules)  # a set would not serialize to JSON
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)  # as JSON gives it back: equal after a round trip
        if self.components is not None:
            if not isinstance(self.components, (list, tuple)) or any(
                not isinstance(c, (list, tuple)) for c in self.components
            ):
                raise ValueError(
                    "components: expected a list of (a1, a2, b1, b2) shapes, e.g. [(64, 64, 64, 64)], "
                    f"got {self.components!r}"
                )
            self.components = [self._check_component(i, c) for i, c in enumerate(self.components)]
            if not self.components:
                raise ValueError("components: expected at least one (a1, a2, b1, b2) shape (r >= 1), got []")
            # The default 5 yields to the shapes given; any other value must agree with them.
            if self.num_components not in (_DEFAULT_NUM_COMPONENTS, len(self.components)):
                raise ValueError(
                    f"num_components: {self.num_components} disagrees with the {len(self.components)} shapes of "
                    f"components; leave it out or set it to {len(self.components)}"
                )
            self.num_components = len(self.components)

    def _check_component(self, index: int, comp: Sequence[int]) -> ComponentShape:
        comp = tuple(_as_int(v) for v in comp)
        if len(comp) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in comp):
            raise ValueError(f"components[{index}]: expected four positive ints (a1, a2, b1, b2), got {comp!r}")
        a1, a2, b1, b2 = comp
        if self.variant == "moka_s" and a1 != a2:
            raise ValueError(f"components[{index}]: moka_s needs a square identity A (a1 == a2), got {comp!r}")
        return (a1, a2, b1, b2)

    def component_shapes(
        self, out_features: int, in_features: int, layer_name: str = "layer", warn: bool = True
    ) -> list[ComponentShape]:
        """The (a1, a2, b1, b2) of each component for a layer of shape (out_features, in_features).
        ``warn=False``: no too-few-shapes warning (a check of a layer that was warned about when built)."""
        if self.components is not None:
            for i, (a1, a2, b1, b2) in enumerate(self.components):
                if a1 * b1 != out_features or a2 * b2 != in_features:
                    raise ValueError(
                        f"components[{i}]: expected a1*b1 == out_features={out_features} and a2*b2 == "
                        f"in_features={in_features} for {layer_name}, got (a1, a2, b1, b2)={(a1, a2, b1, b2)}"
                    )
            return list(self.components)
        shapes = auto_component_shapes(out_features, in_features, self.num_components, self.variant)
        if not shapes:
            raise ValueError(
                f"{layer_name}: a {out_features}x{in_features} layer has no non-trivial Kronecker factorization "
                f"for variant {self.variant!r}"
            )
        if len(shapes) < self.num_components:
            message = (
                f"{layer_name}: a {out_features}x{in_features} layer has only {len(shapes)} distinct "
                f"factorizations for variant {self.variant!r}, fewer than num_components={self.num_components}"
            )
            if self.on_too_few_shapes == "error":
                raise ValueError(message)
            if warn:
                warnings.warn(message + f"; using {len(shapes)} components", stacklevel=3)
        return shapes

    def matches(self, module_name: str) -> bool:
        """Whether a module of this (dotted) name is a target."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def resolved_adapter_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        """The factors' dtype on a base of ``base_dtype``: ``adapter_dtype`` if set, else fp32 (fp64 on fp64)."""
        if self.adapter_dtype is not None:
            return self.adapter_dtype
        return torch.float64 if base_dtype == torch.float64 else torch.float32

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (dtype as a string)."""
        out = asdict(self)
        out["adapter_dtype"] = None if self.adapter_dtype is None else str(self.adapter_dtype).removeprefix("torch.")
        out["components"] = None if self.components is None else [list(c) for c in self.components]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoKAConfig:
        """The config ``to_dict`` wrote (as saved in moka_adapter_config.json); unknown keys are an error."""
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"config: unknown MoKAConfig fields {sorted(unknown)}")
        if data.get("adapter_dtype") is not None:
            name = data["adapter_dtype"]
            data["adapter_dtype"] = getattr(torch, name, None) if isinstance(name, str) else None
            if not isinstance(data["adapter_dtype"], torch.dtype):
                raise ValueError(f"adapter_dtype: expected a torch dtype name such as 'float32', got {name!r}")
        if data.get("components") is not None:
            try:
                data["components"] = [tuple(c) for c in data["components"]]
            except TypeError:
                raise ValueError(
                    f"components: expected a list of [a1, a2, b1, b2] lists, got {data['components']!r}"
                ) from None
        return cls(**data)
