"""The paper's mathematics as plain functions of tensors and modules (no MLflow, no files, no gin state):

- :mod:`~dlsm.math.schedules`: noise levels sigma_1 > ... > sigma_L (NCSNv2 Techniques 1, 2, 4, 5);
- :mod:`~dlsm.math.losses`: DSM (NCSNv2 eq. 2), CE, DLSM' (DLSM eq. 11) and Total = DLSM' + lambda CE (eq. 12);
- :mod:`~dlsm.math.scores`: prior, likelihood and posterior scores combined by Bayes' rule (DLSM eq. 4);
- :mod:`~dlsm.math.guidance`: where and how strongly the likelihood score guides (constant alpha, limited
  interval, a power of sigma, entropy-driven, tempered classifier);
- :mod:`~dlsm.math.calibration`: temperature scaling and calibration error of a classifier at one sigma;
- :mod:`~dlsm.math.samplers`: annealed Langevin (NCSNv2 Alg. 1) and predictor-corrector sampling;
- :mod:`~dlsm.math.oracle`: the closed-form scores of a Parzen (Gaussian-mixture) density, the reference of
score errors.
"""
