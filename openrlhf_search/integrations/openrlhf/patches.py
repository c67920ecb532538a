"""The ONE module that touches OpenRLHF internals: our losses and CalibAdv inside OpenRLHF 0.11.2's Ray actors.

OpenRLHF has no registry for policy losses or advantage post-processing, so we subclass its Ray actor classes and
swap them in the driver before ``train_ppo_ray.train`` builds its actor groups:

* ``PolicyModelActor`` (``openrlhf.trainer.ray.ppo_actor``): after ``init_model_from_pretrained`` builds its
  ``ActorPPOTrainer``, ``trainer.actor_loss_fn`` (OpenRLHF's ``PolicyLoss``) is replaced by
  :class:`OpenRLHFPolicyLoss`, an adapter around any loss of our registry
  (:func:`openrlhf_search.algorithms.losses.get_policy_loss`, e.g. SAPO), and the trainer's ``training_step`` also
  reports our loss's metrics (``search_loss/*``) into OpenRLHF's logs.
* ``PPOTrainer`` (``openrlhf.trainer.ppo_trainer``) and, for ``--train.async_enable``, the ``TrainingActor`` that
  ``PPOTrainerAsync`` builds (``openrlhf.trainer.ppo_trainer_async``): their ``RemoteExperienceMaker`` gets
  :func:`calibrate_experiences` after OpenRLHF's ``compute_advantages_and_returns`` (CalibAdv,
  :func:`openrlhf_search.algorithms.calibadv.calibrate_advantages`), with metrics ``calibadv/*``, plus the
  staleness tags (``async/*``, :mod:`.staleness`).

The subclasses are built by factories that capture the :class:`~.config.PatchConfig`, so Ray pickles them by value
with their configuration: nothing has to be set in the workers' environment, on one node or many. Every entry point
checks the installed OpenRLHF version first (:func:`.compat.check_openrlhf_version`).

What OpenRLHF passes to its loss (``ActorPPOTrainer.training_step``)::

    actor_loss_fn(action_log_probs, old_action_log_probs, advantages, action_mask=..., rollout_log_probs=...,
                  dp_size=..., batch_num_tokens=..., global_batch_size=...)
    -> (loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)

Reference log-probs are not passed: a KL term to the reference stays OpenRLHF's (``--algo.kl.use_loss``).

Asynchronous training (``--train.async_enable``, optionally ``--train.partial_rollout_enable``): OpenRLHF builds
``PPOTrainerAsync`` (a controller with a ``GenerateSamplesActor`` and a ``TrainingActor`` linked by a Ray queue)
instead of ``PPOTrainer``; :func:`make_async_trainer_class` makes the controller build our ``TrainingActor``, which
installs the same experience-maker hooks. Both trainers count their weight broadcasts and tell the vLLM actors,
so every sample carries weight-version tags and a staleness (:mod:`.staleness`). Not supported with our patches:
``--train.dynamic_batch_enable`` with the loss patch (our normalization assumes OpenRLHF's fixed micro-batches) and
OpenRLHF's own ``--algo.advantage.is_correction_*`` with the loss patch (use ``+tis``/``+mis``) --
:func:`check_openrlhf_args` refuses them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from openrlhf_search.algorithms.advantages import get_advantage_estimator
from openrlhf_search.algorithms.calibadv import CalibRecord, SearchTurn
from openrlhf_search.algorithms.losses import PolicyLoss, get_policy_loss, step_normalizers
from openrlhf_search.algorithms.offpolicy import with_offpolicy_correction
from openrlhf_search.algorithms.postprocess import apply_postprocessors, needs_records
from openrlhf_search.integrations.megatron.actor import openrlhf_actor_classes
from openrlhf_search.integrations.megatron.vllm_sync import WORKER_EXTENSION
from openrlhf_search.integrations.megatron.weight_sync import encode_meta
from openrlhf_search.plugins import load_plugins

from . import calib_store, compat, staleness
from .config import PatchConfig

_PATCHED: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------- the loss adapter
def _train_device():
    """The device OpenRLHF's ``ppo_train`` moves micro-batches to: ``torch.cuda.current_device()`` (the CPU shim's
    CPU, or the strict proxy's logical GPU, on CPU machines); ``"cpu"`` where torch has no CUDA and no shim runs
    (unit tests). Not decided on ``torch.cuda.is_available()``: under the strict proxy that is False, and the CPU
    branch would all-reduce a host tensor over the NCCL DP group, which no GPU run does."""
    try:
        return torch.cuda.current_device()
    except (AssertionError, RuntimeError):  # "Torch not compiled with CUDA enabled" / no device
        return "cpu"


class OpenRLHFPolicyLoss(torch.nn.Module):
    """OpenRLHF's ``PolicyLoss`` interface around a loss of our registry (any :class:`PolicyLoss`).

    Normalization (one objective on every backend, see :mod:`openrlhf_search.algorithms.losses`): the adapter asks
    the loss which counts it divides by (``PolicyLoss.normalizers``). :func:`install_loss` wraps OpenRLHF's
    ``iter_grad_accum_global_norm`` so that, per optimizer-step window, :meth:`begin_step` sums them over the
    window's micro-batches and all-reduces them over the DP group (:func:`step_normalizers`), then divides them by
    the gradient-accumulation steps ``gas`` as OpenRLHF does with its own counts
    (``openrlhf.utils.loss_utils._optimizer_step_loss_norm``). DeepSpeed scales every backward by ``1/gas`` and
    averages gradients over the ``dp_size`` ranks; the loss gets ``count / dp_size``, so each micro-batch loss is
    ``local sum x gas x dp_size / N`` and the final gradient is exactly that of ``sum over the step / N``, the
    objective our loss defines. OpenRLHF's own counts (``batch_num_tokens``, ``global_batch_size``) only tell the
    adapter that it runs inside ``ppo_train``; without them (a bare call) the loss uses its local means.

    Off-policy correction (``offpolicy="tis"``/``"mis"``, the ``+tis``/``+mis`` modifiers): the registry loss is
    wrapped by :func:`~openrlhf_search.algorithms.offpolicy.with_offpolicy_correction` and gets OpenRLHF's
    ``rollout_log_probs`` (vLLM's processed log-probs of the sampled tokens, 0 on masked positions) as
    ``behaviour_log_probs``: ``rho = pi_old / pi_vllm`` corrects both the vLLM/trainer numerics gap and stale samples
    of ``--train.async_enable``. The proximal policy is ``old_log_probs`` (recomputed by the trainer with the current
    weights), as in the local trainer. With MIS the dropped tokens stay in the step's counts (the normalizer), as
    in the local trainer and in OpenRLHF's own mask mode. OpenRLHF's own correction
    (``--algo.advantage.is_correction_*``) lives in the ``PolicyLoss`` this adapter replaces: :func:`apply_patches`
    refuses it with any loss patch, so the two are never applied together (nor is theirs silently dropped).

    Metrics of the last call are kept in :attr:`last_metrics` (floats): our loss's diagnostics plus
    ``rollout_logprob_abs_diff``, the mean ``|log pi_old - log pi_rollout|`` over model tokens when vLLM's log-probs
    are available -- ~1e-3 when vLLM samples from the trained weights, far larger when weight sync is broken.
    """

    def __init__(self, loss_name: str, loss_config: dict | None = None, offpolicy: str = "",
                 offpolicy_config: dict | None = None) -> None:  # fmt: skip
        super().__init__()
        self.loss_name = loss_name + (f"+{offpolicy}" if offpolicy else "")
        self.loss_fn = get_policy_loss(loss_name, **(loss_config or {}))
        if offpolicy:
            self.loss_fn = with_offpolicy_correction(self.loss_fn, offpolicy, **(offpolicy_config or {}))
        if not isinstance(self.loss_fn, PolicyLoss):
            raise TypeError(f"policy loss {loss_name!r} does not meet the PolicyLoss protocol (config, normalizers, "
                            f"needs_* and the call; see openrlhf_search.algorithms.losses): got {self.loss_fn!r}")
        self.needs_behaviour = bool(self.loss_fn.needs_behaviour_log_probs)
        self.last_metrics: dict[str, float] = {}
        self.step_counts: dict[str, Any] | None = None
        """The loss's normalisers of the current optimizer step / gas (set by :meth:`begin_step`)."""

    def begin_step(self, experiences: list, gas: int = 1, dp_group: Any = None) -> None:
        """Count the loss's normalisers over one optimizer step's micro-batches (``experiences``), all-reduced over
        ``dp_group`` when torch.distributed is initialised, divided by ``gas`` like OpenRLHF's own counts."""
        device = _train_device()
        pairs = [(exp.action_mask.to(device), exp.advantages.to(device)) for exp in experiences]
        counts = step_normalizers(pairs, self.loss_fn, group=dp_group, device=device)
        self.step_counts = {k: v.float() / max(int(gas), 1) for k, v in counts.items()}

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):  # fmt: skip
        """Compute our loss; return OpenRLHF's 5-tuple ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``."""
        if action_mask is None:
            action_mask = torch.ones_like(log_probs, dtype=torch.bool)
        mask = action_mask.bool()
        extra = {}
        if batch_num_tokens is not None or global_batch_size is not None:  # inside ppo_train: the step's counts
            if self.step_counts is None:
                raise RuntimeError(
                    f"policy loss {self.loss_name!r} got OpenRLHF's global counts but no step counts of its own: "
                    "call begin_step() per optimizer step (install_loss wires it)"
                )
            extra.update({k: v / dp_size for k, v in self.step_counts.items()})  # see the class docstring
        if self.needs_behaviour:
            if rollout_log_probs is None:
                raise RuntimeError(
                    f"policy loss {self.loss_name!r}: the off-policy correction needs vLLM's log-probs of the sampled "
                    "tokens (OpenRLHF's rollout_log_probs) and the experience has none: set "
                    "openrlhf.record_rollout_logprobs=true (the agent then asks vLLM for them)"
                )
            extra["behaviour_log_probs"] = rollout_log_probs.to(old_log_probs.dtype)
        loss, metrics = self.loss_fn(log_probs, old_log_probs, advantages, mask, **extra)
        with torch.no_grad():
            n_tok = mask.sum().clamp(min=1)
            log_ratio = torch.where(mask, log_probs.detach() - old_log_probs, torch.zeros_like(log_probs))
            ppo_kl = -log_ratio.sum() / n_tok
            clip_ratio = torch.tensor(
                metrics.get("clip_frac_low", 0.0) + metrics.get("clip_frac_high", 0.0), device=log_probs.device
            )
            if rollout_log_probs is not None:
                diff = torch.where(mask, (old_log_probs - rollout_log_probs).abs(), torch.zeros_like(old_log_probs))
                metrics["rollout_logprob_abs_diff"] = (diff.sum() / n_tok).item()
        self.last_metrics = {f"search_loss/{k}": float(v) for k, v in metrics.items()}
        return loss, clip_ratio, ppo_kl, None, None


