"""The local trainer's update replayed on a batch OpenRLHF trained on (its experience dump), for the update-parity
test (``test_openrlhf_update_parity.py``) and ``benchmarks/backend_learning_parity.py``'s ``--step-check``.

OpenRLHF's dump of a step holds, per sample, the token ids, the action mask over the predicted tokens
(``action_mask[p]`` flags token ``sequence[p + 1]``), OpenRLHF's advantages and its trainer's log-probs, and the
reward. :func:`local_update` builds the local trainer's :class:`~openrlhf_search.trainer.local.Learner` for the same
config, recomputes the advantages from the dumped rewards with the local estimator (groups = ``index //
group_size``), packs the samples into the local trainer's :class:`~openrlhf_search.trainer.local.PackedBatch` and runs
the local ``update_policy`` on them: the loss, the pre-clip gradient norm and the weight change are what the local
trainer would have done with OpenRLHF's batch, to compare with what OpenRLHF logged and exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlhf_search.algorithms.presets import preset_for
from openrlhf_search.trainer.local import Learner, PackedBatch, update_policy


@dataclass
class LocalUpdate:
    """What the local trainer's update did on one dumped batch."""

    loss: float
    """The policy loss (``loss/loss``)."""
    grad_norm: float
    """The global gradient norm before clipping (``update/grad_norm``)."""
    advantages: torch.Tensor
    """``[B]`` the local estimator's advantages, in dump order."""
    delta: dict[str, torch.Tensor]
    """Per parameter name, ``W_after - W_before`` (fp32; the master weights for a bf16 model)."""


def pack_rows(rows: list[dict], pad_id: int) -> PackedBatch:
    """The dumped samples as a local :class:`PackedBatch` whose response axis is every predicted position."""
    B = len(rows)
    T = max(int(r["action_mask"].shape[0]) for r in rows)
    ids = torch.full((B, T + 1), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T + 1), dtype=torch.long)
    index = torch.zeros((B, T), dtype=torch.long)  # padded entries point at 0, as in the local pack
    amask = torch.zeros((B, T), dtype=torch.float32)
    elp = torch.zeros((B, T), dtype=torch.float32)
    lengths = []
    for i, row in enumerate(rows):
        mask = row["action_mask"].float()
        n = int(mask.shape[0])
        last = int(mask.nonzero().max()) + 1 if mask.any() else 0  # drop the batch's right padding
        ids[i, : last + 1] = row["sequence"][: last + 1]
        attn[i, : last + 1] = 1
        index[i, :last] = torch.arange(1, last + 1)
        amask[i, :n] = mask
        if row.get("rollout_log_probs") is not None:
            elp[i, :n] = row["rollout_log_probs"][:n].float()
        lengths.append(last)
    return PackedBatch(ids, attn, index, amask, elp, lengths)


def local_update(rows: list[dict], model_dir: Path, cfg, group_size: int, dtype: torch.dtype) -> LocalUpdate:
    """One local-trainer step of ``cfg`` (its loss, estimator, optimizer, schedule and clipping) on the dumped
    ``rows`` from the checkpoint in ``model_dir`` loaded as ``dtype`` (OpenRLHF trains bf16 parameters with fp32
    master weights; the local trainer does the same for bf16)."""
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    learner = Learner(cfg, policy, tokenizer, torch.device("cpu"), preset_for(cfg.algorithm))
    rewards = torch.tensor([float(r["reward"]) for r in rows], dtype=torch.float32)
    groups = torch.tensor([int(r["index"]) // group_size for r in rows])
    advantages = learner.estimator(rewards, groups)
    packed = pack_rows(rows, tokenizer.pad_token_id)
    before = {n: w.detach().float().clone() for n, w in _weights(learner, policy)}
    with torch.no_grad():
        policy.eval()
        old_lp = learner._logprobs(policy, packed, len(rows))
    policy.train()
    metrics = update_policy(policy, learner.opt, learner.sched, learner.loss_fn, packed, old_lp, None, advantages, cfg)
    delta = {n: w.detach().float() - before[n] for n, w in _weights(learner, policy)}
    return LocalUpdate(metrics["loss/loss"], metrics["update/grad_norm"], advantages, delta)


def _weights(learner: Learner, policy) -> list[tuple[str, torch.Tensor]]:
    """``(name, full-precision weight)`` of every trainable parameter (the fp32 master of a bf16 one)."""
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    masters = getattr(learner.opt, "masters", None)
    params = list(masters) if masters is not None else [p for p in policy.parameters() if p.requires_grad]
    return list(zip(names, params))


def exported_delta(initial_dir: Path, final_dir: Path) -> dict[str, torch.Tensor]:
    """Per tensor name, OpenRLHF's final HF export minus the initial checkpoint rounded to the export's dtype (what
    DeepSpeed's bf16 master weights started from), in fp32."""
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = load(initial_dir), load(final_dir)
    return {k: b[k].float() - a[k].to(b[k].dtype).float() for k in a if k in b}


def update_agreement(local: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]) -> tuple[float, int]:
    """``(cosine, #tensors)`` between the local update and OpenRLHF's over the tensors both name (a tied head is
    compared once, as the embedding)."""
    keys = sorted(k for k in local if k in exported and k != "lm_head.weight")
    x = torch.cat([local[k].flatten() for k in keys])
    y = torch.cat([exported[k].flatten() for k in keys])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0)), len(keys)
