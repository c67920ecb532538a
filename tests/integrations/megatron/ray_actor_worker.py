"""Drive the Megatron Ray actor classes with OpenRLHF 0.11.2's own RayActorGroup (run in the OpenRLHF venv).

Policy group at TP=2 (2 Ray actors, ``duplicate_actors=2``) and reference group at TP=2, on a local Ray cluster
with logical GPUs. Exercises OpenRLHF's dispatch exactly as its PPO trainer does: ``async_init_model_from_pretrained``,
``async_run_method_batch("forward", ...)`` (experience maker), ``async_run_method_batch("append", ...)``,
``async_run_method("fit")``, ``save_model``, ``broadcast_to_vllm`` (no engines). Writes a JSON report.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace


class _Strategy:
    """The two things OpenRLHF's actor-group code uses from its DeepspeedStrategy: ``args`` and ``is_rank_0``."""

    def __init__(self, args) -> None:
        self.args = args

    def is_rank_0(self) -> bool:
        import torch.distributed as dist

        return not dist.is_initialized() or dist.get_rank() == 0


def main() -> int:
    model_path, out_dir = sys.argv[1], sys.argv[2]
    import ray
    import torch
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(__file__))
    from actor_worker import hf_action_logprobs, openrlhf_batch

    from openrlhf_search.integrations.megatron.actor import openrlhf_actor_classes
    from openrlhf_search.integrations.megatron.config import (
        ActorSettings,
        MegatronActorConfig,
        MegatronParallelConfig,
        MegatronTrainConfig,
    )

    # the OpenRLHF CPU shim (flash-attn stub, logical GPUs; loaded by its sitecustomize in every process, the
    # caller starts this script with the same environment) plus the Megatron CPU shim switch
    from openrlhf_search.integrations.openrlhf.cpu_shim import cpu_shim_env

    env = {**cpu_shim_env(), "OPENRLHF_SEARCH_MEGATRON_CPU_SHIM": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.path.dirname(os.path.abspath(__file__))])
    env["PYTHONWARNINGS"] = "ignore"
    ray.init(
        num_cpus=8, num_gpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env}
    )
    backend = MegatronActorConfig(
        megatron=MegatronTrainConfig(
            parallel=MegatronParallelConfig(tensor_model_parallel_size=2),
            precision="fp32",
            lr=0.05,
            clip_grad=0.0,
            micro_batch_size=2,
        ),
        actor=ActorSettings(loss="grpo"),
    )
    policy_cls, reference_cls = openrlhf_actor_classes(backend)
    policy = RayActorGroup(1, 2, policy_cls, pg=None, num_gpus_per_actor=1, duplicate_actors=backend.duplicate_actors)
    reference = RayActorGroup(
        1, 2, reference_cls, pg=None, num_gpus_per_actor=1, duplicate_actors=backend.duplicate_actors
    )
    strategy = _Strategy(
        SimpleNamespace(
            ckpt=SimpleNamespace(output_dir=os.path.join(out_dir, "final_hf"), path=out_dir),
            vllm=SimpleNamespace(sync_backend="gloo"),
        )
    )
    ray.get(policy.async_init_model_from_pretrained(strategy, model_path))
    ray.get(reference.async_init_model_from_pretrained(strategy, model_path))

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    sequences, attention_mask, action_mask = openrlhf_batch(hf.config.vocab_size)
    expected = hf_action_logprobs(hf, sequences, attention_mask, action_mask)
    # what ExperienceMaker.make_experience does: one list entry per rollout micro-batch
    kwargs = dict(sequences=[sequences], action_mask=[action_mask], attention_mask=[attention_mask])
    policy_out = ray.get(policy.async_run_method_batch(method_name="forward", **kwargs))
    ref_out = ray.get(reference.async_run_method_batch(method_name="forward", **kwargs))
    report: dict = {
        "policy_results": len(policy_out),
        "policy_forward_diff": max(float((r[0] - expected).abs().max()) for r in policy_out),
        "reference_forward_diff": max(float((r[0] - expected).abs().max()) for r in ref_out),
    }
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * action_mask.float()
    experience = Experience(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        action_log_probs=policy_out[0][0],
        base_action_log_probs=ref_out[0][0],
        advantages=advantages,
    )
    ray.get(policy.async_run_method_batch(method_name="append", experience=[experience]))
    statuses = ray.get(policy.async_run_method(method_name="fit", kl_ctl=0.0))
    report["fit_status"] = statuses
    after = ray.get(policy.async_run_method_batch(method_name="forward", **kwargs))
    report["forward_change_after_fit"] = float((after[0][0] - policy_out[0][0]).abs().max())
    ray.get(policy.async_save_model())
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "final_hf"), dtype=torch.float32).eval()
    report["saved_diff_vs_policy"] = float(
        (hf_action_logprobs(saved, sequences, attention_mask, action_mask) - after[0][0]).abs().max()
    )
    report["broadcast"] = ray.get(policy.async_run_method(method_name="broadcast_to_vllm"))
    with open(os.path.join(out_dir, "ray_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
