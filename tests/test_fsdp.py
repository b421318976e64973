"""FSDP2 (``fully_shard``, gloo on CPU, 2 processes) trains MoKA on a dense or an NF4 base as one process does,
with the NF4 base's bytes sharded across the ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import BATCH, build, train
from safetensors.torch import load_file

from moka import adapter_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("base", ["dense", "nf4", "nf4-bf16"])
def test_fsdp2_two_ranks_match_one_process(base, tmp_path):
    initial = adapter_state_dict(build(base))
    model = build(base)
    losses = train(model, BATCH)
    expected = adapter_state_dict(model)
    env = dict(
        os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )
    out = tmp_path / "fsdp"
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # torchrun picks a free port
    done = subprocess.run(
        [sys.executable, *argv, str(ROOT / "tests" / "fsdp_worker.py"), base, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(out / "result.pt")
    saved = load_file(out / "adapter" / "moka_adapter.safetensors")  # save_adapter gathered the shards
    # load_adapter into a fresh sharded model (adapters zeroed) gives the trained adapters and the same loss
    assert result["reloaded"] and result["same_loss"]
    assert result["refused"].startswith("model: is already sharded by FSDP2 (fully_shard)")
    sharding = result["sharding"]
    # the frozen base is sharded too: half the rows of W (dense) or of the packed NF4 bytes on each rank
    assert sharding["type"] == "DTensor" and sharding["shard_0"] == [True]
    rows, dtype = (128 * 128 // 2, "torch.uint8") if base.startswith("nf4") else (128, "torch.float32")
    assert sharding["local_rows"] * 2 == sharding["rows"] == rows and sharding["dtype"] == dtype
    assert result["losses"][0] != pytest.approx(losses[0], abs=1e-7)  # rank 0 saw half the batch
    adapted_layers = 2 * (4 if base.startswith("nf4") else 7)  # 2 decoder layers; nf4: attention only
    assert expected.keys() == saved.keys() and len(expected) == adapted_layers * 5
    assert all(not torch.equal(expected[k], initial[k]) for k in expected), "every adapter tensor should train"
    if base.endswith("bf16"):  # bf16 compute (the NF4 bytes never cast): the updates within bf16 error
        steps = {k: (saved[k] - initial[k], expected[k] - initial[k]) for k in expected}
        assert all(saved[k].dtype == torch.float32 for k in expected)  # fp32 master adapters
        for key, (step, reference) in steps.items():
            # the gate logits' gradients are small differences between components: bf16 can't hold them
            if "_factors." in key:
                assert (step - reference).norm() < 0.05 * reference.norm(), key
        step, reference = (torch.cat([t.flatten() for t in ts]) for ts in zip(*steps.values(), strict=True))
        assert (step - reference).norm() < 0.03 * reference.norm()
    else:
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-7, msg=key)
