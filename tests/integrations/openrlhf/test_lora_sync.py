"""LoRA on the OpenRLHF backend, our side (main suite: peft and transformers, no OpenRLHF): the target-module form
peft expands, and the weight view the patched ``broadcast_to_vllm`` sends (merged weights under the plain model's
names, what vLLM's loader knows), checked against a real peft ``PeftModel`` on tiny Qwen2 and Llama models."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

peft = pytest.importorskip("peft")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from openrlhf_search.integrations.openrlhf.config import PatchConfig  # noqa: E402
from openrlhf_search.integrations.openrlhf.patches import (  # noqa: E402
    check_openrlhf_args,
    install_lora_sync,
    lora_target_modules,
    merged_lora_parameters,
)

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=32)  # fmt: skip


def _tiny(kind: str, tied: bool):
    torch.manual_seed(0)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=tied)).eval()
    return LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tied)).eval()


def _lora(model, target=("all-linear",)):
    """OpenRLHF's Actor LoRA setup (``openrlhf/models/actor.py``) with the target modules as our actor passes them,
    and non-zero adapters (peft initialises B to 0, which would make merged == unmerged)."""
    cfg = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                          target_modules=lora_target_modules(list(target)))  # fmt: skip
    model = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def test_all_linear_from_openrlhfs_parser_is_expanded_by_peft():
    """OpenRLHF 0.11.2 parses ``--ds.lora.target_modules all-linear`` (nargs="*") to ``['all-linear']``: peft then
    looks for a module of that name; the string our actor passes is expanded to every linear layer but the head."""
    with pytest.raises(ValueError, match="all-linear"):
        peft.get_peft_model(_tiny("qwen2", False), peft.LoraConfig(r=4, target_modules=["all-linear"]))
    assert lora_target_modules(["all-linear"]) == "all-linear" and lora_target_modules("all-linear") == "all-linear"
    assert lora_target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    model = _lora(_tiny("qwen2", False))
    targeted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("tied", [False, True])
def test_merged_view_has_the_plain_models_names_and_the_merged_values(kind, tied):
    plain_names = [n for n, _ in _tiny(kind, tied).named_parameters()]
    model = _lora(_tiny(kind, tied))
    view = merged_lora_parameters(model)
    assert [n for n, _ in view] == plain_names
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    base = dict(_tiny(kind, tied).named_parameters())
    changed = 0
    for name, param in view:
        assert param.shape == merged[name].shape and param.dtype == merged[name].dtype, name
        assert torch.equal(param.data, merged[name]), name
        changed += not torch.equal(param.data, base[name])
    assert changed == 7 * SIZES["num_hidden_layers"]  # every adapted projection differs from the base weight


def _openrlhf_broadcast(trainer, received):
    """OpenRLHF 0.11.2's ``ActorPPOTrainer.broadcast_to_vllm`` as far as names and tensors go: list the module's
    ``named_parameters()`` (all of them for a text model), then send each ``param.data`` under its name with its
    shape and dtype (``engine.update_weight(name, dtype, shape)`` + broadcast, or CUDA IPC of ``param.data``)."""
    model = trainer.actor.model.module
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or True]
    for name, param in params:
        received[name] = (param.dtype, tuple(param.shape), param.data.clone())


def test_patched_broadcast_feeds_a_plain_loader_the_merged_model_and_leaves_the_model_alone():
    model = _lora(_tiny("qwen2", False))
    received: dict = {}
    trainer = SimpleNamespace(actor=SimpleNamespace(model=SimpleNamespace(module=model)))
    trainer.broadcast_to_vllm = lambda: _openrlhf_broadcast(trainer, received)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert install_lora_sync(trainer)
    trainer.broadcast_to_vllm()
    # vLLM's loader looks every name up in the plain architecture: a plain model's strict load is the stand-in
    receiver = _tiny("qwen2", False)
    for name, (dtype, shape, tensor) in received.items():
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, name
    receiver.load_state_dict({n: t for n, (_, _, t) in received.items()}, strict=True)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = copy.deepcopy(model).merge_and_unload()(ids).logits
        assert torch.allclose(receiver(ids).logits, want, atol=1e-5)
        assert not torch.allclose(_tiny("qwen2", False)(ids).logits, want, atol=1e-3)  # the adapters matter
    after = dict(model.named_parameters())  # the peft model's own view is back, weights untouched (no merge left)
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert not any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "lora_A"))


def test_non_lora_models_keep_openrlhfs_broadcast():
    trainer = SimpleNamespace(actor=SimpleNamespace(model=SimpleNamespace(module=_tiny("llama", True))),
                              broadcast_to_vllm=lambda: None)  # fmt: skip
    original = trainer.broadcast_to_vllm
    assert not install_lora_sync(trainer) and trainer.broadcast_to_vllm is original


@pytest.mark.parametrize("bad", [{"zero_stage": 3}, {"tensor_parallel_size": 2}, {"load_in_4bit": True}])
def test_lora_layouts_whose_merge_needs_gathered_weights_are_refused(bad):
    ds = {"zero_stage": 2, "tensor_parallel_size": 1, "load_in_4bit": False, **bad}
    args = SimpleNamespace(train=SimpleNamespace(async_enable=False, partial_rollout_enable=False,
                                                 dynamic_batch_enable=False),
                           algo=SimpleNamespace(advantage=SimpleNamespace(is_correction_level="off")),
                           ds=SimpleNamespace(lora=SimpleNamespace(rank=8), **ds))  # fmt: skip
    with pytest.raises(ValueError, match=r"LoRA \(--ds.lora.rank 8\) with --ds\."):
        check_openrlhf_args(PatchConfig(), args)
    args.ds.lora.rank = 0
    check_openrlhf_args(PatchConfig(), args)
