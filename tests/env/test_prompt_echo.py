"""A model that echoes its prompt takes no action and earns no reward: no shipped template's instructions, corrective
messages or observation wrapper hold a complete action (tags are named as empty pairs such as <search></search>,
examples stay outside the tags). Checked for every substring that starts at a tag opening, with every tool set."""

from __future__ import annotations

import re

import pytest

from openrlhf_search.env import EnvConfig, Episode, SearchEnv
from openrlhf_search.env.actions import parse_action
from openrlhf_search.env.templates import available_templates
from openrlhf_search.rewards import get_reward_fn

TOOL_SETS = (["search"], ["search", "open"])
TAG_START = re.compile(r"<\s*/?\s*[A-Za-z_|]")


def _texts(ep: Episode) -> dict[str, str]:
    t = ep.template
    out = {"system": t.system or "", "user": t.user_message("Which company does Muzem Gamairar work for?"),
           "observation": t.wrap_observation("Doc 1 (Title: X) some text", turn_ended=False, hint=True),
           "last turn hint": t.last_turn_hint}
    for ended in (True, False):
        for hint in (True, False):
            out[f"feedback ended={ended} hint={hint}"] = t.feedback(ended, hint)
    return out


def _echoes(text: str):
    """Every substring from a tag opening on, ending after any '>' or at the end."""
    ends = sorted({m.end() for m in re.finditer(">", text)} | {len(text)})
    for m in TAG_START.finditer(text):
        for e in ends:
            if e > m.start():
                yield text[m.start() : e]


CASES = [(name, tools) for name in available_templates() for tools in TOOL_SETS]


@pytest.mark.parametrize("name, tools", CASES, ids=[f"{n}-{'+'.join(t)}" for n, t in CASES])
def test_echoing_any_part_of_the_instructions_is_no_action(tok, name, tools):
    ep = Episode(tok, name, EnvConfig(tools=list(tools)))
    checked = 0
    for where, text in _texts(ep).items():
        for echo in _echoes(text):
            action = parse_action(echo, ep.protocol, tools=ep.tools)
            assert action.kind == "invalid", (where, echo, action)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("name, tools", CASES, ids=[f"{n}-{'+'.join(t)}" for n, t in CASES])
def test_an_echoed_prompt_earns_nothing(tok, kb, retriever, gen, name, tools):
    retriever.get_documents = lambda targets: retriever.calls.append(list(targets)) or [None] * len(targets)
    env = SearchEnv(tok, retriever, name, EnvConfig(tools=list(tools), max_turns=2))
    eos = tok.eos_token
    s = kb.train[0]
    rewards = [get_reward_fn("format_em"), get_reward_fn("format_f1", retrieval_score=0.5, no_search_penalty=0.05)]
    base = env.reset([s])
    env.step(base, [gen("I do not know." + eos)])
    floor = [env.compute_rewards(base, r)[0][0] for r in rewards]
    texts = _texts(env.episode)
    echoes = [text[m.start():] for text in texts.values() for m in TAG_START.finditer(text)] + list(texts.values())
    trajs = env.reset([s] * len(echoes))
    env.step(trajs, [gen(e + eos) for e in echoes])
    for t, echo in zip(trajs, echoes):
        assert t.answer is None and t.num_tool_calls == 0 and not retriever.calls, echo
        assert [env.compute_rewards([t], r)[0][0] for r in rewards] == floor, echo
