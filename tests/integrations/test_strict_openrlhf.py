"""Planted mistakes in the OpenRLHF integration's code paths under the strict device proxy (main suite: no OpenRLHF,
no DeepSpeed). Each case fails the way a GPU run fails; the correctly placed variant passes. The DeepSpeed actors
themselves are covered by the opt-in ``tests/integrations/openrlhf/test_strict_deepspeed.py``."""

import socket
from types import SimpleNamespace

import pytest
import torch

from openrlhf_search.integrations import strict_devices as sd
from openrlhf_search.integrations.openrlhf import patches
from openrlhf_search.integrations.openrlhf.cpu_shim import GlooBroadcastGroup
from openrlhf_search.integrations.openrlhf.patches import OpenRLHFPolicyLoss

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the strict proxy is for CPU-only machines")


def _batch(device):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g)
    new = (old + 0.05 * torch.randn(3, 5, generator=g)).requires_grad_(True)
    adv = torch.randn(3, 1, generator=g).expand(3, 5).contiguous()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return [t.to(device) if t is not new else new.detach().to(device).requires_grad_(True) for t in
            (new, old, adv, mask)]  # fmt: skip


@pytest.mark.parametrize("loss_name", ["grpo", "sapo"])
def test_strict_loss_adapter_host_advantages_raise(loss_name):
    """OpenRLHF moves every micro-batch to the GPU (``experience.to_device``): advantages our code left on the host
    meet CUDA log-probs inside our loss -- a GPU run fails there, and so does the proxy."""
    with sd.strict_devices():
        dev = torch.cuda.current_device()
        new, old, adv, mask = _batch(dev)
        loss = OpenRLHFPolicyLoss(loss_name)
        n = mask.sum().float()
        loss.begin_step([SimpleNamespace(action_mask=mask, advantages=adv)])
        out = loss(new, old, adv, action_mask=mask, dp_size=1, batch_num_tokens=n, global_batch_size=3.0)
        assert sd.logical_device(out[0]) == dev and sd.logical_device(out[2]) == dev
        out[0].backward()
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            loss(new, old, adv.cpu(), action_mask=mask, dp_size=1, batch_num_tokens=n, global_batch_size=3.0)


@pytest.fixture
def gloo_world():
    """A one-rank ``torch.distributed`` world (its default group is NCCL-like under the proxy, as on GPUs)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_strict_sapo_step_count_is_all_reduced_on_the_gpu(gloo_world, monkeypatch):
    """The loss's per-step counts (``begin_step``; SAPO has two) are all-reduced over OpenRLHF's DP group, NCCL on
    GPUs: they must live on the training device. The old ``torch.cuda.is_available()`` branch (False on a CPU
    machine) counted on the host, which the proxy now refuses as NCCL would; the training device passes."""
    with sd.strict_devices():
        _, _, adv, mask = _batch(torch.cuda.current_device())
        loss = OpenRLHFPolicyLoss("sapo")
        loss.begin_step([SimpleNamespace(action_mask=mask, advantages=adv)], gas=1, dp_group=gloo_world)
        assert set(loss.step_counts) == {"normalizer", "sapo_normalizer"}
        assert all(sd.logical_device(c) == 0 for c in loss.step_counts.values())
        monkeypatch.setattr(patches, "_train_device", lambda: "cpu")  # the planted mistake (the old branch)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            loss.begin_step([SimpleNamespace(action_mask=mask, advantages=adv)], gas=1, dp_group=gloo_world)


def test_strict_weight_sync_broadcast_refuses_a_host_tensor():
    """The trainer's weight broadcast goes through vLLM's PyNccl communicator on GPUs: a host tensor is refused
    before the (gloo) group is touched; a logical-CUDA parameter goes through."""
    sent = []
    group = GlooBroadcastGroup(SimpleNamespace(broadcast=lambda ts, opts: sent.append(ts) or SimpleNamespace(
        wait=lambda: None)))  # fmt: skip
    with sd.strict_devices():
        with pytest.raises(RuntimeError, match="nccl communicator .* is on cpu"):
            group.broadcast(torch.ones(4), src=0)
        group.broadcast(torch.nn.Linear(2, 2).cuda().weight.data, src=0)
    assert len(sent) == 1


def test_strict_current_device_is_the_visible_index(monkeypatch):
    """Under Ray (``CUDA_VISIBLE_DEVICES=3``, ``LOCAL_RANK=0``) ``cuda:0`` *is* the current device, as on a GPU
    (DeepSpeed names it ``device_name(local_rank)``); NCCL's physical location stays GPU 3."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with sd.strict_devices():
        torch.cuda.set_device(0)
        assert torch.cuda.current_device() == 0 and sd.fake_gpu_index() == 3
        x = torch.ones(2).to(torch.cuda.current_device()) + torch.ones(2, device="cuda:0")
        assert x.device == torch.device("cuda", 0)
        with pytest.raises(RuntimeError, match="cuda:1 and cuda:0"):
            x + torch.ones(2, device="cuda:1")


def test_strict_backward_hooks_run_under_the_proxy():
    """DeepSpeed's ZeRO gradient hooks and custom autograd functions run inside backward, where autograd drops the
    torch-function mode: :func:`track_backward` re-enters it there, so a hook that allocates on the GPU gets CUDA
    placements (not a real CUDA call) and a hook that mixes the gradient with a host tensor raises."""
    seen = {}

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen["buffer"] = torch.zeros(g.shape, device=torch.cuda.current_device())
            return g * 2

    with sd.strict_devices() as mode:
        sd.track_backward(mode)
        try:
            lin = torch.nn.Linear(3, 1).cuda()
            lin.weight.register_post_accumulate_grad_hook(lambda p: seen.update(grad=p.grad + 0))
            Scale.apply(lin(torch.ones(2, 3).cuda())).sum().backward()
            assert sd.logical_device(seen["buffer"]) == 0 and sd.logical_device(seen["grad"]) == 0
            lin.bias.register_post_accumulate_grad_hook(lambda p: seen.update(bad=p.grad + torch.ones(1)))  # host
            with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
                lin(torch.ones(2, 3).cuda()).sum().backward()
        finally:
            sd.track_backward(None)
