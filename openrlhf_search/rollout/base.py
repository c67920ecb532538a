"""The rollout-engine contract: token ids in, token ids + sampling log-probs out.

Every engine (HF transformers, vLLM) is *token-in / token-out*: the environment tokenizes each observation once
and the engine continues exactly those ids, so what the trainer scores is exactly what was sampled (Search-R1
re-tokenizes the whole text every turn, which drifts; we never do).

Stop strings follow one rule across engines: generation of a row ends right after the token whose decoding
completes a stop string (that token is kept, even if it carries characters after the stop string), or after EOS
(kept), or after ``max_new_tokens`` (``finish_reason="length"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of continuations."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per row (per turn in the multi-turn runner)."""
    temperature: float = 1.0
    """Softmax temperature; ``0`` means greedy decoding (log-probs are then those of the untempered policy)."""
    top_p: float = 1.0
    """Nucleus sampling mass; ``1.0`` disables it."""
    stop_strings: tuple[str, ...] = ()
    """Generation of a row stops after the token that completes any of these strings (the token is kept)."""
    seed: int | None = None
    """Seed for this call's sampler (``None``: continue the engine's own generator)."""


@dataclass
class Generation:
    """One continuation."""

    token_ids: list[int]
    """The sampled ids, exactly as sampled (never re-tokenized)."""
    logprobs: list[float]
    """Log-probability of each sampled id under the sampling distribution (temperature applied, before top-p)."""
    finish_reason: str
    """``"stop"`` (a stop string matched), ``"eos"`` (the EOS token) or ``"length"`` (``max_new_tokens`` hit)."""
    stop_string: str | None = None
    """The stop string that ended the row, if any."""
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """What the multi-turn runner needs from a generation backend."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Generation]:
        """Continue every prompt (a list of token ids) once; one :class:`Generation` per prompt, in order."""
        ...

    def update_weights(self, model) -> None:
        """Make the engine sample from ``model``'s current weights (called after each optimizer step)."""
        ...


def match_stop_string(text: str, stop_strings: tuple[str, ...] | list[str], new_chars: int) -> str | None:
    """Return the stop string completed by the last ``new_chars`` characters of ``text``, else ``None``.

    A stop string counts only if it ends inside the newly decoded characters, so a stop string that was already
    complete before (impossible in practice, since we stop at once) is never matched twice.
    """
    if not stop_strings or new_chars <= 0:
        return None
    for s in stop_strings:
        # The match must end within the new characters: search in the window that can contain such an end.
        window = text[max(0, len(text) - new_chars - len(s) + 1) :]
        if s in window:
            return s
    return None