# --------------------------------------------------------------------------------------------- advantages
def calibrate_experiences(experiences: list, n_samples_per_prompt: int, calib_config: dict | None = None) -> dict:
    """CalibAdv on OpenRLHF experiences in place: :func:`postprocess_experiences` with the chain ``calibadv``."""
    return postprocess_experiences(experiences, n_samples_per_prompt, PatchConfig(calibadv=True,
                                                                                   calibadv_config=calib_config or {}))


def _calib_records(experiences: list) -> tuple[list, int]:
    """The agent's CalibRecords of every sample of ``experiences``, collected by id; ``(records, missing)``."""



    ids = []
    for exp in experiences:
        got = exp.info.get(calib_store.CALIB_ID_KEY)
        if got is None:
            raise RuntimeError(
                "an advantage post-processor needs the environment's records but the experiences carry no calib_id: "
                "the agent must run with calib_records=true (openrlhf_search.integrations.openrlhf.agent)"
            )
        ids.extend(int(i) for i in torch.as_tensor(got).reshape(-1).tolist())
    raw = calib_store.collect(ids)
    records, missing = [], 0
    for rec in raw:
        if rec is None:
            missing += 1
            rec = {"search_turns": [], "answer_span": None, "f1": 0.0, "valid_format": False}
        records.append(CalibRecord(
            search_turns=[SearchTurn(**t) for t in rec["search_turns"]],
            answer_span=tuple(rec["answer_span"]) if rec["answer_span"] is not None else None,
            f1=float(rec["f1"]), valid_format=bool(rec["valid_format"])))  # fmt: skip
    return records, missing


