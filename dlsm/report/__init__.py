"""Reports and figures made from MLflow runs (``python -m dlsm.report [digits]``):

- :mod:`~dlsm.report.moons`: the moons report (Table 1, Figures 1 and 5); :mod:`~dlsm.report.digits`: the digits
  report (Table 2 over seeds, paired verdicts, mechanism, frontier);
- :mod:`~dlsm.report.frontier`: the (lambda, alpha) frontier; :mod:`~dlsm.report.stats`: Student-t and paired
  intervals and verdicts; :mod:`~dlsm.report.plots`: the figures the stages and reports draw;
- :mod:`~dlsm.report.common`: the MLflow client, markdown tables, the commands' error handling.
"""
