"""Atomic checkpoints and exact resume.

Layout under ``<output_dir>/checkpoints/``::

    step_000020/            model.safetensors + config.json + tokenizer files (``save_pretrained``: a normal HF
                            checkpoint that ``from_pretrained``, vLLM and ``openrlhf-search eval`` load as is)
                trainer_state.pt   optimizer, LR scheduler, RNG states (python, numpy, torch, sampler), data position
                meta.json          step and anything small the trainer wants to read without torch
                run_config.yaml    the run's config (``openrlhf-search eval`` rebuilds the run's environment from it)
    latest                  a one-line file naming the newest complete checkpoint directory

Integrity: the weights are checked before every write (a model with a NaN or inf parameter is never saved:
:class:`~openrlhf_search.trainer.preemption.Diverged`), and :func:`find_resume_checkpoint` verifies a checkpoint
before resuming from it (safetensors sizes against their headers, ``trainer_state.pt`` loads), falling back to the
previous good one with a message naming both.

Atomicity: a checkpoint is written into a hidden temporary sibling directory, fsynced, then renamed into place with
``os.replace`` (atomic on POSIX); ``latest`` is rewritten the same way (write a temp file, ``os.replace``). A crash
(even SIGKILL) mid-save leaves the previous checkpoint and ``latest`` untouched; leftover temporaries are removed at
the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from openrlhf_search.trainer import lora
from openrlhf_search.trainer.preemption import Diverged, nonfinite_parameters

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def capture_rng_state(extra_generator=None) -> dict:
    """Python, numpy and torch RNG states (plus an optional ``torch.Generator``, e.g. the sampler's)."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if extra_generator is not None:
        state["sampler"] = extra_generator.get_state()
    return state


def restore_rng_state(state: dict, extra_generator=None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if extra_generator is not None and "sampler" in state:
        extra_generator.set_state(state["sampler"])


def save_checkpoint(ckpt_root: str | Path, step: int, model, tokenizer, trainer_state: dict[str, Any],
                    keep: int = 2, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``step_{step:06d}`` atomically and point ``latest`` at it; keep the ``keep`` newest step dirs.

    Args:
        ckpt_root: ``<output_dir>/checkpoints``.
        step: the number of completed RL steps.
        model: a ``PreTrainedModel`` (saved with ``save_pretrained``, safetensors).
        tokenizer: saved alongside so the directory is self-contained.
        trainer_state: picklable dict (optimizer/scheduler ``state_dict``, RNG, data position, ...).
        keep: number of ``step_*`` directories kept (0 = keep all).
        extra_files: small text files written into the checkpoint (the trainer adds ``run_config.yaml``, which
            ``openrlhf-search eval`` reads to rebuild the run's environment).

    Returns:
        The final checkpoint directory.
    """
    import torch

    bad = nonfinite_parameters(model)
    if bad:  # never write NaN/inf weights: the previous checkpoint stays the latest good one
        raise Diverged(f"step {step}: non-finite parameters ({', '.join(bad)}, ...); checkpoint not written; "
                       f"last good checkpoint: {latest_checkpoint(ckpt_root) or 'none'}")
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".tmp_*"):  # debris of an interrupted save
        shutil.rmtree(leftover, ignore_errors=True)
    name = f"step_{step:06d}"
    tmp = root / f".tmp_{name}_{os.getpid()}"
    if lora.is_lora(model):  # the merged model (what eval and vLLM load) + the adapter alone
        lora.save_merged(model, tmp)
        lora.save_adapter(model, tmp / lora.ADAPTER_DIR)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step}), encoding="utf-8")
    for fname, text in (extra_files or {}).items():
        (tmp / fname).write_text(text, encoding="utf-8")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = root / name
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(root, name)
    _fsync_dir(root)
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or ``None`` when there is none."""
    root = Path(ckpt_root)
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if (cand / "trainer_state.pt").is_file():
            return cand
    steps = sorted(p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file())
    return steps[-1] if steps else None


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    """The ``trainer_state.pt`` dict of a checkpoint (contains RNG states, hence ``weights_only=False``)."""
    import torch

    return torch.load(Path(ckpt_dir) / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_model_weights(model, ckpt_dir: str | Path) -> None:
    """Load a checkpoint's safetensors weights into an existing ``model`` (strict)."""
    from safetensors.torch import load_file

    files = sorted(Path(ckpt_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in checkpoint {ckpt_dir}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                           False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_dir} does not match the model: missing={missing}, "
                           f"unexpected={unexpected}")
    if tied:
        model.tie_weights()


class CheckpointError(RuntimeError):
    """No usable checkpoint (every candidate is missing files or corrupt); the message names each one."""


def verify_safetensors(path: str | Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete safetensors file (header parses, size matches it)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: truncated ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(f"{path.name}: truncated header ({size} bytes, header says {n})")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise ValueError(f"{path.name}: unreadable header ({exc})") from None
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise ValueError(f"{path.name}: {size} bytes, expected {8 + n + end} (truncated?)")


def verify_checkpoint(ckpt_dir: str | Path) -> dict:
    """Check a checkpoint directory and return its trainer state; ``ValueError`` names the broken file."""
    ckpt = Path(ckpt_dir)
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ValueError("no *.safetensors file")
    for f in files:
        verify_safetensors(f)
    if not (ckpt / "trainer_state.pt").is_file():
        raise ValueError("no trainer_state.pt")
    try:
        state = load_trainer_state(ckpt)
    except Exception as exc:
        raise ValueError(f"trainer_state.pt does not load ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("trainer_state.pt holds no step")
    return state


def checkpoint_candidates(ckpt_root: str | Path) -> list[Path]:
    """Checkpoint directories newest first: the one ``latest`` names, then the ``step_*`` directories."""
    root = Path(ckpt_root)
    out: list[Path] = []
    pointer = root / LATEST
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if cand.is_dir():
            out.append(cand)
    out += [p for p in sorted(root.glob("step_*"), reverse=True) if p.is_dir() and p not in out]
    return out


def find_resume_checkpoint(ckpt_root: str | Path, log=print) -> tuple[Path, dict] | None:
    """``(dir, trainer_state)`` of the newest checkpoint that verifies, or ``None`` when there is none at all.

    A corrupt newer checkpoint is skipped with a message naming it, the reason and the checkpoint used instead.

    Raises:
        CheckpointError: there are checkpoints but none of them verifies.
    """
    cands = checkpoint_candidates(ckpt_root)
    if not cands:
        return None
    broken = []
    for cand in cands:
        try:
            state = verify_checkpoint(cand)
        except (ValueError, OSError) as exc:
            broken.append(f"{cand} ({exc})")
            continue
        if broken:
            log(f"[openrlhf-search] checkpoint {broken[-1]} is corrupt; resuming from the previous good one, {cand}"
                if len(broken) == 1 else
                f"[openrlhf-search] corrupt checkpoints: {'; '.join(broken)}; resuming from {cand}")
        return cand, state
    raise CheckpointError(f"no usable checkpoint under {ckpt_root}: {'; '.join(broken)}")
