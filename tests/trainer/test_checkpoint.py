"""Checkpoints: atomic writes, the ``latest`` pointer, crash debris ignored, RNG and data position restored."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from openrlhf_search.trainer.checkpoint import (  # noqa: E402
    capture_rng_state,
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
)
from openrlhf_search.trainer.data import QuestionStream  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    tok = build_tiny_tokenizer([f"alpha beta gamma {i}" for i in range(100)], vocab_size=320)
    return tok, build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64), seed=0)


def test_save_and_restore_roundtrip(tmp_path, tiny):
    tok, model = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    state = {"step": 3, "optimizer": opt.state_dict(), "rng": capture_rng_state()}
    d = save_checkpoint(tmp_path, 3, model, tok, state)
    assert latest_checkpoint(tmp_path) == d
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    expected = [random.random(), float(torch.rand(1))]
    restore_rng_state(load_trainer_state(d)["rng"])
    assert [random.random(), float(torch.rand(1))] == expected
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    fresh = build_tiny_qwen2(tok, TinyModelSpec(32, 1, 2, 1, 64), seed=1)
    load_model_weights(fresh, d)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(load_trainer_state(d)["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, tiny, monkeypatch):
    tok, model = tiny
    good = save_checkpoint(tmp_path, 1, model, tok, {"step": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, tok, {"step": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == good  # the half-written step 2 is invisible
    assert not (tmp_path / "step_000002").exists()
    third = save_checkpoint(tmp_path, 3, model, tok, {"step": 3}, keep=2)  # cleans the debris
    assert not list(tmp_path.glob(".tmp_*"))
    assert latest_checkpoint(tmp_path) == third
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001", "step_000003"]


def test_question_stream_resumes_exactly():
    items = [f"q{i}" for i in range(7)]
    ref = QuestionStream(items, seed=3)
    full = ref.take(20)
    a = QuestionStream(items, seed=3)
    head = a.take(9)
    b = QuestionStream(items, seed=3)
    b.load_state_dict(a.state_dict())
    assert head + b.take(11) == full
    assert sorted(full[:7]) == sorted(items)  # each epoch is a permutation
    with pytest.raises(ValueError, match="different data config"):
        QuestionStream(items[:3]).load_state_dict(a.state_dict())
