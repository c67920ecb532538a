"""The agent protocol's grammar and answer normalisation (a leaf module: the standard library and the registry).

Everything that reads the model's text as protocol is defined here once, and imported by the action parser
(:mod:`.actions`), the observation neutralizer (:mod:`.observation`), the tools, the trajectory record and the
rewards:

* **Tags.** ``<name>`` / ``</name>``, matched case-insensitively with optional spaces inside the brackets
  (``< /Answer >``): :func:`tag_pattern`. The protocol tag names are :data:`PROTOCOL_TAG_NAMES` (tools add theirs).
* **Block grammar** of a finished response, per protocol: :func:`format_error`.
* **Answers.** :func:`extract_answer` (the last complete ``<answer>`` block of a text that did not go through the
  environment) and the SQuAD answer metrics (Rajpurkar et al., 2016; the same normalisation as Search-R1, FlashRAG
  and CalibAdv):

  - :func:`normalize_answer`: lower case, drop punctuation, drop the articles ``a|an|the``, collapse whitespace;
  - :func:`exact_match`: 1 if the normalised prediction equals one normalised golden answer;
  - :func:`substring_exact_match` ("subEM", "cover EM"): 1 if a normalised golden answer occurs inside the
    normalised prediction, token-aligned (``"1984"`` does not match ``"19845"``);
  - :func:`f1_score`: bag-of-tokens F1 (``P = |common| / |pred|``, ``R = |common| / |gold|``), maximised over the
    golden answers.
* **Examples in prompts.** :func:`action_pairs` finds the complete action pairs a text holds (a prompt's instruction
  must hold none: a model that echoes it would otherwise act on the example).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from openrlhf_search.registry import Registry

__all__ = [
    "normalize_answer",
    "exact_match",
    "substring_exact_match",
    "f1_score",
    "tag_pattern",
    "PROTOCOL_TAG_NAMES",
    "TOOLS",
    "tag_names",
    "OBSERVATION_TAGS",
    "any_tag_re",
    "ANY_TAG_RE",
    "extract_answer",
    "format_error",
    "action_pairs",
]

# ------------------------------------------------------------------------------------------- answer normalisation
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, remove punctuation and articles, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    s = str(s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_list(golds: str | Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    return [str(g) for g in golds]


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if ``normalize_answer(pred)`` equals the normalized form of any golden answer, else 0.0.

    ``pred=None`` (no answer) scores 0. ``golds`` may be a single string or a list of strings.
    """
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in _as_list(golds)))


def substring_exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if a normalized golden answer is a token-aligned substring of the normalized prediction.

    Empty golden answers never match (otherwise every prediction would).
    """
    if pred is None:
        return 0.0
    p = f" {normalize_answer(pred)} "
    for g in _as_list(golds):
        ng = normalize_answer(g)
        if ng and f" {ng} " in p:
            return 1.0
    return 0.0


def _f1_single(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: str | Sequence[str]) -> float:
    """Token-level F1 (SQuAD) between the prediction and each golden answer; the maximum is returned.

    Both sides are normalized with :func:`normalize_answer` and split on whitespace. Two empty strings score 1,
    one empty side scores 0; ``pred=None`` scores 0.
    """
    if pred is None:
        return 0.0
    pt = normalize_answer(pred).split()
    return max((_f1_single(pt, normalize_answer(g).split()) for g in _as_list(golds)), default=0.0)


# ---------------------------------------------------------------------------------------------------------- tags
def tag_pattern(name: str, closing: bool) -> str:
    """Regex source for an opening or closing protocol tag ``<name>`` / ``</name>`` (case and space tolerant)."""
    return r"<\s*" + (r"/\s*" if closing else "") + re.escape(name) + r"\s*>"


PROTOCOL_TAG_NAMES = ("think", "search", "open", "information", "answer", "tool_call", "tool_response")
"""Every tag name of both protocols with the built-in tools (registered tools add their own names)."""

TOOLS: Registry[type] = Registry("tool")
"""Tool classes by name (:class:`openrlhf_search.env.tools.Tool`; built-ins ``search`` and ``open``). It lives here
because a registered tool's name is a protocol tag: the neutralizer escapes every one (:func:`tag_names`)."""


def tag_names() -> tuple[str, ...]:
    """The protocol tags plus the name of every registered tool."""
    return tuple(dict.fromkeys(PROTOCOL_TAG_NAMES + tuple(TOOLS.names())))

OBSERVATION_TAGS = {"tags": "information", "tool_call": "tool_response"}
"""The observation block of each protocol (``tags``: Search-R1's; ``tool_call``: Qwen's JSON tool calls)."""


@lru_cache(maxsize=32)
def any_tag_re(names: tuple[str, ...]) -> re.Pattern:
    """Matches any opening or closing tag of ``names``."""
    return re.compile("|".join(tag_pattern(n, c) for n in names for c in (False, True)), re.I)


ANY_TAG_RE = any_tag_re(PROTOCOL_TAG_NAMES)
"""Matches any opening or closing tag of :data:`PROTOCOL_TAG_NAMES`."""

