"""Discrete-event simulation of synchronous vs asynchronous (stale, partial) rollouts for a search agent.

Pure Python, a few seconds per run. It measures the *scheduling* only: the latency models below stand in for
the GPUs, the retriever and the learner; the scheduling rules are the real ones of
:mod:`openrlhf_search.rollout.async_schedule` (``StalenessBound``, ``WeightMailbox``).

    python benchmarks/async_rollout_sim.py --out benchmarks/results/async_rollout_sim.json \\
        --plot benchmarks/results/async_rollout_sim.png

Model (every parameter is a field of :class:`Hardware` or :class:`Profile`; sources in benchmarks/README.md):

* one *item* = a GRPO group of ``group_size`` trajectories of one prompt; ``prompts_per_step`` items per update;
* the engine has ``gpus * slots_per_gpu`` decode slots (continuous batching); a turn occupies one slot for
  ``tokens / decode_tok_s`` seconds; between turns the trajectory waits for the retriever (no slot held);
  waiting turns are served oldest start tag first;
* the learner's update takes ``tokens_in_batch * flops_per_token / (gpus * peak_flops * mfu)`` seconds
  (``flops_per_token = 10 N``: 6N forward+backward, 2N old log-probs, 2N reference log-probs);
* a weight update pauses the engine ``weight_sync_s``; with partial rollouts it is applied at once (the in-flight
  turns are interrupted, keep their tokens, and continue under the new version: tokens are tagged per version),
  without, it waits until no trajectory is in flight (no new trajectory is admitted meanwhile: a drain);
* ``colocated``: learner and engine share all GPUs and alternate (the synchronous baseline most trainers use);
  otherwise they split the GPUs (``engine_gpus`` / ``learner_gpus``) and run concurrently.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openrlhf_search.rollout.async_schedule import StalenessBound, WeightMailbox  # noqa: E402


@dataclass
class Profile:
    """Trajectory shape: turn counts, tokens per turn, retrieval latency."""

    name: str
    turns: str = "short"
    """``short``: 1/2/3 model turns with probability ``short_probs`` (Search-R1, max_turns=2);
    ``pareto``: ``min(max_turns, floor(U**(-1/alpha)))`` (a long tail, ASearcher-like)."""
    short_probs: tuple = (0.35, 0.45, 0.20)
    """Probabilities of 1, 2, 3 model turns for ``turns="short"``."""
    alpha: float = 1.1
    """Pareto tail index of the turn count (``turns="pareto"``); smaller = heavier tail."""
    max_turns: int = 32
    """Cap on model turns (``turns="pareto"``)."""
    turn_tokens_median: float = 150.0
    """Median model tokens per turn (lognormal)."""
    turn_tokens_sigma: float = 0.6
    """Lognormal sigma of tokens per turn."""
    turn_tokens_max: int = 500
    """Cap on tokens per turn (Search-R1's max_response_length=500)."""
    obs_tokens: int = 300
    """Retrieved tokens appended per search (3 passages; Search-R1 topk=3, max_obs_length=500)."""
    prompt_tokens: int = 200
    """Prompt tokens per trajectory."""
    retrieval_median_s: float = 0.3
    """Median retrieval latency (lognormal)."""
    retrieval_sigma: float = 0.5
    """Lognormal sigma of retrieval latency."""


PROFILES = {
    "short": Profile("short"),
    "long_tailed": Profile("long_tailed", turns="pareto", retrieval_median_s=1.5, retrieval_sigma=0.8),
}


@dataclass
class Hardware:
    """A 7B policy on 8 GPUs (H100-class)."""

    gpus: int = 8
    """GPUs in total."""
    engine_gpus: int = 4
    """GPUs of the rollout engine when not colocated (the learner gets the rest)."""
    slots_per_gpu: int = 64
    """Concurrent sequences per engine GPU."""
    decode_tok_s: float = 35.0
    """Decode speed of one sequence at that concurrency (tokens/s); 64 x 35 = 2240 tokens/s per GPU."""
    params: float = 7.6e9
    """Policy parameters N (Qwen2.5-7B)."""
    peak_flops: float = 989e12
    """Dense bf16 peak per GPU (H100 SXM)."""
    mfu: float = 0.30
    """Learner model-FLOPs utilisation."""
    weight_sync_s: float = 8.0
    """Engine pause to receive and load new weights (15 GB of bf16)."""


@dataclass
class Scenario:
    name: str
    max_staleness: int
    partial: bool
    colocated: bool = False


SCENARIOS = [
    Scenario("sync (colocated)", 0, False, colocated=True),
    Scenario("sync (split)", 0, False),
    Scenario("stale 1", 1, False),
    Scenario("stale 1 + partial", 1, True),
    Scenario("stale 2", 2, False),
    Scenario("stale 2 + partial", 2, True),
]


@dataclass
class Traj:
    tid: int
    group: int
    turns: list  # tokens per model turn
    turn: int = 0
    segments: list = field(default_factory=list)  # (version, tokens)


def sample_trajectory(rng: random.Random, prof: Profile) -> list:
    if prof.turns == "short":
        k = rng.choices([1, 2, 3], weights=prof.short_probs)[0]
    else:
        k = min(prof.max_turns, int(math.floor((1.0 - rng.random()) ** (-1.0 / prof.alpha))))
    return [min(prof.turn_tokens_max, max(1, int(rng.lognormvariate(math.log(prof.turn_tokens_median),
                                                                     prof.turn_tokens_sigma)))) for _ in range(k)]


def simulate(prof: Profile, hw: Hardware, sc: Scenario, prompts: int, group: int, steps: int, warmup: int,
             seed: int) -> dict:
    """Run ``steps`` learner updates; metrics over the updates after ``warmup``."""
    rng = random.Random(seed)
    e_gpus = hw.gpus if sc.colocated else hw.engine_gpus
    l_gpus = hw.gpus if sc.colocated else hw.gpus - hw.engine_gpus
    slots = e_gpus * hw.slots_per_gpu
    bound = StalenessBound(prompts, sc.max_staleness)
    box = WeightMailbox(partial_rollouts=sc.partial)
    events: list = []
    counter = itertools.count()
    now = 0.0

    def push(t, kind, payload=None):
        heapq.heappush(events, (t, next(counter), kind, payload))

    trajs: dict[int, Traj] = {}
    groups: dict[int, dict] = {}
    waiting: list = []  # heap of (tag, seq, tid): turns ready for a slot
    active: dict[int, dict] = {}  # tid -> running generation
    completed: list = []  # (tag, gid)
    st = dict(paused=False, learner_busy=False, in_flight=0, free=slots, learn_start=None)
    busy_learn, busy_slots, step_end, stale_hist, multi_version = [], [], [], {}, [0, 0]
    ids = itertools.count()
    learner_version_at_end = []

    def admit():
        key = (bound.started, bound.consumed, box.engine_version)
        if st["paused"] or box.blocks_admission() or st.get("refused") == key:
            return
        while (not st["paused"] and not box.blocks_admission() and not (sc.colocated and st["learner_busy"])
               and bound.can_start(box.engine_version)):
            tag = bound.start(box.engine_version)
            gid = next(ids)
            groups[gid] = dict(tag=tag, left=group, tids=[])
            for _ in range(group):
                t = Traj(next(ids), gid, sample_trajectory(rng, prof))
                trajs[t.tid] = t
                groups[gid]["tids"].append(t.tid)
                st["in_flight"] += 1
                heapq.heappush(waiting, (tag, next(counter), t.tid))
        if not (sc.colocated and st["learner_busy"]):
            st["refused"] = (bound.started, bound.consumed, box.engine_version)  # nothing changes until one does

    def run_gens():
        while not st["paused"] and st["free"] > 0 and waiting:
            _, _, tid = heapq.heappop(waiting)
            t = trajs[tid]
            n = t.turns[t.turn]
            g = dict(start=now, tokens=n, version=box.engine_version, gen=next(counter))
            g["end"] = now + n / hw.decode_tok_s
            active[tid] = g
            st["free"] -= 1
            push(g["end"], "gen_done", (tid, g["gen"]))

    def maybe_update():
        if st["paused"]:
            return
        new = box.maybe_apply(st["in_flight"])
        if new is None:
            return
        st["paused"] = True
        for tid, g in list(active.items()):  # partial rollouts: interrupt, keep tokens, continue after the sync
            total = g["end"] - g["start"]
            done_tok = int(round(g["tokens"] * (now - g["start"]) / total)) if total > 0 else g["tokens"]
            if done_tok:
                trajs[tid].segments.append((g["version"], done_tok))
            left = g["end"] - now
            g.update(start=now + hw.weight_sync_s, tokens=g["tokens"] - done_tok, version=new, gen=next(counter))
            g["end"] = g["start"] + left
            push(g["end"], "gen_done", (tid, g["gen"]))
        push(now + hw.weight_sync_s, "sync_done")

    def learner_try():
        if st["learner_busy"] or len(step_end) >= steps or len(completed) < prompts:
            return
        if sc.colocated and (active or st["paused"]):
            return
        key = (len(completed), bound.started, bound.consumed)
        if st.get("waited") == key:
            return  # same state as the last refusal
        keys = bound.take_batch(completed)
        if keys is None:
            st["waited"] = key
            return
        chosen = set(keys)
        completed[:] = [c for c in completed if c[1] not in chosen]
        tokens = 0
        for gid in keys:
            s = bound.staleness(groups[gid]["tag"])
            stale_hist[s] = stale_hist.get(s, 0) + 1
            for tid in groups[gid]["tids"]:
                t = trajs.pop(tid)
                tokens += prof.prompt_tokens + sum(t.turns) + prof.obs_tokens * (len(t.turns) - 1)
                multi_version[0] += len({v for v, _ in t.segments}) > 1
                multi_version[1] += 1
            del groups[gid]
        dur = tokens * 10 * hw.params / (l_gpus * hw.peak_flops * hw.mfu)
        st["learner_busy"] = True
        busy_learn.append((now, now + dur))
        push(now + dur, "learn_done")

    admit()
    run_gens()
    while events and len(step_end) < steps:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "gen_done":
            tid, gen = payload
            g = active.get(tid)
            if g is None or g["gen"] != gen:
                continue  # superseded by an interruption
            del active[tid]
            st["free"] += 1
            busy_slots.append((g["start"], now))
            t = trajs[tid]
            if g["tokens"]:
                t.segments.append((g["version"], g["tokens"]))
            t.turn += 1
            if t.turn < len(t.turns):
                lat = rng.lognormvariate(math.log(prof.retrieval_median_s), prof.retrieval_sigma)
                push(now + lat, "retrieved", tid)
            else:
                st["in_flight"] -= 1
                grp = groups[t.group]
                grp["left"] -= 1
                if grp["left"] == 0:
                    completed.append((grp["tag"], t.group))
        elif kind == "retrieved":
            tid = payload
            heapq.heappush(waiting, (groups[trajs[tid].group]["tag"], next(counter), tid))
        elif kind == "learn_done":
            st["learner_busy"] = False
            step_end.append(now)
            learner_version_at_end.append(bound.publish())
            box.post(bound.learner_version)
        elif kind == "sync_done":
            st["paused"] = False
        maybe_update()
        admit()
        run_gens()
        learner_try()

    t0, t1 = step_end[warmup - 1], step_end[-1]
    window = t1 - t0

    def overlap(spans):
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)

    n_traj = (len(step_end) - warmup) * prompts * group
    consumed = sum(stale_hist.values())
    return dict(
        scenario=sc.name, profile=prof.name, max_staleness=sc.max_staleness, partial=sc.partial,
        colocated=sc.colocated, steps=len(step_end), traj_per_s=n_traj / window,
        step_s=window / (len(step_end) - warmup),
        learner_idle=max(0.0, 1.0 - overlap(busy_learn) / window),
        engine_idle=1.0 - overlap(busy_slots) / (window * (hw.gpus * hw.slots_per_gpu if sc.colocated else slots)),
        staleness_hist={str(k): v / consumed for k, v in sorted(stale_hist.items())},
        multi_version_traj_share=multi_version[0] / max(1, multi_version[1]),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=512, help="groups per update (Search-R1: 512)")
    ap.add_argument("--group-size", type=int, default=5, help="trajectories per group (Search-R1: n_agent=5)")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4, help="updates excluded from the measurement window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-gpus", type=int, default=Hardware.engine_gpus,
                    help="GPUs of the engine when split (of 8; the learner gets the rest)")
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--plot", type=Path, default=None, help="PNG bar chart")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps <= args.warmup:
        ap.error("need 1 <= --warmup < --steps")
    hw = Hardware(engine_gpus=args.engine_gpus)
    if not 0 < hw.engine_gpus < hw.gpus:
        ap.error(f"--engine-gpus must be between 1 and {hw.gpus - 1}")
    rows = []
    for prof in (PROFILES[p] for p in args.profiles):
        for sc in SCENARIOS:
            rows.append(simulate(prof, hw, sc, args.prompts, args.group_size, args.steps, args.warmup, args.seed))
    print(f"{'profile':12} {'scenario':20} {'traj/s':>7} {'x sync':>7} {'step s':>7} {'learner idle':>12} "
          f"{'engine idle':>11} {'multi-ver':>9}  staleness")
    for prof in args.profiles:
        base = next(r for r in rows if r["profile"] == prof and r["colocated"])["traj_per_s"]
        for r in (r for r in rows if r["profile"] == prof):
            r["speedup_vs_colocated_sync"] = r["traj_per_s"] / base
            print(f"{prof:12} {r['scenario']:20} {r['traj_per_s']:7.2f} {r['speedup_vs_colocated_sync']:7.2f} "
                  f"{r['step_s']:7.1f} {r['learner_idle']:12.1%} {r['engine_idle']:11.1%} "
                  f"{r['multi_version_traj_share']:9.1%}  {r['staleness_hist']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, hardware=asdict(hw),
                                            profiles={k: asdict(v) for k, v in PROFILES.items()}, rows=rows),
                                       indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profs = list(dict.fromkeys(r["profile"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [s.name for s in SCENARIOS]
    width = 0.8 / len(profs)
    for j, prof in enumerate(profs):
        rs = [next(r for r in rows if r["profile"] == prof and r["scenario"] == n) for n in names]
        xs = [i + (j - (len(profs) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, [r["speedup_vs_colocated_sync"] for r in rs], width, label=prof)
        axes[1].bar(xs, [100 * r["learner_idle"] for r in rs], width, label=prof)
    axes[0].axhline(1.5, color="k", ls="--", lw=0.8)
    axes[0].set_ylabel("trajectories/s relative to colocated sync")
    axes[1].axhline(10, color="k", ls="--", lw=0.8)
    axes[1].set_ylabel("learner idle (%)")
    for ax in axes:
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
        ax.legend()
    fig.suptitle("Simulated scheduling: 7B search agent, 8 GPUs (latency models in benchmarks/README.md)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
