"""Sweep any gin binding with Ray Tune: ``python tune/sweep.py --param LAM --values 0.1 1 --share stage1``."""

import sys

from dlsm.sweep.driver import main

if __name__ == "__main__":
    sys.exit(main(prog="tune/sweep.py"))