@lru_cache(maxsize=64)
def _pair_re(name: str) -> re.Pattern:
    """A complete ``<name>body</name>`` pair whose body holds no other opening ``<name>`` (the innermost one:
    ``"<answer> tags. <answer>x</answer>"`` yields ``"x"``)."""
    opening = tag_pattern(name, False)
    return re.compile(opening + r"((?:(?!" + opening + r").)*?)" + tag_pattern(name, True), re.S | re.I)


_ANSWER_RE = _pair_re("answer")


def extract_answer(response_text: str) -> str | None:
    """The stripped content of the last complete ``<answer>...</answer>`` in the response, or None.

    For texts that did not go through the environment (demonstrations, evaluation files): a trajectory's answer is
    the one the environment accepted (``Trajectory.answer``). An unclosed final ``<answer>`` does not count, nor
    does an empty one (``<answer></answer>``, how instructions name the tag; the action parser rejects it too).
    """
    matches = [m.strip() for m in _ANSWER_RE.findall(response_text or "") if m.strip()]
    return matches[-1] if matches else None


# Chat scaffolding that may legitimately appear between the model's blocks in a decoded response (turn markers of
# the tool-call protocol, an EOS at the very end): removed before the structural check.
_CHAT_NOISE = re.compile(r"<\|im_start\|>\s*(?:system|user|assistant|tool)?\s*|<\|[^|<>\s]{1,40}\|>|</s>|<eos>")


def call_tags(protocol: str, tools: Sequence[str]) -> list[str]:
    """The tags that are calls in ``protocol``: the tool names (``tags``) or ``tool_call``."""
    if protocol not in OBSERVATION_TAGS:
        raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(OBSERVATION_TAGS)}")
    if protocol == "tool_call":
        return ["tool_call"]
    return [tools] if isinstance(tools, str) else list(tools)


def format_error(response_text: str, protocol: str, tools: Sequence[str]) -> str | None:
    """Why ``response_text`` breaks the protocol, or None when it is well formed.

    Grammar (whitespace allowed between blocks, nothing else)::

        response := ( [think] call obs )* [think] answer
        tags protocol:      call = <search>..</search> | <open>..</open> | ..  obs = <information>..</information>
        tool_call protocol: call = <tool_call>..</tool_call>                  obs = <tool_response>..</tool_response>

    ``tools``: the tool tags that count as calls in the ``tags`` protocol (the environment's ``EnvConfig.tools``).
    Blocks may not nest, ``answer`` appears exactly once and last. Chat turn markers (``<|im_start|>user``,
    ``<|im_end|>``) are ignored so the tool-call protocol's turn structure and a final EOS are accepted.
    """
    calls, obs = call_tags(protocol, tools), OBSERVATION_TAGS[protocol]
    names = ["think", *calls, obs, "answer"]
    text = _CHAT_NOISE.sub(" ", response_text or "")
    block = _block_re(tuple(names))
    any_tag = any_tag_re(tuple(names))
    seq: list[str] = []
    pos = 0
    for m in block.finditer(text):
        if text[pos : m.start()].strip():
            return f"text outside blocks near {text[pos : m.start()].strip()[:40]!r}"
        kind = next(n for n in names if m.group(n) is not None)
        if any_tag.search(m.group(f"{kind}_body")):
            return f"nested tag inside <{kind}>"
        seq.append(kind)
        pos = m.end()
    if text[pos:].strip():
        return f"text outside blocks near {text[pos:].strip()[:40]!r}"
    if not seq or seq[-1] != "answer":
        return "the response does not end with an <answer> block"
    if seq.count("answer") != 1:
        return "more than one <answer> block"
    prev = None
    for kind in seq:
        if kind == "think" and prev == "think":
            return "two <think> blocks in a row"
        if kind == obs and prev not in calls:
            return f"<{obs}> without a preceding {'/'.join(f'<{c}>' for c in calls)}"
        if (kind in calls or kind == "answer") and prev in calls:
            return f"<{prev}> not followed by <{obs}>"
        prev = kind
    return None


@lru_cache(maxsize=32)
def _block_re(names: tuple[str, ...]) -> re.Pattern:
    return re.compile(
        "|".join(rf"(?P<{n}>{tag_pattern(n, False)}(?P<{n}_body>.*?){tag_pattern(n, True)})" for n in names),
        re.S | re.I,
    )


def action_pairs(text: str, names: Sequence[str]) -> list[str]:
    """Every complete ``<name> body </name>`` pair of ``names`` in ``text`` whose body is not blank.

    The action parser acts on such a pair (an empty body is an invalid action), so a prompt's instructions and
    corrective messages must hold none: a model that copies them would act on the example. Conservative on purpose
    (a pair inside a ``<think>`` block counts too); each pair is reported from its innermost opening tag.
    """
    return [m.group(0) for n in names for m in _pair_re(n).finditer(text or "") if m.group(1).strip()]
