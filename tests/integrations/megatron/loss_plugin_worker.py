"""One rank of the Megatron plugin-loss check (launched by test_megatron_loss_plugin.py via run_local_ranks).

Reads the backend config the OpenRLHF launcher wrote (``OPENRLHF_SEARCH_MEGATRON_CONFIG``), builds a policy
:class:`MegatronActorCore` with its actor settings (loss name, loss config and plugins exactly as an OpenRLHF Megatron
actor gets them), appends one OpenRLHF-style experience whose old log-probs are the actor's own (ratio 1) and runs
``fit``. Writes ``<out>/status.json``: the status plus the batch's masked mean advantage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from openrlhf_search.integrations.megatron.cpu_shim import maybe_apply_cpu_shim

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    assert maybe_apply_cpu_shim() is not None, "the launcher sets the shim switch"

    from openrlhf_search.integrations.megatron.actor import MegatronActorCore
    from openrlhf_search.integrations.megatron.config import MegatronActorConfig, MegatronTrainConfig

    backend = MegatronActorConfig.from_env()  # the launcher's view, as every Megatron actor reads it
    settings = dataclasses.replace(backend.actor, train_batch_size=None, max_epochs=1)
    cfg = MegatronTrainConfig(precision="fp32", lr=1e-3, clip_grad=0.0, micro_batch_size=2,
                              use_distributed_optimizer=False)  # fmt: skip
    core = MegatronActorCore(args.model, cfg, settings)

    g = torch.Generator().manual_seed(3)
    sequences = torch.randint(3, 100, (4, 10), generator=g)
    attention_mask = torch.ones(4, 10, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding
    action_mask = torch.ones(4, 5, dtype=torch.bool)
    action_mask[0, 3:] = False  # right padding
    action_mask[2, 1:3] = False  # a retrieved passage
    sequences = sequences * attention_mask
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2])[:, None].expand(4, 5).contiguous()
    old = core.forward(sequences, action_mask, attention_mask)  # the actor's own log-probs: ratio 1
    core.append(SimpleNamespace(sequences=sequences, attention_mask=attention_mask, action_mask=action_mask,
                                action_log_probs=old, advantages=advantages, info={}))  # fmt: skip
    status = core.fit()
    mean_adv = float((advantages * action_mask).sum() / action_mask.sum())
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "status.json"), "w") as f:
            json.dump({"status": status, "mean_adv": mean_adv, "loss": settings.loss}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
