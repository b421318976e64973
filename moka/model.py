"""Patching Hugging Face causal LMs: apply, remove and merge MoKA; save and load adapters.

Everything validates (apply_moka builds every layer) before it changes anything, so a failed call leaves
the model as it was, and never a partial file in an adapter directory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moka_kernels import NF4Tensor, quantize_nf4
from moka_kernels.nf4 import VALID_BLOCKSIZES

from .bnb_compat import forget_4bit_loading, is_linear4bit, keep_dense_when_reloaded, nf4_from_linear4bit
from .config import LLAMA_TARGET_MODULES, MoKAConfig, require_bool
from .layer import MoKALinear, NF4Linear, refuse_a_forward_that_would_be_skipped

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "MoKASummary",
    "adapter_files",
    "adapter_state_dict",
    "apply_moka",
    "disable_adapters",
    "load_adapter",
    "merge_moka",
    "moka_layers",
    "quantize_model",
    "remove_moka",
    "save_adapter",
]

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "moka_adapter.safetensors"
ADAPTER_CONFIG_NAME = "moka_adapter_config.json"
# The names adapters had before commit 7878e8d (2026-11-29), PEFT's own: transformers' and PEFT's loaders
# took a MoKA adapter dir for a PEFT one and failed on a KeyError. Still read; a save into such a dir
# replaces them.
LEGACY_ADAPTER_CONFIG_NAME = "adapter_config.json"
LEGACY_ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


@dataclass
class MoKASummary:
    """What apply_moka did."""

    layers_patched: int
    trainable_parameters: int
    total_parameters: int
    layer_names: list[str] = field(repr=False, default_factory=list)

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all the model's parameters."""
        return 100.0 * self.trainable_parameters / max(self.total_parameters, 1)

    def __str__(self) -> str:
        layers = f"{self.layers_patched} layer{'s' if self.layers_patched != 1 else ''}"
        return (
            f"MoKA: {layers} patched, {self.trainable_parameters:,} trainable / "
            f"{self.total_parameters:,} total parameters ({self.trainable_percent:.3f}%)"
        )


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def moka_layers(model: nn.Module) -> dict[str, MoKALinear]:
    """Every MoKALinear in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoKALinear)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the ``with`` block, every MoKA layer of ``model`` computes its frozen base alone (PEFT's
    ``model.disable_adapter()``): reference logits for DPO, an A/B check against the base. The base is computed
    as the enabled layer computes it (same casts, same decode), so disabled equals enabled at zero adapters;
    a bitsandbytes ``Linear4bit`` is decoded by moka, not by its own forward (whose CPU decode is wrong where
    the blocksize does not divide K).

    The adapters are untouched and come back on leaving the block, also when it raises. A gradient-checkpointed
    forward run inside the block must also be backpropagated inside it (its recomputation reads the switch).
    """
    layers = moka_layers(model)
    if not layers:
        raise ValueError("model: has no MoKA layers to disable")
    enabled = {name: layer.adapters_enabled for name, layer in layers.items()}
    for layer in layers.values():
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.adapters_enabled = enabled[name]


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); 4-bit weights count with their logical (unpacked) size, a shared (tied) one once."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):  # its bytes may be parameters (for FSDP): count W's logical size
            total += module.in_features * module.out_features  # and its bias (a buffer), as Linear4bit's counts
            total += 0 if module.bias is None else module.bias.numel()
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # e.g. an lm_head tied to the input embedding
                continue
            seen.add(id(p))
            n = p.numel()
            if name == "weight" and is_linear4bit(module):
                n = module.in_features * module.out_features
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def _summary(model: nn.Module) -> MoKASummary:
    layers = moka_layers(model)
    trainable, total = _count_parameters(model)
    return MoKASummary(len(layers), trainable, total, list(layers))


_BASE_LAYERS = (nn.Linear, NF4Linear)  # Linear4bit is an nn.Linear


