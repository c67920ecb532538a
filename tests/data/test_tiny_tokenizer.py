"""The tiny local tokenizer: byte-level round trip, single-id protocol tags, chat template, save/load."""

import pytest

from openrlhf_search.data.tiny_tokenizer import PROTOCOL_TAGS, build_tiny_tokenizer

TEXTS = ["Zorvan Kelt was born in Mirabel in 1971.", "Tanix Labs is a glass company based in Quessia."] * 50


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return build_tiny_tokenizer(TEXTS, vocab_size=400, out_dir=out), out


def test_roundtrip_and_tags(tok):
    t, _ = tok
    s = "<think>ok</think><search>Zorvan Kelt</search>\n\n<information>Doc 1 é 東京</information><answer>x</answer>"
    ids = t.encode(s, add_special_tokens=False)
    assert t.decode(ids) == s
    for tag in PROTOCOL_TAGS:
        assert len(t.encode(tag, add_special_tokens=False)) == 1, tag
    assert t.decode(ids, skip_special_tokens=True) == s  # tags are added, not special: they survive


def test_chat_template_and_special_tokens(tok):
    t, _ = tok
    text = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|endoftext|>"
    assert t.encode("<|im_end|>", add_special_tokens=False) == [t.eos_token_id]


def test_save_and_load_through_auto_tokenizer(tok):
    from transformers import AutoTokenizer

    t, out = tok
    loaded = AutoTokenizer.from_pretrained(str(out))
    s = "<search>Tanix Labs</search><|im_end|>"
    assert loaded.encode(s, add_special_tokens=False) == t.encode(s, add_special_tokens=False)
    assert loaded.chat_template == t.chat_template


def test_errors():
    with pytest.raises(ValueError, match="'texts' is empty"):
        build_tiny_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_tokenizer(["a"], vocab_size=100)
