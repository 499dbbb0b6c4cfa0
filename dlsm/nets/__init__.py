"""Networks for images: noise-conditional score models (a small U-Net, NCSN++ from diffusers' layers, NCSNv2's
RefineNet) and a sigma-conditioned conv classifier (ResNet-18/34 widths as in the official DLSM code).

Both take ``(x, sigma)`` with x of shape (B, C, H, W) and sigma a float or a (B,) tensor, and condition on
c_noise = log(sigma) through :class:`GaussianFourierEmbedding`. The MLPs for flat data are in ``dlsm.nets.mlp``.
"""

from dlsm.nets.common import count_parameters
from dlsm.nets.convnet import BasicBlock, ConvClassifier
from dlsm.nets.embeddings import GaussianFourierEmbedding
from dlsm.nets.ncsnpp import NCSNpp
from dlsm.nets.ncsnv2 import InstanceNorm2dPlus, NCSNv2, RefineNet
from dlsm.nets.unet import AttentionBlock, ResBlock, ScoreUNet, UNet

__all__ = [
    "AttentionBlock",
    "BasicBlock",
    "ConvClassifier",
    "GaussianFourierEmbedding",
    "InstanceNorm2dPlus",
    "NCSNpp",
    "NCSNv2",
    "RefineNet",
    "ResBlock",
    "ScoreUNet",
    "UNet",
    "count_parameters",
]
