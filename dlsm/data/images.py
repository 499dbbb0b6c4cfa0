"""Image datasets kept in memory as uint8 (N, C, H, W) tensors; batches are converted to float in model space.

Model space is [0, 1] (``x = u / 255``), as in the official DLSM/NCSNv2 configs, or [-1, 1] with
``centered=True`` (``x = 2 u / 255 - 1``). A dataset that fits on the accelerator is moved there once
with ``ImageData.to(device)`` and stays uint8 (4x smaller than float32); ``ImageData.batch`` gathers,
optionally mirrors and converts rows on that device, so training draws batches without host round trips.

Loaders (gin configurables): ``cifar10``, ``cifar100`` (torchvision's python-pickle archives, read from
``root``, default ``$DATA_ROOT`` else ``./data``; never downloaded unless asked) and ``digits``
(scikit-learn's bundled 8x8 digits, offline, optionally resized, e.g. to 32x32 for CIFAR-sized networks).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gin
import torch
import torch.nn.functional as F

from dlsm.errors import ConfigError, DataError

__all__ = [
    "ImageData",
    "cifar10",
    "cifar100",
    "digits",
    "digits_to_uint8",
    "from_model_space",
    "random_hflip",
    "to_model_space",
]

_SPLITS = ("train", "test")


def to_model_space(u: torch.Tensor, *, centered: bool = False) -> torch.Tensor:
    """uint8 pixels -> float32 model space: ``u / 255`` in [0, 1], or ``2 u / 255 - 1`` in [-1, 1] if centered."""
    x = u.to(torch.float32).div_(255.0)
    return x.mul_(2.0).sub_(1.0) if centered else x


@gin.configurable(allowlist=["rounding"])
def from_model_space(x: torch.Tensor, *, centered: bool = False, rounding: str = "nearest") -> torch.Tensor:
    """float model space -> uint8 pixels, the inverse of ``to_model_space``: the nearest of the 256 levels.

    ``round(255 x)`` (or ``round(127.5 (x + 1))`` if centered), clamped to [0, 255]; rounding is half to even;
    NaN maps to 0. For every uint8 ``u``, ``from_model_space(to_model_space(u)) == u`` exactly.
    ``rounding = 'truncate'`` takes floor(clamp(255 x, 0, 255)) instead, as the official DLSM sampler saves images
    (``np.clip(x * 255, 0, 255).astype(np.uint8)``, ``run_lib_sampling.py``): on average half a level darker
    (``gin/eval_official.gin`` binds it; it reaches every sample decoded: saved, streamed, evaluated). It keeps
    ``to_model_space`` levels exact in [0, 1] (the official data space), not when centered: there
    (x + 1) 127.5 falls just below some levels in float32.
    """
    if rounding not in ("nearest", "truncate"):
        raise ConfigError(f"from_model_space.rounding must be 'nearest' or 'truncate', got {rounding!r}")
    v = x.to(torch.float32)
    v = (v + 1.0) * 127.5 if centered else v * 255.0
    v = torch.nan_to_num(v, nan=0.0).clamp_(0.0, 255.0)
    return (v.round() if rounding == "nearest" else v.floor()).to(torch.uint8)


def random_hflip(images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image of (N, ..., W) along its last (width) axis independently with probability 1/2.

    The coin flips are drawn on ``images.device`` (one uniform per image, flipped if < 1/2) from ``generator``,
    which must live on that device.
    """
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (images.dim() - 1))), images.flip(-1), images)


