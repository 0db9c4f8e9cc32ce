"""gradclip across ranks (issue 8): FSDP2, tensor parallel DTensors, pipeline process groups, DDP.

Every test spawns 1, 2 or 4 gloo ranks on the CPU (see tests/dist_workers.py, which holds the
worker bodies and the collective counter); the NCCL smoke test needs a GPU.
"""

from __future__ import annotations

import dist_workers as w
import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda n: f"{n}ranks")
def test_fsdp2_norm_and_clipped_grads_match_single_process(world_size):
    """Norm types 2, 1, inf; clipping and not; one all_reduce per call; equal to torch unsharded."""
    w.launch(w.fsdp2_worker, world_size)


def test_tensor_parallel_2d_mesh_replicated_params_and_two_meshes():
    """Shard/Replicate on a (dp, tp) mesh, submeshes and a second mesh: one collective per group."""
    w.launch(w.tp_layout_worker, 4)


def test_pipeline_process_group_pieces():
    """Disjoint pieces per rank: WORLD, two separate pipelines, and pipeline x FSDP."""
    w.launch(w.pipeline_worker, 4)


def test_ddp_issues_no_collective():
    w.launch(w.ddp_worker, 2)


@pytest.mark.parametrize("world_size", [2, 4], ids=lambda n: f"{n}ranks")
def test_nonfinite_on_one_rank_is_seen_on_every_rank(world_size):
    w.launch(w.nonfinite_worker, world_size)


def test_thousands_of_dtensor_params_one_collective_linear_time():
    w.launch(w.many_params_worker, 2)


def test_world_size_one_gloo():
    w.launch(w.world1_worker, 1, "cpu")


@pytest.mark.requires_cuda
def test_world_size_one_nccl_smoke():
    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    w.launch(w.world1_nccl_worker, 1)


def test_per_param_norms_of_full_params_in_the_same_collective():
    """Per-parameter norms of DTensor (sharded, replicated, empty, Partial) and process_group
    tensors on 2 ranks: full-parameter norms, identical on every rank, one collective per group."""
    w.launch(w.per_param_worker, 2)


def test_a_wrong_norm_is_caught():
    """The comparison helpers can fail: a norm off by 1e-4 relative is rejected."""
    with pytest.raises(AssertionError):
        w.check_norm(torch.tensor(1.0001), 1.0)


def test_single_device_calls_do_not_load_the_distributed_path():
    import subprocess
    import sys

    code = "import sys, torch, gradclip; p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3); "
    code += "gradclip.clip_grad_norm_([p], 1.0); gradclip.get_total_norm([p.grad]); "
    code += "print('gradclip.distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_process_group_rejects_nonpositive_norm_type():
    from gradclip import distributed

    with pytest.raises(ValueError, match="p > 0"):
        distributed.total_norm([torch.ones(2)], 0.0, "auto", None)
