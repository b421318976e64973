"""Three SGD steps of a tiny MoKA LLaMA, in one process or sharded by FSDP2 (run under torchrun, gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py BASE OUT``: each rank trains on its
half of the batch with every decoder layer and the root wrapped by ``fully_shard``; rank 0 saves the adapter
(gathered) and what it saw of the sharding to OUT. ``train(BASE)`` in one process is the reference.
"""

from __future__ import annotations

import os
import sys

import torch
from helpers import randomize_adapters, tiny_llama

from moka import MoKAConfig, apply_moka, quantize_model

BATCH = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
STEPS = 3


def build(base: str):
    """``base``: "dense" (fp32 nn.Linear) or "nf4" (quantize_model with double quantization); "nf4-bf16" is
    "nf4" under FSDP2's bf16 MixedPrecisionPolicy (built the same)."""
    model = tiny_llama(hidden=128).train()
    if base.startswith("nf4"):
        quantize_model(model, shardable=True, progress=False)
    apply_moka(model, MoKAConfig(num_components=2))
    randomize_adapters(model, std=0.05)
    return model


def train(model, ids: torch.Tensor) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids).loss  # every sequence has the same number of labels: rank means average
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adapter_state(model) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}  # collective
    return {k: v.clone() for k, v in full.items() if "_factors." in k or k.endswith("gate_logits")}


def main(base: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(base)
    mixed = {}
    if base.endswith("bf16"):  # bf16 compute, fp32 gradient reduction: the usual GPU setting
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mixed["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, **mixed)
    fully_shard(model, **mixed)
    base_layer = model.model.layers[0].self_attn.q_proj.base_layer
    frozen = base_layer.packed if base.startswith("nf4") else base_layer.weight  # the NF4 bytes, or the dense W
    sharding = {
        "type": type(frozen).__name__,
        "dtype": str(frozen.dtype),
        "shard_0": [p.is_shard(0) for p in getattr(frozen, "placements", ())],
        "local_rows": frozen.to_local().shape[0] if hasattr(frozen, "to_local") else frozen.shape[0],
        "rows": frozen.shape[0],
    }
    per_rank = BATCH.shape[0] // world
    losses = train(model, BATCH[rank * per_rank : (rank + 1) * per_rank])
    state = adapter_state(model)
    if rank == 0:
        torch.save({"state": state, "sharding": sharding, "losses": losses}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Skip interpreter finalization: a gloo worker thread still joinable there aborts the process ("terminate
    # called without an active exception") in about 1 run in 10 on this 2-core machine, after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
