"""Importing this module registers every gin configurable of dlsm (used by the entry points and sweep trials).

It imports the modules that declare configurables and nothing that imports it back: the sweep's settings
(:mod:`dlsm.sweep.settings`) are a leaf module, so the sweep driver can import this module without a circle.
"""

from dlsm import experiment, stages  # noqa: F401
from dlsm.data import images, points  # noqa: F401
from dlsm.eval import images as image_suite  # noqa: F401
from dlsm.eval import points as point_suite  # noqa: F401
from dlsm.math import guidance, heun, losses, samplers, schedules  # noqa: F401
from dlsm.nets import convnet, embeddings, mlp, ncsnpp, ncsnv2, unet  # noqa: F401
from dlsm.report import plots  # noqa: F401
from dlsm.sweep import settings  # noqa: F401
from dlsm.train import device, loop  # noqa: F401
