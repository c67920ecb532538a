"""The update step: NaN/inf guard, trainer log-probs vs the engine's, LR schedules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from openrlhf_search.trainer.config import TrainConfig  # noqa: E402
from openrlhf_search.trainer.local import lr_lambda, pack, response_logprobs, update_policy  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    tok = build_tiny_tokenizer([f"<search> who is {i} </search> <answer> {i} </answer>" for i in range(100)],
                               vocab_size=320)
    return tok, build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64), seed=0)


def _trajs(tok, engine=None):
    from openrlhf_search.rollout.base import SamplingParams

    prompts = [tok.encode("who is 3"), tok.encode("<search> who is 12 and 7")]
    if engine is None:
        gens = [SimpleNamespace(token_ids=[5, 6, 7], logprobs=[0.0] * 3), SimpleNamespace(token_ids=[8, 9],
                                                                                        logprobs=[0.0] * 2)]
    else:
        gens = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0))
    out = []
    for p, g in zip(prompts, gens):
        out.append(SimpleNamespace(prompt_ids=p, response_ids=list(g.token_ids), action_mask=[1] * len(g.token_ids),
                                   logprobs=list(g.logprobs)))
    return out


def test_trainer_logprobs_match_engine_sampling_logprobs(tiny):
    from openrlhf_search.rollout.hf import HFEngine

    tok, model = tiny
    trajs = _trajs(tok, HFEngine(model.eval(), tok))
    packed = pack(trajs, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp = response_logprobs(model, packed, torch.arange(2), temperature=1.0)
    gap = ((lp - packed.engine_logprobs).abs() * packed.action_mask).max()
    assert gap < 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_skips_the_update_and_is_logged(tiny, bad):
    tok, model = tiny
    before = [p.detach().clone() for p in model.parameters()]
    packed = pack(_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def loss_fn(lp, old, adv, mask, **_):
        return (lp * mask).sum() * bad, {"loss": float("nan")}

    cfg = TrainConfig()
    old = torch.zeros_like(packed.action_mask)
    metrics = update_policy(model, opt, sched, loss_fn, packed, old, None, torch.ones(2), cfg)
    assert metrics["update/skipped_nonfinite"] == cfg.algorithm.num_minibatches
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_skips_the_update(tiny):
    tok, model = tiny
    before = [p.detach().clone() for p in model.parameters()]
    packed = pack(_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def loss_fn(lp, old, adv, mask, **_):  # finite value, infinite gradient: sqrt'(0) = inf
        return torch.sqrt((lp * mask).sum() * 0.0), {}

    metrics = update_policy(model, opt, sched, loss_fn, packed, torch.zeros_like(packed.action_mask), None,
                            torch.ones(2), TrainConfig())
    assert metrics["update/skipped_nonfinite"] >= 1
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_finite_loss_updates(tiny):
    tok, model = tiny
    before = [p.detach().clone() for p in model.parameters()]
    packed = pack(_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def loss_fn(lp, old, adv, mask, **_):
        return -(lp * mask).sum() / mask.sum(), {"loss": 0.0}

    metrics = update_policy(model, opt, sched, loss_fn, packed, torch.zeros_like(packed.action_mask), None,
                            torch.ones(2), TrainConfig())
    assert metrics["update/skipped_nonfinite"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_schedules():
    f = lr_lambda("cosine", 2, 12)
    assert [round(f(s), 3) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_lambda("linear", 0, 10)(5) == pytest.approx(0.5)
    assert lr_lambda("constant", 0, 10)(9) == 1.0
    with pytest.raises(ValueError, match="optimizer.schedule"):
        lr_lambda("exp", 0, 10)


def _uneven_trajs(tok):
    texts = ["who is 3", "<search> who is 12 and 7", "who is 41 and 5 and 6", "<answer> 9"]
    out = []
    for i, text in enumerate(texts):
        resp = [5 + (j * 7 + i) % 200 for j in range(2 + 3 * i)]
        amask = [1] * len(resp)
        if len(resp) > 6:
            amask[2:4] = [0, 0]  # a retrieved passage
        out.append(SimpleNamespace(prompt_ids=tok.encode(text), response_ids=resp, action_mask=amask,
                                   logprobs=[0.0] * len(resp)))
    return out


@pytest.mark.parametrize(("name", "agg"), [("grpo", "token-mean"), ("gspo", "seq-mean-token-mean"),
                                           ("sapo", "seq-mean-token-sum"), ("dapo", "seq-mean-token-sum-norm")])
def test_normaliser_local_trainer_micro_batches_give_the_same_step(tiny, name, agg):
    """One minibatch as 1, 2 or 4 gradient-accumulation micro-batches: the same SGD step (= the same gradient)."""
    from openrlhf_search.algorithms import get_policy_loss

    tok, model = tiny
    packed = pack(_uneven_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        lp = response_logprobs(model, packed, torch.arange(4), temperature=1.0)
    old = lp + 0.4 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    loss_fn = get_policy_loss(name, loss_agg=agg, sapo_threshold=0.9)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = {}
    for micro in (1, 2, 4):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        cfg = TrainConfig()
        cfg.algorithm.num_minibatches, cfg.algorithm.micro_batches, cfg.optimizer.grad_clip = 1, micro, 0.0
        torch.manual_seed(1)
        metrics = update_policy(model, opt, sched, loss_fn, packed, old, None, adv, cfg)
        results[micro] = ({k: v.detach() - start[k] for k, v in model.state_dict().items()}, metrics)
    model.load_state_dict(start)
    ref, ref_metrics = results[1]
    assert sum(float(d.abs().sum()) for d in ref.values()) > 1e-3  # the step moved the weights
    for micro in (2, 4):
        delta, metrics = results[micro]
        for k in ref:
            assert torch.allclose(delta[k], ref[k], atol=1e-6, rtol=1e-4), f"{name} {agg} {micro} micro {k}"
        assert metrics["loss/loss"] == pytest.approx(ref_metrics["loss/loss"], rel=1e-5, abs=1e-7)


def test_offpolicy_loss_receives_the_engine_logprobs(tiny):
    """A ``+tis`` preset's loss gets ``packed.engine_logprobs`` as ``behaviour_log_probs``; a plain one gets none."""
    from openrlhf_search.algorithms import get_algorithm

    tok, model = tiny
    trajs = _trajs(tok)
    trajs[0].logprobs = [-0.5, -1.0, -1.5]
    packed = pack(trajs, tok.pad_token_id, torch.device("cpu"))
    seen = []
    for name in ("grpo+tis", "grpo"):
        inner = get_algorithm(name).build_loss()

        def spy(lp, old, adv, mask, inner=inner, **extra):
            seen.append(extra.get("behaviour_log_probs"))
            return inner(lp, old, adv, mask, **extra)

        spy.needs_behaviour_log_probs = getattr(inner, "needs_behaviour_log_probs", False)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        cfg = TrainConfig()
        cfg.algorithm.num_minibatches = 1
        metrics = update_policy(model, opt, sched, spy, packed, torch.zeros_like(packed.action_mask), None,
                                torch.ones(2), cfg)
        assert ("loss/offpolicy/weight_mean" in metrics or "offpolicy/weight_mean" in metrics) == (name != "grpo")
    rows = sorted(map(tuple, seen[0].tolist()))  # minibatch rows come shuffled
    assert rows == sorted(map(tuple, packed.engine_logprobs.tolist())) and seen[-1] is None
