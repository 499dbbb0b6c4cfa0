"""Importing this module registers every gin configurable of dlsm (used by launch and tune)."""

from dlsm import (  # noqa: F401
    data,
    device,
    eval,
    experiment,
    images,
    losses,
    metrics,
    nets,
    networks,
    plots,
    samplers,
    schedules,
    stages,
    sweep,
    training,
)