def postprocess_experiences(experiences: list, n_samples_per_prompt: int, patch: PatchConfig) -> dict:
    """Our advantage estimator and post-processor chain on OpenRLHF experiences, in place, after OpenRLHF's own
    ``compute_advantages_and_returns`` (both training backends: DeepSpeed and Megatron actors).

    Each experience is a right-padded micro-batch with ``advantages``/``action_mask`` ``[b, T_e]``, ``rewards``
    ``[b]`` (the raw scores), ``index`` (the samples' positions in the rollout batch; group id =
    ``index // n_samples_per_prompt``, the grouping OpenRLHF's own group baselines use) and, when a post-processor
    needs records, ``info["calib_id"]`` (the record ids published by the agent). With ``patch.estimator`` the outcome
    advantages are recomputed from the rewards by our registry estimator; otherwise the outcome advantage of a sample
    is OpenRLHF's on its first model token (OpenRLHF's outcome estimators give every model token the same value).
    All micro-batches are processed together (group statistics), then written back. ``patch.plugins`` are imported
    first, so user-registered estimators and post-processors resolve here.

    Returns the chain's metrics (CalibAdv's ``calibadv/*``, plus ``calibadv/missing_records`` when records are used:
    samples without a record get an empty one).
    """

    load_plugins(patch.plugins, source="patch.plugins")
    chain = patch.chain()
    rows = [(exp, r) for exp in experiences for r in range(exp.action_mask.shape[0])]
    T = max(exp.action_mask.shape[1] for exp in experiences)
    B = len(rows)
    mask = torch.zeros(B, T, dtype=torch.bool)
    seq_adv = torch.zeros(B)
    rewards = torch.zeros(B)
    group_ids = torch.zeros(B, dtype=torch.long)
    for k, (exp, r) in enumerate(rows):
        m = exp.action_mask[r].bool().cpu()
        mask[k, : m.shape[0]] = m
        first = int(m.nonzero()[0]) if m.any() else None
        seq_adv[k] = float(exp.advantages[r, first]) if first is not None else 0.0
        if patch.estimator:
            rewards[k] = float(torch.as_tensor(exp.rewards).reshape(-1)[r])
        group_ids[k] = int(exp.index[r]) // n_samples_per_prompt
    if patch.estimator:
        seq_adv = get_advantage_estimator(patch.estimator, **patch.estimator_config)(rewards, group_ids)
    records, missing = (None, 0)
    if needs_records(chain):
        records, missing = _calib_records(experiences)
    token_adv, metrics = apply_postprocessors(chain, seq_adv, mask, group_ids, records)
    for k, (exp, r) in enumerate(rows):
        t_e = exp.advantages.shape[1]
        exp.advantages[r] = token_adv[k, :t_e].to(exp.advantages.dtype)
    if records is not None:
        for exp in experiences:
            exp.info.pop(calib_store.CALIB_ID_KEY, None)
        metrics["calibadv/missing_records"] = float(missing)
    return {k if "/" in k else f"advantages/{k}": float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------- actor subclasses
def make_policy_actor_class(base_remote_cls, patch: PatchConfig):
    """A Ray actor class like ``base_remote_cls`` (OpenRLHF's ``PolicyModelActor``) whose trainer uses our loss
    (``patch.loss``) and, with LoRA (``--ds.lora.rank > 0``), gets peft the target modules it expands and sends vLLM
    merged weights under the plain model's names (:func:`lora_target_modules`, :func:`install_lora_sync`)."""
    base = base_remote_cls.__ray_actor_class__

    class SearchPolicyModelActor(base):
        _patch_config = patch

        def init_model_from_pretrained(self, strategy, *args, **kwargs):
            lora = strategy.args.ds.lora
            lora.target_modules = lora_target_modules(lora.target_modules)  # before OpenRLHF's Actor builds peft's
            out = super().init_model_from_pretrained(strategy, *args, **kwargs)
            install_loss(self.trainer, self._patch_config)
            install_lora_sync(self.trainer)
            return out

    SearchPolicyModelActor.__qualname__ = SearchPolicyModelActor.__name__ = "SearchPolicyModelActor"
    return _as_remote(SearchPolicyModelActor, base_remote_cls)


def install_loss(trainer, patch: PatchConfig) -> None:
    """Replace ``trainer.actor_loss_fn`` by our loss and make ``training_step`` log its metrics."""
    if not patch.loss:
        return

    load_plugins(patch.plugins, source="patch.plugins")  # a user's loss may live in a plugin module
    loss = OpenRLHFPolicyLoss(patch.loss, patch.loss_config, patch.offpolicy, patch.offpolicy_config)
    trainer.actor_loss_fn = loss
    trainer.strategy._search_policy_loss = loss  # the step windows count the loss's normalisers (begin_step)
    _wrap_step_windows()
    original_step = trainer.training_step

    def training_step(experience, kl_ctl, step, loss_batch_info=None):
        status = original_step(experience, kl_ctl, step, loss_batch_info)
        for key, value in loss.last_metrics.items():
            status["metrics"][key] = torch.tensor(value)
            status["weights"][key] = "token"
        return status

    trainer.training_step = training_step


def _wrap_step_windows() -> None:
    """Wrap OpenRLHF's ``iter_grad_accum_global_norm`` (its optimizer-step windows, as ``ppo_train`` uses them) so
    that the loss installed on the strategy counts its normalisers per window before the window trains."""
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_mod

    original = ppo_actor_mod.iter_grad_accum_global_norm
    if getattr(original, "_search_wrapped", False):
        return

    def iter_grad_accum_global_norm(data_iter, strategy, accumulated_gradient, mask_fn):
        from openrlhf.utils.loss_utils import _get_dp_group

        loss = getattr(strategy, "_search_policy_loss", None)
        inner = original(data_iter, strategy, accumulated_gradient, mask_fn)
        if loss is None:
            yield from inner
            return
        gas = max(int(accumulated_gradient), 1)
        window: list = []
        for pair in inner:
            window.append(pair)
            if len(window) == gas:
                loss.begin_step([item for item, _ in window], gas, _get_dp_group(strategy))
                yield from window
                window = []
        if window:  # trailing partial step: OpenRLHF still divides its counts by gas
            loss.begin_step([item for item, _ in window], gas, _get_dp_group(strategy))
            yield from window

    iter_grad_accum_global_norm._search_wrapped = True  # type: ignore[attr-defined]
    ppo_actor_mod.iter_grad_accum_global_norm = iter_grad_accum_global_norm


def _versioned_broadcast_base():
    """A ``BasePPOTrainer`` subclass whose ``broadcast_to_vllm`` counts the weight versions (:mod:`.staleness`).

    It is placed *after* OpenRLHF's concrete trainer in the bases of our subclasses (``class
    SearchTrainingActor(TrainingActor, WeightVersionedBroadcast)``), so the MRO puts it between that trainer and
    ``BasePPOTrainer``: the async ``TrainingActor.broadcast_to_vllm`` (vLLM lock, ``pause_generation`` with partial
    rollouts) calls it through ``super()``, and the new version reaches the rollout actors *before* OpenRLHF resumes
    generation. A turn that starts after the resume therefore never reads the old version."""
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    class WeightVersionedBroadcast(BasePPOTrainer):
        _search_weight_version = 0

        def broadcast_to_vllm(self):
            super().broadcast_to_vllm()

            self._search_weight_version += 1
            staleness.publish_engine_version(self.vllm_engines, self._search_weight_version)

        def search_weight_version(self) -> int:
            return self._search_weight_version

        def openrlhf_search_hooks(self) -> dict:
            """What our patches installed in this trainer (the async controller checks it)."""
            return dict(getattr(self, "_search_hooks", {}))

    return WeightVersionedBroadcast


def _install_trainer_hooks(trainer, patch: PatchConfig) -> None:
    """Our experience-maker hooks on a freshly built OpenRLHF trainer (sync ``PPOTrainer`` or async
    ``TrainingActor``); raises if the trainer has no experience maker to hook."""
    maker = getattr(trainer, "experience_maker", None)
    if maker is None or not hasattr(maker, "compute_advantages_and_returns"):
        raise RuntimeError(
            f"{type(trainer).__name__} has no experience maker with compute_advantages_and_returns: openrlhf_search "
            "cannot install CalibAdv / its advantage estimator / dumps / staleness tags (OpenRLHF layout changed?)"
        )
    install_maker_hooks(maker, patch, version_fn=lambda: trainer._search_weight_version)
    trainer._search_hooks = {"maker": True, "advantages": patch.advantages_patched, "dump": bool(patch.dump_dir)}


def make_ppo_trainer_class(base_remote_cls, patch: PatchConfig):
    """A Ray actor class like OpenRLHF's ``PPOTrainer`` whose experience maker applies CalibAdv (and dumps) and whose
    weight broadcasts are versioned (staleness tags, always 0 in the synchronous loop)."""
    base = base_remote_cls.__ray_actor_class__

    class SearchPPOTrainer(base, _versioned_broadcast_base()):
        _patch_config = patch

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _install_trainer_hooks(self, self._patch_config)

    SearchPPOTrainer.__qualname__ = SearchPPOTrainer.__name__ = "SearchPPOTrainer"
    return _as_remote(SearchPPOTrainer, base_remote_cls)


def make_training_actor_class(base_remote_cls, patch: PatchConfig):
    """The raw (not yet ``ray.remote``) class of OpenRLHF's async ``TrainingActor`` with our hooks: the trainer half
    of ``PPOTrainerAsync``; it builds the experience maker (``BasePPOTrainer.__init__``) and broadcasts weights."""
    base = base_remote_cls.__ray_actor_class__

    class SearchTrainingActor(base, _versioned_broadcast_base()):
        _patch_config = patch

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _install_trainer_hooks(self, self._patch_config)

    SearchTrainingActor.__qualname__ = SearchTrainingActor.__name__ = "SearchTrainingActor"
    return SearchTrainingActor


def make_async_trainer_class(base_remote_cls, training_actor_remote_cls, patch: PatchConfig):
    """A Ray actor class like OpenRLHF's ``PPOTrainerAsync`` (the ``--train.async_enable`` controller) that builds our
    :func:`make_training_actor_class` instead of OpenRLHF's ``TrainingActor``.

    ``PPOTrainerAsync.__init__`` runs in its own Ray worker and looks the global ``TrainingActor`` up there, so the
    driver cannot swap it. Ray ships OpenRLHF's class to that worker *by value* (cloudpickle: the module attribute
    is the Ray wrapper, not the class), with a private copy of the globals its methods use, so setting the module
    attribute in the worker does nothing (OpenRLHF's own ``TrainingActor`` would be built). Our
    controller therefore sets the name in ``__init__.__globals__`` -- the module dict when pickled by reference,
    the private copy when by value -- around ``super().__init__``, then checks that the actor it built is ours and
    has its hooks (it raises otherwise: CalibAdv is never silently skipped)."""
    base = base_remote_cls.__ray_actor_class__
    training_cls = make_training_actor_class(training_actor_remote_cls, patch)

    class SearchPPOTrainerAsync(base):
        _training_cls = training_cls

        def __init__(self, *args, **kwargs):
            import ray

            init_globals = base.__init__.__globals__
            original = init_globals["TrainingActor"]
            init_globals["TrainingActor"] = _as_remote(self._training_cls, original)
            try:
                super().__init__(*args, **kwargs)
            finally:
                init_globals["TrainingActor"] = original
            try:
                hooks = ray.get(self.trainer_actor.openrlhf_search_hooks.remote())
            except AttributeError as exc:
                raise RuntimeError("--train.async_enable: OpenRLHF's PPOTrainerAsync did not build openrlhf_search's "
                                   "TrainingActor (its constructor changed?); CalibAdv/dumps/staleness would not "
                                   "run") from exc  # fmt: skip
            if not hooks.get("maker"):
                raise RuntimeError("--train.async_enable: openrlhf_search's experience-maker hooks are not installed "
                                   f"in the TrainingActor ({hooks})")  # fmt: skip

    SearchPPOTrainerAsync.__qualname__ = SearchPPOTrainerAsync.__name__ = "SearchPPOTrainerAsync"
    return _as_remote(SearchPPOTrainerAsync, base_remote_cls)


def install_maker_hooks(maker, patch: PatchConfig, version_fn=None) -> None:
    """Wrap ``maker.compute_advantages_and_returns``: then tag staleness (with ``version_fn``, the trainer's weight
    version: :func:`.staleness.tag_staleness`), run :func:`postprocess_experiences` (our estimator and
    post-processors, e.g. CalibAdv) and, with ``patch.dump_dir``, :func:`dump_experiences`. Metrics go to the
    experiences' ``info``, one value per sample, so OpenRLHF averages and logs them."""
    if not (patch.advantages_patched or patch.dump_dir or version_fn is not None):
        return

    load_plugins(patch.plugins, source="patch.plugins")
    original = maker.compute_advantages_and_returns
    state = {"step": 0}

    def compute_advantages_and_returns(experiences):

        experiences = original(experiences)
        metrics = staleness.tag_staleness(experiences, int(version_fn())) if version_fn is not None else {}
        if patch.advantages_patched:
            n_per_prompt = maker.args.rollout.n_samples_per_prompt
            metrics.update(postprocess_experiences(experiences, n_per_prompt, patch))
        for exp in experiences:
            n = exp.action_mask.shape[0]
            for key, value in metrics.items():
                exp.info[key] = torch.full((n,), value)
        state["step"] += 1
        if patch.dump_dir:
            dump_experiences(experiences, Path(patch.dump_dir) / f"step_{state['step']}.pt")
        return experiences

    maker.compute_advantages_and_returns = compute_advantages_and_returns


def dump_experiences(experiences: list, path: Path) -> Path:
    """Save the per-sample tensors of ``experiences`` (unpadded rows) with ``torch.save``."""

    rows = []
    for exp in experiences:
        for r in range(exp.sequences.shape[0]):
            row = {"sequence": exp.sequences[r].cpu(), "action_mask": exp.action_mask[r].cpu(),
                   "advantages": exp.advantages[r].cpu(), "action_log_probs": exp.action_log_probs[r].cpu(),
                   "index": int(exp.index[r])}  # fmt: skip
            if exp.rollout_log_probs is not None:
                row["rollout_log_probs"] = exp.rollout_log_probs[r].cpu()
            if "reward" in exp.info:
                row["reward"] = float(torch.as_tensor(exp.info["reward"]).reshape(-1)[r])
            for key in ("weight_version_min", "weight_version_max", "async/staleness", "async/trainer_version"):
                if key in exp.info:  # staleness tags (.staleness)
                    row[key] = float(torch.as_tensor(exp.info[key]).reshape(-1)[r])
            rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows, path)
    return path


