"""The ``open`` tool in the local trainer: the environment the trainer builds from ``env.tools`` (over the trainer's
own BM25 index, through its timed retriever wrapper) opens a document, and the trainer's reward call scores it."""

from __future__ import annotations

import pytest

from openrlhf_search.rollout.base import Generation, SamplingParams


class ScriptedEngine:
    def __init__(self, tok, texts):
        self.tok, self.texts = tok, list(texts)

    def generate(self, prompts, params, row_max_new_tokens=None):
        ids = self.tok.encode(self.texts.pop(0), add_special_tokens=False)
        return [Generation(ids, [-0.1] * len(ids), "stop") for _ in prompts]


def _setup(tmp_path, tools):
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.rollout.runner import PhaseTimer, TimedRetriever
    from openrlhf_search.trainer.config import load_config
    from openrlhf_search.trainer.local import build_env, build_retriever, load_questions

    cfg = load_config(None, [f"env.tools={tools}", "data.num_entities=20", "env.template=search_r1_compact",
                             "env.max_obs_tokens=200"])
    train, _, kb = load_questions(cfg, tmp_path)
    timer = PhaseTimer()
    retriever = TimedRetriever(build_retriever(cfg, tmp_path, kb), timer)
    tok = build_tiny_tokenizer([d.contents for d in kb.corpus] * 2, vocab_size=600)
    return cfg, kb, train, build_env(cfg, tok, retriever), tok, timer


def test_trainer_env_opens_a_document_and_scores_it(tmp_path):
    from openrlhf_search.rewards import get_reward_fn
    from openrlhf_search.rollout.runner import run_rollouts
    from openrlhf_search.trainer.local import score_trajectories

    cfg, kb, train, env, tok, timer = _setup(tmp_path, "[search, open]")
    sample = train[0]
    subject, gold = sample.metadata["subject"], sample.golden_answers[0]
    doc = next(d for d in kb.corpus if d.title == subject)
    assert "</open>" in env.stop_strings() and "<open>" in env.template.user
    engine = ScriptedEngine(tok, [f"<open>{subject.upper()}</open>", f"<answer>{gold}</answer>"])
    traj = run_rollouts(engine, env, [sample], 1, SamplingParams(max_new_tokens=40))[0]
    turn = traj.turns[0]
    assert turn.action == "open" and turn.error is None and turn.doc_ids == [doc.id]
    assert doc.text.split()[3] in turn.obs_text and "[page 1 of 1]" in turn.obs_text
    assert timer.seconds.get("retrieval", 0.0) > 0.0  # the open call went through the timed wrapper
    rewards, infos = score_trajectories([traj], get_reward_fn(cfg.env.reward), tok)
    assert infos[0]["valid_format"] and rewards[0] == pytest.approx(1.0)


def test_open_is_not_an_action_unless_configured(tmp_path):
    from openrlhf_search.rollout.runner import run_rollouts

    _, _, train, env, tok, _ = _setup(tmp_path, "[search]")
    assert "</open>" not in env.stop_strings() and "<open>" not in env.template.user
    engine = ScriptedEngine(tok, [f"<open>{train[0].metadata['subject']}</open>", "<answer>x</answer>"])
    traj = run_rollouts(engine, env, [train[0]], 1, SamplingParams(max_new_tokens=40))[0]
    assert traj.turns[0].action == "invalid" and traj.turns[0].obs_text == env.template.feedback()


def test_open_needs_a_retriever_with_documents(tok=None):
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.env import EnvConfig, SearchEnv

    class SearchOnly:
        def search(self, queries, topk=3):
            return [[] for _ in queries]

    tok = build_tiny_tokenizer(["a b c"] * 10, vocab_size=300)
    with pytest.raises(TypeError, match="tool 'open' needs a retriever with get_documents"):
        SearchEnv(tok, SearchOnly(), "search_r1", EnvConfig(tools=["search", "open"]))
    with pytest.raises(KeyError, match="unknown tool 'browse'"):
        SearchEnv(tok, SearchOnly(), "search_r1", EnvConfig(tools=["search", "browse"]))
