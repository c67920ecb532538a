"""Scripted model outputs run through the local environment and through the OpenRLHF agent, for the parity tests.

A scenario is a list of turns ``(text, mode)``: ``stop`` (the text as it would end at a stop string), ``eos`` (the
text followed by the tokenizer's EOS id, as vLLM and our engines return it) or ``length`` (cut at the turn budget).
Every generation is also cut to the budget the environment grants, as an engine would.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

TAGS, TOOLS = "search_r1", "qwen_tools"


@dataclass
class Scenario:
    name: str
    turns: list[tuple[str, str]]
    expect_finish: str
    template: str = TAGS
    tools: list[str] = field(default_factory=lambda: ["search", "open"])
    extra_length: int = 400
    """max_length = prompt length + this."""


SCENARIOS = [
    Scenario("search_then_answer", [("<think>look it up</think><search>{subject}</search>", "stop"),
                                    ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("open_then_answer", [("<open>{subject}</open>", "stop"), ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("open_missing_and_past_the_end", [("<open>{subject} | 7</open>", "stop"),
                                               ("<open>no such document</open>", "stop"),
                                               ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("invalid_then_answer", [("I am not sure.", "stop"), ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("eos_without_action", [("I do not know.", "eos")], "stop"),
    Scenario("over_long_turn", [("<think>" + "very long thinking " * 40, "length"),
                                ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("answer_on_the_last_turn", [("<search>{subject}</search>", "stop"), ("<search>{gold}</search>", "stop"),
                                         ("<answer>{gold}</answer>", "stop")], "answer"),
    Scenario("search_on_the_last_turn", [("<search>{subject}</search>", "stop"), ("<open>{subject}</open>", "stop"),
                                         ("<search>{gold}</search>", "stop")], "max_turns"),
    Scenario("injected_tags", [("<information>Doc 1 <answer>{gold}</answer></information>", "stop"),
                               ("<think>I could <answer>{gold}</answer></think><answer>wrong</answer>", "stop")],
             "answer"),
    Scenario("budget_exhausted", [("<search>{subject}</search>", "stop"), ("<search>{gold}</search>", "stop"),
                                  ("<answer>{gold}</answer>", "stop")], "max_length", extra_length=70),
    Scenario("open_not_a_tool", [("<open>{subject}</open>", "stop"), ("<answer>{gold}</answer>", "stop")], "answer",
             tools=["search"]),
    Scenario("tool_call_protocol", [('<tool_call>{{"name": "open", "arguments": {{"id": "{doc_id}"}}}}</tool_call>',
                                     "stop"),
                                    ('<tool_call>{{"name": "search", "arguments": {{"query": "{subject}"}}}}'
                                     "</tool_call>", "stop"),
                                    ("<answer>{gold}</answer><|im_end|>", "stop")], "answer", template=TOOLS),
    Scenario("qwen3_tools_chat_rendered", [('<think>find it</think><tool_call>{{"name": "search", "arguments": '
                                            '{{"query": "{subject}"}}}}</tool_call>', "stop"),
                                           ('<think>read it</think><tool_call>{{"name": "open", "arguments": '
                                            '{{"id": "{doc_id}"}}}}</tool_call><|im_end|>', "stop"),
                                           ("not json", "stop")], "max_turns", template="qwen3_tools"),
    Scenario("qwen3_think_tags", [("<think>look it up</think><search>{subject}</search>", "stop"),
                                  ("<think>got it</think><answer>{gold}</answer>", "stop")], "answer",
             template="qwen3_think"),
]

ENV_LIMITS = {"max_turns": 3, "max_tokens_per_turn": 48, "max_obs_tokens": 60, "topk": 2}


def fill(text: str, sample, doc_id: str) -> str:
    return text.format(subject=sample.metadata["subject"], gold=sample.golden_answers[0], doc_id=doc_id)


def scripted_ids(tok, text: str, mode: str, budget: int) -> tuple[list[int], str]:
    """The ids an engine would return for ``text`` under ``budget`` and the finish reason (local naming)."""
    ids = tok.encode(text, add_special_tokens=False)
    if mode == "eos":
        ids = ids + [tok.eos_token_id]
    if len(ids) > budget:
        return ids[:budget], "length"
    return ids, {"stop": "stop", "eos": "eos", "length": "length"}[mode]


class LocalScriptedEngine:
    """A ``rollout.base.Engine`` replaying one scenario for one trajectory."""

    def __init__(self, tok, turns):
        self.tok, self.turns = tok, list(turns)

    def generate(self, prompts, params, row_max_new_tokens=None):
        from openrlhf_search.rollout.base import Generation

        assert len(prompts) == 1
        budget = row_max_new_tokens[0] if row_max_new_tokens else params.max_new_tokens
        text, mode = self.turns.pop(0) if self.turns else ("<answer>script ran out</answer>", "stop")
        ids, finish = scripted_ids(self.tok, text, mode, budget)
        return [Generation(ids, [-0.5] * len(ids), finish)]


class VLLMScriptedEngine:
    """Stands in for OpenRLHF's vLLM engine handle: replays a scenario, vLLM's output shape and finish reasons."""

    def __init__(self, tok, turns):
        self.tok, self.turns = tok, list(turns)
        self.calls = []

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        self.calls.append((list(prompt_token_ids), sampling_params))
        text, mode = self.turns.pop(0) if self.turns else ("<answer>script ran out</answer>", "stop")
        ids, finish = scripted_ids(self.tok, text, mode, sampling_params.max_tokens)
        vllm_finish = "stop" if finish == "eos" else finish  # vLLM says "stop" for EOS, with stop_reason None
        stop = next((s for s in sampling_params.stop or [] if finish == "stop" and text.endswith(s)), None)
        logprobs = [{i: SimpleNamespace(logprob=-0.5)} for i in ids]
        out = SimpleNamespace(token_ids=ids, text=self.tok.decode(ids), logprobs=logprobs, finish_reason=vllm_finish,
                              stop_reason=stop)
        return SimpleNamespace(outputs=[out])


def env_config(scenario: Scenario, max_length: int):
    from openrlhf_search.env import EnvConfig

    return EnvConfig(**ENV_LIMITS, max_total_tokens=max_length, tools=list(scenario.tools))


def agent_config(scenario: Scenario, index_dir) -> str:
    cfg = {"retrieval_url": str(index_dir), "calib_records": True,
           "env": {"template": scenario.template, "tools": list(scenario.tools), "reward": "format_em", **ENV_LIMITS}}
    return json.dumps(cfg)


def run_local(scenario: Scenario, tok, retriever, sample, doc_id: str):
    """The scenario through ``SearchEnv`` and the local rollout runner; returns (env, trajectory, max_length)."""
    from openrlhf_search.env import SearchEnv
    from openrlhf_search.rollout.base import SamplingParams
    from openrlhf_search.rollout.runner import run_rollouts

    probe = SearchEnv(tok, retriever, scenario.template, env_config(scenario, 10**6))
    max_length = len(probe.reset([sample])[0].prompt_ids) + scenario.extra_length
    env = SearchEnv(tok, retriever, scenario.template, env_config(scenario, max_length))
    turns = [(fill(t, sample, doc_id), m) for t, m in scenario.turns]
    params = SamplingParams(max_new_tokens=ENV_LIMITS["max_tokens_per_turn"], temperature=0.0)
    traj = run_rollouts(LocalScriptedEngine(tok, turns), env, [sample], 1, params)[0]
    return env, traj, max_length


def compare(env, traj, result, agent_traj, reward_fn, calib_record):
    """Assert the OpenRLHF-side result equals the local trajectory (ids, masks, log-probs, reward, logs, record)."""
    from openrlhf_search.env import score_trajectory

    P = len(traj.prompt_ids)
    tokens = result["observation_tokens"]
    assert tokens == traj.prompt_ids + traj.response_ids
    mask = [0] * len(tokens)
    for s, e in result["action_ranges"]:
        mask[s:e] = [1] * (e - s)
    assert mask[:P] == [0] * P and mask[P:] == traj.action_mask
    assert result["rollout_log_probs"] == [0.0] * P + traj.logprobs
    score, info = score_trajectory(traj, reward_fn)
    assert result["reward"] == score and result["scores"] == score
    assert agent_traj.finish_reason == traj.finish_reason
    assert result["truncated"] == (traj.finish_reason == "max_length")
    from openrlhf_search.integrations.openrlhf.staleness import TRANSPORT_KEYS

    assert {k: result["extra_logs"][k] for k in TRANSPORT_KEYS} == {k: 0 for k in TRANSPORT_KEYS}  # no trainer
    logs = {k: v for k, v in result["extra_logs"].items() if k != "calib_id" and k not in TRANSPORT_KEYS}
    assert logs == env.metrics(traj, info, reward_fn)
    assert sorted(logs) == sorted(env.episode.metric_names(reward_fn))
    assert calib_record == dataclasses.asdict(traj.to_calib_record(offset=P - 1))
    def record(t):  # the engine's own finish-reason word differs (vLLM: "stop" at EOS; ours: "eos"), nothing else
        return {k: v for k, v in dataclasses.asdict(t).items() if k != "gen_finish_reason"}

    assert [record(t) for t in agent_traj.turns] == [record(t) for t in traj.turns]
