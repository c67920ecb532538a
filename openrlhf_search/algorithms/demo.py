"""``openrlhf-search demo-algorithms``: a small, real numeric comparison of the policy-optimisation algorithms.

A toy "search-shaped" task that runs in seconds on a CPU, using exactly the code the trainers use
(:func:`get_algorithm` -> estimator, :class:`GroupBatcher`, policy loss with its diagnostics):

* a pool of prompts, each with a hidden target string of ``T`` tokens over a ``V``-token vocabulary;
* the policy is a table of logits per (prompt, position) (a contextual bandit over sequences);
* positions ``obs_positions`` are *retrieved* tokens: the environment writes the target token there and they are
  masked out of the loss (``action_mask = 0``), like ``<information>`` passages;
* reward is binary, exact-match-like: 1 if at least ``hit_threshold`` of the model positions are right -- sparse
  at the start, so many groups are all-zero (and later all-one), which is what DSPO's filter is about;
* with a ``calibadv`` preset, the tokens before the retrieved span play the search query (query token ``k`` with
  value ``v`` "retrieves" doc ``k=v``), the tokens after it the answer, and F1 is the share of model tokens right;
* each step samples ``G`` responses for ``prompts_per_round`` prompts and takes ``epochs`` optimizer steps on the
  same batch (off-policy updates after the first: the regime where ratios drift and clipping / SAPO matter).

Printed per algorithm (mean over seeds): final sampled reward (last 20% of steps), greedy accuracy over the whole
pool, mean of the per-update minimum ratio, the drift share (positive-advantage tokens with ratio <= the SAPO
threshold), clip fractions, samples drawn, wall time. It makes no claim beyond this toy: it is a smoke test with
real numbers and a quick way to see what each knob does.
"""

from __future__ import annotations

import argparse
import time

import torch

from .calibadv import CalibAdvConfig, CalibRecord, SearchTurn, calibrate_advantages
from .filtering import BatchNotFilledError, GroupBatcher
from .presets import get_algorithm

DEFAULT_ALGORITHMS = "grpo,dapo,gspo,dspo,sapo,calibadv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``openrlhf-search demo-algorithms``."""
    parser.add_argument("--algorithms", default=DEFAULT_ALGORITHMS, help="comma-separated get_algorithm() names")
    parser.add_argument("--steps", type=int, default=100, help="training steps per algorithm and seed")
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds to average")
    parser.add_argument("--epochs", type=int, default=8, help="optimizer steps per sampled batch (off-policy >1)")
    parser.add_argument("--lr", type=float, default=0.3, help="Adam learning rate of the logit table")
    parser.add_argument("--group-size", type=int, default=8, help="G: samples per prompt")
    parser.add_argument("--prompts-per-round", type=int, default=16, help="prompts sampled per round")
    parser.add_argument("--pool", type=int, default=64, help="number of distinct prompts")
    parser.add_argument("--vocab", type=int, default=6, help="V: vocabulary size")
    parser.add_argument("--length", type=int, default=10, help="T: response length (incl. retrieved tokens)")
    parser.add_argument("--hit-threshold", type=int, default=4, help="reward 1 if >= this many model tokens right")
    parser.add_argument("--max-rounds", type=int, default=3, help="sampling rounds cap for dynamic filtering")
    parser.add_argument("--sapo-threshold", type=float, default=None, help="override sapo_threshold (t)")
    parser.add_argument("--sapo-coef", type=float, default=None, help="override sapo_coef (w) of sapo losses")


