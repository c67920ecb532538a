"""Preemption, divergence and exit codes of the local trainer.

A cluster preempts a job by sending SIGTERM (Slurm: ``#SBATCH --signal=B:TERM@120`` sends it 120 s before the
kill); a user stops one with Ctrl-C (SIGINT). :class:`PreemptionGuard` turns the first such signal into a request
that the RL loop honours at its next safe point (the end of the current step): it writes a checkpoint and the run
exits with :data:`EXIT_PREEMPTED`. During set-up and the warm start (before the first RL step, when there is no
RL state to save) the signal stops the run at once with the same code; a resumed run then starts from its last
checkpoint, or afresh with ``--resume-or-start``. A second signal stops the run immediately without saving.

Exit codes of ``openrlhf-search train`` / ``quickstart``:

* 0 -- finished.
* 2 -- bad input: config, data file, run directory, ``--resume`` without a checkpoint (one line on stderr).
* 3 -- the retriever is down (after the client's retries); the last completed step was checkpointed.
* 4 -- the run diverged: non-finite parameters, or ``optimizer.max_skipped_steps`` consecutive steps whose updates
  were all skipped as non-finite; nothing non-finite is saved, the last good checkpoint is kept.
* 75 -- preempted (SIGTERM/SIGINT): a checkpoint was written (EX_TEMPFAIL: "try again", i.e. requeue and resume).
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

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signame: str, checkpoint=None, step: int | None = None):
        self.signame, self.checkpoint, self.step = signame, checkpoint, step
        where = f"checkpoint {checkpoint} (step {step})" if checkpoint else "no checkpoint written (before RL)"
        super().__init__(f"{signame} received: stopped at a safe point; {where}; rerun with --resume to continue")


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
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None or not self.deferred:
            self.requested = name
            raise Preempted(name, *(self.saved or (None, None)))
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