def _as_remote(cls, like):
    """``ray.remote`` of ``cls`` with the same decorator options as the Ray actor class ``like``."""
    import ray

    options = _remote_options(like)
    return ray.remote(**options)(cls) if options else ray.remote(cls)


def _remote_options(remote_cls) -> dict:
    """The ``@ray.remote(...)`` options of an existing actor class (e.g. ``num_gpus=1``)."""
    opts = getattr(remote_cls, "_default_options", None)
    if opts is None:
        opts = remote_cls.__ray_metadata__.default_options  # older Ray layout
    return {k: v for k, v in dict(opts or {}).items() if v is not None}


# --------------------------------------------------------------------------------------------- LoRA
LORA_ALL_LINEAR = "all-linear"
"""peft's shorthand for every linear layer but the output head (``peft.tuners.tuners_utils``)."""

_PEFT_PREFIX = "base_model.model."
"""Prefix ``PeftModel.named_parameters`` puts before the wrapped model's names."""


def lora_target_modules(value: Any) -> Any:
    """The ``target_modules`` to give peft for OpenRLHF's parsed ``--ds.lora.target_modules``.

    OpenRLHF 0.11.2 declares the flag with ``nargs="*"``, so ``--ds.lora.target_modules all-linear`` arrives as the
    list ``['all-linear']``; peft expands the shorthand only when it is a *string*
    (``_maybe_include_all_linear_layers``) and otherwise looks for a module named ``all-linear`` ("Target modules
    {'all-linear'} not found"). A one-element list holding the shorthand becomes the string; anything else (module
    names, or the flag's string default) is returned unchanged."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and str(value[0]).lower() == LORA_ALL_LINEAR:
        return str(value[0])
    return value


class _MergedLoraWeight:
    """A LoRA-wrapped layer's weight as the plain model would hold it after merging: ``W + delta`` (peft's
    ``get_delta_weight`` of every active adapter, as ``merge_adapter`` adds it), computed when ``.data`` is read.

    OpenRLHF's ``broadcast_to_vllm`` lists every parameter first and then reads ``param.data``/``shape``/``dtype``
    one at a time, so computing on read keeps one merged weight alive at a time (a merged copy of every adapted
    layer at once would double their memory), and the trained model is never modified (merging into bf16 weights
    and unmerging afterwards does not restore them exactly: the frozen base would drift every sync)."""

    requires_grad = True  # OpenRLHF syncs VLM models' trainable parameters only; a merged weight must be synced

    def __init__(self, layer: Any, weight: torch.Tensor) -> None:
        self.layer = layer
        self.weight = weight
        self.shape = weight.shape
        self.dtype = weight.dtype
        self.device = weight.device

    @property
    def data(self) -> torch.Tensor:
        with torch.no_grad():
            merged = self.weight.detach().clone()
            for adapter in self.layer.active_adapters:
                if adapter in self.layer.lora_A or adapter in getattr(self.layer, "lora_embedding_A", {}):
                    merged += self.layer.get_delta_weight(adapter).to(merged.dtype)
            return merged


def merged_lora_parameters(model: Any) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of a peft ``PeftModel`` under the names of the plain (unwrapped) model's
    ``named_parameters()``, the names vLLM's loader knows: ``base_model.model.`` stripped, ``.base_layer`` dropped,
    the adapters' own parameters (``lora_*``) skipped; each adapted layer's weight is a :class:`_MergedLoraWeight`.

    Raises ``ValueError`` on what the plain model has no name for (peft's ``modules_to_save`` copies) and on
    adapters whose merge is not a weight delta (DoRA)."""
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    out = []
    for name, param in torch.nn.Module.named_parameters(model):  # the class method: not our override below
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        if "modules_to_save" in parts or "original_module" in parts:
            raise ValueError(f"LoRA weight sync: {name!r} belongs to peft's modules_to_save, which openrlhf_search "
                             "cannot map to vLLM's names; train without modules_to_save")  # fmt: skip
        if "base_layer" in parts:
            owner = ".".join(parts[: parts.index("base_layer")])
            layer = modules.get(owner)
            if not isinstance(layer, LoraLayer):
                raise ValueError(f"LoRA weight sync: {name!r} is not under a LoRA layer")
            if any(getattr(layer, "use_dora", {}).get(a, False) for a in layer.active_adapters):
                raise ValueError(f"LoRA weight sync: {owner!r} uses DoRA, whose merge openrlhf_search does not "
                                 "compute; use plain LoRA")  # fmt: skip
            if parts[-1] == "weight" and not getattr(layer, "merged", False):
                param = _MergedLoraWeight(layer, param)
            parts = [p for p in parts if p != "base_layer"]
        hf_name = ".".join(parts)
        out.append((hf_name[len(_PEFT_PREFIX):] if hf_name.startswith(_PEFT_PREFIX) else hf_name, param))
    return out


