"""Ranks of the Megatron actor check (launched by test_megatron_actor.py).

Trainer ranks (``run_local_ranks``, TP=2): MegatronActorCore.forward on an OpenRLHF-style batch (left-padded
prompts, right-padded responses) vs transformers; append + fit (GRPO, large LR); save_model -> transformers
reload; broadcast_to_vllm over a stateless gloo group to a separate receiver process; then a reference actor.
Receiver (``--receiver``): plays the vLLM worker: joins the stateless group, loads the received HF tensors into
a transformers model by name and computes the same action log-probs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from types import SimpleNamespace


def openrlhf_batch(vocab: int):
    """sequences [4, 11] = 5 left-padded prompt tokens + 6 right-padded response tokens; action_mask [4, 6]."""
    import torch

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, vocab, (4, 5), generator=g)
    response = torch.randint(3, vocab, (4, 6), generator=g)
    prompt_mask = torch.ones(4, 5, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_mask[3, :1] = 0
    response_mask = torch.ones(4, 6, dtype=torch.long)
    response_mask[0, 4:] = 0
    response_mask[2, 3:] = 0
    sequences = torch.cat([prompt * prompt_mask, response * response_mask], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    return sequences, attention_mask, response_mask.bool()


def hf_action_logprobs(model, sequences, attention_mask, action_mask):
    """OpenRLHF's Actor.forward computation with a transformers model."""
    import torch

    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    return logp[:, -action_mask.shape[1] :] * action_mask.float()


def receiver(args) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from openrlhf_search.integrations.megatron.weight_sync import RawProcessGroupTransport, receive_buckets

    store = dist.TCPStore("127.0.0.1", args.sync_port, 2, is_master=False, timeout=timedelta(seconds=200))
    pg = dist.ProcessGroupGloo(store, 1, 2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    loaded: list[str] = []

    def load(items):  # what vLLM's model.load_weights does, by HF name
        for name, tensor in items:
            if name == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.append(name)

    stats = receive_buckets(transport=RawProcessGroupTransport(pg, src=0), load=load)
    sequences, attention_mask, action_mask = openrlhf_batch(model.config.vocab_size)
    received_logp = hf_action_logprobs(model, sequences, attention_mask, action_mask)
    with open(os.path.join(args.out, "trainer_after.json")) as f:
        trainer_after = torch.tensor(json.load(f))
    result = {
        "buckets": stats.buckets,
        "tensors": stats.tensors,
        "loaded_all": sorted(set(loaded)) == sorted(k for k in params),
        "logprob_diff_vs_trainer": float((received_logp - trainer_after).abs().max()),
    }
    with open(os.path.join(args.out, "receiver.json"), "w") as f:
        json.dump(result, f)
    return 0


def trainer(args) -> int:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from openrlhf_search.integrations.megatron.cpu_shim import maybe_apply_cpu_shim

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    assert maybe_apply_cpu_shim() is not None, "the launcher sets the shim switch"  # the test layer applies it
    rank = dist.get_rank()
    from openrlhf_search.integrations.megatron.actor import MegatronActorCore
    from openrlhf_search.integrations.megatron.config import ActorSettings, MegatronParallelConfig, MegatronTrainConfig
    from openrlhf_search.integrations.megatron.weight_sync import RawProcessGroupTransport

    cfg = MegatronTrainConfig(
        parallel=MegatronParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        precision="fp32",
        lr=0.05,
        clip_grad=0.0,
        micro_batch_size=2,
        weight_sync_bucket_mb=0.0625,
    )
    core = MegatronActorCore(args.model, cfg, ActorSettings(role="policy", loss="grpo"))
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sequences, attention_mask, action_mask = openrlhf_batch(hf.config.vocab_size)
    res: dict = {"rank": rank}
    before = core.forward(sequences, action_mask, attention_mask)
    ref = hf_action_logprobs(hf, sequences, attention_mask, action_mask)
    res["forward_shape"] = list(before.shape)
    res["forward_diff_vs_hf"] = float((before - ref).abs().max())

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * action_mask.float()
    core.append(
        SimpleNamespace(
            sequences=sequences,
            attention_mask=attention_mask,
            action_mask=action_mask,
            action_log_probs=before,
            advantages=advantages,
            base_action_log_probs=None,
        )
    )
    status = core.fit(kl_ctl=0.0)
    res["status"] = status
    after = core.forward(sequences, action_mask, attention_mask)
    res["forward_change_after_fit"] = float((after - before).abs().max())
    # the step pushed positive-advantage sequences up and negative ones down
    gain = ((after - before) * action_mask).sum(1)
    res["gain_sign_matches_advantage"] = bool(((gain > 0) == (advantages[:, 0] > 0)).all())

    export_dir = os.path.join(args.out, "hf_export")
    core.save_model(export_dir)
    if rank == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
        res["export_reload_diff_vs_trainer"] = float(
            (hf_action_logprobs(reloaded, sequences, attention_mask, action_mask) - after).abs().max()
        )
        with open(os.path.join(args.out, "trainer_after.json"), "w") as f:
            json.dump(after.tolist(), f)
        store = dist.TCPStore("127.0.0.1", args.sync_port, 2, is_master=True, timeout=timedelta(seconds=200))
        pg = dist.ProcessGroupGloo(store, 0, 2)
        stats = core.broadcast_to_vllm(RawProcessGroupTransport(pg, src=0))
    else:
        stats = core.broadcast_to_vllm(None)
    res["sync"] = {"buckets": stats.buckets, "tensors": stats.tensors, "seconds": stats.seconds}

    ref_core = MegatronActorCore(args.model, cfg, ActorSettings(role="reference"))
    res["reference_diff_vs_hf"] = float((ref_core.forward(sequences, action_mask, attention_mask) - ref).abs().max())
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--sync-port", type=int, required=True)
    parser.add_argument("--receiver", action="store_true")
    args = parser.parse_args()
    return receiver(args) if args.receiver else trainer(args)


if __name__ == "__main__":
    sys.exit(main())
