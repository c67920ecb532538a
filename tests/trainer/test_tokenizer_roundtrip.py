"""A checkpoint reloads with exactly the run's tokenizer, for the tiny model and for an HF directory, through the
project's loader and through plain ``AutoTokenizer`` (what vLLM, OpenRLHF and every HF tool call).

Reproduced with: ``openrlhf-search quickstart`` then ``AutoTokenizer.from_pretrained`` on its checkpoint: transformers
built a ``Qwen2Tokenizer`` (the checkpoint's config.json says qwen2) that disagreed with the run's locally trained
BPE on 180 of 200 corpus passages; the tiny BPE is now trained with Qwen2's normaliser and pre-tokeniser.
"""

from __future__ import annotations

import json
import unicodedata

import pytest

from openrlhf_search.data.synthetic import generate_kb
from openrlhf_search.data.tiny_tokenizer import PROTOCOL_TAGS, SPECIAL_TOKENS, build_tiny_tokenizer
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
    probe += [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
              for q in (s.question for s in kb.test[:5])]
    probe += PROTOCOL_TAGS + SPECIAL_TOKENS + ["".join(PROTOCOL_TAGS), "<|im_start|>assistant\n<think>", "  a\n\n b\t",
                                               "it's 3.14, isn't it?", "x<answer>12</answer>y", "Ünïcödé ﬁ ½",
                                               "Cafe\u0301 decomposed"]
    return tok, model, probe


def _legacy_tiny_tokenizer(texts, vocab_size):
    """The tiny BPE as it was first written: byte-level pre-tokeniser with GPT-2's regex, no normaliser (what
    ``Qwen2Tokenizer`` does not rebuild: a checkpoint carrying it loads differently through ``AutoTokenizer``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                 unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                 additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    hf.add_tokens(PROTOCOL_TAGS)
    return hf


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


def test_autotokenizer_on_a_tiny_checkpoint_is_the_runs_tokenizer(tmp_path, world):
    """Plain ``AutoTokenizer.from_pretrained(checkpoint)`` (a ``Qwen2Tokenizer`` in transformers 5, rebuilt from the
    vocabulary) encodes passages, prompts, chat turns, tags and special tokens id for id like the run's tokenizer,
    with and without special tokens, and decodes them back to the same text."""
    from transformers import AutoTokenizer

    tok, model, probe = world
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, model, tok, {"step": 1})
    auto = AutoTokenizer.from_pretrained(str(ckpt))
    _assert_same(tok, auto, probe)
    for text in probe:
        ids = tok.encode(text)
        assert auto.encode(text) == ids, text
        assert auto.decode(ids) == tok.decode(ids) == unicodedata.normalize("NFC", text), text  # NFC as Qwen2's
        assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True), text
    for tag in PROTOCOL_TAGS + SPECIAL_TOKENS:  # one id each, the same id
        assert auto.convert_tokens_to_ids(tag) == tok.convert_tokens_to_ids(tag) and len(auto.encode(tag)) == 1, tag
    chat = [{"role": "user", "content": probe[0]}, {"role": "assistant", "content": "<answer> x </answer>"}]
    assert auto.apply_chat_template(chat, tokenize=True) == tok.apply_chat_template(chat, tokenize=True)
    assert auto.padding_side == "left"


def test_a_legacy_tiny_checkpoint_is_what_autotokenizer_gets_wrong(tmp_path, world):
    """The old pipeline (GPT-2 byte-level regex) reloads differently through AutoTokenizer: the check above has teeth,
    and the project's own loader still reloads such a checkpoint exactly."""
    from transformers import AutoTokenizer

    _, _, probe = world
    kb = generate_kb(seed=0, n_entities=60)
    legacy = _legacy_tiny_tokenizer([d.contents for d in kb.corpus] + [s.question for s in kb.train], 1024)
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, build_tiny_qwen2(legacy, TinyModelSpec(32, 1, 2, 1, 64)),
                           legacy, {"step": 1})
    assert _disagreements(legacy, AutoTokenizer.from_pretrained(str(ckpt)), probe) > 50
    assert _disagreements(legacy, load_tokenizer(ckpt), probe) == 0


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
    """The OpenRLHF path tokenizes with AutoTokenizer (OpenRLHF's loader): a checkpoint it rebuilds as another
    tokenizer (a legacy tiny-model one) is refused by prompt line; the run's own tokenizer used as AutoTokenizer's
    result passes."""
    from transformers import AutoTokenizer

    from openrlhf_search.integrations.openrlhf.run import check_tokenizer_reloads

    _, _, probe = world
    kb = generate_kb(seed=0, n_entities=60)
    tok = _legacy_tiny_tokenizer([d.contents for d in kb.corpus], 1024)
    ckpt = save_checkpoint(tmp_path / "checkpoints", 1, build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64)), tok,
                           {"step": 1})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input": t}) + "\n" for t in probe[-40:]))
    with pytest.raises(ValueError, match=r"tokenizes prompt \d+ of .*prompts\.jsonl differently"):
        check_tokenizer_reloads(str(ckpt), AutoTokenizer.from_pretrained(str(ckpt)), prompts)
    check_tokenizer_reloads(str(ckpt), load_tokenizer(ckpt), prompts)  # the same tokenizer: no error
