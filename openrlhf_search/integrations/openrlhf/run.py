"""The OpenRLHF backend's run: write a plan's files, start the retrieval server, run OpenRLHF, stop the server.

With ``openrlhf.retrieval_replicas`` the retrieval servers are Ray actors instead, started by the entrypoint inside
the Ray job (:mod:`openrlhf_search.retrieval.replicas`) and ended with it; nothing is started or awaited here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from openrlhf_search.data.config import DataConfig
from openrlhf_search.data.formats import read_dataset
from openrlhf_search.data.synthetic import generate_kb
from openrlhf_search.env.config import EnvConfig
from openrlhf_search.env.search_env import SearchEnv
from openrlhf_search.env.templates import env_template
from openrlhf_search.retrieval import load_retriever
from openrlhf_search.retrieval.client import parse_urls
from openrlhf_search.trainer.config import TrainConfig, search_env_config
from openrlhf_search.trainer.models import load_tokenizer
from openrlhf_search.trainer.sft import select_train_questions

from .config import OpenRLHFConfig, to_json_file
from .plan import LaunchPlan, _orl_config, build_plan, check_cluster_inputs, checkpoint_dir


def load_train_samples(data_cfg: DataConfig) -> list:
    """Training questions (``QASample``): the synthetic KB's train split or the given files, capped at
    ``data.num_train`` (set it large for real datasets)."""
    if data_cfg.source == "synthetic":
        return generate_kb(seed=data_cfg.seed, n_entities=data_cfg.num_entities).train[: data_cfg.num_train]
    if not data_cfg.train_files:
        raise ValueError(f"data.source={data_cfg.source!r} needs data.train_files")
    return [s for path in data_cfg.train_files for s in read_dataset(path)][: data_cfg.num_train]


def select_answerable(config: TrainConfig, tokenizer, samples: list) -> list:
    """``data.train_questions``: every sample, or those whose golden answer the configured retriever returns for the
    question itself, chosen by the local trainer's own test (:func:`~openrlhf_search.trainer.sft.answerable_questions`
    on the same environment) so that both backends train on the same questions."""
    if config.data.train_questions == "all":
        return samples
    if not config.retriever.spec:
        raise ValueError("data.train_questions=answerable with --backend openrlhf needs retriever.spec (an index "
                         "directory or a server URL) to select the questions before the run starts")
    retriever = load_retriever(config.retriever.spec, token=config.retriever.token)
    env = SearchEnv(tokenizer, retriever, config.env.template, search_env_config(config))
    return select_train_questions(config.data, env, samples)


def write_prompt_dataset(samples: list, path: Path, n_rows: int, template_name: str, tokenizer, seed: int,
                         tools: list[str] | None = None) -> Path:
    """Write ``n_rows`` prompts (epochs of seeded permutations of ``samples``) as OpenRLHF JSONL (rendered with the
    template the agent's episode uses for ``tools``)."""
    if not samples:
        raise ValueError("no training questions")
    template = env_template(template_name, EnvConfig(tools=list(tools or ["search"])))
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_rows:
        perm = list(range(len(samples)))
        rng.shuffle(perm)
        order.extend(perm)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in order[:n_rows]:
            s = samples[i]
            label = json.dumps({"question": s.question, "golden_answers": list(s.golden_answers)})
            f.write(json.dumps({"input": template.render(s.question, tokenizer), "label": label}) + "\n")
    return path


def check_tokenizer_reloads(model_path: str, tokenizer, prompt_file: Path, sample: int = 64) -> None:
    """Refuse a checkpoint whose ``AutoTokenizer`` (what OpenRLHF's actors and vLLM load) tokenizes its prompts
    differently from the tokenizer it was saved with (``trainer.models.load_tokenizer``): e.g. a tiny-model run's
    locally trained BPE under a ``qwen2`` config, which transformers 5 rebuilds as ``Qwen2Tokenizer``. Compared on
    the first ``sample`` rendered prompts, by token ids (a backend that differs only in unused settings passes)."""
    if not (Path(model_path) / "tokenizer.json").is_file():
        return
    try:
        exact = load_tokenizer(model_path)
    except (OSError, RuntimeError, ValueError):  # nothing to compare against
        return
    with open(prompt_file, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line_no > sample:
                break
            text = json.loads(line)["input"]
            if tokenizer.encode(text, add_special_tokens=False) != exact.encode(text, add_special_tokens=False):
                raise ValueError(f"model.path={model_path}: AutoTokenizer (used by OpenRLHF's actors and vLLM) "
                                 f"tokenizes prompt {line_no} of {prompt_file} differently from the tokenizer this "
                                 "checkpoint was saved with; train it locally, or use a checkpoint whose "
                                 "config.json names its own tokenizer class")  # fmt: skip


def materialize(plan: LaunchPlan, config: TrainConfig) -> None:
    """Write the prompt dataset and the agent/patch JSON files of ``plan``."""
    from transformers import AutoTokenizer

    # OpenRLHF's actors and vLLM load the tokenizer with AutoTokenizer too: render the prompts with exactly that one.
    tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    n_rows = config.steps * config.rollout.prompts_per_step
    samples = select_answerable(config, tokenizer, load_train_samples(config.data))
    write_prompt_dataset(samples, plan.prompt_file, n_rows, config.env.template, tokenizer, config.seed,
                         tools=list(config.env.tools))
    check_tokenizer_reloads(config.model.path, tokenizer, plan.prompt_file)
    to_json_file(plan.agent_config, plan.agent_file)
    to_json_file(plan.patch_config, plan.patch_file)
    if plan.megatron_config is not None and plan.megatron_file is not None:
        plan.megatron_config.to_json_file(str(plan.megatron_file))


def wait_for_health(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``<url>/health`` until it answers 200; raise ``RuntimeError`` naming the URL on timeout or exit."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"retrieval server exited with code {proc.returncode} before {url}/health answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"retrieval server at {url} did not answer /health within {timeout:.0f} s")


def run_openrlhf(config: TrainConfig, dry_run: bool = False, openrlhf: OpenRLHFConfig | dict | None = None,
                 megatron: object = None, require_checkpoint: bool = False) -> int:  # fmt: skip
    """Run (or with ``dry_run`` print) the OpenRLHF training described by ``config``; return the exit code.

    ``require_checkpoint`` (``--resume``): refuse to start when the run has no checkpoint yet (``--resume-or-start``
    and ``openrlhf.resume`` alone start fresh then, as OpenRLHF does)."""
    try:
        plan = build_plan(config, openrlhf, megatron)
        check_cluster_inputs(config, plan, _orl_config(config, openrlhf))
        if require_checkpoint and not dry_run and not checkpoint_dir(plan).is_dir():
            raise ValueError(f"--resume: no checkpoint at {checkpoint_dir(plan)} (use --resume-or-start to start "
                             "fresh when there is none)")  # fmt: skip
    except (ValueError, KeyError) as exc:
        print(f"openrlhf-search train --backend openrlhf: {exc}", file=sys.stderr)
        return 2
    if dry_run:
        print(plan.render())
        return 0
    return execute(plan, config)


def resume_problem(plan: LaunchPlan) -> str:
    """The ``--resume`` refusal when the run has no checkpoint yet, or ``""``."""
    if checkpoint_dir(plan).is_dir():
        return ""
    return (f"--resume: no checkpoint at {checkpoint_dir(plan)} (use --resume-or-start to start fresh when there is "
            "none)")


def execute(plan: LaunchPlan, config: TrainConfig) -> int:
    """Write the plan's files, start the retrieval server (unless the plan names a running one, or replicas serve:
    the entrypoint starts those), run OpenRLHF and stop the server; return OpenRLHF's exit code, or 2 with one line
    when the inputs cannot be written (a bad data file, no answerable training question)."""
    try:
        materialize(plan, config)
    except ValueError as exc:  # DatasetFormatError included: names file and line
        print(f"openrlhf-search train --backend openrlhf: {exc}", file=sys.stderr)
        return 2
    env = {**os.environ, **plan.env}
    server = None
    try:
        if plan.server_command:
            server = subprocess.Popen(plan.server_command, env=env)
            wait_for_health(plan.retrieval_url, proc=server)
        elif plan.replicas is None:
            for url in parse_urls(plan.retrieval_url):  # every replica named must answer before the run starts
                wait_for_health(url, timeout=30.0)
        return subprocess.call(plan.command, env=env)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