def _linears_under_two_names(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[str, str] | None:
    """(two names of one target module) if two different parents hold it: swapping it in one would leave the
    other calling the bare layer. (One parent reachable under two names is fine: the swap reaches both.)"""
    holders: dict[int, set[tuple[int, str]]] = {}
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        for attr, child in module._modules.items():
            if child is not None:
                holders.setdefault(id(child), set()).add((id(module), attr))
    for module in targets.values():
        if len(holders.get(id(module), ())) > 1:
            return names[id(module)][0], names[id(module)][1]
    return None


def _holds_a_matrix(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def _regex_hint(target_modules: list[str] | str) -> str:
    if isinstance(target_modules, str):
        return (
            " (a string is one regular expression matched against the whole dotted name, e.g. "
            f"'model.layers.0.self_attn.q_proj'; names matched as suffixes are a list, [{target_modules!r}]; on "
            "the command line, drop --target-regex)"
        )
    return ""


def apply_moka(model: nn.Module, config: MoKAConfig | None = None) -> MoKASummary:
    """Replace the target linear layers of ``model`` in place with MoKALinear and freeze all but the adapters.

    Targets are ``nn.Linear`` (dense bases), bitsandbytes ``Linear4bit`` and moka's own :class:`NF4Linear`
    layers (what ``merge_moka(requantize=True)`` and :func:`quantize_model` leave) whose names match
    ``config.target_modules``. All shapes are checked before the first layer is replaced.

    Returns:
        A :class:`MoKASummary` (layers patched, trainable and total parameters).
    """
    config = config if config is not None else MoKAConfig()
    if not isinstance(config, MoKAConfig):
        raise TypeError(f"config: expected a MoKAConfig, got {type(config).__name__}")
    config = dataclasses.replace(copy.deepcopy(config))  # validated again; the caller's object stays theirs
    if moka_layers(model):
        raise ValueError("model: already has MoKA layers; call remove_moka(model) or merge_moka(model) first")
    _refuse_patching_inside_a_distributed_wrapper(model)
    # A matched layer of another kind with a weight matrix (a PEFT LoRA layer, GPT-2's Conv1D, an embedding)
    # is refused, not skipped; other matches (norms, activations, containers under a broad regex) are passed
    # over.
    unsupported = next(
        (
            (name, f"{type(m).__module__}.{type(m).__qualname__}")
            for name, m in model.named_modules()
            if name and not isinstance(m, _BASE_LAYERS) and config.matches(name) and _holds_a_matrix(m)
        ),
        None,
    )
    if unsupported:
        raise ValueError(
            f"target_modules: {unsupported[0]} is a {unsupported[1]}, not an nn.Linear, bitsandbytes Linear4bit or "
            "NF4Linear, the layers MoKA adapts: narrow target_modules (on a PEFT model, merge or unload its "
            "adapters first)"
        )
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, _BASE_LAYERS) and name and config.matches(name)
    }
    _refuse_targets_a_swap_would_miss(model, targets, "an adapter there would never run", "without the adapter")
    if not targets:
        linear_names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, _BASE_LAYERS)})
        raise ValueError(
            f"target_modules: {config.target_modules!r} matched no linear layer; this model's linear layers are "
            f"named {linear_names}{_regex_hint(config.target_modules)}"
        )
    # every name, a tied weight's second one too: a merge unties lm_head, whose own weight then needs its flag
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    try:  # build every layer before swapping any: a layer that cannot be wrapped leaves the model as it was
        layers = {name: MoKALinear(module, config, name=name) for name, module in targets.items()}
    except BaseException:
        _restore_requires_grad(model, flags)  # MoKALinear froze the bases it got to
        raise
    model._moka_requires_grad = flags
    for name, layer in layers.items():
        layer._moka_patched_as = name  # a plain string: pickles and deep-copies with the layer
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in moka_layers(model).values():
        layer.reset_requires_grad()
    base_weights = {name: getattr(layer.base_layer, "weight", None) for name, layer in layers.items()}
    for name, source in _tied_weight_sources(model, base_weights).items():
        # transformers' save_pretrained drops a tied weight only under a name the model declares tied
        # (lm_head.weight); declared here under its wrapped name, a patched model with a tied lm_head saves
        # (the Trainer's checkpoints) instead of raising on the shared tensor
        layers[name]._tied_weights_keys = {"base_layer.weight": source}
    model.moka_config = config
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output_layer, MoKALinear) and callable(getattr(model, "resize_token_embeddings", None)):
        # transformers would resize the input embeddings, then fail on (or tie into) the wrapped lm_head:
        # a model half resized. Refused before anything changes; remove_moka/merge_moka drop the guard.
        model.resize_token_embeddings = functools.partial(_refuse_resize, output_layer._moka_patched_as)
    return _summary(model)


def _refuse_resize(lm_head_name: str, *args, **kwargs) -> None:
    raise ValueError(
        f"resize_token_embeddings: {lm_head_name} carries a MoKA adapter sized for the current vocabulary; "
        "resize the vocabulary before apply_moka, or remove_moka (or merge_moka) first"
    )


def _refuse_targets_a_swap_would_miss(model: nn.Module, targets: dict[str, nn.Module], effect: str, left: str) -> None:
    """Replacing a target module in its parent must reach every use of it: an nn.MultiheadAttention reads its
    projection's weight directly, and a layer held by two parents would be replaced under one name only."""
    unused_forward = [n for n in targets if isinstance(_parent_and_attr(model, n)[0], nn.MultiheadAttention)]
    if unused_forward:
        raise ValueError(
            f"target_modules: {unused_forward[0]} is an nn.MultiheadAttention's projection, whose weight the "
            f"attention reads directly (never calling its forward), so {effect}; leave it out of target_modules"
        )
    shared = _linears_under_two_names(model, targets)
    if shared:
        raise ValueError(
            f"target_modules: one layer is reachable as {shared[0]!r} and {shared[1]!r}; replacing it under one "
            f"name would leave the other call site {left}; untie the modules or target neither"
        )


