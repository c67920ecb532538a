"""The batched multi-turn search environment (token-in / token-out).

One turn for a batch of trajectories::

    live = env.live(trajs)                                   # trajectories still running, in batch order
    prompts = env.inputs(live)                               # prompt_ids + response_ids of each
    budgets = [env.turn_budget(t) for t in live]             # max new tokens of each
    gens = engine.generate(prompts, stop=env.stop_strings(), max_new_tokens=budgets)
    env.step(trajs, gens)                                    # gens[i] belongs to live[i]

:meth:`SearchEnv.step` appends each generation's *exact* sampled ids and log-probs (mask 1), decodes them only to
parse the action (:func:`~openrlhf_search.env.actions.parse_action`), sends every query of every live trajectory to
the retriever in **one** ``retriever.search(queries, topk)`` call, formats and tokenizes each observation once and
appends it (mask 0), and ends trajectories on an answer, on the turn limit or on the length limit.

Limits (:class:`EnvConfig`): ``max_turns`` counts model generations (the answering one included);
``max_tokens_per_turn`` caps one generation; ``max_obs_tokens`` caps one observation's documents;
``max_total_tokens`` caps prompt + response; ``max_response_tokens`` optionally caps the response (OpenRLHF's
``response_length`` counts observation tokens too). With ``forbid_search_on_last_turn`` the observation before the
last turn tells the model to answer, and a search written on the last turn is recorded but not executed.

Invalid actions get the template's fixed corrective message (as Search-R1 does) unless the generation ended with EOS
(``end_on_eos``): a chat model that closed its turn without acting is done (``finish_reason="stop"``).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

from openrlhf_search.data.types import QASample
from openrlhf_search.env.actions import Action, parse_action
from openrlhf_search.env.observation import format_observation, special_token_strings
from openrlhf_search.env.templates import PromptTemplate, get_template
from openrlhf_search.env.trajectory import Trajectory, TurnRecord
from openrlhf_search.retrieval.types import Hit
from openrlhf_search.rewards import normalize_answer

__all__ = ["EnvConfig", "SearchEnv", "merge_hits", "turn_is_repeated"]


@dataclass
class EnvConfig:
    """Limits and switches of :class:`SearchEnv` (defaults follow Search-R1: 4 turns, 500 tokens, top-3)."""

    max_turns: int = 4
    """Maximum model generations per trajectory, the answering one included."""
    max_tokens_per_turn: int = 500
    """Maximum new tokens of one generation."""
    max_obs_tokens: int = 500
    """Token budget of one observation's documents (the wrapper tags are extra)."""
    max_total_tokens: int = 4096
    """Budget of prompt + response tokens; a trajectory that cannot fit another turn ends with ``max_length``."""
    max_response_tokens: int | None = None
    """Optional budget of response tokens (model + observation), e.g. OpenRLHF's ``response_length``."""
    topk: int = 3
    """Documents retrieved per query."""
    max_queries_per_turn: int = 3
    """Queries kept from one search action (extra ones are dropped)."""
    max_docs_per_turn: int | None = None
    """Documents shown per observation after merging queries (default ``topk * max_queries_per_turn``)."""
    forbid_search_on_last_turn: bool = True
    """Tell the model before its last turn that no search is left, and do not execute a last-turn search."""
    end_on_eos: bool = True
    """A generation ending with EOS and no valid action ends the trajectory (``stop``) instead of a correction."""
    min_turn_tokens: int = 16
    """If fewer tokens than this remain for the next generation, the trajectory ends with ``max_length``."""

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens_per_turn", "max_total_tokens", "topk", "max_queries_per_turn"):
            if getattr(self, name) < 1:
                raise ValueError(f"EnvConfig.{name} must be >= 1, got {getattr(self, name)}")


def _accepts_keyword(fn, name: str) -> bool:
    """True if ``fn`` can be called with keyword ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == name and p.kind != p.POSITIONAL_ONLY) or p.kind == p.VAR_KEYWORD for p in params)


def merge_hits(per_query: Sequence[Sequence[Hit]], limit: int | None = None) -> list[Hit]:
    """Merge the hits of a turn's queries: query order then rank order, first occurrence of a doc id kept."""
    seen, out = set(), []
    for hits in per_query:
        for h in hits:
            if h.document.id not in seen:
                seen.add(h.document.id)
                out.append(h)
    return out[:limit] if limit is not None else out


