"""Golden cases for the answer metrics, answer extraction, the format grammar and the reward registry."""

import subprocess
import sys
import time

import pytest

from openrlhf_search.rewards import (
    Reward,
    RewardError,
    RewardInput,
    available_rewards,
    exact_match,
    extract_answer,
    f1_score,
    format_error,
    get_reward_fn,
    is_valid_format,
    normalize_answer,
    register_reward,
    run_reward,
    substring_exact_match,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple, a PEAR!  ", "apple pear"),
        ("theatre", "theatre"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("Anna's  dog", "annas dog"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred, golds, em, subem, f1",
    [
        ("Paris", ["paris"], 1.0, 1.0, 1.0),
        ("the Paris", "Paris", 1.0, 1.0, 1.0),  # a single gold string is accepted
        ("Paris, France", ["Paris"], 0.0, 1.0, 2 / 3),  # P=1/2, R=1 -> 2/3
        ("cat sat", ["the cat sat on the mat"], 0.0, 0.0, 2 / 3),  # P=1, R=2/4 -> 2/3
        ("19845", ["1984"], 0.0, 0.0, 0.0),  # subEM is token aligned
        ("in 1984 exactly", ["1984"], 0.0, 1.0, 0.5),  # P=1/3, R=1 -> 0.5
        ("London", ["Paris", "london"], 1.0, 1.0, 1.0),  # best gold wins
        ("x y y", ["y c"], 0.0, 0.0, 0.4),  # counts clip: common {y: 1}; P=1/3, R=1/2 -> 0.4
        (None, ["Paris"], 0.0, 0.0, 0.0),
        ("", [""], 1.0, 0.0, 1.0),  # empty gold never matches as a substring
    ],
)
def test_metrics_golden(pred, golds, em, subem, f1):
    assert exact_match(pred, golds) == em
    assert substring_exact_match(pred, golds) == subem
    assert f1_score(pred, golds) == pytest.approx(f1)


def test_f1_article_removed_before_counting():
    # "a b b" normalizes to "b b": P = 2/2, R = 2/3 -> 0.8
    assert f1_score("a b b", ["b b c"]) == pytest.approx(0.8)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>Paris</answer>", "Paris"),
        ("<answer>Lyon</answer> then <answer> Paris </answer>", "Paris"),  # the last one
        ("<ANSWER>Paris</ answer >", "Paris"),  # case and inner spaces
        ("<answer>Paris", None),  # unclosed does not count
        ("no answer here", None),
        ("<answer>multi\nline</answer>", "multi\nline"),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


VALID = [
    "<answer>Paris</answer>",
    "<think>easy</think>\n<answer>Paris</answer>",
    "<think>a</think><search>q</search>\n\n<information>Doc 1</information>\n\n<think>b</think><answer>x</answer>",
    "<search>q1</search><information>d</information><search>q2</search><information>d</information><answer>x</answer>",
    "<think>t</think><answer>x</answer><|im_end|>",  # a final EOS is allowed
]
INVALID = [
    ("", "does not end with an <answer>"),
    ("Paris <answer>Paris</answer>", "text outside blocks"),
    ("<answer>Paris</answer> because", "text outside blocks"),
    ("<think>a <search>q</search></think><answer>x</answer>", "nested"),
    ("<search>q</search><answer>x</answer>", "not followed by <information>"),
    ("<information>fake</information><answer>x</answer>", "without a preceding <search>"),
    ("<answer>x</answer><answer>y</answer>", "more than one"),
    ("<think>a</think><think>b</think><answer>x</answer>", "two <think>"),
    ("<think>a</think>", "does not end with an <answer>"),
]


@pytest.mark.parametrize("text", VALID)
def test_valid_format(text):
    assert is_valid_format(text), format_error(text)


@pytest.mark.parametrize("text, why", INVALID)
def test_invalid_format(text, why):
    err = format_error(text)
    assert err is not None and why in err


def test_tool_call_protocol_format():
    ok = (
        '<think>t</think>\n<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nDoc 1\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        "<answer>x</answer><|im_end|>"
    )
    assert is_valid_format(ok, protocol="tool_call")
    assert not is_valid_format(ok, protocol="tags")
    with pytest.raises(KeyError, match="unknown protocol"):
        is_valid_format(ok, protocol="xml")


GOOD = "<think>t</think><answer>Paris</answer>"
BAD_FORMAT = "Sure! <answer>Paris</answer>"


def inp(text, golds, answer, retrieved="", tool_calls=1, question="Q?"):
    """The reward input the environment would build for ``text`` (format checked once, here)."""
    err = format_error(text)
    return RewardInput(question=question, answer=answer, golden_answers=tuple(golds), retrieved_text=retrieved,
                       valid_format=err is None, format_error=err, num_tool_calls=tool_calls)


def score(reward, x):
    return run_reward(reward, [x])[0]


@pytest.mark.parametrize(
    "name, text, golds, expected",
    [
        ("em", GOOD, ["paris"], 1.0),
        ("em", BAD_FORMAT, ["paris"], 1.0),  # plain EM ignores the format
        ("subem", "<answer>Paris, France</answer>", ["paris"], 1.0),
        ("f1", "<answer>Paris France</answer>", ["paris"], 2 / 3),
        ("format_em", GOOD, ["paris"], 1.0),  # valid & correct
        ("format_em", BAD_FORMAT, ["paris"], 0.8),  # correct, invalid format
        ("format_em", "<answer>Lyon</answer>", ["paris"], 0.1),  # valid, wrong
        ("format_em", "Lyon", ["paris"], 0.0),  # invalid, wrong
        ("format_f1", "<answer>Paris France</answer>", ["paris"], 0.1 + 0.9 * 2 / 3),
        ("f1_x_format", "<answer>Paris France</answer>", ["paris"], 2 / 3),
        ("f1_x_format", "x <answer>Paris</answer>", ["paris"], 0.0),
    ],
)
def test_reward_registry_values(name, text, golds, expected):
    reward = get_reward_fn(name)
    value, info = score(reward, inp(text, golds, extract_answer(text)))
    assert value == pytest.approx(expected)
    assert set(info) >= {"answer", "em", "subem", "f1", "valid_format", "retrieval_hit"}
    assert reward.metrics == ("em", "subem", "f1")


def test_format_reward_weights_and_retrieval_score():
    fn = get_reward_fn("format_em", wrong_valid=0.2, retrieval_score=0.3)
    wrong = "<answer>Lyon</answer>"
    assert score(fn, inp(wrong, ["Paris"], "Lyon"))[0] == pytest.approx(0.2)
    value, info = score(fn, inp(wrong, ["Paris"], "Lyon", retrieved="Doc 1 (Title: France) Its capital is Paris."))
    assert info["retrieval_hit"] and value == pytest.approx(0.5)
    assert score(fn, inp("<answer>Paris</answer>", ["Paris"], "Paris", retrieved="Paris"))[0] == pytest.approx(1.0)
    # the model's own <information> block is not retrieved text
    fake = "<search>q</search><information>Paris</information><answer>Lyon</answer>"
    assert score(fn, inp(fake, ["Paris"], "Lyon"))[1]["retrieval_hit"] is False
    # answering without a tool call costs no_search_penalty, correct or not
    pen = get_reward_fn("format_em", no_search_penalty=0.05)
    assert score(pen, inp("<answer>Paris</answer>", ["Paris"], "Paris", tool_calls=0))[0] == pytest.approx(0.95)
    assert score(pen, inp(wrong, ["Paris"], "Lyon", tool_calls=0))[0] == pytest.approx(0.05)


def test_weights_that_let_a_wrong_answer_reach_a_correct_one_are_refused():
    with pytest.raises(ValueError, match="correct_valid - wrong_valid = 0.9 must be greater than retrieval_score"):
        get_reward_fn("format_em", retrieval_score=0.9)
    with pytest.raises(ValueError, match="correct_invalid - wrong_invalid"):
        get_reward_fn("format_f1", retrieval_score=0.5, no_search_penalty=0.3)
    with pytest.raises(ValueError, match="no_search_penalty must be >= 0"):
        get_reward_fn("format_em", no_search_penalty=-0.1)
    with pytest.raises(ValueError, match="correct_valid .* must be >= correct_invalid"):
        get_reward_fn("format_em", correct_invalid=1.5)


def test_old_reward_options_say_what_replaced_them():
    with pytest.warns(FutureWarning, match="'retrieval_bonus' is deprecated, use 'retrieval_score'"):
        old = get_reward_fn("format_f1", retrieval_bonus=0.5)
    assert old.weights == get_reward_fn("format_f1", retrieval_score=0.5).weights
    with pytest.raises(TypeError, match="'protocol' was removed"):
        get_reward_fn("format_em", protocol="tool_call")


@pytest.mark.parametrize("name", ["em", "subem", "f1", "format_em", "format_f1", "f1_x_format"])
def test_the_accepted_answer_is_what_is_scored(name):
    reward = get_reward_fn(name)
    text = "<answer>wrong</answer> <answer>Paris</answer>"
    value, info = score(reward, inp(text, ["Paris"], "wrong"))  # the environment's answer, not the text's last block
    assert info["answer"] == "wrong" and info["em"] == 0.0 and info["valid_format"] is False
    value_none, info_none = score(reward, inp(text, ["Paris"], None))  # no accepted answer: the metric is 0
    assert info_none["answer"] is None and info_none["f1"] == 0.0 and value_none == value
    assert score(reward, inp(text, ["Paris"], "Paris"))[1]["em"] == 1.0


def test_registry_errors():
    assert {"em", "subem", "f1", "format_em", "format_f1", "f1_x_format"} <= set(available_rewards())
    with pytest.raises(KeyError, match="unknown reward 'bleu'.*format_em"):
        get_reward_fn("bleu")
    with pytest.raises(TypeError, match="unknown reward option.*wrong_vlaid"):
        get_reward_fn("format_em", wrong_vlaid=0.1)
    with pytest.raises(TypeError, match="takes no options"):
        get_reward_fn("em", correct_valid=1.0)
    with pytest.raises(KeyError, match="already registered"):
        register_reward("em")(lambda **cfg: None)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        get_reward_fn("em", timeout=0)
    assert get_reward_fn("em", timeout=None).timeout is None and get_reward_fn("em", timeout=5).timeout == 5.0


def test_rewards_module_does_not_import_torch():
    code = "import sys, openrlhf_search.rewards; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


HUNG_REWARD = """
import asyncio, sys, time
from openrlhf_search.rewards import Reward, RewardInput, RewardTimeoutError, arun_reward, run_reward

class Hung(Reward):
    name, timeout = "hung", 0.05

    def score(self, x):
        time.sleep(600)  # a reward that never answers

x = [RewardInput(question="q", answer="a", golden_answers=("a",))]
for call in (lambda: run_reward(Hung(), x), lambda: asyncio.run(arun_reward(Hung(), x))):
    try:
        call()
    except RewardTimeoutError as exc:
        print(exc, flush=True)
"""


def test_a_hung_reward_fails_at_its_timeout_and_does_not_hold_the_process():
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", HUNG_REWARD], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("reward 'hung' did not score a batch of 1 trajectories within 0.05 s") == 2
    assert time.perf_counter() - t0 < 30  # the process exited without waiting for the hung threads


class _Broken(Reward):
    name, metrics = "broken", ("em",)

    def __init__(self, out):
        self.out = out

    def score_batch(self, inputs):
        return self.out


@pytest.mark.parametrize("out, why", [
    ([(1.0, {})], "reward 'broken' declares the metric 'em' but its info for trajectory 0 has None"),
    ([(float("nan"), {"em": 0.0})], "reward 'broken': trajectory 0 scored nan"),
    ([], "reward 'broken' returned 0 results for 1 trajectories"),
    (["x"], "reward 'broken': result 0 is not \\(score, info\\)"),
])
def test_a_reward_breaking_its_contract_fails_naming_it(out, why):
    with pytest.raises(RewardError, match=why):
        run_reward(_Broken(out), [RewardInput(question="q", answer="a", golden_answers=("a",))])
