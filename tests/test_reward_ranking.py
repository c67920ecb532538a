"""A reward cannot be gamed by partial answers: under every shipped configuration a correct answer scores strictly
more than any wrong one (at equal format validity, whatever was retrieved and whether it searched), and a correct
answer in a well-formed response outranks every wrong answer."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from openrlhf_search.rewards import RewardInput, exact_match, f1_score, get_reward_fn, normalize_answer, run_reward
from openrlhf_search.trainer.cli_quickstart import QUICKSTART
from openrlhf_search.trainer.config import TrainConfig, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "examples" / "configs").glob("*.yaml"))


def _configs():
    out = {p.name: load_config(p) for p in SHIPPED}
    out["quickstart (built in)"] = config_from_dict(QUICKSTART)
    out["defaults"] = TrainConfig()
    return out


CONFIGS = _configs()
REWARDS = {name: get_reward_fn(c.env.reward, **c.env.reward_kwargs) for name, c in CONFIGS.items()}


def test_every_shipped_config_is_covered():
    assert {p.name for p in SHIPPED} <= set(REWARDS) and len(SHIPPED) >= 3


def _score(reward, answer, gold, valid, hit, calls):
    retrieved = f"Doc 1 (Title: X) the answer is {gold} here." if hit and calls else ("Doc 1 noise" if calls else "")
    x = RewardInput(question="Who?", answer=answer, golden_answers=(gold,), retrieved_text=retrieved,
                    valid_format=valid, format_error=None if valid else "text outside blocks", num_tool_calls=calls)
    return run_reward(reward, [x])[0][0]


WORD = st.text(alphabet=string.ascii_letters + "'", min_size=1, max_size=7)
GOLD = st.lists(WORD, min_size=1, max_size=4).map(" ".join).filter(lambda g: normalize_answer(g) != "")


@st.composite
def correct_and_wrong(draw):
    gold = draw(GOLD)
    words = gold.split()
    style = draw(st.sampled_from(["same", "upper", "article", "punct"]))
    correct = {"same": gold, "upper": gold.upper(), "article": "The " + gold, "punct": gold + "."}[style]
    kind = draw(st.sampled_from(["random", "one_letter", "drop", "add", "none"]))
    if kind == "random":
        wrong = " ".join(draw(st.lists(WORD, min_size=0, max_size=5)))
    elif kind == "one_letter":
        i = draw(st.integers(0, len(words) - 1))
        j = draw(st.integers(0, len(words[i]) - 1))
        w = words[i]
        words = words[:i] + [w[:j] + draw(st.sampled_from("bdxqz")) + w[j + 1:]] + words[i + 1:]
        wrong = " ".join(words)
    elif kind == "drop":
        wrong = " ".join(words[:-1])
    elif kind == "add":
        wrong = gold + " " + draw(WORD)
    else:
        wrong = None
    assume(exact_match(correct, [gold]) == 1.0 and f1_score(correct, [gold]) == 1.0)
    assume(exact_match(wrong, [gold]) == 0.0 and f1_score(wrong, [gold]) < 1.0)
    return gold, correct, wrong


COND = st.tuples(st.booleans(), st.integers(0, 2))  # retrieval hit, tool calls


@pytest.mark.parametrize("config", sorted(REWARDS))
@settings(max_examples=150, deadline=None)
@given(case=correct_and_wrong(), valid=st.booleans(), wrong_valid=st.booleans(), c_cond=COND, w_cond=COND)
def test_a_correct_answer_outranks_every_wrong_one(config, case, valid, wrong_valid, c_cond, w_cond):
    reward = REWARDS[config]
    gold, correct, wrong = case
    right = _score(reward, correct, gold, valid, *c_cond)
    assert right > _score(reward, wrong, gold, valid, *w_cond)  # same format, any retrieval, searched or not
    if valid:  # a correct answer in a well-formed response beats a wrong answer in any format
        assert right > _score(reward, wrong, gold, wrong_valid, *w_cond)


def test_a_near_miss_with_the_passage_retrieved_is_not_scored_like_the_answer():
    """Regression: the quickstart's sample 'Dothoth Labs' for gold 'Bothoth Labs' (F1 0.5, passage retrieved)
    scored 1.000, the reward of a correct answer."""
    reward = REWARDS["quickstart.yaml"]
    near = _score(reward, "Dothoth Labs", "Bothoth Labs", True, True, 1)
    right = _score(reward, "Bothoth Labs", "Bothoth Labs", True, True, 1)
    assert right == pytest.approx(1.0) and near < right and near == pytest.approx(0.8)
    assert _score(reward, "Dothoth Labs", "Bothoth Labs", True, False, 1) < near  # retrieval still earns credit
    assert _score(reward, None, "Bothoth Labs", True, True, 1) == pytest.approx(0.6)  # searched, wrong: as before
