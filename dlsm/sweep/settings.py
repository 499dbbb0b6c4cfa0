"""Sweep settings as one gin configurable, :func:`sweep` (resources, scheduler, retries, metric), so a gin file can
declare them. A leaf module: :mod:`dlsm.components` registers it without importing the sweep driver."""

from __future__ import annotations

from dataclasses import dataclass

import gin

from dlsm.errors import ConfigError

__all__ = ["SHARE", "SweepSettings", "sweep"]

SHARE = ("stage1", "stage2", "none")


@dataclass
class SweepSettings:
    metric: str
    mode: str
    scheduler: str
    gpus_per_trial: float
    cpus_per_trial: float
    max_failures: int
    max_concurrent_trials: int
    grace_period: int
    report_every: int
    dashboard: bool = False
    logical_gpus: float | None = None


@gin.configurable
def sweep(
    *,
    metric: str = "total/D_L_grid/s7.5",
    mode: str = "min",
    scheduler: str = "grid",
    gpus_per_trial: float = 1.0,
    cpus_per_trial: float = 1.0,
    max_failures: int = 1,
    max_concurrent_trials: int = 0,
    grace_period: int = 4,
    report_every: int = 1,
    dashboard: bool = False,
    logical_gpus: float | None = None,
) -> SweepSettings:
    """Sweep settings. ``metric`` is a final metric of the trial's experiment, averaged over classes
    when it has no ``/c{k}/`` part (``total/D_L_grid/s7.5`` is the mean of ``total/c*/D_L_grid/s7.5``),
    or a stage-2 training metric ``{loss}/{key}`` (``total/track/D_L_grid/s7.5``, ``total/loss``)
    that trials also report while they train. ``scheduler``: ``'grid'`` runs every value to the end;
    ``'asha'`` stops the worst trials early at rungs of ``grace_period`` reports (give it a training
    metric). ``gpus_per_trial`` applies only where the cluster has GPUs (fractions such as 0.25 pack
    small trials onto one GPU); elsewhere trials take ``cpus_per_trial`` CPUs. A failed trial is
    retried ``max_failures`` times. ``max_concurrent_trials = 0`` lets Ray decide. ``dashboard = True``
    starts Ray's dashboard (on 127.0.0.1) with a Ray the sweep starts itself; see :mod:`dlsm.sweep.cluster`.
    ``logical_gpus`` (a Ray the sweep starts itself): announce that many GPUs to Ray whatever the machine has, as
    ``ray start --num-gpus`` does; Ray then packs ``gpus_per_trial`` onto them and sets each trial's
    ``CUDA_VISIBLE_DEVICES``. It is how GPU packing is checked on a CPU machine; trials there fall back to the CPU
    (``device.name = 'auto'``)."""
    if mode not in ("min", "max"):
        raise ConfigError(f"sweep.mode must be 'min' or 'max', got {mode!r}")
    if scheduler not in ("grid", "asha"):
        raise ConfigError(f"sweep.scheduler must be 'grid' or 'asha', got {scheduler!r}")
    if not gpus_per_trial > 0 or not cpus_per_trial > 0:
        raise ConfigError("sweep.gpus_per_trial and sweep.cpus_per_trial must be positive")
    if max_failures < 0 or max_concurrent_trials < 0 or grace_period < 1 or report_every < 1:
        raise ConfigError("sweep.max_failures and max_concurrent_trials must be >= 0, grace_period and "
                          "report_every >= 1")
    if logical_gpus is not None and (isinstance(logical_gpus, bool) or not isinstance(logical_gpus, (int, float))
                                     or not logical_gpus >= 0):
        raise ConfigError(f"sweep.logical_gpus must be None or a number >= 0, got {logical_gpus!r}")
    return SweepSettings(metric, mode, scheduler, float(gpus_per_trial), float(cpus_per_trial), max_failures,
                         max_concurrent_trials, grace_period, report_every, bool(dashboard),
                         None if logical_gpus is None else float(logical_gpus))
