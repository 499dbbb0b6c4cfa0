"""Sweep alpha, the likelihood-score scale at sampling, with Ray Tune; stages 1 and 2 are trained once.

    python tune/sweep_alpha.py [--gin FILE ...] [--gin_param B ...] [--values ...] [--address ADDRESS]

Every trial reuses the same score model and classifiers (``experiment.stage2_run_id``) and only
samples and evaluates; the default metric is the sliced Wasserstein-1 distance of the Total
method's samples to the class data (mean over classes).
"""

import sys

from dlsm.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main(param="ALPHA", values=["1.0", "2.0", "4.0", "8.0"], share="stage2",
                  default_params=["sweep.metric = 'total/sw1'"], prog="tune/sweep_alpha.py"))
