"""Importing this module registers every gin configurable of dlsm (used by launch and tune)."""

from dlsm import (  # noqa: F401
    data,
    losses,
    metrics,
    networks,
    pipeline,
    plots,
    samplers,
    schedules,
    sweep,
    training,
)
