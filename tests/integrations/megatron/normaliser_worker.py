"""One rank of the Megatron loss-normaliser check (launched by test_megatron_normaliser.py via run_local_ranks).

Data parallelism only (TP = PP = 1, gloo, CPU shim). A fixed batch of 8 sequences with uneven model-token counts is
split over the DP ranks (rank r gets rows ``[r*8/dp, (r+1)*8/dp)``); for each loss config and each micro-batch size
this rank runs :func:`engine.train_step` with the optimizer step replaced by a capture of the finalised
(DP-reduced) gradient, so the weights never change between cases. Rank 0 writes ``<out>/grads.json``:
``{case: {micro_batch_size: [gradient floats]}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CASES = {
    "grpo_token_mean": ("grpo", {"loss_agg": "token-mean", "kl_coef": 0.2, "entropy_coef": 0.01}),
    "grpo_seq_mean_token_mean": ("grpo", {"loss_agg": "seq-mean-token-mean"}),
    "grpo_seq_mean_token_sum": ("grpo", {"loss_agg": "seq-mean-token-sum", "entropy_coef": 0.01}),
    "dapo_seq_mean_token_sum_norm": ("dapo", {"loss_agg": "seq-mean-token-sum-norm"}),
    "gspo": ("gspo", {}),
    "sapo": ("sapo", {"sapo_threshold": 0.95, "sapo_coef": 1.0, "kl_coef": 0.1}),
    "planted_no_normaliser": ("grpo", {}),  # a bare callable: no config, so no normaliser (the old behaviour)
}


def fixed_batch(vocab: int):
    """8 sequences of 16 tokens: a 4-token prompt, responses of uneven length (one empty), right padding."""
    import torch

    g = torch.Generator().manual_seed(5)
    b, s = 8, 16
    ids = torch.randint(3, vocab, (b, s), generator=g)
    lengths = torch.tensor([16, 6, 11, 5, 14, 8, 16, 9])
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = ids * mask
    action = (mask[:, 1:] * mask[:, :-1]).bool()
    action[:, :3] = False  # the prompt
    action[2, 5:7] = False  # a retrieved passage
    adv = torch.tensor([1.0, -0.5, 0.8, 0.3, -1.1, 0.6, -0.2, 0.9])
    return ids, mask, action, adv


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--micro-batch-sizes", default="2,4,8")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from openrlhf_search.integrations.megatron.cpu_shim import maybe_apply_cpu_shim

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    assert maybe_apply_cpu_shim() is not None, "the launcher sets the shim switch"

    from megatron.core import parallel_state as mpu

    from openrlhf_search.algorithms import get_policy_loss
    from openrlhf_search.integrations.megatron import engine
    from openrlhf_search.integrations.megatron import model as mmodel
    from openrlhf_search.integrations.megatron.config import MegatronTrainConfig

    cfg = MegatronTrainConfig(
        lr=1e-3, clip_grad=0.0, micro_batch_size=1, seed=1234, precision="fp32", use_distributed_optimizer=False
    )  # full reduced gradient on every rank
    mmodel.init_model_parallel(cfg)
    model = mmodel.build_model(args.model, cfg)
    optimizer = engine.build_optimizer(model)
    captured: list = []

    def capture_step():
        grads = [p.main_grad.detach().flatten().clone() for c in model.chunks for p in c.parameters()]
        captured.append(torch.cat(grads))
        return True, float(torch.cat(grads).norm()), None

    optimizer.step = capture_step  # the finalised (DP all-reduced) gradient, weights untouched

    ids, mask, action, adv = fixed_batch(model.hf_config.vocab_size)
    logp, _ = engine.compute_logprobs(model, ids, mask)
    g = torch.Generator().manual_seed(11)
    logp = logp.cpu()  # on the model's device (logical CUDA under the strict proxy); the batch is built on the host
    old = (logp + 0.3 * torch.randn(logp.shape, generator=g)).detach()
    ref = (logp + 0.1 * torch.randn(logp.shape, generator=g)).detach()
    dp, rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    per_rank = ids.shape[0] // dp
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    batch = {"input_ids": ids[rows], "attention_mask": mask[rows], "old_log_probs": old[rows],
             "advantages": adv[rows], "action_mask": action[rows], "ref_log_probs": ref[rows]}  # fmt: skip
    out: dict = {}
    for case, (name, loss_cfg) in CASES.items():
        fn = get_policy_loss(name, **loss_cfg)
        if case.startswith("planted"):
            registry_fn = fn

            def fn(*a, _f=registry_fn, **k):  # no .config attribute: the engine cannot normalise globally
                return _f(*a, **k)

        out[case] = {}
        for mbs in (int(x) for x in args.micro_batch_sizes.split(",")):
            model.cfg.micro_batch_size = mbs
            captured.clear()
            result = engine.train_step(model, optimizer, batch, fn)
            out[case][str(mbs)] = {"grad": captured[0].tolist(), "loss": result.loss}
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "grads.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
