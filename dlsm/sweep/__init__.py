"""Ray Tune sweeps over one gin binding (``python tune/sweep.py``):

- :mod:`~dlsm.sweep.settings`: the ``sweep`` configurable (resources, scheduler, metric);
- :mod:`~dlsm.sweep.driver`: the driver: checks every value, trains the shared stages once, runs the trials;
- :mod:`~dlsm.sweep.trial`: one trial in a Ray worker process;
- :mod:`~dlsm.sweep.results`: the results table and plot;
- :mod:`~dlsm.sweep.cluster`: a loopback-only Ray (no cloud probes), or joining a cluster.
"""