def _is_lora_model(model: Any) -> bool:
    return type(model).__name__.startswith("Peft") and hasattr(model, "peft_config")


def install_lora_sync(trainer: Any) -> bool:
    """With a peft model in ``trainer.actor``, make ``trainer.broadcast_to_vllm`` send the merged weights under the
    plain model's names (:func:`merged_lora_parameters`) through OpenRLHF's own transport (NCCL, CUDA IPC or the
    CPU shim's gloo): during the broadcast the model's ``named_parameters`` is replaced by that view, then restored.
    Without it vLLM 0.29's loader rejects the first name (``There is no module or parameter named
    'base_model'``). Returns whether it installed."""
    actor_model = getattr(getattr(trainer, "actor", None), "model", None)
    model = getattr(actor_model, "module", actor_model)  # the DeepSpeed engine wraps the PeftModel
    if model is None or not _is_lora_model(model):
        return False
    original = trainer.broadcast_to_vllm

    def broadcast_to_vllm(*args, **kwargs):
        view = merged_lora_parameters(model)
        model.named_parameters = lambda *a, **k: iter(view)
        try:
            return original(*args, **kwargs)
        finally:
            del model.named_parameters  # back to the class method

    trainer.broadcast_to_vllm = broadcast_to_vllm
    return True


# --------------------------------------------------------------------------------------------- entry point
def check_openrlhf_args(patch: PatchConfig, args) -> None:
    """Refuse the OpenRLHF flags our patches cannot honour, each with a message naming the flag (pure: no
    OpenRLHF import, so the main suite tests it with a namespace)."""
    train, algo = args.train, args.algo
    correction = getattr(algo.advantage, "is_correction_level", "off")
    if patch.loss and correction != "off":
        raise ValueError(
            f"--algo.advantage.is_correction_level {correction}: OpenRLHF applies that correction inside its "
            f"PolicyLoss, which openrlhf_search's loss patch ({patch.loss!r}) replaces, so it would be silently "
            "dropped (or, with +tis/+mis, applied twice); use the algorithm's +tis / +mis modifier instead "
            "(e.g. algorithm.name=grpo+tis) and leave OpenRLHF's --algo.advantage.is_correction_* at off"
        )
    if patch.offpolicy and not patch.loss:
        raise ValueError(f"patch offpolicy={patch.offpolicy!r} without a loss: +{patch.offpolicy} wraps our loss")
    if patch.loss and train.dynamic_batch_enable:
        raise ValueError("--train.dynamic_batch_enable is not supported with openrlhf_search's loss patch (its "
                         "normalization assumes OpenRLHF's fixed micro-batches)")  # fmt: skip
    if getattr(train, "partial_rollout_enable", False) and not train.async_enable:
        raise ValueError("--train.partial_rollout_enable needs --train.async_enable (OpenRLHF's rule)")
    ds = getattr(args, "ds", None)
    if getattr(getattr(ds, "lora", None), "rank", 0) > 0:  # merged LoRA weights are computed from full tensors
        for flag, on in (("--ds.zero_stage 3", ds.zero_stage == 3),
                         ("--ds.tensor_parallel_size > 1", getattr(ds, "tensor_parallel_size", 1) > 1),
                         ("--ds.load_in_4bit", getattr(ds, "load_in_4bit", False))):  # fmt: skip
            if on:
                raise ValueError(f"LoRA (--ds.lora.rank {ds.lora.rank}) with {flag} is not supported: openrlhf_search "
                                 "merges the adapters into full, unquantised weights for vLLM; use ZeRO stage 0-2, "
                                 "no DeepSpeed tensor parallelism and no 4-bit base")  # fmt: skip


