"""Parameter-efficient RL: LoRA adapters on the policy (peft), for the local trainer and the OpenRLHF backend.

``model.lora_rank > 0`` wraps the policy with peft's LoRA after the warm start; only the adapter matrices are
trained (the base weights are frozen), so the optimiser state is a few MB even for large policies.

Weights in the checkpoint and in the rollout engine (documented choice: **merged**):

* every checkpoint holds the *merged* model (``W + scale * B A``) as an ordinary HF directory, so ``eval``, vLLM and
  any other tool load it unchanged, plus the adapter alone in ``adapter/`` (peft format; ``PeftModel.from_pretrained``
  on the base reads it);
* the frozen base is written once per run to ``<output_dir>/lora_base/`` (it never changes); ``--resume`` rebuilds
  ``base + adapter`` exactly from it and the checkpoint's ``adapter/``, so the resumed run continues bit for bit;
* the vLLM engine receives :func:`merged_state_dict` (computed out of place with peft's ``get_delta_weight``: the
  trained module is never merged and unmerged in place, which would perturb the frozen base in float arithmetic).

On the OpenRLHF backend the same fields become OpenRLHF 0.11.2's ``--ds.lora.rank/alpha/dropout/target_modules``
(OpenRLHF merges the adapter before broadcasting to vLLM). The Megatron backend refuses LoRA (not implemented).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["apply_lora", "is_lora", "merged_state_dict", "save_adapter", "load_adapter", "trainable_summary",
           "BASE_DIR", "ADAPTER_DIR"]

BASE_DIR = "lora_base"
"""Run sub-directory holding the frozen base weights of a LoRA run (written once)."""
ADAPTER_DIR = "adapter"
"""Checkpoint sub-directory holding the adapter alone (peft format)."""


PEFT_MISSING = "needs peft, which is not installed: pip install peft (or the [lora] extra)"
"""Why ``model.lora_rank > 0`` cannot run here (the config check says it before any model is loaded)."""


def peft_installed() -> bool:
    """Whether peft can be imported (found without importing it: the config check stays fast)."""
    import importlib.util

    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # a broken or shadowed installation
        return False


def _peft():
    try:
        import peft
    except ModuleNotFoundError:
        raise SystemExit(f"model.lora_rank > 0 {PEFT_MISSING}") from None
    return peft


def is_lora(model) -> bool:
    """Whether ``model`` is a peft-wrapped model."""
    return hasattr(model, "peft_config")


def apply_lora(model, rank: int, alpha: int, dropout: float, target_modules: list[str] | str):
    """Wrap ``model`` with a LoRA adapter of rank ``rank`` (peft ``get_peft_model``); base weights are frozen."""
    peft = _peft()
    targets = target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    cfg = peft.LoraConfig(r=int(rank), lora_alpha=int(alpha), lora_dropout=float(dropout), target_modules=targets,
                          task_type="CAUSAL_LM", bias="none")
    import warnings

    with warnings.catch_warnings():
        # peft 0.21 asks transformers' deprecated `is_gradient_checkpointing` (FutureWarning, transformers >= 5.2x);
        # a known third-party deprecation, silenced here once instead of shown at every run start.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(model, cfg)


def base_model(model):
    """The underlying transformers model (the peft wrapper's ``base_model.model``)."""
    return model.base_model.model if is_lora(model) else model


def merged_state_dict(model) -> dict:
    """HF-named weights of ``base + adapter`` (out of place); for a plain model, its ``state_dict``."""
    if not is_lora(model):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer

    inner = base_model(model)
    deltas = {}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    deltas[name] = deltas.get(name, 0) + module.get_delta_weight(adapter).detach()
    out = {}
    for key, value in inner.state_dict().items():
        if "lora_" in key:
            continue
        clean = key.replace(".base_layer.", ".")
        module_name = clean.rsplit(".", 1)[0]
        if clean.endswith(".weight") and module_name in deltas:
            value = value.detach() + deltas[module_name].to(value.dtype)
        out[clean] = value.detach()
    return out


def save_merged(model, path: str | Path) -> None:
    """Write the merged model as an HF directory (config + safetensors)."""
    inner = base_model(model)
    inner.save_pretrained(str(path), state_dict=merged_state_dict(model), safe_serialization=True)


def save_adapter(model, path: str | Path) -> None:
    """Write the adapter alone (peft format: ``adapter_config.json`` + ``adapter_model.safetensors``)."""
    model.save_pretrained(str(path), safe_serialization=True)


def load_adapter(model, path: str | Path) -> None:
    """Load adapter weights saved by :func:`save_adapter` into the (already wrapped) ``model``, strictly."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: the LoRA adapter of this checkpoint is missing")
    result = set_peft_model_state_dict(model, load_file(str(f)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"{f}: adapter does not match the model (unexpected keys {unexpected[:5]})")


def save_base(model, run_dir: str | Path) -> Path:
    """Write the frozen base of a LoRA run once to ``<run_dir>/lora_base`` (HF names, safetensors)."""
    from safetensors.torch import save_file

    out = Path(run_dir) / BASE_DIR
    out.mkdir(parents=True, exist_ok=True)
    inner = base_model(model)
    tied = getattr(inner.config, "tie_word_embeddings", False)
    # safetensors refuses shared storage: a tied head is re-tied on load instead of being stored twice
    state = {k: v.detach().contiguous() for k, v in inner.state_dict().items()
             if not (tied and k.endswith("lm_head.weight"))}
    save_file(state, str(out / "model.safetensors"))
    return out


def load_base(model, run_dir: str | Path) -> None:
    """Load the frozen base written by :func:`save_base` into an unwrapped ``model`` (tied heads re-tied)."""
    from safetensors.torch import load_file

    f = Path(run_dir) / BASE_DIR / "model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: this LoRA run's base weights are missing (cannot resume the adapter)")
    missing, unexpected = model.load_state_dict(load_file(str(f)), strict=False)
    if [k for k in missing if not k.endswith("lm_head.weight")] or unexpected:
        raise RuntimeError(f"{f} does not match the model: missing={missing[:5]}, unexpected={unexpected[:5]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def trainable_summary(model) -> dict[str, float]:
    """Trainable and total parameter counts (logged at the start of a run)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/total": float(total), "params/trainable": float(trainable)}
