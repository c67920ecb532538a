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


# ------------------------------------------------------------------------------------------ update semantics
def _ppo_token_mean(lp, old, adv, mask, eps=0.2):
    """PPO's clipped surrogate, token-mean over model tokens, written out by hand (the tests' reference)."""
    ratio = torch.exp(lp - old)
    a = adv[:, None].expand_as(lp)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
    return (pg * mask).sum() / mask.sum()


def _sgd_setup(model, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_importance_ratio_uses_the_old_logprobs_of_the_step_not_the_policy_being_updated(tiny):
    """Two PPO epochs over one minibatch with SGD: the second epoch's ratio is pi_theta1 / pi_theta0 (the log-probs
    recomputed before any update), not 1. The trainer's step equals two hand-written SGD steps on the clipped
    surrogate with old log-probs fixed at theta0, and differs from the step whose old log-probs come from the policy
    being updated (ratio 1 in every epoch)."""
    from openrlhf_search.algorithms import get_policy_loss

    tok, model = tiny
    packed = pack(_uneven_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    rows, mask = torch.arange(4), packed.action_mask
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    lr = 3.0
    with torch.no_grad():
        old = response_logprobs(model, packed, rows, temperature=1.0)

    def hand_steps(fixed_old: bool):
        model.load_state_dict(start)
        for _ in range(2):
            lp = response_logprobs(model, packed, rows, temperature=1.0)
            ref_old = old if fixed_old else lp.detach()
            model.zero_grad(set_to_none=True)
            _ppo_token_mean(lp, ref_old, adv, mask).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= lr * p.grad
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    expected, stale = hand_steps(True), hand_steps(False)
    model.load_state_dict(start)
    seen = []

    def spy(lp, old_lp, a, m, **kw):
        seen.append(torch.exp(lp.detach() - old_lp)[m.bool()])
        return loss_fn(lp, old_lp, a, m, **kw)

    loss_fn = get_policy_loss("ppo", loss_agg="token-mean")
    spy.config = loss_fn.config
    opt, sched = _sgd_setup(model, lr)
    cfg = TrainConfig()
    cfg.algorithm.num_minibatches, cfg.algorithm.ppo_epochs, cfg.optimizer.grad_clip = 1, 2, 0.0
    update_policy(model, opt, sched, spy, packed, old, None, adv, cfg)
    got = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    assert len(seen) == 2
    assert (seen[0] - 1).abs().max() < 1e-5  # epoch 1: the policy the old log-probs were computed with
    assert (seen[1] - 1).abs().max() > 0.05  # epoch 2: one SGD step later
    gap = max(float((expected[k] - stale[k]).abs().max()) for k in expected)
    assert gap > 1e-4  # the fixture tells the two semantics apart
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=gap / 20, rtol=0), k


@pytest.mark.parametrize("micro", [1, 2])
def test_gradients_are_clipped_to_grad_clip_over_the_whole_minibatch(tiny, micro):
    """SGD(lr=1) step = -g * min(1, grad_clip / ||g||_2), g the minibatch's full gradient (all micro-batches
    accumulated, one global L2 norm); ``update/grad_norm`` logs ||g|| before clipping; grad_clip 0 = no clipping."""
    from openrlhf_search.algorithms import get_policy_loss

    tok, model = tiny
    packed = pack(_uneven_trajs(tok), tok.pad_token_id, torch.device("cpu"))
    rows, mask = torch.arange(4), packed.action_mask
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        old = response_logprobs(model, packed, rows, temperature=1.0) - 0.3  # ratios e^0.3: some clipped
    model.zero_grad(set_to_none=True)
    _ppo_token_mean(response_logprobs(model, packed, rows, temperature=1.0), old, adv, mask).backward()
    names = [n for n, p in model.named_parameters() if p.grad is not None]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    gnorm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
    model.zero_grad(set_to_none=True)
    for clip in (gnorm / 7, 0.0):
        model.load_state_dict(start)
        opt, sched = _sgd_setup(model, 1.0)
        cfg = TrainConfig()
        cfg.algorithm.num_minibatches, cfg.algorithm.micro_batches, cfg.optimizer.grad_clip = 1, micro, clip
        metrics = update_policy(model, opt, sched, get_policy_loss("ppo", loss_agg="token-mean"), packed, old, None,
                                adv, cfg)
        assert metrics["update/grad_norm"] == pytest.approx(gnorm, rel=1e-4)
        scale = min(1.0, clip / gnorm) if clip > 0 else 1.0
        params = dict(model.named_parameters())
        moved = torch.sqrt(sum(((params[n].detach() - start[n]).double() ** 2).sum() for n in names))
        assert float(moved) == pytest.approx(gnorm * scale, rel=1e-3)  # the step's L2 length
        for n in names:
            assert torch.allclose(params[n].detach() - start[n], -scale * grads[n], atol=1e-6 * gnorm, rtol=1e-3), n
    model.load_state_dict(start)