def apply_patches(patch: PatchConfig, args=None) -> None:
    """Swap OpenRLHF's ``PolicyModelActor`` / ``PPOTrainer`` (or, with ``--train.async_enable``, its
    ``PPOTrainerAsync``, whose ``TrainingActor`` becomes ours) for our subclasses (driver side, before ``train``).

    Args:
        patch: what to replace; an inactive config changes nothing.
        args: OpenRLHF's parsed arguments, checked by :func:`check_openrlhf_args` (refused flag combinations);
            with ``--ds.lora.rank > 0`` the policy actor is always ours (LoRA target modules and weight sync).
    """
    load_plugins(patch.plugins, source="patch.plugins")  # the driver resolves names too
    lora = args is not None and getattr(getattr(getattr(args, "ds", None), "lora", None), "rank", 0) > 0
    if not (patch.active or lora):
        return
    compat.check_openrlhf_version()
    if args is not None:
        check_openrlhf_args(patch, args)
    import openrlhf.trainer.ppo_trainer as ppo_trainer_mod
    import openrlhf.trainer.ppo_trainer_async as ppo_trainer_async_mod
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_mod

    if "PolicyModelActor" not in _PATCHED:
        _PATCHED["PolicyModelActor"] = ppo_actor_mod.PolicyModelActor
        _PATCHED["PPOTrainer"] = ppo_trainer_mod.PPOTrainer
        _PATCHED["PPOTrainerAsync"] = ppo_trainer_async_mod.PPOTrainerAsync
        _PATCHED["TrainingActor"] = ppo_trainer_async_mod.TrainingActor
    if patch.loss or lora:
        ppo_actor_mod.PolicyModelActor = make_policy_actor_class(_PATCHED["PolicyModelActor"], patch)
        cli = sys.modules.get("openrlhf.cli.train_ppo_ray")
        if cli is not None:
            cli.PolicyModelActor = ppo_actor_mod.PolicyModelActor
    # both trainers: train_ppo_ray imports the one --train.async_enable selects when train() runs
    ppo_trainer_mod.PPOTrainer = make_ppo_trainer_class(_PATCHED["PPOTrainer"], patch)
    ppo_trainer_async_mod.PPOTrainerAsync = make_async_trainer_class(_PATCHED["PPOTrainerAsync"],
                                                                     _PATCHED["TrainingActor"], patch)


