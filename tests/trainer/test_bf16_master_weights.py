"""bf16 training keeps small updates: the local trainer's optimizer holds fp32 master weights (``build_optimizer``).

With plain AdamW on bf16 parameters an update below half a unit in the last place is rounded away: at lr 1e-6 almost
no weight of a model moves, however many steps run (what ``dtype: auto`` did on CUDA). CPU bf16 shows the same
rounding as a GPU's, so this runs here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from openrlhf_search.trainer.models import build_optimizer, optimizer_weights


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).to(dtype)


def _train(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.float().backward()
        opt.step()


def _fraction_changed(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    changed = sum(int((a.float() != b.float()).sum()) for a, b in zip(before, after))
    return changed / sum(b.numel() for b in before)


def _plain_adamw(params, lr):  # the planted mistake: what the trainer did before
    return torch.optim.AdamW(params, lr=lr)


@pytest.mark.parametrize("make_opt", [build_optimizer, pytest.param(_plain_adamw, marks=pytest.mark.xfail(
    strict=True, reason="planted: plain AdamW on bf16 parameters loses updates below bf16 resolution"))])
def test_bf16_training_at_a_small_learning_rate_moves_the_weights(make_opt):
    lr, steps = 1e-6, 5
    model = _model(torch.bfloat16)
    params = list(model.parameters())
    before = [p.detach().float().clone() for p in params]
    opt = make_opt(params, lr=lr)
    _train(model, opt, steps)
    trained = optimizer_weights(opt, params)
    assert _fraction_changed(before, trained) > 0.5  # ~all weights moved (plain bf16 AdamW: a few percent)
    # and they moved as an fp32 run moves them: the updates are the fp32 updates, not rounding noise
    ref = _model(torch.float32)
    ref_before = [p.detach().clone() for p in ref.parameters()]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=lr)
    _train(ref, ref_opt, steps)
    d_ref = torch.cat([(p.detach() - b).flatten() for p, b in zip(ref.parameters(), ref_before)])
    d_bf16 = torch.cat([(t.float() - b).flatten() for t, b in zip(trained, before)])
    assert float(torch.nn.functional.cosine_similarity(d_ref, d_bf16, dim=0)) > 0.9
    # the bf16 model is the masters rounded (what the engine samples from and the checkpoint stores)
    assert all(torch.equal(p.detach(), t.to(p.dtype)) for p, t in zip(params, trained))


def test_fp32_parameters_keep_plain_adamw():
    model = _model(torch.float32)
    assert type(build_optimizer(model.parameters(), lr=1e-3)) is torch.optim.AdamW


def test_master_weights_survive_a_resume():
    """The optimizer state carries the fp32 masters: a resumed run continues from them, not from bf16 roundings."""
    lr = 1e-6
    model = _model(torch.bfloat16)
    opt = build_optimizer(model.parameters(), lr=lr)
    _train(model, opt, 3)
    state = copy.deepcopy(opt.state_dict())  # as torch.load gives it back (no tensor shared with opt)
    masters = [m.detach().clone() for m in opt.masters]
    resumed = _model(torch.bfloat16)
    resumed.load_state_dict(model.state_dict())  # the checkpoint's bf16 weights
    opt2 = build_optimizer(resumed.parameters(), lr=lr)
    opt2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(opt2.masters, masters))
    _train(model, opt, 2)
    _train(resumed, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(opt2.masters, opt.masters))  # same run as without the resume
    with pytest.raises(ValueError, match="master weights for"):
        build_optimizer(list(resumed.parameters())[:3], lr=lr).load_state_dict(state)
