"""Command line: ``python -m dlsm.launch --gin FILE [--gin FILE ...] [--gin_param 'BINDING' ...]``.

User errors (bad gin file or binding, wrong-typed or out-of-range value, undefined or unused macro,
missing data, unusable MLflow store or workdir, bad checkpoint, NaN loss) print one line to stderr
and exit non-zero; all but the last two are found before anything trains. Ctrl-C keeps the last
checkpoint: relaunch the same command to resume. ``--traceback`` shows the full traceback of a user error.

Several GPUs: ``torchrun --nproc_per_node N -m dlsm.launch --gin FILE ...`` runs the same command in N
processes (:mod:`dlsm.train.distributed`): the training stages use DistributedDataParallel with ``train.batch_size``
as the global batch, rank 0 alone tracks in MLflow and writes checkpoints, every rank draws its share of the
sampling units (:mod:`dlsm.stages.units`), and evaluation runs on rank 0. Errors and results are printed once,
by rank 0; a user error, a NaN loss, a full disk (on any rank), a lost MLflow store or a Ctrl-C stops every rank.
A programming error on one rank alone leaves torchrun to stop the others.
"""

from __future__ import annotations

import argparse
import sys

from dlsm.errors import DlsmError, print_error
from dlsm.train import distributed as dist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlsm.launch", description=__doc__.splitlines()[0])
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable)")
    p.add_argument("--gin_param", action="append", default=[], metavar="BINDING",
                   help="a gin binding, e.g. 'total_loss.lam = 0.5' (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore an unfinished run of this config; start over")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.gin:
        print("dlsm: error: give at least one --gin FILE (try gin/moons.gin)", file=sys.stderr)
        return 2
    main_rank, failed = True, True
    try:
        dist.init()  # torchrun's process group, if any; every step below runs on every rank
        main_rank = dist.is_main()
        from dlsm import components  # noqa: F401  (registers every configurable)
        from dlsm.config import call_configurable, parse_config
        from dlsm.experiment import experiment, run_experiment

        parse_config(args.gin, args.gin_param)  # types, ranges and macros checked here
        spec = call_configurable(experiment)
        # run_experiment checks the MLflow store, experiment.workdir and reused run ids before training
        results = run_experiment(spec, fresh=args.fresh).metrics
        failed = False
    except DlsmError as err:
        if args.traceback:
            raise
        return print_error(err) if main_rank else err.exit_code
    except KeyboardInterrupt:
        if main_rank:
            print("dlsm: interrupted; relaunch the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    finally:
        dist.cleanup(failed=failed)  # on an error, every rank waits until rank 0 has printed it
    if not main_rank:
        return 0
    width = max((len(k) for k in results), default=0)
    for k in sorted(results):
        print(f"{k:<{width}}  {results[k]:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