# --------------------------------------------------------------------------------------------- Megatron backend
def make_rollout_actor_class(base_remote_cls):
    """OpenRLHF's vLLM Ray actor (``RolloutRayActor``) with the Megatron backend's bucketed weight receiver.

    Its engines load :data:`..megatron.vllm_sync.WORKER_EXTENSION` (OpenRLHF's ``WorkerWrap`` plus
    ``update_weight_bucket``) instead of OpenRLHF's ``WorkerWrap``, and the actor forwards ``update_weight_bucket``
    to every worker with ``collective_rpc`` (as OpenRLHF's own ``update_weight``).
    """

    base = base_remote_cls.__ray_actor_class__

    class MegatronRolloutRayActor(base):
        async def __init__(self, *args, **kwargs):
            kwargs["worker_extension_cls"] = WORKER_EXTENSION
            await super().__init__(*args, **kwargs)

        async def update_weight_bucket(self, meta):
            # pickled: vLLM's collective_rpc serialiser would turn the BucketMeta dataclass into a dict
            return await self.llm.collective_rpc("update_weight_bucket", args=(encode_meta(meta),))

    MegatronRolloutRayActor.__qualname__ = MegatronRolloutRayActor.__name__ = "MegatronRolloutRayActor"
    return _as_remote(MegatronRolloutRayActor, base_remote_cls)


