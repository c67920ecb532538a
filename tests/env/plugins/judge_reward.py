"""A user's reward plugin: an LLM-as-judge stand-in, in one file and one registration (``env.reward: judge_stub``).

It reads the question (a judge prompt needs it), scores a whole batch in one ``async`` call (one request to a judge
server in real use; here an ``asyncio.sleep`` of ``delay`` seconds), and declares the one metric it fills
(``judge``), so ``search/em`` and ``search/f1`` are not logged for it."""

import asyncio

from openrlhf_search.env.protocol import normalize_answer
from openrlhf_search.rewards import Reward, register_reward

CALLS: list[list[str]] = []
"""The questions of every batch the judge received (tests read it)."""


class JudgeStub(Reward):
    metrics = ("judge",)

    def __init__(self, delay: float = 0.0, strict: bool = True) -> None:
        self.delay = float(delay)
        self.strict = bool(strict)

    async def score_batch(self, inputs):
        CALLS.append([x.question for x in inputs])
        await asyncio.sleep(self.delay)  # the judge server's latency
        out = []
        for x in inputs:
            ans = normalize_answer(x.answer or "")
            # the judge sees the question: an answer that only repeats the question's words is not an answer
            copied = bool(ans) and set(ans.split()) <= set(normalize_answer(x.question).split())
            right = bool(ans) and any(ans == normalize_answer(g) for g in x.golden_answers) and not copied
            score = 1.0 if right else 0.0
            if not self.strict and x.valid_format:
                score = max(score, 0.1)
            out.append((score, {"judge": score, "question": x.question, "copied_question": copied}))
        return out


@register_reward("judge_stub")
def judge_stub(**cfg):
    return JudgeStub(**cfg)