@dataclass(frozen=True, eq=False)
class ImageData:
    """Labelled images: ``x_uint8`` uint8 (N, C, H, W), ``y`` int64 (N,) in [0, num_classes), on one device.

    ``centered`` selects the model space of the float views (``batch``, ``x``, ``of_class``) and of ``decode``:
    [0, 1] if False, [-1, 1] if True.
    """

    x_uint8: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()
    centered: bool = False

    def __post_init__(self) -> None:
        u, y = self.x_uint8, self.y
        if u.dtype != torch.uint8 or u.dim() != 4:
            raise DataError(f"{self.name}: images must be a uint8 (N, C, H, W) tensor, got {u.dtype} {tuple(u.shape)}")
        if y.dtype != torch.int64 or tuple(y.shape) != (u.shape[0],):
            raise DataError(f"{self.name}: labels must be int64 of shape ({u.shape[0]},), got {y.dtype} "
                            f"{tuple(y.shape)}")
        if y.device != u.device:
            raise DataError(f"{self.name}: images on {u.device} but labels on {y.device}; move both with .to(device)")

    @property
    def shape(self) -> tuple[int, int, int]:
        """One image's shape (C, H, W)."""
        c, h, w = self.x_uint8.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def dim(self) -> int:
        """Numbers per image, C * H * W."""
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.x_uint8.device

    def __len__(self) -> int:
        return int(self.x_uint8.shape[0])

    @property
    def x(self) -> torch.Tensor:
        """All images as float32 in model space, computed afresh on each access (not cached).

        Costs 4 bytes per number, 4x the uint8 store: 614 MB for CIFAR-10 train (50,000 x 3 x 32 x 32);
        prefer ``batch`` in training loops. Kept so that code written for ``LabelledData.x`` still works.
        """
        return to_model_space(self.x_uint8, centered=self.centered)

    def of_class(self, c: int) -> torch.Tensor:
        """The float images (model space) whose label is ``c``."""
        return to_model_space(self.x_uint8[self.y == c], centered=self.centered)

    def batch(
        self,
        idx: torch.Tensor | Sequence[int],
        *,
        flip: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` as (float32 images in model space, int64 labels), gathered on the data's device.

        With ``flip``, each row is mirrored horizontally with probability 1/2 using ``generator`` (a
        torch.Generator on the data's device). Pass ``idx`` on the data's device to avoid a host copy.
        """
        idx = torch.as_tensor(idx, device=self.device)
        u = self.x_uint8[idx]
        if flip:
            u = random_hflip(u, generator=generator)
        return to_model_space(u, centered=self.centered), self.y[idx]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in this dataset's model space -> uint8 (N, C, H, W), rounded and clamped (for saving)."""
        return from_model_space(x, centered=self.centered)

    def subset(self, idx: torch.Tensor | Sequence[int]) -> ImageData:
        """The rows ``idx`` (indices or a boolean mask) as a new ImageData with the same classes and model space."""
        idx = torch.as_tensor(idx, device=self.device)
        return replace(self, x_uint8=self.x_uint8[idx], y=self.y[idx])

    def to(self, device: torch.device | str) -> ImageData:
        """A copy whose images (still uint8) and labels live on ``device``."""
        return replace(self, x_uint8=self.x_uint8.to(device), y=self.y.to(device))


def _check_split(loader: str, split: str) -> None:
    if split not in _SPLITS:
        raise DataError(f"{loader}.split must be 'train' or 'test', got {split!r}")


def _data_root(loader: str, root: str | os.PathLike | None, folder: str) -> Path:
    """``root``, else ``$DATA_ROOT``, else ``./data``, made absolute; a DATA_ROOT that does not exist is an error."""
    if root is None:
        env = os.environ.get("DATA_ROOT", "")
        if env:
            path = Path(env).expanduser().absolute()
            if not path.is_dir():
                raise DataError(f"DATA_ROOT={path} does not exist: create it and put {folder}/ there, "
                                f"or unset DATA_ROOT or set {loader}.root")
            return path
        root = "data"
    return Path(root).expanduser().absolute()


_CIFAR = {
    # loader name -> (display name, torchvision class name, archive folder under root)
    "cifar10": ("CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
    "cifar100": ("CIFAR-100", "CIFAR100", "cifar-100-python"),
}


def _cifar(loader: str, root: str | os.PathLike | None, split: str, download: bool, centered: bool) -> ImageData:
    """Read a CIFAR python-pickle archive through torchvision into an uint8 (N, 3, 32, 32) ImageData."""
    _check_split(loader, split)
    title, cls_name, folder = _CIFAR[loader]
    path = _data_root(loader, root, folder)
    where = path / folder
    if not download and not where.is_dir():
        raise DataError(f"{title} not found in {path}: expected {where}/ (set DATA_ROOT or {loader}.root, "
                        f"or {loader}.download = True with internet)")

    import torchvision.datasets  # deferred: a missing folder is reported without paying for the import

    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root=str(path), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision's integrity check: missing file or md5 mismatch
        expected = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [f for f in expected if not (where / f).is_file()]
        what = f"missing {', '.join(missing)}" if missing else "a file fails its md5 check"
        raise DataError(f"{title} in {where}/ is incomplete or corrupt ({what}; torchvision: {err}): "
                        f"delete the folder and set {loader}.download = True, or copy a good archive there") from None
    except OSError as err:  # URLError is an OSError: no internet, or a refused/filtered connection
        reason = " ".join(str(getattr(err, "reason", err)).split())
        if not download:
            raise DataError(f"{title} in {where}/ cannot be read ({reason}): check its permissions, "
                            f"or delete it and set {loader}.download = True") from None
        raise DataError(f"could not download {title} from {cls.url} into {path} ({reason}): download "
                        f"{cls.filename} elsewhere and extract it there, or point DATA_ROOT at a copy") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise DataError(f"{title} in {where}/ cannot be read ({type(err).__name__}: {err}): "
                        f"delete the folder and set {loader}.download = True, or copy a good archive there") from None

    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision's HWC view -> CHW, no PIL
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    names = tuple(str(c) for c in ds.classes)
    if len(y) != len(x) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(names)):
        raise DataError(f"{title} in {where}/ has labels that do not match its {len(x)} images and "
                        f"{len(names)} classes: delete the folder and download it again")
    return ImageData(x, y, len(names), loader, names, centered)


@gin.configurable
def cifar10(
    *, root: str | os.PathLike | None = None, split: str = "train", download: bool = False, centered: bool = False
) -> ImageData:
    """CIFAR-10 (50,000 train / 10,000 test, 3x32x32, 10 classes) from ``root/cifar-10-batches-py/``.

    ``root`` defaults to ``$DATA_ROOT``, else ``./data``; nothing is downloaded unless ``download=True``.
    """
    return _cifar("cifar10", root, split, download, centered)


@gin.configurable
def cifar100(
    *, root: str | os.PathLike | None = None, split: str = "train", download: bool = False, centered: bool = False
) -> ImageData:
    """CIFAR-100 (50,000 train / 10,000 test, 3x32x32, 100 fine classes) from ``root/cifar-100-python/``.

    ``root`` defaults to ``$DATA_ROOT``, else ``./data``; nothing is downloaded unless ``download=True``.
    """
    return _cifar("cifar100", root, split, download, centered)


def digits_to_uint8(v: torch.Tensor) -> torch.Tensor:
    """scikit-learn digit intensities 0..16 -> uint8 0..255: ``floor((255 v + 8) / 16)``, i.e. round(255 v / 16)
    with halves rounded up (8 -> 128, 16 -> 255)."""
    return torch.div(v.to(torch.int64) * 255 + 8, 16, rounding_mode="floor").to(torch.uint8)


@gin.configurable
def digits(
    *, split: str = "train", size: int = 8, test_fraction: float = 0.2, seed: int = 0, centered: bool = False
) -> ImageData:
    """scikit-learn's 1,797 grey 8x8 digits (10 classes) as uint8 (N, 1, size, size), offline and deterministic.

    Pixels are mapped by ``digits_to_uint8``; the train/test split is scikit-learn's ``train_test_split``
    stratified by label with ``random_state=seed`` (test gets ceil(test_fraction * 1797) images). If ``size``
    differs from 8, the uint8 images are resized with bilinear interpolation (antialias=True,
    align_corners=False; equals PIL's bilinear resize up to rounding), rounded half to even and clamped.
    """
    _check_split("digits", split)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"digits.size must be a positive integer (8 is native, 32 is CIFAR-sized), got {size!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(f"digits.test_fraction must be in (0, 1), e.g. 0.2, got {test_fraction!r}")

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = bunch.target
    try:
        train_idx, test_idx = train_test_split(
            range(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:
        raise DataError(f"digits.test_fraction={test_fraction!r} cannot split 1,797 images stratified over "
                        f"10 classes ({err}); use a value like 0.2") from None
    idx = torch.as_tensor(train_idx if split == "train" else test_idx, dtype=torch.int64)

    u = digits_to_uint8(torch.from_numpy(bunch.images))[idx].unsqueeze(1)
    if size != 8:
        v = F.interpolate(u.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        u = v.round().clamp_(0, 255).to(torch.uint8)
    y = torch.from_numpy(labels).to(torch.int64)[idx]
    return ImageData(u.contiguous(), y, 10, "digits", tuple(str(k) for k in range(10)), centered)
