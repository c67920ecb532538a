"""Token-in / token-out trajectories of the multi-turn search loop.

A :class:`Trajectory` holds the exact ids the engine sampled (never re-tokenized) interleaved with the ids of the
observations the environment inserted (tokenized once, when inserted). ``action_mask`` is 1 on model tokens and 0
on observation tokens; ``logprobs`` holds the engine's log-probability of every model token (0 for observation
tokens). Everything indexes the *response* axis: position 0 is the first token after the prompt.

Why token-in/token-out: Search-R1 decodes the whole context to text and re-tokenizes it every turn; BPE merges
across turn boundaries then differ from what was sampled, so the trainer scores token sequences the policy never
produced (users report the drift as a mismatch between rollout and training log-probs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from openrlhf_search.env.protocol import f1_score, format_error
from openrlhf_search.env.tools import TOOLS, tool_names

__all__ = ["TurnRecord", "Trajectory"]


@dataclass
class TurnRecord:
    """One model turn and the observation that followed it (if any)."""

    index: int
    """0-based turn number."""
    model_span: tuple[int, int]
    """``[start, end)`` of this turn's sampled tokens in ``response_ids``."""
    action: str
    """Parsed action kind: a tool name (``search``, ``open``...), ``answer`` or ``invalid``."""
    text: str = ""
    """The decoded model tokens of this turn (used for parsing only; the ids are the truth)."""
    queries: list[str] = field(default_factory=list)
    """Queries sent to the retriever (empty if none were sent)."""
    doc_ids: list[str] = field(default_factory=list)
    """Ids of the documents shown in the observation, in display order (deduplicated across queries)."""
    scores: list[float] = field(default_factory=list)
    """Retriever scores aligned with ``doc_ids``."""
    obs_span: tuple[int, int] | None = None
    """``[start, end)`` of the inserted observation in ``response_ids`` (None if nothing was inserted)."""
    obs_text: str = ""
    """The inserted observation text (retrieval results or the corrective message)."""
    error: str | None = None
    """Why the action was invalid or not executed (e.g. a search on the last turn)."""
    repeated: bool = False
    """A search turn that adds nothing new: its queries or its documents all appeared in earlier turns, or its
    reasoning text repeats an earlier turn's (CalibAdv gives such turns no calibration credit)."""
    gen_finish_reason: str | None = None
    """The engine's finish reason for this generation when it reports one (``stop``, ``length``...)."""
    args: dict = field(default_factory=dict)
    """The tool call's parsed arguments (``search``: ``{"queries": [...]}``; ``open``: ``{"target", "page"}``)."""


