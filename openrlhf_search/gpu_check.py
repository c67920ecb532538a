"""``python -m openrlhf_search.gpu_check``: one table that says whether the GPU-facing paths work on this machine.

Six rows, each run in-process and timed:

1. **local trainer**: a few RL steps of the smoke preset (``examples/configs/smoke.yaml``: tiny Qwen2, synthetic KB,
   BM25) on CUDA in bf16 (the trainer's ``dtype: auto``); passes when every step's reward is finite, no update was
   skipped and the weights changed between the first and the last checkpoint.
2. **HF-engine sampling at temperature 1**: the rollout engine's own sampler (``torch.multinomial`` with the engine's
   ``torch.Generator``) on the model's device, with and without top-p; a seeded request must reproduce, the sampled
   log-probs must be finite, the sampler must live where the model does (a CPU generator crashes on CUDA).
3. **bf16 at a small learning rate**: 10 AdamW steps at lr 1e-6 of a tiny bf16 model with the trainer's optimizer
   (``trainer.models.build_optimizer``: fp32 master weights); passes when most trained weights moved and the bf16
   model is the masters rounded. Plain AdamW on bf16 parameters is measured beside it (it moves a few percent).
4. **LoRA**: the smoke preset's RL steps with ``model.lora_rank=8`` (peft adapters, merged checkpoints).
5. **megatron engine**: a tiny random Llama saved with ``save_pretrained`` is loaded at TP=1 (mbridge + local
   layer spec, fp32 so the comparison is tight); its next-token log-probs are compared with transformers' on the
   same HF weights, then one optimizer step of the ``grpo`` loss must succeed and move the log-probs.
6. **chunked log-prob kernel**: :func:`openrlhf_search.algorithms.logprobs.sampled_token_logprobs` against the
   naive ``log_softmax(hidden @ W.T)`` gather at V = 151,936 (Qwen2.5's vocabulary), forward + backward: max
   difference, wall time and, on CUDA, peak memory of each.

On a machine without CUDA every row runs on the CPU (smaller kernel sizes; Megatron through its CPU shim) under the
strict device proxy, which gives the trainer rows a *logical* GPU (``device=cuda`` on CPU storage, with the GPU's
placement and generator rules); the table says which rows did not run on a GPU. Exit status 0 only when every row
passes. The wrapper is ``scripts/gpu_check.sh``; ``--prepare DIR`` downloads the wheels a bare GPU machine lacks and
``--install-wheels DIR --target SITE`` installs the missing ones without touching the system Python (see
docs/trainer.md, "GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openrlhf_search.integrations.megatron import model as mmodel
from openrlhf_search.integrations.megatron.config import MegatronTrainConfig
from openrlhf_search.integrations.megatron.cpu_shim import ENV_SWITCH, maybe_apply_cpu_shim
from openrlhf_search.integrations.megatron.launch import free_port
from openrlhf_search.integrations.strict_devices import strict_devices
from openrlhf_search.rewards import Reward, available_rewards, get_reward_fn, register_reward
from openrlhf_search.rollout.base import SamplingParams
from openrlhf_search.rollout.hf import HFEngine
from openrlhf_search.trainer import logging as trainer_logging
from openrlhf_search.trainer import models
from openrlhf_search.trainer.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "examples" / "configs" / "smoke.yaml"
VOCAB = 151_936
"""Qwen2/2.5's vocabulary size, the size the kernel row measures."""

WHEELS = {
    # distribution==version -> importable module (installed only when the module is missing on the target)
    "megatron-core==0.16.1": "megatron.core",  # cp312 manylinux (a compiled helper)
    "mbridge==0.15.1": "mbridge",  # pure Python
    "einops==0.8.2": "einops",  # pure Python; mbridge imports it at package import
    "bm25s==0.3.16": "bm25s",  # pure Python (numpy + scipy: on the GPU image through sentence-transformers)
    "PyStemmer==3.1.0": "Stemmer",  # cp312 manylinux
}
"""What ``--prepare`` downloads for a bare GPU machine (Python 3.12 with torch, transformers, accelerate, peft,
safetensors, sentence-transformers and pytest, no network): ~3.6 MB. Everything else the rows import is there
(orjson, numba and matplotlib are optional speed-ups/plots the rows do without)."""
WHEEL_BUDGET_BYTES = 64 * 2**20
"""Upper bound on the wheel folder, which travels with the checkout to the GPU machine."""


