"""Preemption, divergence and exit codes of the local trainer.

A cluster preempts a job by sending SIGTERM (Slurm: ``#SBATCH --signal=B:TERM@120`` sends it 120 s before the
kill); a user stops one with Ctrl-C (SIGINT). :class:`PreemptionGuard` turns the first such signal into a request
that the RL loop honours at its next safe point (the end of the current step): it writes a checkpoint and the run
exits with :data:`EXIT_PREEMPTED`. During set-up and the warm start (before the first RL step, when there is no
RL state to save) the signal stops the run at once with the same code. A second signal stops the run immediately
without saving. The message names what the run was doing and says what is true of its directory: ``--resume`` when
a checkpoint exists (a resumed run's own, or one written during RL), else that there is nothing to resume and that
``--overwrite`` (or ``--resume-or-start``) starts again.

Exit codes of ``openrlhf-search train`` / ``quickstart``:

* 0 -- finished.
* 2 -- bad input: config, data file, run directory, ``--resume`` without a checkpoint (one line on stderr).
* 3 -- the retriever is down (after the client's retries); the last completed step was checkpointed.
* 4 -- the run diverged: non-finite parameters, or ``optimizer.max_skipped_steps`` consecutive steps whose updates
  were all skipped as non-finite; nothing non-finite is saved, the last good checkpoint is kept.
* 75 -- preempted (SIGTERM/SIGINT; EX_TEMPFAIL: "try again", i.e. requeue and resume): a checkpoint was written at
  the end of the step, or the message says there is none to resume.
"""

from __future__ import annotations

import signal
import sys

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_RETRIEVER = 3
EXIT_DIVERGED = 4
EXIT_PREEMPTED = 75


class Preempted(BaseException):
    """The run was asked to stop (SIGTERM/SIGINT); ``checkpoint`` is the newest checkpoint written, if any.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way swallows it. The
    message says what is true of the run directory: ``--resume`` only when a checkpoint exists, else that there is
    nothing to resume and how to start again.

    Args:
        signame: the signal's name.
        checkpoint, step: the newest checkpoint and its RL step (None when there is none).
        during: what the run was doing when it stopped at once (``set-up``, ``the warm start``, ``RL step 3``...);
            None: it stopped at the safe point after saving ``checkpoint``.
        again: the signal was the second one (the first asked for a save at the end of the step).
    """

    def __init__(self, signame: str, checkpoint=None, step: int | None = None, during: str | None = None,
                 again: bool = False):
        self.signame, self.checkpoint, self.step, self.during = signame, checkpoint, step, during
        received = f"{signame} received{' again' if again else ''}"
        if during is None:
            stopped = f"stopped at a safe point; checkpoint {checkpoint} (step {step})"
        else:
            stopped = f"stopped at once during {during}" + (", without saving" if again else "")
        if checkpoint:
            then = (f"; the newest checkpoint is {checkpoint} (step {step})" if during is not None else "") + \
                "; rerun with --resume to continue"
        else:
            why = "a run saves its first checkpoint during RL" if during is None or not during.startswith("RL") else \
                "none was due yet (logging.save_every / save_every_seconds)"
            then = (f"; no checkpoint was written ({why}), so there is nothing to resume: rerun with --overwrite "
                    "(or train --resume-or-start) to start again")
        super().__init__(f"{received}: {stopped}{then}")


class Diverged(RuntimeError):
    """Training produced non-finite parameters or only skipped updates; the last good checkpoint is kept."""


class PreemptionGuard:
    """Context manager: SIGTERM/SIGINT set :attr:`requested` (deferred mode) or raise :class:`Preempted` at once.

    ``deferred=False`` (set-up phase): the signal raises :class:`Preempted` in the main thread immediately.
    ``deferred=True`` (RL loop): the loop polls :attr:`requested` at safe points. A second signal always raises.
    The previous handlers are restored on exit. Outside the main thread it does nothing.
    """

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self.deferred = False
        self.saved: tuple | None = None  # (checkpoint dir, step) of the newest checkpoint, set by the trainer
        self.phase = "set-up"  # what the run is doing, set by the trainer: it names where a signal stopped it
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None or not self.deferred:
            again = self.requested is not None
            self.requested = name
            raise Preempted(name, *(self.saved or (None, None)), during=self.phase, again=again)
        self.requested = name
        print(f"\n[openrlhf-search] {name} received: saving a checkpoint at the end of this step "
              "(send it again to stop at once without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> PreemptionGuard:
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def nonfinite_parameters(model, limit: int = 5) -> list[str]:
    """Names of (up to ``limit``) parameters holding NaN or inf; [] when every parameter is finite."""
    import torch

    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                bad.append(name)
                if len(bad) >= limit:
                    break
    return bad


class SkipMonitor:
    """Counts consecutive RL steps whose every optimiser update was skipped (non-finite loss or gradient)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run = 0

    def update(self, step: int, all_skipped: bool, last_good: str | None) -> None:
        """Record one step; raise :class:`Diverged` once ``limit`` consecutive steps were all skipped."""
        self.run = self.run + 1 if all_skipped else 0
        if self.limit > 0 and self.run >= self.limit:
            raise Diverged(f"step {step}: the last {self.run} steps skipped every update (non-finite loss or "
                           f"gradients; optimizer.max_skipped_steps={self.limit}): the run diverged (lower "
                           f"optimizer.lr?); last good checkpoint: {last_good or 'none'}")
