"""The batched multi-turn search environment (token-in / token-out).

One turn for a batch of trajectories::

    live = env.live(trajs)                                   # trajectories still running, in batch order
    prompts = env.inputs(live)                               # prompt_ids + response_ids of each
    budgets = [env.turn_budget(t) for t in live]             # max new tokens of each
    gens = engine.generate(prompts, stop=env.stop_strings(), max_new_tokens=budgets)
    env.step(trajs, gens)                                    # gens[i] belongs to live[i]

:meth:`SearchEnv.step` is the per-trajectory step of :class:`~openrlhf_search.env.episode.Episode` (the one the
OpenRLHF agent runs too) with only the tool execution batched: ``plan`` for every live trajectory (append the
*exact* sampled ids and log-probs, parse the action, apply the rules), **one** ``execute`` per tool for all of them
(``search``: one ``retriever.search(queries, topk)`` call with every query of the turn), then ``render`` for each
(format, tokenize once, append with mask 0). The rules and limits are documented in :mod:`.episode`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from openrlhf_search.data.types import QASample
from openrlhf_search.env.episode import EnvConfig, Episode
from openrlhf_search.env.scoring import score_trajectories
from openrlhf_search.env.templates import PromptTemplate
from openrlhf_search.env.tools.search import merge_hits, turn_is_repeated
from openrlhf_search.env.trajectory import Trajectory

__all__ = ["EnvConfig", "SearchEnv", "merge_hits", "turn_is_repeated"]


class SearchEnv:
    """Multi-turn search environment over a batch of trajectories (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        retriever,
        template: str | PromptTemplate = "search_r1",
        cfg: EnvConfig | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ):
        """
        Args:
            tokenizer: a Hugging Face tokenizer (``encode``/``decode``; chat template optional).
            retriever: any object with ``search(queries: list[str], topk: int) -> list[list[Hit]]`` (and
                ``get_documents(ids_or_titles)`` when the ``open`` tool is enabled).
            template: a :class:`PromptTemplate` or a name/path for :func:`get_template`.
            cfg: limits and tools; :class:`EnvConfig` defaults if None.
            eos_token_ids: ids that end a chat turn (default: the tokenizer's ``eos_token_id``); a generation whose
                last id is one of them, or whose ``finish_reason`` is ``"eos"``, ended the model's turn.
        """
        self.episode = Episode(tokenizer, template, cfg, eos_token_ids)
        self.episode.check_retriever(retriever)
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.retrieval_seconds = 0.0
        """Wall time spent executing tools (cumulative)."""
        self.retrieval_calls = 0
        """Number of :meth:`step` calls that executed at least one tool call (one backend call per tool each)."""

    @property
    def cfg(self) -> EnvConfig:
        return self.episode.cfg

    @property
    def template(self) -> PromptTemplate:
        return self.episode.template

    @property
    def eos_token_ids(self) -> set[int]:
        return self.episode.eos_token_ids

    # ------------------------------------------------------------------------------------------------ public API
    def stop_strings(self) -> list[str]:
        """Stop strings for every generation (EOS is the engine's own stop)."""
        return self.episode.stop_strings()

    sampling_stop_strings = stop_strings

    def encode(self, text: str) -> list[int]:
        """Tokenize environment text (prompt, observation) without adding special tokens."""
        return self.episode.encode(text)

    def reset(self, samples: Sequence[QASample | dict], n: int = 1) -> list[Trajectory]:
        """New trajectories: ``n`` per sample (a GRPO group), consecutive, sharing ``meta["group_id"]``.

        ``samples`` are :class:`~openrlhf_search.data.types.QASample` or FlashRAG-like dicts; the group id is the
        sample's ``group_id``, else its ``id``, else its position. A prompt that leaves no room under
        ``max_total_tokens`` starts finished (``max_length``, no response): an engine is never asked for 0 tokens.
        """
        trajs = []
        for i, raw in enumerate(samples):
            s = QASample.coerce(raw, where=f"samples[{i}]")
            prompt_text = self.template.render(s.question, self.tokenizer)
            prompt_ids = self.encode(prompt_text)
            group = s.group_id or s.id or str(i)
            for k in range(n):
                meta = {
                    "sample_id": s.id,
                    "question": s.question,
                    "golden_answers": list(s.golden_answers),
                    "group_id": group,
                    "sample_index": i,
                    "rollout_index": k,
                    "data_source": s.data_source,
                    "prompt_text": prompt_text,
                }
                trajs.append(self.episode.new_trajectory(prompt_ids, meta))
        return trajs

    def live(self, trajs: Sequence[Trajectory]) -> list[Trajectory]:
        """The trajectories still running, in batch order (``step`` expects one generation for each, same order)."""
        return [t for t in trajs if not t.done]

    def inputs(self, trajs: Sequence[Trajectory]) -> list[list[int]]:
        """Engine inputs of the live trajectories: ``prompt_ids + response_ids``."""
        return [t.prompt_ids + t.response_ids for t in self.live(trajs)]

    def room(self, traj: Trajectory) -> int:
        """Tokens left under the total and response budgets (may be negative if an engine overshot)."""
        return self.episode.room(traj)

    def turn_budget(self, traj: Trajectory) -> int:
        """Max new tokens for the trajectory's next generation (per-turn, total and response limits)."""
        return self.episode.turn_budget(traj)

    def step(self, trajs: Sequence[Trajectory], generations: Sequence) -> dict:
        """Advance every live trajectory by one turn.

        Args:
            trajs: the whole batch (finished trajectories are skipped).
            generations: ``generations[i]`` is the output for ``env.live(trajs)[i]`` and has ``token_ids``
                (list[int]), ``logprobs`` (list[float] or None) and optionally ``finish_reason``.

        Returns:
            ``{"queries": n_queries, "retrieval_seconds": s, "finished": n_finished_this_step}``.
        """
        live = self.live(trajs)
        if len(generations) != len(live):
            raise ValueError(
                f"SearchEnv.step: got {len(generations)} generations for {len(live)} live trajectories "
                "(pass one generation per env.live(trajs) entry, in that order)"
            )
        pending = []
        for traj, gen in zip(live, generations):
            p = self.episode.plan(traj, gen.token_ids, getattr(gen, "logprobs", None),
                                  getattr(gen, "finish_reason", None))
            if p is not None:
                pending.append(p)
        t0 = time.perf_counter()
        results = self.episode.execute(pending, self.retriever) if pending else []
        seconds = time.perf_counter() - t0
        if pending:
            self.retrieval_calls += 1
        self.retrieval_seconds += seconds
        for p, r in zip(pending, results):
            self.episode.render(p, r)
        finished = sum(1 for t in live if t.done)
        return {"queries": sum(len(p.turn.queries) for p in pending), "retrieval_seconds": seconds,
                "finished": finished}

    def compute_rewards(self, trajs: Sequence[Trajectory], reward) -> list[tuple[float, dict]]:
        """``(score, info)`` of each trajectory in one batched reward call
        (:func:`~openrlhf_search.env.scoring.score_trajectories`): the reward of the answer the environment accepted
        (``Trajectory.answer``), with the format checked once by the environment."""
        return score_trajectories(trajs, reward)

    def metrics(self, traj: Trajectory, info: dict, reward=None) -> dict[str, float]:
        """Per-trajectory diagnostics, the same names as the OpenRLHF agent's ``extra_logs``."""
        return self.episode.metrics(traj, info, reward)
