"""Sweep a noise setting with Ray Tune: ``--param NUM_SCALES`` (default), ``LANGEVIN_EPS``,
``STEPS_PER_SCALE`` (sampling only: stages 1 and 2 shared) or ``SIGMA_MAX`` / ``SIGMA_MIN``
(they change training too: every trial trains its own stages).

    python tune/sweep_noise.py [--param NUM_SCALES] [--values 25 50 100] [--gin FILE ...] [--address ADDRESS]
"""

import argparse
import sys

from dlsm.sweep.driver import main

TRAINING = ("SIGMA_MAX", "SIGMA_MIN", "noise_schedule.sigma_max", "noise_schedule.sigma_min")

if __name__ == "__main__":
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)  # what is shared; main() parses the rest
    pre.add_argument("--param", default="NUM_SCALES")
    try:
        param = pre.parse_known_args()[0].param
    except argparse.ArgumentError:  # main() reports it
        param = "NUM_SCALES"
    share = "none" if param in TRAINING else "stage2"
    sys.exit(main(param="NUM_SCALES", values=["25", "50", "100"], share=share,
                  default_params=["sweep.metric = 'total/sw1'"], prog="tune/sweep_noise.py"))
