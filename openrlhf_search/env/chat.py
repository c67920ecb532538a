"""Observations rendered by the tokenizer's own chat template, and the prefix-preservation check.

A template with ``obs_role`` (``qwen3_tools``: ``"tool"``) does not write chat markers itself: the observation is
the text the tokenizer's chat template adds for one ``{"role": obs_role, "content": body}`` message after the
model's turn, plus the generation prompt of the next turn. That text is the delta::

    render(history + [assistant, tool message], add_generation_prompt=True), from the end of the assistant's text

measured once per tokenizer with probe strings (:func:`chat_observation_format`) and split into

* ``close_turn``: the end-of-turn token the template writes after an assistant message (``<|im_end|>``), inserted
  only when the model's generation did not end with it (it stopped at ``</tool_call>``);
* ``prefix`` / ``suffix``: the text around the tool result (SmolLM2: ``\\n<|im_start|>tool\\n`` / ``<|im_end|>\\n
  <|im_start|>assistant\\n``; Qwen3: the result inside ``<|im_start|>user\\n<tool_response>\\n...</tool_response>``).

The sampled tokens are always kept as the truth: the environment appends deltas to them and never re-renders the
history, so the context of turn k+1 starts with the exact tokens of turn k by construction, whatever the chat
template does. :func:`check_prefix_preserving` says whether the chat template itself agrees, i.e. whether
``apply_chat_template`` of the finished conversation gives the same text. Templates that rewrite earlier assistant
turns (Qwen3's re-formats or drops ``<think>`` blocks, and adds an empty ``<think></think>`` to the generation prompt
only) do not: then what the model trained on is what it saw while generating, but a server that re-renders the
history with the chat template would show it something else (see docs/environment.md, "Templates").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChatObservationFormat", "render_chat", "chat_observation_format", "check_prefix_preserving"]

PROBE_CALL = "PROBECALLqz7"
"""Stands for the model's tool call in probe conversations (plain letters: no template rewrites it)."""
PROBE_RESULT = "PROBERESULTqz7"
"""Stands for the tool result in probe conversations."""
PROBE_THINK = "<think>probe reasoning</think>"
"""A reasoning block as a model may write it (no newlines around the text): the prefix-preservation probe."""


@dataclass(frozen=True)
class ChatObservationFormat:
    """How a tokenizer's chat template renders one observation message (see the module docstring)."""

    role: str
    """The message role observations are rendered as (``tool``)."""
    close_turn: str
    """End-of-turn text the template writes after an assistant message, when the model did not write it."""
    prefix: str
    """Text between the end of the model's turn and the observation body."""
    suffix: str
    """Text after the body, up to and including the next turn's generation prompt."""
    prefix_preserving: bool
    """Whether ``apply_chat_template`` of the finished conversation reproduces the environment's token text."""
    reason: str = ""
    """Why not (empty when prefix-preserving)."""


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool, chat_kwargs: dict | None = None) -> str:
    """``tokenizer.apply_chat_template`` as text, errors naming the template and the messages' roles."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            **(chat_kwargs or {}))
    except Exception as exc:  # jinja's raise_exception, unknown roles, missing keys
        roles = [m["role"] for m in messages]
        raise ValueError(f"the tokenizer's chat template cannot render messages with roles {roles}: {exc}") from exc
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}, not str")
    return out


def _after(text: str, probe: str, what: str) -> int:
    at = text.find(probe)
    if at < 0:
        raise ValueError(f"the tokenizer's chat template drops the {what} (probe {probe!r} not in {text[-300:]!r})")
    return at + len(probe)


def check_prefix_preserving(tokenizer, messages: list[dict], role: str = "tool",
                            chat_kwargs: dict | None = None) -> tuple[bool, str]:
    """Whether the chat template renders an episode's turns as pure appends: ``(ok, reason)``.

    Renders ``messages`` (system/user), then two rounds of an assistant turn (reasoning in ``<think>`` and a call)
    followed by a ``role`` message, each with the generation prompt, and checks that every render starts with the
    previous one plus the assistant text verbatim.
    """
    history = list(messages)
    prev = render_chat(tokenizer, history, True, chat_kwargs)
    for k in (1, 2):
        reply = f"{PROBE_THINK}{PROBE_CALL}{k}"
        history = history + [{"role": "assistant", "content": reply}, {"role": role, "content": f"{PROBE_RESULT}{k}"}]
        cur = render_chat(tokenizer, history, True, chat_kwargs)
        if not cur.startswith(prev):
            return False, ("the generation prompt is not kept once the assistant message is rendered (e.g. an empty "
                           "<think></think> only in the generation prompt)")
        if not cur[len(prev):].startswith(reply):
            return False, ("an assistant message is rewritten when rendered (e.g. its <think> block re-formatted "
                           "or dropped)")
        prev = cur
    return True, ""


def chat_observation_format(tokenizer, messages: list[dict], role: str = "tool", eos_text: str | None = None,
                            chat_kwargs: dict | None = None) -> ChatObservationFormat:
    """Measure how the tokenizer's chat template renders a ``role`` message after an assistant turn.

    Args:
        tokenizer: a tokenizer with a ``chat_template``.
        messages: the conversation before the model's first turn (the template's system/user messages).
        role: the observation role (``tool``).
        eos_text: the end-of-turn token string the model emits (``tokenizer.eos_token``): the part of the
            template's turn ending that becomes :attr:`ChatObservationFormat.close_turn`.
        chat_kwargs: extra ``apply_chat_template`` arguments (``enable_thinking``).
    """
    turn = list(messages) + [{"role": "assistant", "content": PROBE_CALL}]
    full = render_chat(tokenizer, turn + [{"role": role, "content": PROBE_RESULT}], True, chat_kwargs)
    i = _after(full, PROBE_CALL, "assistant message")
    rest = full[i:]
    j = _after(rest, PROBE_RESULT, f"{role!r} message's content") - len(PROBE_RESULT)
    before, after = rest[:j], rest[j + len(PROBE_RESULT):]
    close = eos_text if eos_text and before.startswith(eos_text) else ""
    ok, reason = check_prefix_preserving(tokenizer, messages, role, chat_kwargs)
    return ChatObservationFormat(role=role, close_turn=close, prefix=before[len(close):], suffix=after,
                                 prefix_preserving=ok, reason=reason)