@dataclass
class Trajectory:
    """A rollout: prompt, response ids with masks and log-probs, and one record per turn."""

    prompt_ids: list[int]
    """Prompt token ids (rendered template)."""
    response_ids: list[int] = field(default_factory=list)
    """Model tokens exactly as sampled, interleaved with observation tokens (tokenized once)."""
    action_mask: list[int] = field(default_factory=list)
    """1 for model tokens, 0 for observation tokens; same length as ``response_ids``."""
    logprobs: list[float] = field(default_factory=list)
    """Engine log-prob of each model token, 0.0 on observation tokens; same length as ``response_ids``."""
    turns: list[TurnRecord] = field(default_factory=list)
    """One record per model turn."""
    answer: str | None = None
    """The parsed final answer (None if the trajectory ended without one)."""
    finish_reason: str | None = None
    """``answer`` | ``max_turns`` | ``max_length`` | ``stop`` (EOS without any action), None while running."""
    token_versions: list[int] | None = None
    """Asynchronous runs only (``rollout.async_producer``): per response token, the policy version that sampled it
    (``-1`` on observation tokens); ``None`` in synchronous runs, where every token comes from the current policy."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Sample fields: ``sample_id``, ``question``, ``golden_answers``, ``group_id``, ``data_source``, ``protocol``,
    ``tools``, ``prompt_text``, ``sample_index``, ``rollout_index``."""
    format_checked: bool = field(default=False, repr=False)
    """Whether :attr:`format_error` holds the format check of the finished response (:meth:`check_format`)."""
    format_error: str | None = None
    """Why the finished response breaks the protocol (None when well formed or not checked yet)."""

    @property
    def done(self) -> bool:
        """True once ``finish_reason`` is set."""
        return self.finish_reason is not None

    @property
    def response_text(self) -> str:
        """The response as text: model turns and observations concatenated (the reward's format check reads it;
        the answer scored is :attr:`answer`)."""
        return "".join(t.text + t.obs_text for t in self.turns)

    @property
    def retrieved_text(self) -> str:
        """All retrieval observations (the environment's, never the model's own ``<information>``)."""
        return "\n".join(t.obs_text for t in self.turns if t.doc_ids)

    @property
    def num_searches(self) -> int:
        """Number of turns whose queries reached the retriever."""
        return sum(1 for t in self.turns if t.action == "search" and t.queries and t.error is None)

    @property
    def num_tool_calls(self) -> int:
        """Number of executed tool calls of any tool."""
        return sum(1 for t in self.turns if t.action not in ("answer", "invalid") and t.error is None)

    def check_format(self) -> str | None:
        """Why the response breaks its protocol, or None (:func:`openrlhf_search.env.protocol.format_error` with the
        protocol and tools of ``meta``); computed once when the trajectory is finished and kept (the reward, the
        metrics and the CalibAdv record all read this one result)."""
        if self.format_checked:
            return self.format_error
        tools = self.meta.get("tools") or tool_names()
        err = format_error(self.response_text, self.meta.get("protocol", "tags"), tools)
        if self.done:
            self.format_checked, self.format_error = True, err
        return err

    @property
    def valid_format(self) -> bool:
        """Whether the response follows its protocol (:meth:`check_format`)."""
        return self.check_format() is None

    def append(self, ids: list[int], is_model: bool, logprobs: list[float] | None = None) -> tuple[int, int]:
        """Append ids (model tokens with their log-probs, or observation tokens); returns their ``[start, end)``."""
        start = len(self.response_ids)
        self.response_ids.extend(ids)
        self.action_mask.extend([1 if is_model else 0] * len(ids))
        if is_model:
            lp = list(logprobs) if logprobs is not None else [0.0] * len(ids)
            if len(lp) != len(ids):
                raise ValueError(f"{len(ids)} sampled token ids but {len(lp)} log-probs")
            self.logprobs.extend(float(x) for x in lp)
        else:
            self.logprobs.extend([0.0] * len(ids))
        return start, len(self.response_ids)

    def to_calib_record(self, offset: int = 0, protocol: str | None = None):
        """The CalibAdv view of this rollout (``openrlhf_search.algorithms.calibadv.CalibRecord``), the one builder
        of every backend.

        * ``search_turns``: one ``SearchTurn(start, end, doc_ids, repeated)`` per executed call of a tool with
          ``calib_credit`` (``search``); the span is the turn's *model* tokens (end exclusive);
        * ``answer_span``: the model tokens of the turn that produced the final answer, or None;
        * ``f1``: token F1 of ``answer`` against ``meta["golden_answers"]``;
        * ``valid_format``: :attr:`valid_format` (the environment's one format check).

        Args:
            offset: added to every span. 0: the response axis (``response_ids``, the local trainer). OpenRLHF's
                action-mask axis is ``mask[1:]`` of the full sequence, i.e. ``offset = len(prompt_ids) - 1``.
            protocol: overrides ``meta["protocol"]`` for the format check.
        """
        from openrlhf_search.algorithms.calibadv import CalibRecord, SearchTurn  # imports torch

        def credited(t: TurnRecord) -> bool:
            return t.action in TOOLS and TOOLS.get(t.action).calib_credit and t.error is None

        search_turns = [
            SearchTurn(t.model_span[0] + offset, t.model_span[1] + offset, list(t.doc_ids), bool(t.repeated))
            for t in self.turns
            if credited(t)
        ]
        answer_span = None
        if self.finish_reason == "answer" and self.turns and self.turns[-1].action == "answer":
            answer_span = (self.turns[-1].model_span[0] + offset, self.turns[-1].model_span[1] + offset)
        golds = self.meta.get("golden_answers", [])
        return CalibRecord(
            search_turns=search_turns,
            answer_span=answer_span,
            f1=f1_score(self.answer, golds) if golds else 0.0,
            valid_format=self.valid_format if protocol is None else format_error(
                self.response_text, protocol, self.meta.get("tools") or tool_names()) is None,
        )

    def to_dict(self) -> dict:
        """A JSON-serializable summary (for rollout logs)."""
        return {
            "meta": {k: v for k, v in self.meta.items() if k != "prompt_text"},
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "response_length": len(self.response_ids),
            "model_tokens": sum(self.action_mask),
            "turns": [asdict(t) for t in self.turns],
        }
