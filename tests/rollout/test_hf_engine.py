"""HFEngine: exact stop boundaries, EOS, per-row budgets, left-padding invariance, log-probs vs a full forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from openrlhf_search.rollout.base import SamplingParams, match_stop_string  # noqa: E402
from openrlhf_search.rollout.hf import HFEngine, sample_next  # noqa: E402


class ScriptTokenizer:
    """Token id i decodes to ``pieces[i]``; id 0 is EOS/pad."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.eos_token_id = 0
        self.pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)


class ScriptLM(torch.nn.Module):
    """Emits ``scripts[row][k]`` as its k-th generated token (logit 50 vs 0), whatever the context.

    The row is recovered from a per-row marker: the first prompt token, used as an index into ``scripts``.
    """

    def __init__(self, scripts, vocab):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = SimpleNamespace(eos_token_id=0)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        B = input_ids.size(0)
        if past_key_values is None:  # prefill: remember the marker (first real token) and the prompt length
            first = attention_mask.argmax(-1)
            marker = input_ids[torch.arange(B), first].float()
            count = torch.zeros(B)
        else:
            marker, count = past_key_values[0][0][:, 0, 0, 0], past_key_values[0][1][:, 0, 0, 0] + 1
        logits = torch.zeros(B, input_ids.size(1), self.vocab)
        for b in range(B):
            script = self.scripts[int(marker[b]) - 1]
            k = int(count[b])
            logits[b, -1, script[k] if k < len(script) else 1] = 50.0
        cache = ((marker.view(B, 1, 1, 1), count.view(B, 1, 1, 1)),)
        return SimpleNamespace(logits=logits, past_key_values=cache)


PIECES = ["<eos>", "x", "<se", "arch", ">", " a", "</se", "arch>", " tail", "b"]


def make_engine(scripts):
    return HFEngine(ScriptLM(scripts, len(PIECES)), ScriptTokenizer(PIECES))


def test_stop_string_completed_across_tokens_keeps_the_completing_token():
    # row 1: "<se" "arch" ">" -> "<search>" stop not wanted; then "</se" "arch>" completes "</search>"
    eng = make_engine([[2, 3, 4, 5, 6, 7, 8, 8], [5, 5, 5, 5, 5, 5, 5, 5, 5, 5], [5, 0, 5]])
    prompts = [[1], [2, 9, 9], [3, 9]]  # markers 1, 2, 3; different lengths exercise left padding
    gens = eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0, stop_strings=("</search>",)))
    assert gens[0].token_ids == [2, 3, 4, 5, 6, 7]
    assert gens[0].finish_reason == "stop" and gens[0].stop_string == "</search>"
    assert gens[1].token_ids == [5] * 8 and gens[1].finish_reason == "length"
    assert gens[2].token_ids == [5, 0] and gens[2].finish_reason == "eos"
    for g in gens:
        assert len(g.logprobs) == len(g.token_ids)


def test_stop_token_carrying_extra_text_is_kept_whole():
    eng = make_engine([[5, 7, 8]])  # " a" "arch>" -> the stop "ch>" ends inside the token "arch>"
    g = eng.generate([[1]], SamplingParams(max_new_tokens=5, temperature=0, stop_strings=("ch>",)))[0]
    assert g.token_ids == [5, 7] and g.finish_reason == "stop"


def test_per_row_budgets():
    eng = make_engine([[5] * 10, [5] * 10])
    gens = eng.generate([[1], [2]], SamplingParams(max_new_tokens=6, temperature=0), row_max_new_tokens=[2, 6])
    assert [len(g.token_ids) for g in gens] == [2, 6]
    assert all(g.finish_reason == "length" for g in gens)


def test_match_stop_string_only_counts_new_characters():
    assert match_stop_string("abc</search>", ("</search>",), 3) == "</search>"
    assert match_stop_string("</search> more", ("</search>",), 5) is None


def test_top_p_keeps_the_nucleus_and_logprobs_are_of_the_tempered_distribution():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        tok, lp = sample_next(logits, SamplingParams(temperature=2.0, top_p=0.9), gen)
        seen.add(int(tok))
        assert torch.allclose(lp, torch.log_softmax(logits / 2.0, -1)[0, tok])
    assert seen <= {0, 1}


@pytest.fixture(scope="module")
def tiny():
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2

    texts = [f"<search> who founded city {i} </search> <answer> person {i} </answer>" for i in range(200)]
    tok = build_tiny_tokenizer(texts, vocab_size=400)
    model = build_tiny_qwen2(tok, TinyModelSpec(64, 2, 2, 1, 128), seed=0).eval()
    return tok, model


def test_batched_left_padded_generation_matches_single_and_full_forward(tiny):
    tok, model = tiny
    eng = HFEngine(model, tok)
    prompts = [tok.encode("<search> who"), tok.encode("person 12 founded city 3 and"), tok.encode("x")]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    batched = eng.generate(prompts, params)
    for p, g in zip(prompts, batched):
        single = eng.generate([p], params)[0]
        assert single.token_ids == g.token_ids
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)
        ref = full.gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(ref, torch.tensor(g.logprobs), atol=1e-4)


def test_sampling_is_reproducible_with_a_seed(tiny):
    tok, model = tiny
    eng = HFEngine(model, tok)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123)
    a = eng.generate([tok.encode("who")] * 3, params)
    b = eng.generate([tok.encode("who")] * 3, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_prefill_keeps_only_the_last_logits_and_samples_the_same():
    """The prefill asks the model for the last position's logits only (``[B, 1, V]``, not ``[B, T, V]``: the
    rollout's memory peak with a large vocabulary), and sampling is unchanged by it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_search.rollout import hf

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    tok = SimpleNamespace(eos_token_id=0, pad_token_id=0, decode=lambda ids, skip_special_tokens=False: "")
    shapes = []
    model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    kept = HFEngine(model, tok, seed=3).generate(prompts, params)
    assert shapes[0] == (2, 1, 64)
    shapes.clear()
    orig = hf._keep_last_logits
    hf._keep_last_logits = lambda m: {}
    try:
        full = HFEngine(model, tok, seed=3).generate(prompts, params)
    finally:
        hf._keep_last_logits = orig
    assert shapes[0] == (2, 5, 64)
    assert [g.token_ids for g in kept] == [g.token_ids for g in full]
    assert [lp for g in kept for lp in g.logprobs] == pytest.approx([lp for g in full for lp in g.logprobs], abs=1e-5)
