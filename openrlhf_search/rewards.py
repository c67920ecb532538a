"""Outcome rewards for search agents: SQuAD-style answer metrics and a format-aware reward.

Metrics (Rajpurkar et al., 2016, SQuAD evaluation script; the same normalization is used by Search-R1,
FlashRAG and CalibAdv):

* ``normalize_answer``: lower-case, drop punctuation, drop the articles ``a|an|the``, collapse whitespace.
* ``exact_match``: 1 if the normalized prediction equals one normalized golden answer.
* ``substring_exact_match`` ("subEM", "cover EM"): 1 if a normalized golden answer occurs inside the
  normalized prediction (token-aligned, so ``"1984"`` does not match ``"19845"``).
* ``f1_score``: bag-of-tokens F1 between prediction and gold, maximised over the golden answers.
  ``P = |common| / |pred|``, ``R = |common| / |gold|``, ``F1 = 2PR / (P + R)``.

Every reward function receives the answer **the environment accepted** (``Trajectory.answer``; ``None`` when the
rollout gave none) as the required keyword ``answer``: an ``<answer>`` block the action parser rejected (inside a
model-written ``<information>`` block, after the first action of a turn) earns nothing, on every backend. The
response text is still passed for the format check; :func:`extract_answer` (the last complete ``<answer>`` block
of a text) is a helper for texts that did not go through the environment.

Format-aware reward (Search-R1's structured reward, rewritten with one linear rule). With ``m`` in [0, 1] the
answer metric (EM or F1) and ``valid`` the format check of :func:`is_valid_format`::

    valid:    r = wrong_valid   + (correct_valid   - wrong_valid)   * m
    invalid:  r = wrong_invalid + (correct_invalid - wrong_invalid) * m
    r += retrieval_bonus   if m < 1 and a golden answer occurs in the (environment-provided) retrieved text
    r  = min(r, correct_valid)

so for EM the four cases are exactly "valid & correct = 1", "correct but invalid format = 0.8", "valid but wrong
= 0.1", "invalid and wrong = 0" (defaults). The retrieval bonus uses the text the *environment* retrieved, never
the model's own ``<information>`` blocks, so it cannot be gamed by writing fake evidence.

Pure Python on purpose (no torch import): the reward runs inside rollout workers and the HTTP-free tests.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from openrlhf_search.registry import Registry

__all__ = [
    "normalize_answer",
    "exact_match",
    "substring_exact_match",
    "f1_score",
    "extract_answer",
    "is_valid_format",
    "format_error",
    "FormatRewardWeights",
    "RewardFn",
    "REWARDS",
    "register_reward",
    "get_reward_fn",
    "available_rewards",
]

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


# ----------------------------------------------------------------------------------------------------- answer & format
# Tag matching is deliberately lenient about case and inner whitespace (``< /Answer >``), the same way the action
# parser and the observation neutralizer are (openrlhf_search.env.actions uses these helpers).
def tag_pattern(name: str, closing: bool) -> str:
    """Regex source for an opening or closing protocol tag ``<name>`` / ``</name>`` (case and space tolerant)."""
    return r"<\s*" + (r"/\s*" if closing else "") + re.escape(name) + r"\s*>"


# The body may not contain another opening tag: "<answer> tags. <answer>x</answer>" yields "x" (innermost).
_ANSWER_RE = re.compile(
    tag_pattern("answer", False) + r"((?:(?!" + tag_pattern("answer", False) + r").)*?)" + tag_pattern("answer", True),
    re.S | re.I,
)


def extract_answer(response_text: str) -> str | None:
    """The stripped content of the last complete ``<answer>...</answer>`` in the response, or None.

    Pass the response only (not the prompt, whose instructions show an example answer tag). An unclosed final
    ``<answer>`` does not count: Search-R1 and our environment both require the closing tag.
    """
    matches = _ANSWER_RE.findall(response_text or "")
    if not matches:
        return None
    return matches[-1].strip()


# Chat scaffolding that may legitimately appear between the model's blocks in a decoded response (turn markers of
# the tool-call protocol, an EOS at the very end): removed before the structural check.
_CHAT_NOISE = re.compile(r"<\|im_start\|>\s*(?:system|user|assistant|tool)?\s*|<\|[^|<>\s]{1,40}\|>|</s>|<eos>")

# Block grammar per protocol. ``think`` may precede any action; observation blocks must follow the call they answer.
_PROTOCOLS: dict[str, str] = {"tags": "information", "tool_call": "tool_response"}
"""Observation block of each protocol."""


def _call_tags(protocol: str, tools) -> list[str]:
    if protocol == "tool_call":
        return ["tool_call"]
    if tools is None:
        from openrlhf_search.env.tools import tool_names

        return sorted(tool_names(), key=lambda n: (n != "search", n))  # the first tool first in messages
    return [tools] if isinstance(tools, str) else list(tools)


def format_error(response_text: str, protocol: str = "tags", tools=None) -> str | None:
    """Why ``response_text`` breaks the protocol, or None when it is well formed.

    Grammar (whitespace allowed between blocks, nothing else)::

        response := ( [think] call obs )* [think] answer
        tags protocol:      call = <search>..</search> | <open>..</open> | ..  obs = <information>..</information>
        tool_call protocol: call = <tool_call>..</tool_call>                  obs = <tool_response>..</tool_response>

    ``tools``: the tool tags that count as calls in the ``tags`` protocol (the environment's ``EnvConfig.tools``);
    ``None`` accepts every registered tool (the environment only inserts an observation after a call it ran, so a
    tag it does not know is followed by its corrective message, i.e. text outside blocks, and fails anyway).
    Blocks may not nest, ``answer`` appears exactly once and last. Chat turn markers (``<|im_start|>user``,
    ``<|im_end|>``) are ignored so the tool-call protocol's turn structure and a final EOS are accepted.
    """
    if protocol not in _PROTOCOLS:
        raise KeyError(f"unknown protocol {protocol!r}; valid: {sorted(_PROTOCOLS)}")
    calls, obs = _call_tags(protocol, tools), _PROTOCOLS[protocol]
    names = ["think", *calls, obs, "answer"]
    text = _CHAT_NOISE.sub(" ", response_text or "")
    block = re.compile(
        "|".join(rf"(?P<{n}>{tag_pattern(n, False)}(?P<{n}_body>.*?){tag_pattern(n, True)})" for n in names),
        re.S | re.I,
    )
    any_tag = re.compile("|".join(tag_pattern(n, c) for n in names for c in (False, True)), re.I)
    seq: list[str] = []
    pos = 0
    for m in block.finditer(text):
        if text[pos : m.start()].strip():
            return f"text outside blocks near {text[pos : m.start()].strip()[:40]!r}"
        kind = next(n for n in names if m.group(n) is not None)
        body = m.group(f"{kind}_body")
        if any_tag.search(body):
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


def is_valid_format(response_text: str, protocol: str = "tags", tools=None) -> bool:
    """True when the response follows the protocol (see :func:`format_error` for the grammar and ``tools``)."""
    return format_error(response_text, protocol, tools) is None


# ---------------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class FormatRewardWeights:
    """Weights of the format-aware reward (see the module docstring for the formula)."""

    correct_valid: float = 1.0
    """Reward of a correct answer in a well-formed response (the maximum)."""
    correct_invalid: float = 0.8
    """Reward of a correct answer whose response breaks the protocol (less than ``correct_valid``)."""
    wrong_valid: float = 0.1
    """Reward of a wrong (or missing) answer in a well-formed response: a little credit for the format."""
    wrong_invalid: float = 0.0
    """Reward of a wrong answer in a malformed response."""
    retrieval_bonus: float = 0.0
    """Added when the answer is not fully correct but a golden answer occurs in the retrieved text (0 = off)."""
    protocol: str = "tags"
    """Which grammar :func:`is_valid_format` checks: ``tags`` (Search-R1) or ``tool_call`` (Qwen JSON tools)."""
    tools: tuple[str, ...] | None = None
    """Tool tags that count as calls in the ``tags`` grammar (None: all registered tools, see :func:`format_error`)."""

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"FormatRewardWeights.protocol={self.protocol!r}; valid: {sorted(_PROTOCOLS)}")


RewardFn = Callable[..., tuple[float, dict]]
"""``fn(response_text, golden_answers, retrieved_text="", *, answer) -> (score, info)``; ``answer`` is required."""
REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward")
"""Reward *factories* by name: ``factory(**cfg) -> RewardFn``."""


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Register a reward *factory* ``factory(**cfg) -> fn(response_text, golden_answers, retrieved_text="", *,
    answer)`` (registering a name twice raises ``KeyError``)."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    """Names accepted by :func:`get_reward_fn`."""
    return REWARDS.names()


def get_reward_fn(name: str, **cfg) -> RewardFn:
    """Build the reward function registered under ``name``.

    Returns ``fn(response_text, golden_answers, retrieved_text="", *, answer) -> (score, info)`` where ``info``
    holds ``answer``, ``em``, ``subem``, ``f1``, ``valid_format``, ``format_error`` and ``retrieval_hit``.
    ``answer`` (keyword only, **required**) is the answer the environment accepted (``Trajectory.answer``; ``None``
    = the trajectory gave no accepted answer); it is what the metric scores. The environment computes it once
    (``openrlhf_search.env.episode.score_trajectory`` is the one call every backend makes). The format check reads
    the whole response. ``cfg`` are the :class:`FormatRewardWeights` fields (for the format rewards).
    """
    return REWARDS.get(name)(**cfg)


def _info(response_text: str, golden_answers, retrieved_text: str, answer: str | None, protocol: str = "tags",
          tools=None) -> dict:
    golds = _as_list(golden_answers)
    err = format_error(response_text, protocol, tools)
    return {
        "answer": answer,
        "em": exact_match(answer, golds),
        "subem": substring_exact_match(answer, golds),
        "f1": f1_score(answer, golds),
        "valid_format": err is None,
        "format_error": err,
        "retrieval_hit": bool(retrieved_text) and substring_exact_match(retrieved_text, golds) > 0,
    }


def _plain(metric: str) -> Callable[..., RewardFn]:
    def factory(**cfg) -> RewardFn:
        if cfg:
            raise TypeError(f"reward {metric!r} takes no options, got {sorted(cfg)}")

        def fn(response_text: str, golden_answers, retrieved_text: str = "", *, answer: str | None
               ) -> tuple[float, dict]:
            info = _info(response_text, golden_answers, retrieved_text, answer)
            return float(info[metric]), info

        fn.__name__ = f"reward_{metric}"
        return fn

    return factory


for _m in ("em", "subem", "f1"):
    register_reward(_m)(_plain(_m))


def _make_weights(cfg: dict, defaults: dict | None = None) -> FormatRewardWeights:
    valid = {f.name for f in fields(FormatRewardWeights)}
    unknown = set(cfg) - valid
    if unknown:
        raise TypeError(f"unknown reward option(s) {sorted(unknown)}; valid: {sorted(valid)}")
    merged = {**(defaults or {}), **cfg}
    if merged.get("tools") is not None:
        merged["tools"] = tuple([merged["tools"]] if isinstance(merged["tools"], str) else merged["tools"])
    return FormatRewardWeights(**merged)


def _format_reward(metric: str, defaults: dict | None = None) -> Callable[..., RewardFn]:
    def factory(**cfg) -> RewardFn:
        w = _make_weights(cfg, defaults)

        def fn(response_text: str, golden_answers, retrieved_text: str = "", *, answer: str | None
               ) -> tuple[float, dict]:
            info = _info(response_text, golden_answers, retrieved_text, answer, w.protocol, w.tools)
            m = float(info[metric])
            if info["valid_format"]:
                r = w.wrong_valid + (w.correct_valid - w.wrong_valid) * m
            else:
                r = w.wrong_invalid + (w.correct_invalid - w.wrong_invalid) * m
            if w.retrieval_bonus and m < 1.0 and info["retrieval_hit"]:
                r = min(r + w.retrieval_bonus, w.correct_valid)
            return float(r), info

        fn.__name__ = f"reward_format_{metric}"
        return fn

    return factory


register_reward("format_em")(_format_reward("em"))
register_reward("format_f1")(_format_reward("f1"))
# CalibAdv's default reward: F1 when the format is valid, else 0 (``F1 x format``).
register_reward("f1_x_format")(
    _format_reward("f1", {"correct_valid": 1.0, "correct_invalid": 0.0, "wrong_valid": 0.0, "wrong_invalid": 0.0})
)
