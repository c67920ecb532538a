"""Build a tiny byte-level BPE tokenizer locally (no download), with a ChatML chat template.

Used by the tests and by the quickstart's tiny model: training on a few hundred lines takes about a second.
The tokenizer is a real ``transformers.PreTrainedTokenizerFast`` (saved with ``save_pretrained`` when
``out_dir`` is given, so it loads through the same ``AutoTokenizer.from_pretrained`` path users take).

* Special tokens: ``<|endoftext|>`` (pad/unk/bos), ``<|im_start|>``, ``<|im_end|>`` (EOS, ends a chat turn).
* The protocol tags (``<think>``, ``<search>``, ``<information>``, ``<answer>``, ``<tool_call>``,
  ``<tool_response>`` and their closing forms) are *added* (non-special) tokens: each is one id, so stop strings
  and masks line up with tag boundaries, and ``decode(skip_special_tokens=True)`` keeps them.
* Byte-level BPE means every NFC-normal string round-trips: ``decode(encode(s)) == s``.
* Qwen2's normaliser (NFC) and pre-tokeniser (its split regex, then byte-level without a second regex): the tiny
  model's checkpoints say ``model_type: qwen2``, for which ``AutoTokenizer`` (and so vLLM, OpenRLHF and every HF
  tool) builds a ``Qwen2Tokenizer`` -- transformers 5 rebuilds it from the saved vocabulary and merges with that
  normaliser and pre-tokeniser, whatever ``tokenizer.json`` says. Trained with the same pipeline, the rebuilt
  tokenizer is this one, id for id, on every loader.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PROTOCOL_TAGS = [
    f"<{slash}{name}>"
    for name in ("think", "search", "information", "answer", "tool_call", "tool_response")
    for slash in ("", "/")
]
"""Tags added as single (non-special) tokens."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
"""Special tokens: pad/unk/bos, chat turn start, chat turn end (EOS)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The ChatML template (Qwen's format, minus tools): ``<|im_start|>role\\ncontent<|im_end|>\\n``."""


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None, min_frequency: int = 2
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training lines (a few hundred short passages are enough).
        vocab_size: target vocabulary size, including the 256 byte symbols, special and added tokens.
        out_dir: if given, ``save_pretrained`` there (then ``AutoTokenizer.from_pretrained(out_dir)`` works).
        min_frequency: minimum pair count for a merge.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``eos_token="<|im_end|>"``, ``pad_token="<|endoftext|>"``
        and a ChatML ``chat_template``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    texts = list(texts)
    if not texts:
        raise ValueError("build_tiny_tokenizer: 'texts' is empty; pass a few hundred lines of training text")
    if vocab_size < 300:
        raise ValueError(f"build_tiny_tokenizer: vocab_size={vocab_size} is too small (need > 256 bytes + specials)")
    # exactly the pipeline Qwen2Tokenizer builds around a vocabulary (see the module docstring)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.model.continuing_subword_prefix = tok.model.end_of_word_suffix = ""  # Qwen2Tokenizer's (same merges)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
        padding_side="left",  # an init kwarg, so it is saved and reloaded with the tokenizer
    )
    hf.add_tokens(PROTOCOL_TAGS)
    hf.chat_template = CHATML_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf
