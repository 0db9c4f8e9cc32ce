"""The Clipper on FSDP2 (DTensor) parameters: 2 gloo ranks on the CPU (launcher in dist_workers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradclip

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def clipper_fsdp2_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 11), nn.Tanh(), nn.Linear(11, 3))
    ref = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    clipper = gradclip.Clipper(model.named_parameters(), max_norm=0.05, per_param_norms=True, history=4)
    assert clipper.names == tuple(n for n, _ in ref.named_parameters())
    x = torch.randn(8, 13)
    for step in range(3):
        model.zero_grad()
        ref.zero_grad()
        (model(x) * (step + 1)).pow(2).sum().backward()
        (ref(x) * (step + 1)).pow(2).sum().backward()
        if step == 2:  # a None grad: zero norm, untouched, on every rank
            model[2].bias.grad = None
            ref[2].bias.grad = None
        exact = [
            0.0 if p.grad is None else torch.linalg.vector_norm(p.grad.double()).item()
            for p in ref.parameters()
        ]
        stats = clipper.clip_()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        torch.testing.assert_close(stats.total_norm, expected, rtol=2e-6, atol=0)
        assert not isinstance(stats.total_norm, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(
            stats.per_param_norms.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-5, atol=1e-12
        )
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)
    assert clipper.history.snapshot()["steps"] == 3


def test_clipper_on_fsdp2_parameters_matches_torch_unsharded():
    import dist_workers

    dist_workers.launch(clipper_fsdp2_worker, 2)
