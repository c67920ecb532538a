"""A checkpoint reloads with exactly the run's tokenizer (issue 16), for the tiny model and for an HF directory.

Reproduced with: ``openrlhf-search quickstart`` then ``--resume`` / ``eval`` on its checkpoint: ``AutoTokenizer``
built a ``Qwen2Tokenizer`` (the checkpoint's config.json says qwen2) that disagreed with the run's locally trained
BPE on 360 of 380 corpus passages.
"""

from __future__ import annotations

import json

import pytest

from openrlhf_search.data.synthetic import generate_kb
from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
from openrlhf_search.env.templates import get_template
from openrlhf_search.trainer.checkpoint import save_checkpoint
from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2, load_pretrained, load_tokenizer


@pytest.fixture(scope="module")
def world():

    kb = generate_kb(seed=0, n_entities=60)
    texts = [d.contents for d in kb.corpus] + [s.question for s in kb.train]
    tok = build_tiny_tokenizer(texts, vocab_size=1024)
    model = build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64))
    tmpl = get_template("search_r1_compact")
    probe = [d.contents for d in kb.corpus] + [tmpl.render(s.question) for s in kb.test]
    probe.append("<search>Zé 東京 1971</search>\n<information>x</information><answer> 42 </answer><|im_end|>")
    return tok, model, probe


def _disagreements(a, b, texts) -> int:
    return sum(a.encode(t, add_special_tokens=False) != b.encode(t, add_special_tokens=False) for t in texts)


def _assert_same(a, b, texts):
    assert _disagreements(a, b, texts) == 0
    assert (a.eos_token_id, a.pad_token_id, a.bos_token_id) == (b.eos_token_id, b.pad_token_id, b.bos_token_id)
    assert a.chat_template == b.chat_template
    assert len(a) == len(b)


def test_tiny_checkpoint_reloads_the_runs_tokenizer(tmp_path, world):
    tok, model, probe = world
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, model, tok, {"step": 1})
    loaded = load_tokenizer(ckpt)
    _assert_same(tok, loaded, probe)
    assert loaded.padding_side == tok.padding_side == "left"
    # byte for byte: saving the reloaded tokenizer writes the same tokenizer.json
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text()) == json.loads(
        (ckpt / "tokenizer.json").read_text())
    # the planted mistake: plain AutoTokenizer rebuilds another tokenizer from the qwen2 config
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(ckpt))
    assert _disagreements(tok, auto, probe) > 0


def test_hf_directory_tokenizer_survives_a_checkpoint(tmp_path, world):
    """A model directory whose own tokenizer class is Qwen2Tokenizer: the run's tokenizer (what load_pretrained
    gives) is the one every checkpoint reloads with, class included."""
    tok, model, probe = world
    from transformers import Qwen2Tokenizer

    seed_dir = tmp_path / "seed"
    model.save_pretrained(seed_dir)
    tok.save_pretrained(seed_dir)
    qwen_tok = Qwen2Tokenizer.from_pretrained(str(seed_dir))  # a model-specific class, as a hub model would ship
    hf_dir = tmp_path / "hf_model"
    model.save_pretrained(hf_dir)
    qwen_tok.save_pretrained(hf_dir)

    _, run_tok = load_pretrained(str(hf_dir))
    assert type(run_tok).__name__ == "Qwen2Tokenizer"
    _assert_same(qwen_tok, run_tok, probe)
    ckpt = save_checkpoint(tmp_path / "checkpoints", 3, model, run_tok, {"step": 3})
    again = load_tokenizer(ckpt)
    assert type(again).__name__ == "Qwen2Tokenizer"
    _assert_same(run_tok, again, probe)


def test_tiny_tokenizer_as_a_model_path_keeps_its_tokenizer(tmp_path, world):
    """``model.path: <a tiny checkpoint>`` (continuing from a quickstart checkpoint) and ``eval --model`` use
    load_pretrained: the same tokenizer as the run that wrote it."""
    tok, model, probe = world
    ckpt = save_checkpoint(tmp_path / "checkpoints", 2, model, tok, {"step": 2})
    _, loaded = load_pretrained(str(ckpt))
    _assert_same(tok, loaded, probe)


def test_openrlhf_launcher_refuses_a_checkpoint_autotokenizer_would_rebuild(tmp_path, world):
    """The OpenRLHF path tokenizes with AutoTokenizer (OpenRLHF's loader): a tiny-model checkpoint it rebuilds as
    another tokenizer is refused by prompt line; the run's own tokenizer used as AutoTokenizer's result passes."""
    from transformers import AutoTokenizer

    from openrlhf_search.integrations.openrlhf.launch import check_tokenizer_reloads

    tok, model, probe = world
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, model, tok, {"step": 1})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": t}) + "\n" for t in probe[-40:]))
    with pytest.raises(ValueError, match=r"tokenizes prompt \d+ of .*prompts\.jsonl differently"):
        check_tokenizer_reloads(str(ckpt), AutoTokenizer.from_pretrained(str(ckpt)), prompts)
    check_tokenizer_reloads(str(ckpt), load_tokenizer(ckpt), prompts)  # the same tokenizer: no error
