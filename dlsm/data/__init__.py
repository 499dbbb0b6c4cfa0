"""Datasets, one contract (``x``, ``y``, ``num_classes``, ``batch``, ``subset``): :mod:`~dlsm.data.points` holds the
toy point sets (two moons) as :class:`~dlsm.data.points.LabelledData`; :mod:`~dlsm.data.images` holds uint8 image
sets (scikit-learn's digits offline, CIFAR-10/100 through torchvision) as :class:`~dlsm.data.images.ImageData`."""