def turn_is_repeated(queries: Sequence[str], doc_ids: Sequence[str], text: str, earlier: Sequence) -> bool:
    """Whether a search turn brought nothing new (CalibAdv gives such turns no credit).

    Repeated: every query was asked before (answer-normalised), or the documents it retrieved were all shown
    before, or its text equals an earlier turn's (whitespace-normalised). ``earlier`` holds the previous turns of
    the trajectory: anything with ``queries``, ``doc_ids`` and ``text`` (the local :class:`TurnRecord` and the
    OpenRLHF agent's turn record both are), so both backends apply the same rule.
    """
    earlier_queries = {normalize_answer(q) for t in earlier for q in t.queries}
    earlier_docs = {d for t in earlier for d in t.doc_ids}
    earlier_texts = {" ".join(t.text.split()) for t in earlier}
    return (
        all(normalize_answer(q) in earlier_queries for q in queries)
        or (bool(doc_ids) and set(doc_ids) <= earlier_docs)
        or " ".join(text.split()) in earlier_texts
    )


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
            retriever: any object with ``search(queries: list[str], topk: int) -> list[list[Hit]]``.
            template: a :class:`PromptTemplate` or a name/path for :func:`get_template`.
            cfg: limits; :class:`EnvConfig` defaults if None.
            eos_token_ids: ids that end a chat turn (default: the tokenizer's ``eos_token_id``); a generation whose
                last id is one of them, or whose ``finish_reason`` is ``"eos"``, ended the model's turn.
        """
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.template = get_template(template)
        self.cfg = cfg or EnvConfig()
        self.retrieval_seconds = 0.0
        """Wall time spent inside ``retriever.search`` (cumulative)."""
        self.retrieval_calls = 0
        """Number of ``retriever.search`` calls (one per :meth:`step` with at least one query)."""
        self._specials = special_token_strings(tokenizer)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}

    # ------------------------------------------------------------------------------------------------ public API
    def stop_strings(self) -> list[str]:
        """Stop strings for every generation (EOS is the engine's own stop)."""
        return list(self.template.stop)

    sampling_stop_strings = stop_strings

    def encode(self, text: str) -> list[int]:
        """Tokenize environment text (prompt, observation) without adding special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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
                    "protocol": self.template.protocol,
                    "prompt_text": prompt_text,
                }
                traj = Trajectory(prompt_ids=list(prompt_ids), meta=meta)
                if self.room(traj) < 1:  # the prompt alone fills the context budget: nothing can be generated
                    traj.finish_reason = "max_length"
                trajs.append(traj)
        return trajs

    def live(self, trajs: Sequence[Trajectory]) -> list[Trajectory]:
        """The trajectories still running, in batch order (``step`` expects one generation for each, same order)."""
        return [t for t in trajs if not t.done]

    def inputs(self, trajs: Sequence[Trajectory]) -> list[list[int]]:
        """Engine inputs of the live trajectories: ``prompt_ids + response_ids``."""
        return [t.prompt_ids + t.response_ids for t in self.live(trajs)]

    def room(self, traj: Trajectory) -> int:
        """Tokens left under the total and response budgets (may be negative if an engine overshot)."""
        c = self.cfg
        room = c.max_total_tokens - len(traj.prompt_ids) - len(traj.response_ids)
        if c.max_response_tokens is not None:
            room = min(room, c.max_response_tokens - len(traj.response_ids))
        return room

    def turn_budget(self, traj: Trajectory) -> int:
        """Max new tokens for the trajectory's next generation (per-turn, total and response limits)."""
        return max(0, min(self.cfg.max_tokens_per_turn, self.room(traj)))

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
        pending: list[tuple[Trajectory, TurnRecord, bool]] = []
        finished = 0
        for traj, gen in zip(live, generations):
            ids = [int(x) for x in gen.token_ids]
            lps = getattr(gen, "logprobs", None)
            start, end = traj.append(ids, is_model=True, logprobs=lps)
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            action = parse_action(text, self.template.protocol, self.cfg.max_queries_per_turn)
            turn = TurnRecord(
                index=len(traj.turns),
                model_span=(start, end),
                action=action.kind,
                text=text,
                error=action.error,
                gen_finish_reason=getattr(gen, "finish_reason", None),
            )
            traj.turns.append(turn)
            ended_by_id = bool(ids) and ids[-1] in self.eos_token_ids
            turn_ended = ended_by_id or getattr(gen, "finish_reason", None) == "eos"
            if self._apply_action(traj, turn, action, turn_ended):
                pending.append((traj, turn, turn_ended))
            finished += traj.done

        queries = [q for _, turn, _ in pending for q in turn.queries]
        t0 = time.perf_counter()
        results: list[list[Hit]] = []
        if queries:
            results = self.retriever.search(queries, self.cfg.topk)
            self.retrieval_calls += 1
            if len(results) != len(queries):
                raise ValueError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
        seconds = time.perf_counter() - t0
        self.retrieval_seconds += seconds

        pos = 0
        for traj, turn, turn_ended in pending:
            per_query = results[pos : pos + len(turn.queries)]
            pos += len(turn.queries)
            self._observe(traj, turn, per_query, turn_ended)
            finished += traj.done
        return {"queries": len(queries), "retrieval_seconds": seconds, "finished": finished}

    def compute_rewards(self, trajs: Sequence[Trajectory], reward_fn) -> list[tuple[float, dict]]:
        """Apply ``reward_fn(response_text, golden_answers, retrieved_text, answer=traj.answer)`` to each trajectory.

        The answer scored is the one the environment accepted (``Trajectory.answer``), not the last ``<answer>``
        block of the text: otherwise an answer the parser rejected (written inside the model's own
        ``<information>`` block, or a second answer after the first action) would still be rewarded. Reward
        functions without an ``answer`` keyword are called with the three positional arguments only.
        """
        takes_answer = _accepts_keyword(reward_fn, "answer")
        out = []
        for t in trajs:
            args = (t.response_text, t.meta["golden_answers"], t.retrieved_text)
            out.append(reward_fn(*args, answer=t.answer) if takes_answer else reward_fn(*args))
        return out

    # ------------------------------------------------------------------------------------------------- internals
    def _is_last_turn(self, traj: Trajectory) -> bool:
        return len(traj.turns) >= self.cfg.max_turns

    def _apply_action(self, traj: Trajectory, turn: TurnRecord, action: Action, turn_ended: bool) -> bool:
        """Handle answer/invalid actions and the turn limit; return True if the turn's queries must be run."""
        last = self._is_last_turn(traj)
        if action.kind == "answer":
            traj.answer = action.answer
            traj.finish_reason = "answer"
            return False
        if action.kind == "search":
            turn.queries = list(action.queries)
            if last and self.cfg.forbid_search_on_last_turn:
                turn.error = "search is not allowed on the last turn"
                traj.finish_reason = "max_turns"
                return False
            return True
        # invalid
        if turn_ended and self.cfg.end_on_eos:
            traj.finish_reason = "stop"
        elif last:
            traj.finish_reason = "max_turns"
        else:
            self._insert(traj, turn, self.template.feedback(turn_ended, hint=self._hint(traj)))
        return False

    def _hint(self, traj: Trajectory) -> bool:
        """Whether to show the last-turn hint: the next turn is the last one and search is forbidden there."""
        return self.cfg.forbid_search_on_last_turn and len(traj.turns) == self.cfg.max_turns - 1

    def _insert(self, traj: Trajectory, turn: TurnRecord, text: str) -> None:
        """Tokenize ``text`` once, append it as observation tokens, and apply the length limits."""
        ids = self.encode(text)
        if self.room(traj) - len(ids) < self.cfg.min_turn_tokens:
            traj.finish_reason = "max_length"
            return
        turn.obs_span = traj.append(ids, is_model=False)
        turn.obs_text = text
        if self._is_last_turn(traj):
            traj.finish_reason = "max_turns"

    def _observe(self, traj: Trajectory, turn: TurnRecord, per_query: list[list[Hit]], turn_ended: bool) -> None:
        """Format the retrieved documents of one search turn and append them."""
        c = self.cfg
        limit = c.max_docs_per_turn if c.max_docs_per_turn is not None else c.topk * c.max_queries_per_turn
        hits = merge_hits(per_query, limit)
        turn.doc_ids = [h.document.id for h in hits]
        turn.scores = [float(h.score) for h in hits]
        turn.repeated = turn_is_repeated(turn.queries, turn.doc_ids, turn.text, traj.turns[:-1])
        # Room for the documents: what is left after this observation's wrapper and the next turn's minimum.
        hint = self._hint(traj)
        overhead = len(self.encode(self.template.wrap_observation("", turn_ended, hint)))
        budget = min(c.max_obs_tokens, self.room(traj) - overhead - c.min_turn_tokens)
        if budget <= 0:
            traj.finish_reason = "max_length"
            return
        body = format_observation(hits, self.tokenizer, budget, self._specials)
        self._insert(traj, turn, self.template.wrap_observation(body, turn_ended, hint))
