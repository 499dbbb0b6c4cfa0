"""Importing this module registers every gin configurable of dlsm (used by launch and tune)."""

from dlsm import data, losses, metrics, networks, pipeline, plots, samplers, schedules, training  # noqa: F401