def _refuse_patching_inside_a_distributed_wrapper(model: nn.Module) -> None:
    """New factors under DDP or FSDP2 would be parameters their gradient reduction never sees (DDP's reducer and
    FSDP's shards are built at wrapping): each rank would train its own adapter."""
    _refuse_fsdp1(model, "apply_moka (or load_adapter)")
    inner = _inside_compile(model)  # torch.compile(DDP(model)): the check is for what compile wraps
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        raise ValueError(
            "model: is wrapped in DistributedDataParallel; call apply_moka (or load_adapter) on the model before "
            "wrapping it, so DDP reduces the adapters' gradients"
        )
    if _fsdp_modules(inner) or _is_sharded(dict(inner.named_parameters())):  # fully_shard on it or on a parent
        raise ValueError(
            "model: is already sharded by FSDP2 (fully_shard); call apply_moka (or load_adapter) before "
            "fully_shard, so the adapters are sharded and their gradients reduced with the rest"
        )


def _refuse_fsdp1(model: nn.Module, what: str) -> None:
    """FSDP1 (``FullyShardedDataParallel``) hands modules flat shards of their parameters under prefixed names:
    an adapter read, written or made through it would be this rank's flat shard (or be trained per rank)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    # a module FSDP1 wrapped at the root only (what accelerate's unwrap_model returns) keeps no wrapper inside,
    # but its parameters are FSDP1's flat-shard views, which it marks
    flattened = any(getattr(p, "_fsdp_flattened", False) for p in model.parameters())
    if flattened or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            f"model: is wrapped in FSDP1 (FullyShardedDataParallel), which {what} does not support (it holds "
            "parameters as flat shards); use FSDP2 (torch.distributed.fsdp.fully_shard) after apply_moka, or "
            "gather FSDP1's full state dict and read the adapter keys yourself"
        )


def _tied_weight_sources(model: nn.Module, weights: dict[str, torch.Tensor | None]) -> dict[str, str]:
    """For each layer (by name) whose weight is the same tensor as another parameter of the model (an
    lm_head tied to the input embedding), that parameter's name."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(p), []).append(name)
    sources = {}
    for name, weight in weights.items():
        others = [n for n in names_by_tensor.get(id(weight), []) if not n.startswith(f"{name}.")]
        if others:
            sources[name] = others[0]
    return sources


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    target_modules: Sequence[str] | str = LLAMA_TARGET_MODULES,
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    shardable: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> int:
    """Turn the target linear layers of ``model`` in place into moka's own NF4 layers (:class:`NF4Linear`),
    without bitsandbytes: QLoRA's frozen 4-bit base for :func:`apply_moka`.

    * A dense ``nn.Linear`` (fp32/fp16/bf16 W) is quantized: ``quantize_nf4(W, blocksize, double_quant)``,
      the bytes bitsandbytes' ``Linear4bit(quant_type="nf4", compress_statistics=double_quant)`` holds when
      quantized on a GPU (its CPU kernel picks a neighbouring 8-bit scale code for 0.1–0.25% of blocks).
      The layer computes in x's dtype; W's dtype is its ``nf4_dtype`` (what it decodes to, and a merge's dtype;
      adapters default to fp32, fp64 on an fp64 base).
    * A bitsandbytes NF4 ``Linear4bit`` (e.g. loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) becomes
      an NF4Linear over the same bytes, not copied and not requantized (``blocksize``/``double_quant`` are
      its own), computing in its ``compute_dtype`` as before.

    Biases are kept. Layers are converted one at a time and each dense weight is freed once its layer is
    replaced (unless something else holds it), so the peak memory is the model plus one weight's work space.
    With ``device`` (e.g. a GPU), each weight is moved there alone, quantized there, and its NF4 layer stays
    there: a model loaded on the CPU reaches the GPU in 4-bit, one dense weight at a time (move the rest of
    the model after).

    Args:
        model: any module; e.g. a Hugging Face causal LM.
        target_modules: module-name suffixes, or one regular expression (as ``MoKAConfig.target_modules``).
        blocksize: elements per absmax block for dense layers; one of 32, 64, ..., 4096 (a layer whose size
            it does not divide gets a short last block, as bitsandbytes gives it).
        double_quant: also quantize the block scales of dense layers to 8 bits.
        device: where to quantize and keep the NF4 layers; None: each layer's own device.
        shardable: for FSDP2 (``fully_shard``): the NF4 bytes become frozen integer parameters, which it
            shards and gathers bit for bit. (A ``Linear4bit`` loses its ``quant_state`` when FSDP2 shards it.)
            Leave it False for FSDP1, which needs one dtype per flattened unit, and for anything else.
        progress: show a progress bar over the layers (from 8 target layers; fewer take no time).

    Returns:
        The number of layers converted. Every target is checked before the first one is replaced; an error
        while converting (out of memory) leaves the layers converted so far, each one whole.
    """
    matches = MoKAConfig(target_modules=target_modules).matches  # validates target_modules
    for flag, name in ((double_quant, "double_quant"), (shardable, "shardable"), (progress, "progress")):
        require_bool(flag, name)
    if moka_layers(model):
        raise ValueError("model: has MoKA layers; quantize the base before apply_moka (or merge/remove first)")
    if isinstance(blocksize, bool) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    targets = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name and matches(name)}
    if not targets:
        kinds = sorted({type(m).__name__ for name, m in model.named_modules() if name and matches(name)})
        found = f" (it matched only {', '.join(kinds)} modules)" if kinds else _regex_hint(target_modules)
        raise ValueError(f"target_modules: {target_modules!r} matched no nn.Linear layer of the model{found}")
    _refuse_targets_a_swap_would_miss(model, targets, "its 4-bit form would never be used", "dense")
    for name, source in _tied_weight_sources(model, {n: m.weight for n, m in targets.items()}).items():
        raise ValueError(
            f"target_modules: {name}.weight is also {source} (tied weights): a 4-bit copy would untie them and "
            f"keep the dense one for {source.rpartition('.')[0]}; leave {name} out of target_modules"
        )
    views: dict[str, NF4Tensor] = {}
    for name, m in targets.items():
        refuse_a_forward_that_would_be_skipped(m, f" (at {name})", "model")  # NF4Linear would skip it as MoKA does
        if is_linear4bit(m):
            try:
                views[name] = nf4_from_linear4bit(m)
            except ValueError as err:
                raise ValueError(f"model: {name} cannot become an NF4Linear: {err}") from None
        elif m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"model: {name}.weight is {m.weight.dtype}; expected float32, float16 or bfloat16")
        elif m.weight.numel() == 0:
            raise ValueError(f"model: {name} has an empty weight; it cannot be quantized")
        elif not m.weight.is_meta and not bool(torch.isfinite(m.weight).all()):
            raise ValueError(f"model: {name}.weight has non-finite values (NaN or inf); they cannot be quantized")
    from tqdm.auto import tqdm

    count = len(targets)
    for name in tqdm(list(targets), desc="NF4", unit="layer", disable=not progress or count < 8):
        m = targets.pop(name)  # no reference left here once the layer is replaced: its dense weight is freed
        if name in views:
            weight, compute_dtype = views.pop(name), m.compute_dtype
        else:
            dense = m.weight.detach() if device is None else m.weight.detach().to(device)
            weight, compute_dtype = quantize_nf4(dense, blocksize, double_quant), None
            del dense
        bias = None if m.bias is None else m.bias.detach()
        layer = NF4Linear(weight, bias, compute_dtype=compute_dtype, shardable=shardable).train(m.training)
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer if device is None else layer.to(device))
        del m, weight, bias, layer
    return count


