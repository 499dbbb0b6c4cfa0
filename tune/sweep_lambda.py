"""Sweep lambda of L_Total = L_DLSM' + lambda L_CE with Ray Tune; stage 1 is trained once and shared.

    python tune/sweep_lambda.py [--gin FILE ...] [--gin_param B ...] [--values ...] [--address ADDRESS]

Each trial trains the stage-2 classifiers and samples; the metric (``sweep.metric``, default the
class-mean likelihood-score error of the Total classifier on the grid at sigma = 7.5) is compared
in the MLflow UI and in the printed table.
"""

import sys

from dlsm.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main(param="LAM", values=["0.03125", "0.125", "0.5", "2.0"], share="stage1", prog="tune/sweep_lambda.py"))
