"""The strict device proxy (``integrations/strict_devices.py``) catches placement mistakes a GPU would reject.

Each test plants one mistake and checks the proxy raises torch's GPU error, and that the same code without the
mistake passes. In-process, no torch.distributed (the collective/NCCL rules: ``megatron/test_megatron_strict.py``).
"""

from __future__ import annotations

import pytest
import torch

from openrlhf_search.integrations import strict_devices as sd
from openrlhf_search.integrations.strict_devices import strict_devices


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 5))


def test_strict_cpu_input_into_cuda_model_raises():
    with strict_devices():
        model = _tiny_model().cuda()
        ids = torch.randint(0, 11, (2, 3))
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            model[2](model[1](torch.randn(2, 3, 8)))  # CPU activations into CUDA weights
        with pytest.raises(RuntimeError, match="cuda:0 and cpu"):
            model(ids.cpu() * 1.0 @ torch.ones(3, 3).cuda())  # mixing in an op of the caller's own
        out = model(ids.to(torch.cuda.current_device()))  # the fix: put the batch where the model is
        assert out.device == torch.device("cuda", 0) and out.is_cuda
        assert sd.logical_device(out.cpu()) == sd.CPU and sd.logical_device(out) == 0
    assert not sd.logical_device(torch.zeros(1))  # untracked outside the block


def test_strict_megatron_style_parameters_and_module_moves_are_logical_cuda():
    with strict_devices():
        param = torch.nn.Parameter(torch.empty(4, 4, device=torch.cuda.current_device()))
        norm = torch.nn.LayerNorm(4)  # created on the CPU, like the local spec's torch norms
        assert param.device.type == "cuda" and norm.weight.device.type == "cpu"
        with pytest.raises(RuntimeError, match="same device"):
            norm(torch.ones(2, 4, device="cuda") @ param)
        norm.to("cuda")
        y = norm(torch.ones(2, 4, device="cuda") @ param)
        assert y.device.type == "cuda"
        # buffers allocated like an existing tensor follow it
        assert torch.zeros(3, device=y.device).is_cuda and torch.zeros_like(y).is_cuda and y.new_zeros(2).is_cuda


def test_strict_scalars_copies_and_indexing_follow_torch_rules():
    with strict_devices():
        x = torch.arange(6.0).cuda()
        assert (x * torch.tensor(2.0)).is_cuda  # 0-dim CPU tensors are allowed in element-wise ops
        with pytest.raises(RuntimeError, match="same device"):
            torch.stack([x.sum(), torch.tensor(1.0)])  # ... but not in cat/stack
        x.copy_(torch.ones(6))  # copies cross devices
        assert x[torch.tensor([0, 2])].is_cuda  # CPU index tensors are accepted
        with pytest.raises(TypeError, match="can't convert cuda:0"):
            x.numpy()
        assert x.cpu().numpy().shape == (6,)
        with pytest.raises(RuntimeError, match="cuda:1 and cuda:0"):
            x + torch.ones(6, device="cuda:1")  # two fake GPUs


def test_strict_gradients_and_optimizer_step_stay_on_the_logical_gpu():
    with strict_devices():
        model = _tiny_model().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(torch.randint(0, 11, (2, 3)).cuda()).pow(2).mean()
        loss.backward()
        assert all(p.grad.is_cuda for p in model.parameters())
        opt.step()
        assert all(p.is_cuda for p in model.parameters())


def test_strict_fake_gpu_index_and_nccl_member_check():
    assert sd.fake_gpu_index({"LOCAL_RANK": "3"}) == 3
    assert sd.fake_gpu_index({"CUDA_VISIBLE_DEVICES": "4,5", "LOCAL_RANK": "1"}) == 5
    assert sd.fake_gpu_index({"CUDA_VISIBLE_DEVICES": "2", "LOCAL_RANK": "0", sd.ENV_FAKE_GPU: "7"}) == 7
    sd.check_nccl_members([("h", 0), ("h", 1), ("g", 0)])  # distinct (host, GPU): fine
    with pytest.raises(RuntimeError, match="Duplicate GPU detected: rank 2 and rank 0 both on CUDA device 0"):
        sd.check_nccl_members([("h", 0), ("h", 1), ("h", 0)], "weight-sync group")


def test_strict_megatron_engine_pad_and_masks_follow_the_batch_device():
    from openrlhf_search.integrations.megatron.engine import megatron_attention_mask, pad_to_multiple

    with strict_devices():
        mask = torch.ones(2, 5, dtype=torch.long).cuda()
        assert megatron_attention_mask(mask).is_cuda
        padded = pad_to_multiple({"input_ids": mask.clone(), "attention_mask": mask}, 4)
        assert padded["input_ids"].is_cuda and padded["input_ids"].shape == (2, 8)