@dataclass
class Row:
    """One line of the table."""

    check: str
    device: str = "-"
    status: str = "FAIL"
    """``PASS``, ``FAIL`` or ``SKIP`` (a missing optional package, named in ``detail``)."""
    figures: dict = field(default_factory=dict)
    detail: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------- environment
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_LOGICAL_GPU: list[bool] = []
"""Set while the rows run under the strict proxy on a CPU machine: the trainer rows then use a logical GPU."""


def row_device() -> tuple[str, str]:
    """``(torch device name, label prefix)`` for a trainer row: ``cuda`` on a GPU, a logical ``cuda`` under the strict
    proxy on a CPU machine (CPU storage, GPU rules), else ``cpu``."""
    if cuda_available():
        return "cuda", "cuda"
    if _LOGICAL_GPU:
        return "cuda", "cpu (strict proxy: logical cuda)"
    return "cpu", "cpu"


def strict_context():
    """The strict device proxy (``openrlhf_search.integrations.strict_devices``) and its label."""
    return strict_devices(), "on"


# --------------------------------------------------------------------------------------------- row 1
CHECK_REWARD = "gpu_check_format_f1_length"
"""``format_f1`` plus ``0.1 x min(1, characters / 200)``: an untrained tiny model scores 0 on ``format_f1``, so
GRPO's advantages would all be 0 and no update would move the weights; the length term gives every group some
variance, so the row sees real RL updates (it checks the device path, not learning)."""


def _register_check_reward() -> None:
    if CHECK_REWARD in available_rewards():
        return

    class LengthTerm(Reward):
        def __init__(self, base: Reward) -> None:
            self.base, self.metrics = base, base.metrics

        def score(self, x):
            reward, info = self.base.score(x)
            return reward + 0.1 * min(1.0, len(x.response_text) / 200), info

    @register_reward(CHECK_REWARD)
    def factory(**cfg):
        return LengthTerm(get_reward_fn("format_f1", **cfg))


def check_local_trainer(workdir: Path, steps: int = 3, extra: tuple[str, ...] = (),
                        title: str = "local trainer: smoke preset RL steps") -> Row:  # fmt: skip
    """A few RL steps of the smoke preset with the trainer's automatic device and dtype."""
    import torch
    from safetensors.torch import load_file

    from openrlhf_search.trainer import local

    row = Row(title)
    out = workdir / ("local" if not extra else "local_" + "_".join(x.split("=")[0].split(".")[-1] for x in extra))
    _register_check_reward()
    name, label = row_device()
    overrides = [f"steps={steps}", f"logging.output_dir={out}", "logging.save_every=1", f"env.reward={CHECK_REWARD}",
                 *(["device=cuda"] if name == "cuda" else []), *extra]  # fmt: skip
    cfg = load_config(SMOKE_CONFIG, overrides)
    device = local.resolve_device(cfg.device)
    dtype = local.resolve_dtype(cfg.model.dtype, device)
    row.device = f"{label} {str(dtype).replace('torch.', '')}"
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # not on the GPU machine; the reward plot is not what this row checks
        trainer_logging.plot_reward_curve = lambda *a, **k: out / "reward_curve.png"
    summary = local.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward_mean"] for r in rows]
    skipped = sum(r.get("update/skipped_nonfinite", 0.0) for r in rows)
    ckpts = sorted((p.parent for p in out.rglob("model.safetensors")), key=lambda p: p.stat().st_mtime)
    first, last = load_file(str(ckpts[0] / "model.safetensors")), load_file(str(ckpts[-1] / "model.safetensors"))
    change = max(float((first[k].float() - last[k].float()).abs().max()) for k in first)
    row.figures = {"steps": len(rows), "reward_mean": [round(r, 4) for r in rewards],
                   "skipped_updates": skipped, "weight_max_abs_change": change,
                   "rl_seconds": round(summary.get("rl_seconds", float("nan")), 1)}  # fmt: skip
    finite = all(torch.isfinite(torch.tensor(r)) for r in rewards)
    ok = len(rows) == steps and finite and skipped == 0 and change > 0 and len(ckpts) >= 2
    row.status = "PASS" if ok else "FAIL"
    row.detail = f"{len(rows)} steps, rewards {'finite' if finite else 'NOT finite'}, weights changed by {change:.2e}"
    return row