def apply_megatron_backend(config, args=None) -> None:
    """Train with the Megatron actors (``backend: megatron``): swap OpenRLHF's ``PolicyModelActor`` and
    ``ReferenceModelActor`` for :func:`openrlhf_search.integrations.megatron.actor.openrlhf_actor_classes` and its
    vLLM actor for :func:`make_rollout_actor_class` (driver side, before ``train_ppo_ray.train``).

    The classes capture ``config`` (a :class:`~openrlhf_search.integrations.megatron.config.MegatronActorConfig`),
    so Ray ships the configuration with them. ``args`` (OpenRLHF's parsed flags) is checked: the duplicate factor
    ``ds.ring_attn_size x ds.tensor_parallel_size`` must equal ``TP x PP x CP`` (the launcher sets
    ``--ds.tensor_parallel_size``), the actor world size must be a multiple of it, and packing, dynamic batching and
    async training are refused (the Megatron actors do not implement them).
    """

    compat.check_openrlhf_version()
    if args is not None:
        dup = args.ds.ring_attn_size * args.ds.tensor_parallel_size
        if dup != config.duplicate_actors:
            raise ValueError(
                f"backend: megatron needs --ds.tensor_parallel_size {config.duplicate_actors} (TP x PP x CP, "
                f"OpenRLHF's duplicate factor) and --ds.ring_attn_size 1; got ring_attn_size x tensor_parallel_size "
                f"= {dup}"
            )
        roles = ("actor", "ref") if args.algo.kl.init_coef > 0 else ("actor",)
        for role in roles:
            world = getattr(args, role).num_nodes * getattr(args, role).num_gpus_per_node
            if world % dup:
                raise ValueError(f"backend: megatron: {role} world size {world} is not divisible by TPxPPxCP={dup}")
        if args.train.async_enable or getattr(args.train, "partial_rollout_enable", False):
            raise ValueError(
                "backend: megatron does not support --train.async_enable / --train.partial_rollout_enable: OpenRLHF's "
                "async TrainingActor would drive the Megatron actors while vLLM generates, but their bucketed weight "
                "broadcast (megatron.weight_sync) is not versioned for staleness tags and was never run concurrently "
                "with generation; use the DeepSpeed strategy for asynchronous training"
            )
        refused = {"--ds.packing_samples": args.ds.packing_samples,
                   "--train.dynamic_batch_enable": args.train.dynamic_batch_enable}  # fmt: skip
        bad = [flag for flag, on in refused.items() if on]
        if bad:
            raise ValueError(f"backend: megatron does not support {', '.join(bad)}")
    import openrlhf.trainer.ray.launcher as launcher_mod
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_mod
    import openrlhf.trainer.ray.vllm_engine as vllm_engine_mod

    for key, mod, name in (("MegatronPolicy", ppo_actor_mod, "PolicyModelActor"),
                           ("MegatronReference", launcher_mod, "ReferenceModelActor"),
                           ("MegatronRollout", vllm_engine_mod, "RolloutRayActor")):  # fmt: skip
        _PATCHED.setdefault(key, getattr(mod, name))
    policy_cls, reference_cls = openrlhf_actor_classes(config)
    ppo_actor_mod.PolicyModelActor = policy_cls
    launcher_mod.ReferenceModelActor = reference_cls
    vllm_engine_mod.RolloutRayActor = make_rollout_actor_class(_PATCHED["MegatronRollout"])
    cli = sys.modules.get("openrlhf.cli.train_ppo_ray")
    if cli is not None:
        cli.PolicyModelActor, cli.ReferenceModelActor = policy_cls, reference_cls
