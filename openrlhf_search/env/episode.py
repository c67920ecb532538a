"""One episode: the per-trajectory step every backend runs (the local batched environment and the OpenRLHF agent).

A turn of one trajectory is three calls, so that only the tool execution is batched::

    pending = episode.plan(traj, token_ids, logprobs, finish_reason)   # append the sampled ids, parse, apply rules
    results = episode.execute([pending, ...], retriever)               # ONE backend call per tool for the batch
    episode.render(pending, result)                                    # format, tokenize once, append (mask 0)

:class:`~openrlhf_search.env.search_env.SearchEnv` runs ``plan`` for every live trajectory, one ``execute`` for all
of them, then ``render`` for each; the OpenRLHF agent instance runs :meth:`Episode.step` (the same three calls for
one trajectory) on every turn OpenRLHF's executor hands it. Records are :class:`~.trajectory.Trajectory` /
:class:`~.trajectory.TurnRecord` on both, rewards come from :mod:`.scoring` (the format check runs once per finished
trajectory, ``Trajectory.check_format``, and the reward receives its result) and diagnostics from
:meth:`Episode.metrics` (same names on both), the CalibAdv record from ``Trajectory.to_calib_record``.

Rules (:class:`EnvConfig`): ``max_turns`` counts model generations (the answering one included);
``max_tokens_per_turn`` caps one generation; ``max_obs_tokens`` caps one observation's body; ``max_total_tokens``
caps prompt + response (OpenRLHF: ``--data.max_len``); ``max_response_tokens`` optionally caps the response. With
``forbid_search_on_last_turn`` the observation before the last turn tells the model to answer, and a tool call on
the last turn is recorded but not executed. An invalid action gets the template's corrective message unless the
generation ended the model's turn (its last id is an EOS id, or the engine reports ``finish_reason="eos"``) and
``end_on_eos`` is set: then the trajectory is done (``stop``). An observation is shrunk to fit the remaining budget;
when it, or the next turn's ``min_turn_tokens``, no longer fits, the trajectory ends with ``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from openrlhf_search.env.actions import Action, parse_action
from openrlhf_search.env.chat import chat_observation_format
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.env.observation import special_token_strings
from openrlhf_search.env.protocol import substring_exact_match
from openrlhf_search.env.scoring import score_trajectory
from openrlhf_search.env.templates import PromptTemplate, get_template, with_tools
from openrlhf_search.env.tools import RenderContext, Tool, get_tools, turn_is_repeated
from openrlhf_search.env.trajectory import Trajectory, TurnRecord

__all__ = ["EnvConfig", "Episode", "PendingCall", "score_trajectory", "EPISODE_METRICS", "reward_metric_names"]

EPISODE_METRICS = (
    "search/num_turns",
    "search/num_invalid",
    "search/answered",
    "search/truncated",
    "search/valid_format",
    "search/retrieval_hit",
)
"""Per-trajectory diagnostics of every episode (each tool adds its own, :meth:`Tool.metric_names`, and the reward
the metrics it declares, :func:`reward_metric_names`)."""


def reward_metric_names(reward) -> list[str]:
    """``search/<key>`` for every metric ``reward`` declares (``Reward.metrics``; none for None)."""
    return [f"search/{k}" for k in getattr(reward, "metrics", ())]


@dataclass
class PendingCall:
    """A tool call :meth:`Episode.plan` found; :meth:`Episode.execute` runs it, :meth:`Episode.render` shows it."""

    traj: Trajectory
    turn: TurnRecord
    tool: Tool
    args: dict
    turn_ended: bool
    """The model's generation ended its chat turn (EOS): the observation does not need the template's
    ``close_turn`` prefix."""


class Episode:
    """The rules of one trajectory's turns (see the module docstring); stateless across trajectories."""

    def __init__(self, tokenizer, template: str | PromptTemplate = "search_r1", cfg: EnvConfig | None = None,
                 eos_token_ids: Sequence[int] | None = None):
        """
        Args:
            tokenizer: a Hugging Face tokenizer (``encode``/``decode``; chat template optional).
            template: a :class:`PromptTemplate` or a name/path for :func:`get_template`.
            cfg: limits and tools; :class:`EnvConfig` defaults if None.
            eos_token_ids: ids that end a chat turn (default: the tokenizer's ``eos_token_id``).
        """
        self.tokenizer = tokenizer
        self.cfg = (cfg or EnvConfig()).check()
        self.tools: list[Tool] = get_tools(self.cfg.tools, self.cfg)
        self.tools_by_name = {t.name: t for t in self.tools}
        self.template = with_tools(get_template(template), self.tools)
        self.chat_format = None
        """The measured :class:`~openrlhf_search.env.chat.ChatObservationFormat` (templates with ``obs_role``)."""
        tpl = self.template
        if tpl.obs_role and tpl.use_chat_template and getattr(tokenizer, "chat_template", None):
            try:
                self.chat_format = chat_observation_format(tokenizer, tpl.messages("probe question"), tpl.obs_role,
                                                           getattr(tokenizer, "eos_token", None),
                                                           dict(tpl.chat_kwargs))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"template {tpl.name!r} (obs_role={tpl.obs_role!r}): {exc}") from exc
            self.template = tpl.with_chat_format(self.chat_format)
        self.specials = special_token_strings(tokenizer)
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
        self.eos_token_ids: set[int] = {int(i) for i in eos_token_ids}

    # --------------------------------------------------------------------------------------------- basics
    @property
    def protocol(self) -> str:
        return self.template.protocol

    def tool_names(self) -> list[str]:
        return [t.name for t in self.tools]

    def stop_strings(self) -> list[str]:
        """Stop strings of every generation (EOS is the engine's own stop)."""
        return list(self.template.stop)

    def encode(self, text: str) -> list[int]:
        """Tokenize environment text (prompt, observation) without adding special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def check_retriever(self, retriever) -> None:
        """Raise naming the tool if ``retriever`` cannot serve one of the configured tools."""
        for t in self.tools:
            t.check_retriever(retriever)

    def new_trajectory(self, prompt_ids: Sequence[int], meta: dict | None = None) -> Trajectory:
        """A trajectory for ``prompt_ids``; finished at once (``max_length``) if the prompt leaves no room."""
        meta = dict(meta or {})
        meta.setdefault("protocol", self.protocol)
        meta.setdefault("tools", self.tool_names())
        traj = Trajectory(prompt_ids=list(prompt_ids), meta=meta)
        if self.room(traj) < 1:
            traj.finish_reason = "max_length"
        return traj

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

    def ended_turn(self, token_ids: Sequence[int], finish_reason: str | None) -> bool:
        """Whether a generation ended the model's chat turn: its last id is an EOS id (vLLM and our engines keep
        the EOS id in the output) or the engine says ``eos``."""
        return (bool(token_ids) and int(token_ids[-1]) in self.eos_token_ids) or finish_reason == "eos"

    # ------------------------------------------------------------------------------------------ the step
    def plan(self, traj: Trajectory, token_ids: Sequence[int], logprobs: Sequence[float] | None = None,
             finish_reason: str | None = None) -> PendingCall | None:
        """Append one generation and apply the rules; returns the tool call to execute, or None."""
        if traj.done:
            raise ValueError("Episode.plan: the trajectory is already finished")
        ids = [int(x) for x in token_ids]
        start, end = traj.append(ids, is_model=True, logprobs=logprobs)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        action = parse_action(text, self.protocol, tools=self.tools)
        turn = TurnRecord(index=len(traj.turns), model_span=(start, end), action=action.kind, text=text,
                          error=action.error, gen_finish_reason=finish_reason)
        traj.turns.append(turn)
        turn_ended = self.ended_turn(ids, finish_reason)
        return self._apply(traj, turn, action, turn_ended)

    def execute(self, pending: Sequence[PendingCall], retriever) -> list[Any]:
        """Run the pending calls: one :meth:`Tool.execute` per tool over all of them; results in order."""
        results: list[Any] = [None] * len(pending)
        for tool in self.tools:
            idx = [i for i, p in enumerate(pending) if p.tool is tool]
            if idx:
                for i, r in zip(idx, tool.execute([pending[i].args for i in idx], retriever)):
                    results[i] = r
        return results

    def render(self, p: PendingCall, result: Any) -> None:
        """Show one call's result: tool rendering within the remaining budget, template wrapper, append."""
        traj, turn, c = p.traj, p.turn, self.cfg
        hint = self._hint(traj)
        overhead = len(self.encode(self.template.wrap_observation("", p.turn_ended, hint)))
        budget = min(c.max_obs_tokens, self.room(traj) - overhead - c.min_turn_tokens)
        shown = p.tool.render(p.args, result, RenderContext(self.tokenizer, budget, self.specials))
        turn.doc_ids, turn.scores = list(shown.doc_ids), list(shown.scores)
        if p.tool.calib_credit:
            turn.repeated = turn_is_repeated(turn.queries, turn.doc_ids, turn.text, traj.turns[:-1])
        if budget <= 0:
            traj.finish_reason = "max_length"
            return
        self._insert(traj, turn, self.template.wrap_observation(shown.body, p.turn_ended, hint))

    def step(self, traj: Trajectory, token_ids: Sequence[int], logprobs: Sequence[float] | None,
             finish_reason: str | None, retriever) -> str:
        """:meth:`plan`, :meth:`execute` and :meth:`render` for one trajectory; returns the inserted text."""
        before = len(traj.turns)
        pending = self.plan(traj, token_ids, logprobs, finish_reason)
        if pending is not None:
            self.render(pending, self.execute([pending], retriever)[0])
        return traj.turns[before].obs_text if len(traj.turns) > before else ""

    # ------------------------------------------------------------------------------------------- metrics
    def metric_names(self, reward=None) -> list[str]:
        """The diagnostic names :meth:`metrics` returns (fixed for a given tool list and reward)."""
        return list(EPISODE_METRICS) + [n for t in self.tools for n in t.metric_names()] + reward_metric_names(reward)

    def metrics(self, traj: Trajectory, info: dict, reward=None) -> dict[str, float]:
        """Per-trajectory diagnostics: the episode's own, each tool's, and the metrics ``reward`` declares, read
        from ``info`` (its info dict for this trajectory); a metric no reward declares is not logged."""
        finish = traj.finish_reason or "max_length"
        golds = traj.meta.get("golden_answers", [])
        retrieved = traj.retrieved_text
        out = {
            "search/num_turns": float(len(traj.turns)),
            "search/num_invalid": float(sum(t.action == "invalid" for t in traj.turns)),
            "search/answered": float(finish == "answer"),
            "search/truncated": float(finish == "max_length"),
            "search/valid_format": float(traj.valid_format),
            "search/retrieval_hit": float(bool(retrieved) and substring_exact_match(retrieved, golds) > 0),
        }
        for t in self.tools:
            out.update(t.metrics(traj.turns))
        for key, name in zip(getattr(reward, "metrics", ()), reward_metric_names(reward)):
            out[name] = float(info[key])
        return out

    # ----------------------------------------------------------------------------------------- internals
    def _is_last_turn(self, traj: Trajectory) -> bool:
        return len(traj.turns) >= self.cfg.max_turns

    def _apply(self, traj: Trajectory, turn: TurnRecord, action: Action, turn_ended: bool) -> PendingCall | None:
        last = self._is_last_turn(traj)
        if action.kind == "answer":
            traj.answer = action.answer
            traj.finish_reason = "answer"
            return None
        tool = self.tools_by_name.get(action.kind)
        if tool is not None:
            tool.record(turn, action.args)
            turn.args = dict(action.args)
            if last and self.cfg.forbid_search_on_last_turn:
                turn.error = f"{tool.name} is not allowed on the last turn"
                traj.finish_reason = "max_turns"
                return None
            return PendingCall(traj, turn, tool, dict(action.args), turn_ended)
        # invalid
        if turn_ended and self.cfg.end_on_eos:
            traj.finish_reason = "stop"
        elif last:
            traj.finish_reason = "max_turns"
        else:
            self._insert(traj, turn, self.template.feedback(turn_ended, hint=self._hint(traj)))
        return None

    def _hint(self, traj: Trajectory) -> bool:
        """Whether to show the last-turn hint: the next turn is the last one and tool calls are forbidden there."""
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