def _validate(args: argparse.Namespace) -> None:
    checks = {
        "--steps": args.steps >= 1,
        "--seeds": args.seeds >= 1,
        "--epochs": args.epochs >= 1,
        "--group-size": args.group_size >= 2,
        "--vocab": args.vocab >= 2,
        "--length": args.length >= 4,
        "--pool": args.pool >= args.prompts_per_round >= 1,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise SystemExit(f"demo-algorithms: invalid value for {', '.join(bad)}")
    if not 1 <= args.hit_threshold <= args.length - 2:
        raise SystemExit(f"demo-algorithms: --hit-threshold must be in [1, {args.length - 2}] (model tokens)")


def _calib_records(y: torch.Tensor, target: torch.Tensor, obs: torch.Tensor) -> list[CalibRecord]:
    """Toy CalibAdv records: the tokens before the retrieved span are the "search query"; query token ``k`` with
    value ``v`` "retrieves" doc ``k=v``; the tokens after it are the answer; F1 = share of model tokens right."""
    first_obs, last_obs = int(obs.nonzero()[0]), int(obs.nonzero()[-1])
    T = y.shape[1]
    n_model = int((~obs).sum())
    hits = ((y == target) & ~obs).sum(-1).tolist()
    return [
        CalibRecord(
            search_turns=[SearchTurn(0, first_obs, [f"{k}={int(v)}" for k, v in enumerate(row[:first_obs])])],
            answer_span=(last_obs + 1, T),
            f1=h / n_model,
            valid_format=True,
        )
        for row, h in zip(y, hits)
    ]


def run_one(name: str, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Train the toy policy with algorithm ``name`` for ``args.steps`` steps; return summary statistics."""
    preset = get_algorithm(name)
    overrides = {}
    if preset.policy_loss == "sapo" or preset.loss_cfg.get("sapo_coef", 0) > 0:
        if args.sapo_coef is not None:
            overrides["sapo_coef"] = args.sapo_coef
    if args.sapo_threshold is not None:
        overrides["sapo_threshold"] = args.sapo_threshold
    loss_fn = preset.build_loss(**overrides)
    estimator = preset.build_estimator()
    calib_cfg = CalibAdvConfig()

    gen = torch.Generator().manual_seed(seed)
    P, T, V, G = args.pool, args.length, args.vocab, args.group_size
    targets = torch.randint(0, V, (P, T), generator=gen)
    theta = torch.zeros(P, T, V, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=args.lr)
    obs = torch.zeros(T, dtype=torch.bool)
    obs[T // 2 - 1 : T // 2 + 1] = True  # two retrieved tokens in the middle
    model_mask = ~obs

    def sample_round():
        prompts = torch.randperm(P, generator=gen)[: args.prompts_per_round]
        with torch.no_grad():
            probs = theta[prompts].softmax(-1)  # [n, T, V]
            y = torch.multinomial(probs.repeat_interleave(G, 0).reshape(-1, V), 1, generator=gen).reshape(-1, T)
        rows = prompts.repeat_interleave(G)
        y[:, obs] = targets[rows][:, obs]  # the environment writes the retrieved tokens
        hits = ((y == targets[rows]) & model_mask).sum(-1)
        reward = (hits >= args.hit_threshold).float()
        return reward, rows, list(zip(rows.tolist(), y))

    rewards_log, mins, drift, clip_lo, clip_hi, sampled, partial = [], [], [], [], [], 0, 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        if preset.dynamic_filter:
            batcher = GroupBatcher(args.prompts_per_round, max_rounds=args.max_rounds, on_cap="partial")
            while not batcher.done:
                r, rows, items = sample_round()
                sampled += len(r)
                rewards_log.append(r.mean().item())
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    batcher.add(r, rows, items)
            try:
                batch = batcher.result()
            except BatchNotFilledError:
                partial += 1
                continue
            partial += batch.report.partial
            rows = torch.tensor([it[0] for it in batch.items])
            y = torch.stack([it[1] for it in batch.items])
            reward, group_ids = batch.rewards, batch.group_ids
        else:
            reward, rows, items = sample_round()
            sampled += len(reward)
            rewards_log.append(reward.mean().item())
            y = torch.stack([it[1] for it in items])
            group_ids = rows
        adv = estimator(reward, group_ids)
        mask = model_mask.expand(len(rows), T)
        if preset.calibadv:
            adv, _ = calibrate_advantages(adv, _calib_records(y, targets[rows], obs), mask, group_ids, calib_cfg)
        with torch.no_grad():
            old = theta[rows].log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        for epoch in range(args.epochs):
            logp = theta[rows].log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
            loss, m = loss_fn(logp, old, adv, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch > 0:
                mins.append(m["ratio_min"])
                drift.append(m["drift_share"])
                clip_lo.append(m["clip_frac_low"])
                clip_hi.append(m["clip_frac_high"])
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        greedy = theta.argmax(-1)
        greedy_acc = (((greedy == targets) & model_mask).sum(-1) >= args.hit_threshold).float().mean().item()
    tail = rewards_log[-max(1, len(rewards_log) // 5) :]

    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "reward_all": mean(rewards_log),
        "reward": mean(tail),
        "greedy": greedy_acc,
        "ratio_min": mean(mins),
        "drift": mean(drift),
        "clip_low": mean(clip_lo),
        "clip_high": mean(clip_hi),
        "samples": float(sampled),
        "partial": float(partial),
        "seconds": elapsed,
    }


def run(args: argparse.Namespace) -> int:
    """Run every algorithm for every seed and print the comparison table."""
    _validate(args)
    names = [n.strip() for n in args.algorithms.split(",") if n.strip()]
    for n in names:  # fail fast on a typo, before any training
        try:
            get_algorithm(n)
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"demo-algorithms: --algorithms {n!r}: {exc.args[0]}") from None
    # The tensors are tiny: one thread avoids intra-op spin-waiting on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_table(names, args)
    finally:
        torch.set_num_threads(threads)
    return 0


def _run_table(names: list[str], args: argparse.Namespace) -> None:
    print(
        f"toy search-shaped bandit: pool={args.pool} prompts, G={args.group_size}, T={args.length} "
        f"(2 retrieved tokens masked), V={args.vocab}, reward=1[>= {args.hit_threshold} right], "
        f"{args.steps} steps x {args.epochs} epochs, lr={args.lr}, seeds={args.seeds}"
    )
    cols = ["reward_all", "reward", "greedy", "ratio_min", "drift", "clip_low", "clip_high", "samples", "partial"]
    cols.append("seconds")
    header = f"{'algorithm':<16}" + "".join(f"{c:>11}" for c in cols)
    print(header)
    print("-" * len(header))
    for name in names:
        runs = [run_one(name, args, seed) for seed in range(args.seeds)]
        avg = {c: sum(r[c] for r in runs) / len(runs) for c in cols}
        cells = "".join(
            f"{avg[c]:>11.0f}" if c in ("samples",) else f"{avg[c]:>11.2f}" if c == "seconds" else f"{avg[c]:>11.4f}"
            for c in cols
        )
        print(f"{name:<16}{cells}")
    print(
        "reward_all / reward: mean sampled reward over all steps / the last 20% of steps; "
        "greedy: share of the pool solved by argmax; "
        "ratio_min / drift / clip_*: means over off-policy updates (epochs > 1); drift = share of positive-advantage "
        "tokens with ratio <= sapo_threshold; partial: batches the filter could not fill within --max-rounds."
    )