# --------------------------------------------------------------------------------------------- rows 2-4
def _tiny_qwen2(vocab: int = 256):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=2)  # fmt: skip
    return Qwen2ForCausalLM(cfg)


class _IdTokenizer:
    """The few tokenizer members the HF engine uses (ids decode to themselves)."""

    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids)


def check_hf_sampling(workdir: Path) -> Row:
    """The HF rollout engine samples at temperature 1 (and top-p 0.9) on the model's device."""
    import torch

    from openrlhf_search.trainer import local

    name, label = row_device()
    device = torch.device(name)
    dtype = local.resolve_dtype("auto", device)
    row = Row("HF engine: sampling at temperature 1", f"{label} {str(dtype).replace('torch.', '')}")
    model = _tiny_qwen2().to(device=device, dtype=dtype)
    engine = HFEngine(model, _IdTokenizer(), seed=0)
    prompts = [[2, 3 + i, 4, 5 + i] for i in range(8)]
    seeded = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    a, b = engine.generate(prompts, seeded), engine.generate(prompts, seeded)
    own = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16))
    nucleus = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16))
    logps = [x for g in (*own, *nucleus) for x in g.logprobs]
    distinct = len({tuple(g.token_ids) for g in own})
    reproducible = [g.token_ids for g in a] == [g.token_ids for g in b]
    finite = all(x == x and x <= 1e-6 and x > -1e4 for x in logps) and bool(logps)
    sampler = engine.generator.device.type
    row.figures = {"tokens": sum(len(g.token_ids) for g in own), "distinct_rows": distinct,
                   "seeded_reproducible": reproducible, "sampler_device": sampler}  # fmt: skip
    ok = finite and reproducible and distinct > 1 and sampler == device.type
    row.status = "PASS" if ok else "FAIL"
    row.detail = (f"{row.figures['tokens']} tokens, {distinct}/8 distinct rows, seeded run reproduced: "
                  f"{reproducible}, sampler on {sampler}")  # fmt: skip
    return row


def _fraction_changed(before, after) -> float:
    changed = sum(int((a.float() != b.float()).sum()) for a, b in zip(before, after))
    return changed / max(1, sum(b.numel() for b in before))


def _train_tiny(model, opt, steps: int, device) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(3, 256, (4, 24), generator=g).to(device)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.float().backward()
        opt.step()


def check_bf16_small_lr(workdir: Path, steps: int = 10, lr: float = 1e-6) -> Row:
    """bf16 training at lr 1e-6 moves the weights (the trainer's optimizer keeps fp32 masters)."""
    import torch

    from openrlhf_search.trainer import local

    name, label = row_device()
    device = torch.device(name)
    auto = local.resolve_dtype("auto", device)
    row = Row(f"bf16 training at lr {lr:g}: weights move", f"{label} bfloat16")
    if device.type == "cuda" and cuda_available() and auto != torch.bfloat16:
        row.status, row.detail = "SKIP", f"dtype auto picks {auto} on this GPU (no bf16): nothing to check"
        return row
    fractions = {}
    for kind in ("trainer", "plain"):
        model = _tiny_qwen2().to(device=device, dtype=torch.bfloat16)
        params = list(model.parameters())
        before = [p.detach().float().clone() for p in params]
        opt = models.build_optimizer(params, lr=lr) if kind == "trainer" else torch.optim.AdamW(params, lr=lr)
        _train_tiny(model, opt, steps, device)
        trained = models.optimizer_weights(opt, params)
        fractions[kind] = (_fraction_changed(before, trained), _fraction_changed(before, params))
        if kind == "trainer":
            rounded = all(torch.equal(p.detach(), t.to(p.dtype)) for p, t in zip(params, trained))
    (trained_frac, model_frac), (plain_frac, _) = fractions["trainer"], fractions["plain"]
    row.figures = {"steps": steps, "lr": lr, "trained_weights_moved": round(trained_frac, 4),
                   "bf16_model_weights_moved": round(model_frac, 4), "plain_bf16_adamw_moved": round(plain_frac, 4),
                   "model_is_masters_rounded": rounded}  # fmt: skip
    ok = trained_frac > 0.5 and rounded
    row.status = "PASS" if ok else "FAIL"
    row.detail = (f"{steps} steps: {trained_frac:.0%} of trained weights moved (bf16 model {model_frac:.1%}); "
                  f"plain bf16 AdamW {plain_frac:.1%}")  # fmt: skip
    return row


