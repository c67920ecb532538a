"""In-process unit tests of the Megatron backend's pure parts (no process groups, no shim)."""

from __future__ import annotations

import json

import pytest
import torch

from openrlhf_search.integrations.megatron.config import MegatronParallelConfig, MegatronTrainConfig
from openrlhf_search.integrations.megatron.engine import (
    megatron_attention_mask,
    pad_to_multiple,
    position_ids_from_mask,
    split_micro_batches,
)
from openrlhf_search.integrations.megatron.logprobs import vocab_parallel_logprobs_entropy
from openrlhf_search.integrations.megatron.weight_sync import bucket_tensors, pack_bucket, unpack_bucket


def _reference(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    logp_all = torch.log_softmax(logits.double() / temperature, -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_parallel_logprobs_single_shard_matches_log_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 37, generator=g) * 4
    targets = torch.randint(0, 37, (3, 5), generator=g)
    logp, ent = vocab_parallel_logprobs_entropy(logits, targets, temperature=temperature)
    ref_logp, ref_ent = _reference(logits, targets, temperature)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=0)


def test_vocab_parallel_logprobs_gradients_match_autograd():
    """The hand-written backward (no communication) equals autograd through log_softmax, for both outputs."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 11, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.randint(0, 11, (4,), generator=g)
    w_logp, w_ent = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    logp, ent = vocab_parallel_logprobs_entropy(logits, targets)
    (grad,) = torch.autograd.grad((logp.double() * w_logp + ent.double() * w_ent).sum(), logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_logp, ref_ent = _reference(ref_logits, targets)
    (ref_grad,) = torch.autograd.grad((ref_logp * w_logp + ref_ent * w_ent).sum(), ref_logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_vocab_parallel_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="vocab dim"):
        vocab_parallel_logprobs_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), temperature=0)


def test_bucket_tensors_bounds_sizes_splits_dtypes_and_keeps_order():
    tensors = [
        ("a", torch.zeros(10)),  # 40 B
        ("b", torch.zeros(20)),  # 80 B
        ("c", torch.zeros(5, dtype=torch.bfloat16)),  # dtype change -> new bucket
        ("d", torch.zeros(100)),  # 400 B > bound -> alone
        ("e", torch.zeros(3)),
        ("f", torch.zeros(3)),
    ]
    buckets = list(bucket_tensors(iter(tensors), bucket_bytes=128))
    names = [[t.name for t in meta.tensors] for meta, _ in buckets]
    assert names == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [n for group in names for n in group] == [n for n, _ in tensors]
    for meta, items in buckets:
        assert len({t.dtype for t in items}) == 1 and meta.dtype == items[0].dtype
        assert meta.nbytes <= 128 or len(items) == 1
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(bucket_tensors(iter(tensors), bucket_bytes=0))


def test_pack_unpack_round_trip_is_exact():
    g = torch.Generator().manual_seed(2)
    named = [("w", torch.randn(3, 4, generator=g)), ("b", torch.randn(4, generator=g)), ("s", torch.randn(1, 1, 2))]
    ((meta, items),) = list(bucket_tensors(iter(named), bucket_bytes=1 << 20))
    flat = pack_bucket(items)
    assert flat.numel() == meta.numel == 12 + 4 + 2
    for (name, tensor), (uname, utensor) in zip(named, unpack_bucket(meta, flat), strict=True):
        assert name == uname and torch.equal(tensor, utensor)


def test_attention_mask_and_positions_handle_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    masked = megatron_attention_mask(mask)
    assert masked.shape == (2, 1, 5, 5) and masked.dtype == torch.bool
    allowed = ~masked[:, 0]
    # real query 4 of row 0 sees real keys 2..4 only; causal: never the future
    assert allowed[0, 4].tolist() == [False, False, True, True, True]
    assert not allowed[1, 1, 2]
    # every query row keeps at least its diagonal (finite softmax for padding queries)
    assert bool(allowed.diagonal(dim1=-2, dim2=-1).all())


def test_micro_batches_and_sequence_padding():
    batch = {"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    padded = pad_to_multiple(batch, 2)
    assert padded["input_ids"].shape == (4, 4) and padded["attention_mask"][:, -1].sum() == 0
    mbs = split_micro_batches(padded, 2)
    assert len(mbs) == 2 and torch.equal(mbs[1]["input_ids"][:, :3], batch["input_ids"][2:])
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        split_micro_batches(batch, 3)


def test_parallel_config_validation_names_the_field():
    assert MegatronParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).validate(8, 4) == 2
    with pytest.raises(ValueError, match="not divisible"):
        MegatronParallelConfig(tensor_model_parallel_size=3).validate(4, 4)
    with pytest.raises(ValueError, match="do not split"):
        MegatronParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3).validate(2, 4)
    with pytest.raises(ValueError, match="sequence_parallel"):
        MegatronParallelConfig(sequence_parallel=True).validate(1, 4)
    cfg = MegatronTrainConfig.from_dict({"precision": "fp32", "parallel": {"tensor_model_parallel_size": 2}})
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.dtype == torch.float32
    with pytest.raises(ValueError, match=r"megatron: unknown field\(s\) \['tp'\]"):
        MegatronTrainConfig.from_dict({"tp": 2})
    with pytest.raises(ValueError, match=r"megatron.parallel: unknown"):
        MegatronTrainConfig.from_dict({"parallel": {"tp": 2}})


@pytest.mark.megatron
def test_shim_refuses_unverified_megatron_versions(monkeypatch):
    pytest.importorskip("megatron.core")
    from openrlhf_search.integrations.megatron import cpu_shim

    monkeypatch.delenv(cpu_shim.ENV_ANY_VERSION, raising=False)
    with pytest.raises(RuntimeError, match="0.19.0 is not a verified version"):
        cpu_shim._check_version("0.19.0")
    cpu_shim._check_version("0.16.1")
    monkeypatch.setenv(cpu_shim.ENV_ANY_VERSION, "1")
    cpu_shim._check_version("0.19.0")
    # the switch is off by default: nothing is patched in this process
    monkeypatch.delenv(cpu_shim.ENV_SWITCH, raising=False)
    assert cpu_shim.maybe_apply_cpu_shim() is None and cpu_shim.shim_state() is None


@pytest.mark.megatron
def test_unsupported_hf_model_type_is_named():
    pytest.importorskip("megatron.core")
    from transformers import GPT2Config

    from openrlhf_search.integrations.megatron.model import adapt_hf_config

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        adapt_hf_config(GPT2Config(), where="ckpt/config.json")


def test_megatron_actor_config_round_trips(tmp_path, monkeypatch):
    from openrlhf_search.integrations.megatron.config import MEGATRON_CONFIG_ENV, MegatronActorConfig

    cfg = MegatronActorConfig.from_dict(
        {
            "backend": "megatron",  # a whole YAML tree: only megatron and megatron_actor are read
            "megatron": {"parallel": {"tensor_model_parallel_size": 8, "pipeline_model_parallel_size": 2}},
            "megatron_actor": {"loss": "sapo", "temperature": 0.9},
            "unrelated_section": {"ignored": True},
        },
        source="run.yaml",
    )
    assert cfg.duplicate_actors == 16 and cfg.actor.loss == "sapo"
    monkeypatch.setenv(MEGATRON_CONFIG_ENV, cfg.to_json_file(str(tmp_path / "megatron.json")))
    assert MegatronActorConfig.from_env() == cfg
    assert "backend" not in json.loads((tmp_path / "megatron.json").read_text())  # the word means local|openrlhf|...
    with pytest.raises(ValueError, match=r"run.yaml: megatron_actor: unknown field\(s\) \['lr'\]"):
        MegatronActorConfig.from_dict({"megatron_actor": {"lr": 1}}, source="run.yaml")


def test_experience_to_token_batch_places_actions_on_next_token_columns():
    from types import SimpleNamespace

    from openrlhf_search.integrations.megatron.actor import experience_to_token_batch

    # one experience of width 6 (2 actions), one of width 4 (1 action): right-padded to width 6
    e1 = SimpleNamespace(
        sequences=torch.tensor([[0, 5, 6, 7, 8, 9]]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]),
        action_mask=torch.tensor([[True, True]]),
        action_log_probs=torch.tensor([[-1.0, -2.0]]),
        advantages=torch.tensor([[0.5, 0.5]]),
        base_action_log_probs=None,
    )
    e2 = SimpleNamespace(
        sequences=torch.tensor([[4, 5, 6, 7]]),
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        action_mask=torch.tensor([[True]]),
        action_log_probs=torch.tensor([[-3.0]]),
        advantages=torch.tensor([-1.0]),
        base_action_log_probs=None,
    )
    batch = experience_to_token_batch([e1, e2])
    assert batch["input_ids"].shape == (2, 6) and batch["old_log_probs"].shape == (2, 5)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    # column t scores token t+1: e1's actions are tokens 4 and 5 -> columns 3 and 4
    assert batch["old_log_probs"][0].tolist() == [0, 0, 0, -1.0, -2.0]
    assert batch["action_mask"][0].tolist() == [False, False, False, True, True]
    # e2's action is token 3 -> column 2; [B] advantages are broadcast over its actions
    assert batch["old_log_probs"][1].tolist() == [0, 0, -3.0, 0, 0]
    assert batch["advantages"][1].tolist() == [0, 0, -1.0, 0, 0]
    assert batch["ref_log_probs"] is None


def test_the_shim_layer_applies_the_megatron_cpu_shim_after_the_actors_distributed_init(monkeypatch):
    """The Megatron actor never applies CPU simulation itself: the OpenRLHF CPU shim registers a post-import hook
    for the actor module that applies megatron's shim right after ``torch.distributed`` is initialised."""
    import types
    from pathlib import Path

    from openrlhf_search.integrations.megatron import actor, cpu_shim
    from openrlhf_search.integrations.openrlhf import cpu_shim as openrlhf_cpu_shim

    assert "cpu_shim" not in Path(actor.__file__).read_text()  # the product module does not apply it
    calls = []
    monkeypatch.setattr(cpu_shim, "maybe_apply_cpu_shim", lambda: calls.append("shim"))
    fake = types.SimpleNamespace(_init_torch_distributed=lambda: calls.append("dist"))
    openrlhf_cpu_shim.HOOKS["openrlhf_search.integrations.megatron.actor"](fake)
    cpu_shim.patch_actor_module(fake)  # idempotent: wrapped once
    fake._init_torch_distributed()
    assert calls == ["dist", "shim"]
