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


def test_strict_generators_are_devices_too():
    """torch on a GPU: a generator must be on the device type of the tensors it draws for."""
    before = torch.Generator().manual_seed(0)  # created before the proxy: a real CPU generator
    with strict_devices():
        gpu = torch.Generator(device="cuda").manual_seed(1)
        cpu = torch.Generator(device="cpu").manual_seed(1)
        assert isinstance(gpu, torch.Generator) and gpu.device == torch.device("cuda", 0)
        assert cpu.device.type == "cpu" and sd.generator_device(before) == sd.CPU
        probs = torch.softmax(torch.randn(2, 5, device="cuda"), -1)
        x = torch.zeros(3, device=torch.cuda.current_device())
        planted = [  # each draws for CUDA tensors with a CPU generator (or the reverse)
            lambda g: torch.multinomial(probs, 1, generator=g),
            lambda g: torch.randn(3, device="cuda", generator=g),
            lambda g: torch.rand(3, device="cuda", generator=g),
            lambda g: torch.randint(0, 5, (3,), device="cuda", generator=g),
            lambda g: torch.randperm(5, device="cuda", generator=g),
            lambda g: torch.bernoulli(probs, generator=g),
            lambda g: torch.normal(x, 1.0, generator=g),
            lambda g: x.clone().normal_(generator=g),
            lambda g: x.clone().uniform_(generator=g),
            lambda g: x.clone().bernoulli_(0.5, generator=g),
        ]
        for draw in planted:
            for wrong in (cpu, before):
                with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
                    draw(wrong)
            draw(gpu)  # the fix: the generator on the tensors' device
        with pytest.raises(RuntimeError, match="Expected a 'cpu' device type for generator but found 'cuda'"):
            torch.randn(3, generator=gpu)  # a CPU factory with a CUDA generator
        torch.randn(3, generator=cpu)
        # same seed, same device type: the same draws (a seeded logical-CUDA generator is reproducible)
        a = torch.multinomial(probs, 3, generator=torch.Generator(device="cuda").manual_seed(5))
        b = torch.multinomial(probs, 3, generator=torch.Generator(device="cuda").manual_seed(5))
        assert torch.equal(a, b) and a.is_cuda
    assert torch.Generator is torch._C.Generator  # restored


def test_strict_hf_engine_samples_with_a_generator_on_the_model_device():
    """The HF rollout engine on a (logical) GPU at temperature 1: its sampler must be a CUDA generator."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.rollout.hf import HFEngine

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1, pad_token_id=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    with strict_devices():
        model = Qwen2ForCausalLM(cfg).to("cuda")
        engine = HFEngine(model, Tok(), seed=3)
        assert engine.generator.device.type == "cuda"
        first = engine.generate([[2, 3, 4], [5, 6]], params)
        assert [len(g.token_ids) for g in first] == [4, 4]
        seeded = [engine.generate([[2, 3, 4]], SamplingParams(temperature=1.0, max_new_tokens=4, seed=9))
                  for _ in range(2)]  # fmt: skip
        assert seeded[0][0].token_ids == seeded[1][0].token_ids  # reproducible per seed
        engine.generator = torch.Generator().manual_seed(3)  # planted: the sampler left on the host
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator but found 'cpu'"):
            engine.generate([[2, 3, 4]], params)


def test_strict_module_to_with_device_keyword_is_logical_cuda():
    """``module.to(device=..., dtype=...)`` (keyword form, parsed by ``_parse_to``) places like ``.to("cuda")``."""
    with strict_devices():
        for move in (lambda m: m.to(device="cuda"), lambda m: m.to(device=torch.device("cuda"), dtype=torch.bfloat16),
                     lambda m: m.to("cuda", torch.float32)):  # fmt: skip
            model = move(_tiny_model())
            assert all(p.device.type == "cuda" for p in model.parameters())
            with pytest.raises(RuntimeError, match="same device"):
                model[2](torch.randn(2, 8, dtype=model[2].weight.dtype))