def remove_moka(model: nn.Module) -> nn.Module:
    """Put the original base layers back (adapters discarded) and restore requires_grad flags."""
    layers = moka_layers(model)
    if not layers:
        raise ValueError("model: has no MoKA layers to remove")
    _refuse_a_part_of_the_patched_model(model, layers, "remove_moka")
    for name, layer in layers.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer.base_layer)
    _forget_moka(model)
    return model


def _refuse_a_part_of_the_patched_model(model: nn.Module, layers: dict[str, MoKALinear], what: str) -> None:
    """apply_moka keeps the requires_grad flags it found on the module it was called on: called on a part
    of that module, remove_moka/merge_moka would leave the part frozen, and a later apply_moka on the whole
    would take the frozen flags as the original ones."""
    if any(hasattr(m, "_moka_requires_grad") for m in model.modules()):
        return
    name, layer = next(((n, m) for n, m in layers.items() if getattr(m, "_moka_patched_as", None)), (None, None))
    if layer is not None:
        raise ValueError(
            f"model: is a part of the module apply_moka patched (its layer {name!r} was patched as "
            f"{layer._moka_patched_as!r}), which holds the requires_grad flags to restore; call {what} on that module"
        )


def _restore_requires_grad(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in flags and p.is_floating_point():  # a 4-bit weight is uint8 and never requires grad
            p.requires_grad_(flags[n])


def _forget_moka(model: nn.Module) -> None:
    """Restore the requires_grad flags apply_moka found and drop its attributes, on ``model`` or on the
    submodule apply_moka was called on (``apply_moka(model.model)`` then ``remove_moka(model)``)."""
    for module in model.modules():
        if hasattr(module, "_moka_requires_grad"):
            _restore_requires_grad(module, module._moka_requires_grad)
        for attr in ("_moka_requires_grad", "moka_config"):
            if attr in module.__dict__:
                delattr(module, attr)
        guard = module.__dict__.get("resize_token_embeddings")
        if isinstance(guard, functools.partial) and guard.func is _refuse_resize:
            del module.resize_token_embeddings


@torch.no_grad()
def merge_moka(model: nn.Module, requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each MoKALinear in place by a plain layer holding W0 + ΔW (see MoKALinear.merge).

    The requires_grad flags apply_moka found are restored (as remove_moka does), so the merged model is a
    plain model again. ``dtype`` is the merged layers' weight dtype only: the rest of the model (embeddings,
    norms, unpatched layers) keeps its own, so to run the merged model in another dtype cast it too
    (``model.to(dtype)``, as the ``moka-merge`` CLI does).

    On a model transformers loaded in 4-bit, ``save_pretrained`` afterwards writes what ``from_pretrained``
    reloads as it is: with no 4-bit layer left the quantization config is dropped (a plain model); with some
    left, the layers merged dense are added to its skipped modules."""
    layers = moka_layers(model)
    if not layers:
        raise ValueError("model: has no MoKA layers to merge")
    require_bool(requantize, "requantize")
    _refuse_a_part_of_the_patched_model(model, layers, "merge_moka")
    merged = {name: layer.merge(requantize=requantize, dtype=dtype) for name, layer in layers.items()}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    untied = [
        name
        for name, layer in layers.items()
        if embeddings is not None and getattr(layer.base_layer, "weight", None) is embeddings.weight
    ]
    config = getattr(model, "config", None)
    if untied and config is not None and hasattr(config, "tie_word_embeddings"):
        # the merged layer holds W0 + ΔW, no longer the embedding: a later tie_weights() (a resize, a reload
        # honouring the flag) would silently tie it back and drop ΔW
        config.tie_word_embeddings = False
        logger.info("merge_moka: %s no longer tied to the input embeddings; tie_word_embeddings=False", untied[0])
    tied_keys = getattr(model, "all_tied_weights_keys", None)  # transformers' cached mapping, used on reloads
    if isinstance(tied_keys, dict):
        for name in untied:
            tied_keys.pop(f"{name}.weight", None)
    for name, new in merged.items():
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, new)
    if not any(is_linear4bit(m) or isinstance(m, NF4Linear) for m in model.modules()):
        forget_4bit_loading(model)  # a 4-bit-loaded model merged dense: saved and reloaded as the plain model it is
    else:  # some stay 4-bit: a reload must still build the merged ones dense
        keep_dense_when_reloaded(model, [name for name, new in merged.items() if not is_linear4bit(new)])
    _forget_moka(model)
    return model


def _adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters themselves, by their adapter names (DTensors under FSDP2)."""
    params: dict[str, torch.Tensor] = {}
    for name, layer in moka_layers(model).items():
        for i, a in enumerate(layer.a_factors):
            params[f"{name}.a_factors.{i}"] = a
        for i, b in enumerate(layer.b_factors):
            params[f"{name}.b_factors.{i}"] = b
        if layer.gate_logits is not None:
            params[f"{name}.gate_logits"] = layer.gate_logits
    return params


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor  # public from torch 2.5
    except ImportError:
        return None
    return DTensor


def _is_sharded(params: dict[str, torch.Tensor]) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in params.values())


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    try:
        from torch.distributed.fsdp import FSDPModule  # public from torch 2.6
    except ImportError:
        try:  # torch 2.4 / 2.5
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _resharded(model: nn.Module) -> bool:
    """Whether FSDP2 wraps any part of ``model``, after resharding every wrapped module (local, no collective).

    A ``no_grad`` forward leaves the root's parameter group gathered, as plain tensors FSDP drops at its next
    reshard: a load into those would be undone, and a save would not see that the adapters are sharded."""
    modules = _fsdp_modules(model)
    for module in modules:
        module.reshard()
    return bool(modules)


