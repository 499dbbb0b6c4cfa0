"""Networks for small images: a noise-conditional U-Net score model and a sigma-conditioned conv classifier.

Both take ``(x, sigma)`` with x of shape (B, C, H, W) and sigma a float or a (B,) tensor, and condition on
c_noise = log(sigma) through :class:`GaussianFourierEmbedding`. The MLPs for flat data are in ``dlsm.networks``.
"""

from dlsm.nets.common import count_parameters
from dlsm.nets.convnet import BasicBlock, ConvClassifier
from dlsm.nets.embeddings import GaussianFourierEmbedding
from dlsm.nets.unet import AttentionBlock, ResBlock, ScoreUNet, UNet

__all__ = [
    "AttentionBlock",
    "BasicBlock",
    "ConvClassifier",
    "GaussianFourierEmbedding",
    "ResBlock",
    "ScoreUNet",
    "UNet",
    "count_parameters",
]
