"""Three SGD steps of a tiny MoKA LLaMA, in one process or sharded by FSDP2 (run under torchrun, gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py BASE OUT_DIR``: each rank trains on
its half of the batch with every decoder layer and the root wrapped by ``fully_shard``, then every rank calls
``save_adapter`` (OUT_DIR/adapter, written by rank 0) and ``load_adapter`` into a fresh sharded model (after an
evaluation forward, and followed by a backward), and tries ``apply_moka`` on a sharded model. Rank 0 records the
sharding, its losses, the reload check and that refusal in OUT_DIR/result.pt. ``train`` in one process is the
reference.
"""

from __future__ import annotations

import os
import sys

import torch
from helpers import randomize_adapters, tiny_llama, train_steps

from moka import MoKAConfig, adapter_state_dict, apply_moka, load_adapter, quantize_model, save_adapter
from moka.config import LLAMA_TARGET_MODULES

BATCH = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
STEPS = 3


def build(base: str):
    """``base``: "dense" (fp32 nn.Linear, MoKA on all seven projections) or "nf4" (quantize_model with double
    quantization, MoKA on the attention projections: the MLPs' NF4Linear layers train through unwrapped, their
    bytes resharded after the forward and gathered again for the backward); "nf4-bf16" is "nf4" under FSDP2's
    bf16 MixedPrecisionPolicy (built the same)."""
    model = tiny_llama(hidden=128).train()
    targets = list(LLAMA_TARGET_MODULES)
    if base.startswith("nf4"):
        quantize_model(model, shardable=True, progress=False)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the MLPs stay frozen NF4Linear layers
    apply_moka(model, MoKAConfig(num_components=2, target_modules=targets))
    randomize_adapters(model, std=0.05)
    return model


def train(model, ids: torch.Tensor) -> list[float]:
    # every sequence has the same number of labels, so the ranks' mean losses average to one process's
    return train_steps(model, ids, STEPS, lr=0.5, optimizer=torch.optim.SGD)


def shard(model, base: str, root_only: bool = False) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = {}
    if base.endswith("bf16"):  # bf16 compute, fp32 gradient reduction: the usual GPU setting
        mixed["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in [] if root_only else model.model.layers:
        fully_shard(layer, **mixed)
    fully_shard(model, **mixed)


def main(base: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(base)
    shard(model, base)
    base_layer = model.model.layers[0].self_attn.q_proj.base_layer
    frozen = base_layer.packed if base.startswith("nf4") else base_layer.weight  # the NF4 bytes, or the dense W
    sharding = {
        "type": type(frozen).__name__,
        "dtype": str(frozen.dtype),
        "shard_0": [p.is_shard(0) for p in getattr(frozen, "placements", ())],
        "local_rows": frozen.to_local().shape[0] if hasattr(frozen, "to_local") else frozen.shape[0],
        "rows": frozen.shape[0],
    }
    ids = BATCH[rank * (BATCH.shape[0] // world) : (rank + 1) * (BATCH.shape[0] // world)]
    losses = train(model, ids)
    save_adapter(model, f"{out_dir}/adapter")  # every rank; rank 0 writes, all return once it is written
    fresh = build(base)
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.zero_()  # so that only the load can make it equal
    shard(fresh, base)
    load_adapter(fresh, f"{out_dir}/adapter")
    trained, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    root_only = build(base)  # every adapter in the root's parameter group
    shard(root_only, base, root_only=True)
    with torch.no_grad():  # an evaluation forward leaves the root's parameters gathered, as plain tensors
        root_only(ids)
    load_adapter(root_only, f"{out_dir}/adapter")
    root_only(ids, labels=ids).loss.backward()  # FSDP reshards: a load into the gathered copies would be undone
    loaded_root_only = adapter_state_dict(root_only)
    unpatched = tiny_llama(hidden=128)
    shard(unpatched, base)
    try:  # patching after fully_shard would leave adapters FSDP never reduces
        apply_moka(unpatched, MoKAConfig(num_components=2))
        refused = None
    except ValueError as err:
        refused = str(err)
    with torch.no_grad():
        same_loss = model(ids, labels=ids).loss.item() == fresh(ids, labels=ids).loss.item()
    if rank == 0:
        reloaded = all(
            trained.keys() == other.keys() and all(torch.equal(trained[k], other[k]) for k in trained)
            for other in (loaded, loaded_root_only)
        )
        torch.save(
            {"sharding": sharding, "losses": losses, "reloaded": reloaded, "same_loss": same_loss, "refused": refused},
            f"{out_dir}/result.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Skip interpreter finalization: a gloo worker thread still joinable there aborts the process ("terminate
    # called without an active exception") in about 1 run in 10 on this 2-core machine, after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
