"""One rank of a multi-process Megatron check (launched by test_megatron_parity.py via run_local_ranks).

For each HF checkpoint given, on the layout given (TP, PP, VPP, SP), this rank:
  1. builds the Megatron model from the checkpoint (mbridge + local spec, fp32) under the CPU shim;
  2. computes next-token log-probs/entropies of a fixed padded batch (vocab-parallel) and compares them with
     transformers' on the same batch (every rank computes the HF reference itself);
  3. gathers the HF state dict rank by rank and compares it with the checkpoint's tensors (bit-exact), sends it
     in buckets from rank 0 to rank 1 over a separate gloo group (rank 1 compares what it received), and
     exports an HF checkpoint (rank 0 compares its safetensors bit-exactly and loads it with transformers);
  4. runs one GRPO training step of the registry loss and records loss and gradient norm;
  5. (first model only) does 2 and 4 under CudaTouchRecorder and records unhandled CUDA touchpoints.
Results go to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile


def fixed_batch(vocab: int, generator_seed: int = 7):
    """A deterministic padded batch: 4 sequences of 12 tokens, two left-padded and one right-padded."""
    import torch

    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(3, vocab, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    mask[3, -2:] = 0
    ids = ids * mask  # padding id 0
    return ids, mask


def hf_reference(path: str, ids, mask):
    """transformers' next-token log-probs [B, S-1] (float64 math on fp32 logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrlhf_search.integrations.megatron.engine import position_ids_from_mask

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    p = torch.softmax(logits[:, :-1].double(), -1)
    ent = -(p * torch.log_softmax(logits[:, :-1].double(), -1)).sum(-1)
    return logp.float(), ent.float()


