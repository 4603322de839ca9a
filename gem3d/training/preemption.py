"""Preemption on a cluster: ``last.ckpt`` saved on a signal, and the SLURM job requeued as Lightning would.

Lightning registers its SLURM auto-requeue handler (``SLURMEnvironment(auto_requeue=True)``) only when the requeue
signal has no handler yet, and that handler writes a separate ``hpc_ckpt_<n>.ckpt`` from inside the signal handler,
in the middle of a step. :class:`SignalCheckpoint` takes the signal instead: it saves ``last.ckpt`` (atomically,
see :class:`gem3d.training.faults.AtomicCheckpointIO`) at the end of the current batch, when the weights, the EMA and
the data position agree, and then requeues the job with ``scontrol requeue`` exactly when Lightning would have
(a SLURM environment with ``auto_requeue`` on). The requeued job finds its run again with ``main.py -n NAME
--resume-if-exists``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SignalCheckpoint", "slurm_job_id", "requeue_slurm_job"]


def slurm_job_id(environ: dict | None = None) -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    environ = os.environ if environ is None else environ
    array_job = environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{environ['SLURM_ARRAY_TASK_ID']}" if array_job else environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        raise ValueError(f"SLURM job id {job_id!r} (from SLURM_JOB_ID / SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID) is not "
                         f"a job id like '1234' or '1234_5'")
    return job_id


def requeue_slurm_job(job_id: str) -> bool:
    """Run ``scontrol requeue JOB_ID``; True when it succeeded (a failure is printed, not raised)."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        print(f"requeueing SLURM job {job_id} failed: {err}", flush=True)
        return False
    if result.returncode != 0:
        print(f"requeueing SLURM job {job_id} failed (exit status {result.returncode}): {result.stderr.strip()}",
              flush=True)
        return False
    print(f"requeued SLURM job {job_id}", flush=True)
    return True


def stop_now(trainer) -> None:
    """Stop after this batch even below a floor of steps or epochs (``min_steps``, ``min_epochs``: Lightning would
    otherwise keep training past ``should_stop`` until they are met)."""
    trainer.fit_loop.epoch_loop.min_steps = None
    trainer.fit_loop.min_epochs = None
    trainer.should_stop = True


class SignalCheckpoint(L.Callback):
    """Saves ``ckpt_dir/last.ckpt`` at the end of the batch in which a signal arrived, and at the end of training.

    - the requeue signal (SIGUSR1, or the ``requeue_signal`` of the trainer's ``SLURMEnvironment``): save and go on;
      under SLURM with ``auto_requeue`` (Lightning's default there), requeue the job after the save and stop the run
      cleanly, as the job is about to end;
    - SIGTERM: save, then Lightning stops cleanly.
    In DDP every rank saves at the same step (the ranks agree on whether any of them got the signal).
    """

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)
        self.signalled = False
        self.requeue = False
        self.requeue_signal = getattr(signal, "SIGUSR1", None)
        self._previous = None
        self._last_saved_step = -1

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def on_fit_start(self, trainer, pl_module) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None:  # single-device strategies hold none; Lightning's signal connector reads it here
            environment = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            self.requeue = bool(environment.auto_requeue)
            self.requeue_signal = environment.requeue_signal or self.requeue_signal
        if self.requeue_signal is None:  # Windows: no SIGUSR1
            return
        try:  # Lightning's signal connector sees this handler and leaves the signal to it
            self._previous = signal.signal(self.requeue_signal, self._on_signal)
        except ValueError:  # not the main thread
            self._previous = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(self.requeue_signal, self._previous)
            self._previous = None

    def save(self, trainer, reason: str) -> None:
        path = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        self._last_saved_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"[{reason}] saved {path} at global step {trainer.global_step}", flush=True)

    def _signal_name(self) -> str:
        return signal.Signals(self.requeue_signal).name if self.requeue_signal is not None else "signal"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        request = self.signalled or bool(trainer.received_sigterm)
        if trainer.world_size > 1:
            request = trainer.strategy.reduce_boolean_decision(request, all=False)
        if not request:
            return
        by_sigterm = bool(trainer.received_sigterm)
        self.save(trainer, "SIGTERM" if by_sigterm else self._signal_name())
        if self.signalled and self.requeue and not by_sigterm:
            requeued = requeue_slurm_job(slurm_job_id()) if trainer.is_global_zero else False
            if trainer.world_size > 1:
                requeued = trainer.strategy.broadcast(requeued, src=0)
            if requeued:  # the job ends now; the requeued one resumes from last.ckpt
                stop_now(trainer)
        self.signalled = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # SIGTERM arriving after this callback's batch-end check: Lightning stops at the end of that batch
        if isinstance(exception, SIGTERMException) and trainer.global_step != self._last_saved_step:
            self.save(trainer, "SIGTERM")

    def on_train_end(self, trainer, pl_module) -> None:
        saved_by_model_checkpoint = getattr(trainer.checkpoint_callback, "_last_global_step_saved", -1)
        if trainer.global_step not in (self._last_saved_step, saved_by_model_checkpoint):
            self.save(trainer, "end of training")
