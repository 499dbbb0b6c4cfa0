"""Training and where it runs:

- :mod:`~dlsm.train.loop`: the training loop of both stages (noise levels drawn per example, EMA, warm-up, NaN
  checks, resumable checkpoints, deferred Ctrl-C); :mod:`~dlsm.train.steps`: its parts (arguments checked, the run
  set up or resumed, one step: batch, flips, sigma, noise, loss, update, EMA);
- :mod:`~dlsm.train.checkpoints`: atomic checkpoint files read with ``weights_only=True``, EMA weights;
- :mod:`~dlsm.train.device`: the ``device`` binding and seeded generators on it;
- :mod:`~dlsm.train.distributed`: torchrun ranks, DistributedDataParallel and what rank 0 decides for all.
"""