def _inside_compile(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wraps (``model`` itself if it is not a compiled wrapper)."""
    while type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and DDP/DataParallel's wrappers (adapter names never carry their
    ``_orig_mod.`` / ``module.`` prefixes, so a file saved through a wrapper loads without one, and back)."""
    while True:
        model = _inside_compile(model)
        if not isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            return model
        model = model.module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors by name: ``{layer}.a_factors.{i}``, ``{layer}.b_factors.{i}``, ``{layer}.gate_logits``.

    Adapters sharded by FSDP2 (DTensors) are gathered whole: a collective, so every rank must call it. Names
    are the unwrapped model's (no ``torch.compile`` or DDP prefix)."""
    model = _unwrapped(model)
    _refuse_fsdp1(model, "adapter_state_dict (and save_adapter)")
    _resharded(model)
    params = _adapter_parameters(model)
    if not _is_sharded(params):
        return {k: p.detach() for k, p in params.items()}
    dtensor = _dtensor_type()
    return {k: (p.full_tensor() if isinstance(p, dtensor) else p).detach() for k, p in params.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapters as safetensors plus a JSON config (never pickles).

    Both files are written into a temp dir first: a new directory appears whole (one rename); into an
    existing one each file is renamed over its old version, so a failed call never leaves a partial file.

    Under FSDP2 (adapters sharded as DTensors) every rank must call it: the shards are gathered on every
    rank, rank 0 alone writes, and every rank returns once the files are in place (or raises if rank 0
    could not write them).
    """
    model = _unwrapped(model)
    _refuse_fsdp1(model, "save_adapter")
    layers = moka_layers(model)
    if not layers:
        raise ValueError("model: has no MoKA layers to save")
    config = _saved_config(model, layers)
    for name, layer in layers.items():  # the file holds one config, which load_adapter applies to every layer
        differ = _settings_differ(config, layer, f"{next(iter(layers))}, the first layer")
        if differ:
            raise ValueError(
                f"model: layer {name} has {differ}, but save_adapter writes one config for every layer and "
                "load_adapter would apply it to all; give every layer the same scale, gate and variant"
            )
        rebuilt = _shapes_from(config, layer, name)
        if rebuilt != [tuple(shape) for shape in layer.component_shapes]:
            raise ValueError(
                f"model: layer {name} has components {layer.component_shapes}, but the config save_adapter would "
                f"write (model.moka_config, changed after patching?) gives it {rebuilt}: load_adapter could not "
                "rebuild it; restore the config the model was patched with"
            )
    state = adapter_state_dict(model)  # under FSDP2 a collective: every rank gathers before any writes
    directory = Path(directory)
    if not (_fsdp_modules(model) or _is_sharded(_adapter_parameters(model))):  # (resharded by adapter_state_dict)
        return _write_adapter(model, layers, state, directory)
    import torch.distributed as dist

    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            _write_adapter(model, layers, state, directory)
        except BaseException as err:  # reported to every rank before anyone raises
            error = err
    failed = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failed, src=0)
    if error is not None:
        raise error
    if failed[0] is not None:
        raise RuntimeError(f"save_adapter: rank 0 could not write {str(directory)!r}: {failed[0]}")
    return directory


def _saved_config(model: nn.Module, layers: dict[str, MoKALinear]) -> MoKAConfig:
    """The config an adapter file records: the model's, with the scale its layers run with (the first
    layer's: a scale set on every layer after patching is saved; save_adapter refuses layers that differ),
    and, where its ``target_modules`` would not patch exactly these layers in a model like this one (apply_moka
    called on a submodule with a regex of names relative to it, layers wrapped by hand), their names."""
    first = next(iter(layers.values()))
    config = getattr(model, "moka_config", None) or first.config
    if float(config.scale) != first.scale:
        config = dataclasses.replace(config, scale=first.scale)
    if _reload_targets(model, config, layers) != set(layers):
        config = dataclasses.replace(config, target_modules=sorted(layers))
    return config


def _reload_targets(model: nn.Module, config: MoKAConfig, layers: dict[str, MoKALinear]) -> set[str]:
    """The layers apply_moka(config) would patch in this model unpatched: the MoKA layers it matches and the
    matched base layers outside them (a MoKA layer's own base layer sits one level below its name)."""
    inside = tuple(name + "." for name in layers)
    matched = {name for name in layers if config.matches(name)}
    return matched | {
        name
        for name, module in model.named_modules()
        if name and isinstance(module, _BASE_LAYERS) and not name.startswith(inside) and config.matches(name)
    }


def _shapes_from(config: MoKAConfig, layer: MoKALinear, name: str) -> list[tuple[int, ...]] | None:
    """The component shapes ``config`` gives ``layer`` (as load_adapter would build it); None if it gives none."""
    try:
        return [tuple(s) for s in config.component_shapes(layer.out_features, layer.in_features, name, warn=False)]
    except ValueError:
        return None


def _settings_differ(config: MoKAConfig, layer: MoKALinear, config_is: str) -> str:
    """The settings that change a patched layer's function without changing a shape, where ``layer``'s differ
    from ``config``'s: "scale=4.0 (<config_is>: 1.0)"; empty if none do."""
    want = {"scale": float(config.scale), "gate": config.gate, "variant": config.variant}
    have = {"scale": layer.scale, "gate": layer.gate_logits is not None, "variant": layer.variant}
    return ", ".join(f"{k}={have[k]!r} ({config_is}: {want[k]!r})" for k in want if have[k] != want[k])


def _recorded_base(model: nn.Module) -> object:
    """The base an adapter file names: the model config's ``_name_or_path``, made absolute when it is a model
    directory relative to the current one (so that ``moka-merge`` finds it from any directory); a hub id, an
    absolute path or a model built in code ("") as it is."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name and not Path(name).is_absolute() and (Path(name) / "config.json").is_file():
        return str(Path(name).absolute())
    return name


def _write_adapter(
    model: nn.Module, layers: dict[str, MoKALinear], state: dict[str, torch.Tensor], directory: Path
) -> Path:
    from safetensors.torch import save_file

    config = _saved_config(model, layers)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tensors = {k: v.contiguous().cpu() for k, v in state.items()}
        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "moka", "version": str(FORMAT_VERSION)})
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "layers": {
                name: {"in_features": m.in_features, "out_features": m.out_features, "components": m.component_shapes}
                for name, m in layers.items()
            },
            "base_model": _recorded_base(model),
        }
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        share_like_a_new_dir(tmp)
        if directory.exists():
            for item in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                (tmp / item).replace(directory / item)
            if _is_legacy_moka_adapter(directory):  # not left beside the new files, to be read as an adapter
                for item in (LEGACY_ADAPTER_WEIGHTS_NAME, LEGACY_ADAPTER_CONFIG_NAME):
                    (directory / item).unlink()
            shutil.rmtree(tmp)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it to read it, which
    would briefly apply to files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def share_like_a_new_dir(directory: Path) -> None:
    """Modes of a directory and the files in it as a plain ``mkdir``/``open`` would have made them (umask
    applied): ``mkdtemp`` makes the directory 0700, and safetensors writes its files 0600."""
    umask = _umask()
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~umask)


def _is_legacy_moka_adapter(directory: Path) -> bool:
    """Whether ``directory`` holds an adapter save_adapter wrote under the old (PEFT's) names: its JSON has
    MoKA's ``config`` and ``layers`` objects and no ``peft_type`` (a PEFT adapter there is left alone)."""
    if not (directory / LEGACY_ADAPTER_WEIGHTS_NAME).is_file():
        return False
    try:
        meta = json.loads((directory / LEGACY_ADAPTER_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "peft_type" not in meta and {"config", "layers"} <= meta.keys()


def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """The (config JSON, weights) files of the MoKA adapter in ``directory``: ``moka_adapter_config.json``
    and ``moka_adapter.safetensors``, or an older adapter's ``adapter_config.json`` and
    ``adapter_model.safetensors``.

    Raises:
        FileNotFoundError: ``directory`` holds neither.
    """
    directory = Path(directory)
    current = (directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME)
    if all(p.is_file() for p in current):
        return current
    if _is_legacy_moka_adapter(directory):
        return directory / LEGACY_ADAPTER_CONFIG_NAME, directory / LEGACY_ADAPTER_WEIGHTS_NAME
    peft = " (it holds a PEFT adapter, not a MoKA one)" if (directory / LEGACY_ADAPTER_CONFIG_NAME).is_file() else ""
    raise FileNotFoundError(
        f"directory: expected a MoKA adapter dir with {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}, "
        f"got {str(directory)!r}{peft}"
    )


def _layer_of(key: str) -> str:
    """The layer an adapter tensor belongs to: ``{layer}.a_factors.{i}``, ``{layer}.b_factors.{i}`` or
    ``{layer}.gate_logits``."""
    for marker in (".a_factors.", ".b_factors."):
        if marker in key:
            return key.rsplit(marker, 1)[0]
    return key.removesuffix(".gate_logits")


def _shared_layers(tensors: dict, expected: dict, directory) -> tuple[dict, dict]:
    """The file's tensors and the model's expected shapes restricted to the layers both have (strict=False)."""
    in_file, in_model = {_layer_of(k) for k in tensors}, {_layer_of(k) for k in expected}
    shared = in_file & in_model
    if not shared:
        raise ValueError(
            f"directory: adapter {str(directory)!r} shares no layer with this model (file: "
            f"{sorted(in_file)[:3]}, model: {sorted(in_model)[:3]})"
        )
    if shared != in_file or shared != in_model:
        logger.info(
            "load_adapter: %d layers loaded; %d MoKA layers of the model not in the file keep their values; "
            "%d layers of the file not in the model skipped",
            len(shared),
            len(in_model - shared),
            len(in_file - shared),
        )
    return (
        {k: v for k, v in tensors.items() if _layer_of(k) in shared},
        {k: v for k, v in expected.items() if _layer_of(k) in shared},
    )


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The JSON that :func:`save_adapter` wrote beside the weights (the ``MoKAConfig`` under ``"config"``,
    each layer's shape and components under ``"layers"``)."""
    path, _ = adapter_files(directory)
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'config' object (as save_adapter writes it)")
    return meta


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> MoKASummary:
    """Load adapters saved by :func:`save_adapter` into ``model``, patching it first if it is not yet.

    Names and shapes (and, for an already patched model, the scale, gate and variant) are validated
    against the model before anything is copied; on any mismatch a ValueError names the first problems
    and the model is left as it was. Into adapters sharded by FSDP2 (patch before ``fully_shard``), every
    rank loads the file and keeps its own shards.

    Args:
        strict: every MoKA layer of the model must be in the file and every layer of the file in the model.
            ``False`` loads the layers both have (an adapter of some layers into a model patched more
            broadly: the others keep their values) and logs what it skipped; each loaded layer must still
            match whole, and a file that shares no layer with the model is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require_bool(strict, "strict")  # "False" would otherwise mean strict
    if not moka_layers(model):  # patched below: refused inside DDP/FSDP2 (checked before unwrapping DDP)
        _refuse_patching_inside_a_distributed_wrapper(model)
    _refuse_fsdp1(model, "load_adapter")
    model = _unwrapped(model)
    meta = read_adapter_config(directory)
    config_path, weights_path = adapter_files(directory)
    try:
        saved = MoKAConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"directory: {str(config_path)!r} holds an invalid MoKA config ({err})") from err
    try:
        tensors = load_file(weights_path)
    except SafetensorError as err:  # a damaged or truncated file (a missing or unreadable one raises OSError)
        raise ValueError(
            f"directory: {str(weights_path)!r} is not a readable safetensors file ({type(err).__name__}: {err})"
        ) from err
    patched_here = not moka_layers(model)
    if patched_here:  # the file's values replace the initialization: not drawn from the caller's generators
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            apply_moka(model, saved)
    else:  # names and shapes are checked below; these change the function without changing a shape
        in_file = {_layer_of(key) for key in tensors}
        for name, layer in moka_layers(model).items():
            if not strict and name not in in_file:
                continue
            differ = _settings_differ(saved, layer, "adapter")
            if differ:
                raise ValueError(
                    f"directory: adapter {str(directory)!r} does not match the model at {name}, which has "
                    f"{differ}; call remove_moka(model) first and load_adapter patches the model with the "
                    "adapter's config"
                )
    try:
        _resharded(model)  # a load into gathered copies would be undone at FSDP's next reshard
        params = _adapter_parameters(model)
        on_meta = [k for k, p in params.items() if p.is_meta]
        if on_meta:  # copy_ into a meta tensor does nothing: the load would "succeed" and load nothing
            raise ValueError(
                f"model: its adapter parameters are on the meta device ({on_meta[0]}, ...); materialize them "
                "first (model.to_empty(device=...), after fully_shard under FSDP2), then load_adapter"
            )
        expected = {k: p.shape for k, p in params.items()}  # a DTensor's shape is the whole tensor's
        if not strict:
            tensors, expected = _shared_layers(tensors, expected, directory)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mismatched = [
            f"{k}: adapter {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
            for k in sorted(set(expected) & set(tensors))
            if tuple(tensors[k].shape) != tuple(expected[k])
        ]
        if missing or unexpected or mismatched:
            problems = [f"missing {missing[:3]}"] if missing else []
            problems += [f"unexpected {unexpected[:3]}"] if unexpected else []
            problems += mismatched[:3]
            raise ValueError(
                f"directory: adapter {str(directory)!r} does not fit this model (saved from a model of another "
                f"shape or with another config): " + "; ".join(problems)
            )
        dtensor = _dtensor_type() if _is_sharded(params) else None
        for key, p in params.items():
            if key not in expected:  # a layer strict=False skips
                continue
            value = tensors[key].to(device=p.device, dtype=p.dtype)
            if dtensor is not None and isinstance(p, dtensor):  # this rank's shards of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                try:  # every rank read the same file: no communication needed (torch >= 2.7)
                    value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                except TypeError:  # older torch: rank 0's copy is scattered, the same values
                    value = distribute_tensor(value, p.device_mesh, p.placements)
            p.copy_(value)
    except BaseException:
        if patched_here:
            remove_moka(model)
        raise
    return _summary(model)