def layout_flags() -> argparse.ArgumentParser:
    """Flags of one layout (``--layout NAME="--tp 2 --sp"``)."""
    parser = argparse.ArgumentParser(prog="layout")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=0)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bf16 params/compute (fp32 main params)")
    parser.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    return parser


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", action="append", required=True, help="NAME=FLAGS (repeatable), see layout_flags")
    parser.add_argument("--models", required=True, help="comma-separated HF checkpoint dirs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    layouts = {}
    for spec in args.layout:
        name, _, flags = spec.partition("=")
        layouts[name] = layout_flags().parse_args(shlex.split(flags))

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from openrlhf_search.integrations.megatron.cpu_shim import CudaTouchRecorder, maybe_apply_cpu_shim

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    state = maybe_apply_cpu_shim()
    assert state is not None, "the launcher sets the shim switch"

    from openrlhf_search.algorithms import get_policy_loss
    from openrlhf_search.integrations.megatron import engine, weight_sync
    from openrlhf_search.integrations.megatron import model as mmodel
    from openrlhf_search.integrations.megatron.config import MegatronParallelConfig, MegatronTrainConfig

    sync_group = dist.new_group([0, 1], backend="gloo") if world > 1 else None
    result: dict = {"rank": rank, "world": world, "layouts": {}}
    hf_cache: dict = {}
    for layout_name, args_l in layouts.items():
        result["layouts"][layout_name] = {"models": {}}
        for index, path in enumerate(args.models.split(",")):
            name = os.path.basename(path.rstrip("/"))
            cfg = MegatronTrainConfig(
                parallel=MegatronParallelConfig(
                    tensor_model_parallel_size=args_l.tp,
                    pipeline_model_parallel_size=args_l.pp,
                    virtual_pipeline_model_parallel_size=args_l.vpp or None,
                    sequence_parallel=args_l.sp,
                ),
                precision="bf16" if args_l.bf16 else "fp32",
                use_distributed_optimizer=args_l.dist_opt,
                recompute_granularity=args_l.recompute,
                lr=1e-3,
                clip_grad=0.0,
                micro_batch_size=2,
                seed=1234,
            )
            mmodel.init_model_parallel(cfg)
            model = mmodel.build_model(path, cfg)
            hf_cfg = model.hf_config
            ids, mask = fixed_batch(hf_cfg.vocab_size)
            if path not in hf_cache:
                hf_cache[path] = hf_reference(path, ids, mask)
            ref_logp, ref_ent = hf_cache[path]
            valid = (mask[:, 1:] * mask[:, :-1]).bool()  # real context token and real target
            res: dict = {}

            recorder = CudaTouchRecorder() if index == 0 else None
            if recorder is not None:
                recorder.__enter__()
            logp, ent = (t.cpu() for t in engine.compute_logprobs(model, ids, mask))  # on the model's (GPU) device
            res["logprob_max_abs_diff"] = float((logp - ref_logp)[valid].abs().max())
            res["entropy_max_abs_diff"] = float((ent - ref_ent)[valid].abs().max())
            res["logprob_valid_count"] = int(valid.sum())

            # one GRPO step: old log-probs = current ones shifted, sequence advantages, action mask = valid targets
            g = torch.Generator().manual_seed(11)
            old = (logp + 0.05 * torch.randn(logp.shape, generator=g)).detach()
            adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
            action_mask = valid.clone()
            action_mask[:, :3] = False  # prompt tokens are not actions
            loss_fn = get_policy_loss("grpo")
            optimizer = engine.build_optimizer(model)
            from megatron.core import parallel_state as mpu

            dp, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
            rows = slice(dp_rank * ids.shape[0] // dp, (dp_rank + 1) * ids.shape[0] // dp)  # this DP rank's share
            step = engine.train_step(
                model,
                optimizer,
                {"input_ids": ids[rows], "attention_mask": mask[rows], "old_log_probs": old[rows],
                 "advantages": adv[rows], "action_mask": action_mask[rows]},
                loss_fn,
            )  # fmt: skip
            if recorder is not None:
                recorder.__exit__(None, None, None)
                res["unhandled_cuda"] = recorder.report()
                res["redirects"] = state.redirects + getattr(state.mode, "redirects", 0)  # strict mode counts its own
                # the recorder must flag a torch.cuda call it does not know, made from megatron code
                probe = CudaTouchRecorder()
                with probe:
                    code = compile("torch.cuda.get_device_properties", "/x/megatron/core/probe.py", "eval")
                    eval(code, {"torch": torch})
                res["probe_report"] = probe.report()
            res["loss"] = step.loss
            res["grad_norm"] = step.grad_norm
            res["update_successful"] = step.update_successful
            logp_after = engine.compute_logprobs(model, ids, mask)[0].cpu()
            res["logprob_change_after_step"] = float((logp_after - logp)[valid].abs().max())
            res["logprobs_after_step"] = logp_after[valid].tolist()

            # gathered HF state dict == updated weights round trip: compare with a fresh export
            original = load_file(os.path.join(path, "model.safetensors"))
            # rebuild a model from the checkpoint (no training) to check the bit-exact round trip
            fresh = mmodel.build_model(path, cfg, wrap_for_training=False)
            gathered = {}
            for hf_name, tensor in mmodel.iter_hf_weights(fresh):
                gathered[hf_name] = tensor.detach().cpu().clone()
            if getattr(hf_cfg, "tie_word_embeddings", False):
                gathered.pop("lm_head.weight", None)
            res["gathered_names_equal"] = sorted(gathered) == sorted(original)
            res["gathered_bit_exact"] = res["gathered_names_equal"] and all(
                torch.equal(gathered[k], original[k]) for k in original
            )
            if sync_group is not None and rank in (0, 1):
                bucket_bytes = 64 * 1024
                if rank == 0:
                    transport = weight_sync.TorchGroupTransport(sync_group, 0)
                    stats = weight_sync.send_buckets(gathered.items(), transport=transport, bucket_bytes=bucket_bytes)
                else:
                    received: dict = {}

                    def load(items, into=received):
                        into.update({k: v.clone() for k, v in items})

                    transport = weight_sync.TorchGroupTransport(sync_group, 0)
                    stats = weight_sync.receive_buckets(transport=transport, load=load)
                    res["received_bit_exact"] = sorted(received) == sorted(original) and all(
                        torch.equal(received[k], original[k]) for k in original
                    )
                res["sync_buckets"] = stats.buckets
                res["sync_tensors"] = stats.tensors
                res["sync_bytes"] = stats.bytes
                res["sync_seconds"] = stats.seconds
            export_root = tempfile.mkdtemp(prefix="mg_export_") if rank == 0 else None
            holder = [export_root]
            dist.broadcast_object_list(holder, src=0)
            export_dir = os.path.join(holder[0], name)
            mmodel.export_hf(fresh, export_dir)
            if rank == 0:
                exported = load_file(os.path.join(export_dir, "model.safetensors"))
                res["export_bit_exact"] = sorted(exported) == sorted(original) and all(
                    torch.equal(exported[k], original[k]) for k in original
                )
                from transformers import AutoModelForCausalLM

                reloaded = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
                with torch.no_grad():
                    pos = engine.position_ids_from_mask(mask)
                    logits = reloaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                relogp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
                res["export_reload_logprob_diff"] = float((relogp.float() - ref_logp)[valid].abs().max())
            result["layouts"][layout_name]["models"][name] = res
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