def check_lora(workdir: Path, steps: int = 2) -> Row:
    """The smoke preset's RL steps with LoRA adapters (``model.lora_rank=8``)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return Row("local trainer: LoRA RL steps", status="SKIP", detail="peft is not installed")
    return check_local_trainer(workdir, steps=steps, extra=("model.lora_rank=8",),
                               title="local trainer: LoRA RL steps")  # fmt: skip


# --------------------------------------------------------------------------------------------- row 5
def _tiny_llama(path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        initializer_range=0.15,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)  # fmt: skip


def check_megatron(workdir: Path) -> Row:
    """TP=1 Megatron engine vs transformers on the same HF weights, then one optimizer step."""
    import torch
    import torch.distributed as dist

    row = Row("megatron engine TP=1: log-probs vs HF + 1 step")
    try:
        import mbridge  # noqa: F401
        import megatron.core  # noqa: F401
    except ImportError as exc:
        row.status, row.detail = "SKIP", f"{exc.name} is not installed (scripts/gpu_check.sh --prepare carries it)"
        return row
    from openrlhf_search.integrations.megatron import engine

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    row.device = f"{device.type} fp32"
    path = workdir / "tiny_llama"
    _tiny_llama(path)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if on_gpu:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    if not on_gpu:
        os.environ[ENV_SWITCH] = "1"
        maybe_apply_cpu_shim()
    cfg = MegatronTrainConfig(precision="fp32", lr=1e-3, clip_grad=0.0, micro_batch_size=2, seed=1234,
                              use_distributed_optimizer=False)  # fmt: skip
    mmodel.init_model_parallel(cfg)
    model = mmodel.build_model(str(path), cfg)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 320, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[3, -4:] = 0
    ids = (ids * mask).to(device)
    mask = mask.to(device)
    logp, _ = engine.compute_logprobs(model, ids, mask)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=engine.position_ids_from_mask(mask)).logits
    ref = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).float()
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    diff = float((logp.to(device) - ref)[valid].abs().max())

    from openrlhf_search.algorithms.losses import get_policy_loss

    optimizer = engine.build_optimizer(model)
    old = (logp + 0.05 * torch.randn(logp.shape, generator=g).to(logp.device)).detach()
    action = valid.clone()
    action[:, :3] = False
    batch = {"input_ids": ids, "attention_mask": mask, "old_log_probs": old,
             "advantages": torch.tensor([1.0, -0.5, 0.25, -0.75], device=device), "action_mask": action}  # fmt: skip
    step = engine.train_step(model, optimizer, batch, get_policy_loss("grpo"))
    after, _ = engine.compute_logprobs(model, ids, mask)
    moved = float((after - logp)[valid.to(after.device)].abs().max())
    row.figures = {"logprob_max_abs_diff_vs_hf": diff, "loss": step.loss, "grad_norm": step.grad_norm,
                   "update_successful": step.update_successful, "logprob_change_after_step": moved}  # fmt: skip
    ok = diff < 1e-4 and step.update_successful and moved > 1e-3
    row.status = "PASS" if ok else "FAIL"
    row.detail = f"|logp - HF| <= {diff:.1e}, step ok={step.update_successful}, log-probs moved {moved:.2e}"
    return row


# --------------------------------------------------------------------------------------------- row 6
def _measure(fn, device) -> tuple[float, int | None, object]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None
    return time.perf_counter() - t0, peak, result


def check_logprob_kernel(tokens: int | None = None, hidden: int | None = None) -> Row:
    """Chunked vs naive sampled-token log-probs (forward + backward) at V = 151,936."""
    import torch

    from openrlhf_search.algorithms.logprobs import sampled_token_logprobs

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokens = tokens or (8 * 1024 if on_gpu else 256)
    hidden = hidden or (896 if on_gpu else 64)
    row = Row(f"chunked log-probs V={VOCAB:,} ({tokens} tokens, H={hidden})", f"{device.type} {str(dtype)[6:]}")
    g = torch.Generator(device=device).manual_seed(0)
    h0 = torch.randn(1, tokens, hidden, generator=g, device=device, dtype=dtype)
    w0 = (torch.randn(VOCAB, hidden, generator=g, device=device, dtype=dtype) * hidden**-0.5).to(dtype)
    targets = torch.randint(0, VOCAB, (1, tokens), generator=g, device=device)

    def run(chunked: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        if chunked:
            lp = sampled_token_logprobs(h, w, targets)
        else:
            logits = (h @ w.T).float()
            lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        lp.sum().backward()
        return lp.detach(), h.grad, w.grad

    run(True)  # warm-up (kernels, allocator)
    t_naive, m_naive, (lp_n, gh_n, gw_n) = _measure(lambda: run(False), device)
    t_chunk, m_chunk, (lp_c, gh_c, gw_c) = _measure(lambda: run(True), device)
    diff = float((lp_c - lp_n).abs().max())
    gdiff = float((gh_c.float() - gh_n.float()).abs().max() / gh_n.float().abs().max().clamp(min=1e-12))
    mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    row.figures = {"logprob_max_abs_diff": diff, "grad_hidden_max_rel_diff": gdiff,
                   "naive_seconds": round(t_naive, 4), "chunked_seconds": round(t_chunk, 4),
                   "naive_peak_mib": mib(m_naive), "chunked_peak_mib": mib(m_chunk)}  # fmt: skip
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    ok = diff < tol and gdiff < tol * 10 and (m_naive is None or m_chunk < m_naive)
    row.status = "PASS" if ok else "FAIL"
    mem = f", peak {mib(m_chunk)} vs {mib(m_naive)} MiB" if m_naive is not None else ", peak memory: CUDA only"
    row.detail = f"|diff| {diff:.1e}, {t_chunk * 1e3:.0f} vs {t_naive * 1e3:.0f} ms (chunked vs naive){mem}"
    return row


# --------------------------------------------------------------------------------------------- table
CHECKS = {"local": check_local_trainer, "sampling": check_hf_sampling, "bf16": check_bf16_small_lr,
          "lora": check_lora, "megatron": check_megatron, "kernel": check_logprob_kernel}  # fmt: skip


def run_checks(names: list[str], workdir: Path) -> list[Row]:
    rows = []
    for name in names:
        fn = CHECKS[name]
        t0 = time.perf_counter()
        try:
            row = fn(workdir) if name != "kernel" else fn()
        except Exception as exc:  # one failing row must not hide the others
            row = Row(name, status="FAIL", detail=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            traceback.print_exc()
        row.seconds = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows


def format_table(rows: list[Row], on_gpu: bool, strict: str) -> str:
    header = ("#", "check", "device", "status", "seconds", "result")
    lines = [[str(i + 1), r.check, r.device, r.status, f"{r.seconds:.1f}", r.detail] for i, r in enumerate(rows)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "| " + " | ".join(f"{{:<{w}}}" for w in widths) + " |"
    out = [fmt.format(*header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt.format(*line) for line in lines]
    import torch

    gpu = torch.cuda.get_device_name(0) if on_gpu else None
    not_gpu = [str(i + 1) for i, r in enumerate(rows) if not r.device.startswith("cuda")]
    out.append(f"torch {torch.__version__}, CUDA {'available: ' + gpu if gpu else 'NOT available'}; "
               f"strict device proxy: {strict}")  # fmt: skip
    if not_gpu:
        out.append(f"Rows NOT run on a GPU: {', '.join(not_gpu)}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- wheels
def prepare_wheels(dest: Path) -> list[Path]:
    """Download :data:`WHEELS` for CPython 3.12 x86_64 Linux into ``dest`` (``pip download --no-deps``)."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--abi", "cp312", "--abi", "none", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
           "-d", str(dest), *WHEELS]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    total = sum(p.stat().st_size for p in wheels)
    if total > WHEEL_BUDGET_BYTES // 2:
        raise SystemExit(f"gpu_check --prepare: {dest} holds {total / 2**20:.1f} MiB of wheels, over half the "
                         f"{WHEEL_BUDGET_BYTES // 2**20} MiB a device run may carry")  # fmt: skip
    print(f"gpu_check --prepare: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {dest}")
    return wheels


