"""Adding a tool with its own option, and an async reward that reads the question, is one plugin file each
(``tests/env/plugins``) selected from the config: the tool runs in an episode with the configured option, the reward
runs through the local episode path and through the OpenRLHF agent's ``finalize`` (its unit-level call, no
OpenRLHF needed) without blocking the event loop, and only the metrics it declares are logged."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from openrlhf_search.env import EnvConfig, Episode, SearchEnv
from openrlhf_search.env.protocol import TOOLS
from openrlhf_search.env.scoring import reward_inputs
from openrlhf_search.integrations.openrlhf import agent_core
from openrlhf_search.integrations.openrlhf.config import AgentConfig, agent_config_from_tree
from openrlhf_search.plugins import load_plugins
from openrlhf_search.rewards import REWARDS, Reward, RewardTimeoutError, get_reward_fn, run_reward
from openrlhf_search.trainer.config import load_config, search_env_config
from openrlhf_search.trainer.local import score_trajectories
from openrlhf_search.trainer.validate import validate_config

PLUGINS = Path(__file__).parent / "plugins"
TOOL_PLUGIN, REWARD_PLUGIN = PLUGINS / "web_search_tool.py", PLUGINS / "judge_reward.py"


@pytest.fixture(scope="module")
def plugins():
    load_plugins([str(TOOL_PLUGIN), str(REWARD_PLUGIN)])
    yield sys.modules["openrlhf_search_plugin_judge_reward"]
    TOOLS._items.pop("web_search")
    REWARDS._items.pop("judge_stub")
    for stem in ("web_search_tool", "judge_reward"):
        sys.modules.pop(f"openrlhf_search_plugin_{stem}")


def _config(*overrides):
    return load_config(None, [f"plugins=[{TOOL_PLUGIN},{REWARD_PLUGIN}]", "env.tools=[search,web_search]",
                              "env.max_turns=3", *overrides])


# ---------------------------------------------------------------------------------------------------------- the tool
def test_a_tool_option_set_in_the_config_is_used_in_an_episode(plugins, tok, kb, retriever, gen):
    cfg = _config("env.tool_options={web_search: {max_results: 1}}")
    env = SearchEnv(tok, retriever, "search_r1", search_env_config(cfg))
    assert "<web_search></web_search>" in env.template.user and "</web_search>" in env.stop_strings()
    trajs = env.reset(kb.train[:1])
    env.step(trajs, [gen("<web_search>Lyon France</web_search>")])
    obs = trajs[0].turns[0].obs_text
    assert obs.count("Page ") == 1 and trajs[0].turns[0].doc_ids == ["Lyon"]  # max_results=1 from the config
    wide = SearchEnv(tok, retriever, "search_r1", search_env_config(_config("env.tool_options={web_search: "
                                                                            "{max_results: 3}}")))
    trajs = wide.reset(kb.train[:1])
    wide.step(trajs, [gen("<web_search>Lyon France</web_search>")])
    assert trajs[0].turns[0].doc_ids == ["Lyon", "Paris", "Rhone"]
    # the same option reaches the OpenRLHF agent's environment (one config, every backend)
    agent = agent_config_from_tree(cfg, "http://h:1")
    assert Episode(tok, "search_r1", agent.search_env_config()).tools_by_name["web_search"].opts.max_results == 1


def test_tool_option_mistakes_name_the_config_key(plugins):
    with pytest.raises(ValueError, match=r"env.tool_options.web_search: unknown option\(s\) \['max_result'\]"):
        Episode(None, "search_r1", search_env_config(_config("env.tool_options={web_search: {max_result: 2}}")))
    with pytest.raises(ValueError, match="env.tool_options.web_search: max_results must be >= 1"):
        Episode(None, "search_r1", search_env_config(_config("env.tool_options={web_search: {max_results: 0}}")))
    with pytest.raises(ValueError, match=r"env.tool_options.search: tool 'search' takes no options"):
        Episode(None, "search_r1", EnvConfig(tool_options={"search": {"k": 1}}))
    with pytest.raises(ValueError, match=r"env.tool_options names \['web_search'\], which are not in env.tools"):
        Episode(None, "search_r1", EnvConfig(tool_options={"web_search": {"max_results": 2}}))
    problems = validate_config(_config("env.tool_options={web_search: {max_result: 2}}"), check_files=False)
    assert any(p.startswith("env.tool_options") and "max_result" in p for p in problems), problems
    assert not [p for p in validate_config(_config("env.tool_options={web_search: {max_results: 2}}"),
                                           check_files=False) if "tool_options" in p]


# -------------------------------------------------------------------------------------------------------- the reward
def _answered(env, trajs, gen, answers):
    env.step(trajs, [gen(f"<answer>{a}</answer>") for a in answers])
    assert all(t.done for t in trajs)


def test_an_async_reward_reading_the_question_through_the_local_episode_path(plugins, tok, kb, retriever, gen):
    cfg = _config("env.reward=judge_stub", "env.reward_kwargs={delay: 0.01}")
    reward = get_reward_fn(cfg.env.reward, **cfg.env.reward_kwargs)
    env = SearchEnv(tok, retriever, "search_r1", search_env_config(cfg))
    s = kb.train[0]
    trajs = env.reset([s], n=3)
    word = s.question.split()[0]
    _answered(env, trajs, gen, [s.golden_answers[0], "nobody", word])
    plugins.CALLS.clear()
    rewards, infos = score_trajectories(trajs, reward, tok)  # the local trainer's call
    assert plugins.CALLS == [[s.question] * 3]  # one batched call, and the judge saw the question
    assert rewards == [1.0, 0.0, 0.0] and infos[2]["copied_question"] is True
    assert env.compute_rewards(trajs, reward) == list(zip(rewards, infos))  # the SearchEnv call: the same
    logs = env.metrics(trajs[0], infos[0], reward)
    assert logs["search/judge"] == 1.0 and "search/em" not in logs and "search/f1" not in logs  # declared only
    assert sorted(logs) == sorted(env.episode.metric_names(reward))


def _runtime(tok, retriever, reward):
    cfg = AgentConfig(retrieval_url="unused", env=EnvConfig(max_turns=3, tools=["search", "web_search"]))
    return agent_core.AgentRuntime(config=cfg, retriever=retriever, reward_fn=reward)


def _finished_state(runtime, tok, s, answer):
    ep = runtime.episode(tok, 4096)
    state = agent_core.EpisodeState(episode=ep, meta={"question": s.question, "golden_answers": s.golden_answers})
    state.traj = ep.new_trajectory(tok.encode("prompt", add_special_tokens=False), state.meta)
    ep.step(state.traj, tok.encode(f"<answer>{answer}</answer>", add_special_tokens=False), None, "stop",
            runtime.retriever)
    return state


async def _ticking(coro, period=0.005):
    """Run ``coro`` while a ticker counts how often the event loop was free."""
    ticks = [0]

    async def ticker():
        while True:
            await asyncio.sleep(period)
            ticks[0] += 1

    task = asyncio.create_task(ticker())
    try:
        return await coro, ticks[0]
    finally:
        task.cancel()


def test_the_agent_finalize_awaits_the_async_reward_without_blocking(plugins, tok, kb, retriever):
    runtime = _runtime(tok, retriever, get_reward_fn("judge_stub", delay=0.2))
    s = kb.train[0]
    state = _finished_state(runtime, tok, s, s.golden_answers[0])
    plugins.CALLS.clear()
    result, ticks = asyncio.run(_ticking(agent_core.finalize({}, state, runtime)))
    assert result["reward"] == 1.0 and plugins.CALLS == [[s.question]]
    assert result["extra_logs"]["search/judge"] == 1.0 and "search/em" not in result["extra_logs"]
    logs = {k for k in result["extra_logs"] if not k.startswith("weight_version")}  # staleness tags
    assert sorted(logs) == sorted(agent_core.metric_names(runtime.config, runtime.reward_fn))
    # the loop ran other work while the judge was "thinking" (a reward run on the loop leaves at most 1 tick; 0.2 s
    # at a 5 ms period gives ~40 on a quiet machine, fewer under load, so the bound is low on purpose)
    assert ticks >= 3


def test_the_agent_scores_trajectories_finishing_together_in_one_batch(plugins, tok, kb, retriever):
    runtime = _runtime(tok, retriever, get_reward_fn("judge_stub", delay=0.05))
    samples = kb.train[:5]
    states = [_finished_state(runtime, tok, s, s.golden_answers[0] if i % 2 else "nobody")
              for i, s in enumerate(samples)]
    plugins.CALLS.clear()

    async def finish_all():
        return await asyncio.gather(*(agent_core.finalize({}, st, runtime) for st in states))

    results = asyncio.run(finish_all())
    assert plugins.CALLS == [[s.question for s in samples]]  # one judge request for the five
    assert [r["reward"] for r in results] == [0.0, 1.0, 0.0, 1.0, 0.0]  # each trajectory got its own score


class SlowSync(Reward):
    metrics = ("em",)

    def __init__(self, seconds):
        self.seconds = seconds

    def score(self, x):
        time.sleep(self.seconds)  # a blocking call (a CPU-heavy or synchronous-HTTP reward)
        return 0.5, {"em": 0.0}


def test_the_agent_finalize_runs_a_blocking_reward_off_the_event_loop(plugins, tok, kb, retriever):
    reward = SlowSync(0.2)
    reward.name = "slow_sync"
    runtime = _runtime(tok, retriever, reward)
    state = _finished_state(runtime, tok, kb.train[0], "x")
    result, ticks = asyncio.run(_ticking(agent_core.finalize({}, state, runtime)))
    assert result["reward"] == 0.5 and ticks >= 3  # see the async-reward test above


def test_a_reward_past_its_timeout_fails_naming_it(plugins, tok, kb, retriever, gen):
    slow = get_reward_fn("judge_stub", delay=5.0, timeout=0.05)
    runtime = _runtime(tok, retriever, slow)
    state = _finished_state(runtime, tok, kb.train[0], "x")
    t0 = time.perf_counter()
    with pytest.raises(RewardTimeoutError, match=r"reward 'judge_stub' did not score a batch of 1 trajectories "
                                                 r"within 0.05 s \(raise env.reward_kwargs.timeout"):
        asyncio.run(agent_core.finalize({}, state, runtime))
    with pytest.raises(RewardTimeoutError, match="reward 'judge_stub'"):
        score_trajectories([state.traj], slow, tok)
    blocking = SlowSync(1.0)
    blocking.name, blocking.timeout = "slow_sync", 0.05
    with pytest.raises(RewardTimeoutError, match="reward 'slow_sync'"):
        run_reward(blocking, reward_inputs([state.traj]))
    assert time.perf_counter() - t0 < 3.0