def missing_wheels(wheel_dir: Path) -> list[Path]:
    """The wheels of ``wheel_dir`` whose module (:data:`WHEELS`) does not import here."""
    import importlib.util

    out = []
    for spec, module in WHEELS.items():
        name = spec.split("==")[0].lower().replace("-", "_")
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out += [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(name + "-")]
    return out


def install_wheels(wheel_dir: Path, target: Path) -> str:
    """Install :func:`missing_wheels` of ``wheel_dir`` into ``target`` (a directory the wrapper puts on PYTHONPATH),
    never into the system Python: ``pip install --no-deps --no-index --find-links DIR --target SITE`` (``--target``
    also skips pip's externally-managed-environment refusal, PEP 668), or, where pip itself is missing or fails,
    by unpacking the wheels (a wheel is a zip of the importable files). Returns a one-line report."""
    import subprocess
    import zipfile

    wheels = missing_wheels(wheel_dir)
    if not wheels:
        return f"gpu_check: every wheel of {wheel_dir} is importable already"
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--find-links",
           str(wheel_dir), "--target", str(target), "--upgrade", *map(str, wheels)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode == 0:
            names = ", ".join(p.name for p in wheels)
            return f"gpu_check: pip installed {len(wheels)} wheel(s) into {target}: {names}"
        why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = f"{type(exc).__name__}: {exc}"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    return f"gpu_check: pip could not install ({why}); unpacked {len(wheels)} wheel(s) into {target} instead"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_search.gpu_check",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--prepare", metavar="DIR", help="download the wheels a bare GPU machine lacks, then exit")
    parser.add_argument("--missing-wheels", metavar="DIR", help="print the wheels of DIR not installed here, exit")
    parser.add_argument("--install-wheels", metavar="DIR", help="install the wheels of DIR not importable here into "
                        "--target (never into the system Python), then exit")  # fmt: skip
    parser.add_argument("--target", metavar="SITE", help="with --install-wheels: the directory to install into")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of the rows")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare_wheels(Path(args.prepare))
        return 0
    if args.missing_wheels:
        print(" ".join(str(p) for p in missing_wheels(Path(args.missing_wheels))))
        return 0
    if args.install_wheels:
        if not args.target:
            parser.error("--install-wheels needs --target SITE")
        print(install_wheels(Path(args.install_wheels), Path(args.target)))
        return 0
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"--checks: unknown row(s) {unknown}; valid: {', '.join(CHECKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    on_gpu = cuda_available()
    if not on_gpu:
        os.environ.setdefault("OPENRLHF_SEARCH_STRICT_DEVICES", "1")
    ctx, strict = strict_context() if not on_gpu else (contextlib.nullcontext(), "off (real GPU)")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp, ctx:
        _LOGICAL_GPU[:] = [True] if strict == "on" else []
        try:
            rows = run_checks(names, Path(args.workdir or tmp))
        finally:
            _LOGICAL_GPU.clear()
    table = format_table(rows, on_gpu, strict)
    print("\n== openrlhf-search GPU check ==\n" + table, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"on_gpu": on_gpu, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0 if all(r.status == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
