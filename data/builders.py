"""``build_datasets(name, **kwargs)``: the train and validation sets of a named data set.

Every data set returns ``(train_ds, val_ds, info)`` with info = {"num_classes", "image_size",
"classes"}. Keyword arguments a data set does not use are ignored, so one configuration group can
carry the union of all options. ``num_classes=None`` means "whatever the data has"; a number must
match the data, which catches a model head sized for the wrong data set before any training.
File-based data sets never download unless asked to (CIFAR with ``download=True``), and a missing
folder raises ``FileNotFoundError`` naming the absolute path and how to fix it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from . import transforms as tfm
from .errors import CorruptDataError, DataConfigError, DataNotFoundError
from .synthetic import build_synthetic

PathLike = Union[str, Path]
EVAL_SPLITS = ("val", "test")  # the first one present is the validation set


def _info(num_classes_wanted: Optional[int], classes: list[str], image_size: int, name: str) -> dict:
    if num_classes_wanted is not None and int(num_classes_wanted) != len(classes):
        raise DataConfigError(f"{name}: the data has {len(classes)} classes but num_classes={num_classes_wanted}; "
                         f"set dataset.num_classes={len(classes)} (or null to take it from the data)")
    return {"num_classes": len(classes), "image_size": int(image_size), "classes": list(classes)}


def _require_root(root: Optional[PathLike], name: str) -> Path:
    if root is None or str(root) == "":
        raise DataConfigError(f"{name}: no data folder given; set dataset.root=/path/to/the/data")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"{name}: data folder {path.resolve()} does not exist; "
                                f"point dataset.root= at the folder that holds the data")
    return path


def _find_split(root: Path, names: tuple[str, ...], suffix: str, name: str) -> Path:
    for split in names:
        candidate = root / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    expected = " or ".join(str((root / f"{split}{suffix}").resolve()) for split in names)
    how = (f"convert a folder split with python data/folder2lmdb.py -f FOLDER -s {names[0]}" if suffix
           else f"lay the data out as {root.resolve()}/{names[0]}/<class>/<image>")
    raise DataNotFoundError(f"{name}: missing split: expected {expected}; {how}")


def _check_same_classes(train: list[str], val: list[str], val_path: Path, name: str) -> None:
    """Labels are class indices in sorted-name order: different class lists would mislabel silently."""
    if train != val:
        raise DataConfigError(f"{name}: the validation split {val_path.resolve()} has other classes than the "
                         f"training split: only in train: {sorted(set(train) - set(val))[:5]}, "
                         f"only in validation: {sorted(set(val) - set(train))[:5]}")


def _choose_transforms(transforms: Optional[str], image_size: Optional[int],
                       stored_size: Callable[[], int]) -> tuple[str, int, Optional[int]]:
    """(recipe, model input size, stored image size or None when not looked at).

    The stored size is read (from one image) only when it decides something: the input size
    when none is given, and the Resize the "cifar" recipe needs for off-size images."""
    stored = None
    if image_size is None:
        if transforms == "imagenet":
            image_size = 224
        else:
            stored = stored_size()
            image_size = stored if stored <= tfm.SMALL_IMAGE_LIMIT else 224
    kind = transforms or tfm.default_transform_kind(image_size)
    if kind == "cifar" and stored is None:
        stored = stored_size()
    return kind, int(image_size), stored


def _stored_side(path: PathLike) -> int:
    try:
        with Image.open(path) as image:  # reads the header only
            return max(image.size)
    except (OSError, SyntaxError, ValueError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path: PathLike, error: BaseException) -> CorruptDataError:
    return CorruptDataError(f"cannot read the image {Path(path).resolve()} ({type(error).__name__}: {error}); "
                            f"replace or remove that file")


def load_image_file(path: str) -> Image.Image:
    """ImageFolder's loader, naming the file when it is truncated, damaged or not an image at all
    (PIL's own errors do not say which file they are about)."""
    try:
        with open(path, "rb") as handle:
            with Image.open(handle) as image:
                return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _unreadable(path, error) from error


# ------------------------------------------------------------------------------------- data sets
def _synthetic(num_classes: Optional[int] = 10, image_size: Optional[int] = 32, train_size: int = 2048,
               val_size: int = 512, seed: int = 0, **_):
    train, val = build_synthetic(num_classes=int(num_classes or 10), image_size=int(image_size or 32),
                                 train_size=int(train_size), val_size=int(val_size), seed=int(seed))
    return train, val, _info(None, train.classes, train.images.shape[-1], "synthetic")


def _cifar(name: str, dataset_class, mean, std, root: Optional[PathLike] = None, download: bool = False,
           num_classes: Optional[int] = None, image_size: Optional[int] = None,
           transforms: Optional[str] = None, **_):
    if root is None or str(root) == "":
        raise DataConfigError(f"{name}: no data folder given; set dataset.root=/path/to/the/folder "
                         f"holding {dataset_class.base_folder}")
    root = Path(root).expanduser()
    if root.name == dataset_class.base_folder:  # accept the batches folder itself
        root = root.parent
    batches = root / dataset_class.base_folder
    if not download and not batches.is_dir():
        raise DataNotFoundError(
            f"{name}: {batches.resolve()} does not exist. Put the python version of {name} "
            f"({dataset_class.base_folder}) there, point dataset.root= at the folder that holds it, "
            f"or add dataset.download=true to download it ({dataset_class.url})")
    image_size = int(image_size or 32)
    kind = transforms or tfm.default_transform_kind(image_size)

    def load(train: bool) -> Dataset:
        transform = (tfm.cifar_transforms(train, image_size, mean, std, stored_size=32) if kind == "cifar"
                     else tfm.build_transforms(kind, train, image_size))
        try:
            return dataset_class(str(root), train=train, transform=transform, download=bool(download))
        except RuntimeError as error:  # torchvision: files missing or failing their md5 check
            raise CorruptDataError(f"{name}: {batches.resolve()} is incomplete or corrupted ({error}); delete "
                               f"it and re-run with dataset.download=true, or fix dataset.root=") from error

    train, val = load(True), load(False)
    return train, val, _info(num_classes, train.classes, image_size, name)


def _imagefolder(root: Optional[PathLike] = None, image_size: Optional[int] = None,
                 transforms: Optional[str] = None, num_classes: Optional[int] = None,
                 name: str = "imagefolder", **_):
    root = _require_root(root, name)
    train_dir = _find_split(root, ("train",), "", name)
    val_dir = _find_split(root, EVAL_SPLITS, "", name)
    # Built without transforms first: the recipe may depend on the stored image size.
    train = tv_datasets.ImageFolder(str(train_dir), loader=load_image_file)
    val = tv_datasets.ImageFolder(str(val_dir), loader=load_image_file)
    _check_same_classes(train.classes, val.classes, val_dir, name)
    kind, image_size, stored = _choose_transforms(
        transforms, image_size, lambda: _stored_side(train.samples[0][0]))
    train.transform = tfm.build_transforms(kind, True, image_size, stored_size=stored)
    val.transform = tfm.build_transforms(kind, False, image_size, stored_size=stored)
    return train, val, _info(num_classes, train.classes, image_size, name)


def _lmdb(root: Optional[PathLike] = None, image_size: Optional[int] = None, transforms: Optional[str] = None,
          num_classes: Optional[int] = None, name: str = "lmdb", **_):
    from .lmdb_dataset import LMDBImageDataset  # here: only LMDB data needs the lmdb package

    root = _require_root(root, name)
    train = LMDBImageDataset(_find_split(root, ("train",), ".lmdb", name))
    val_path = _find_split(root, EVAL_SPLITS, ".lmdb", name)
    val = LMDBImageDataset(val_path)
    _check_same_classes(train.classes, val.classes, val_path, name)
    kind, image_size, stored = _choose_transforms(
        transforms, image_size, lambda: max(train.load_image(0)[0].size))
    train.transform = tfm.build_transforms(kind, True, image_size, stored_size=stored)
    val.transform = tfm.build_transforms(kind, False, image_size, stored_size=stored)
    return train, val, _info(num_classes, train.classes, image_size, name)


def _imagenet(root: Optional[PathLike] = None, format: str = "imagefolder", num_classes: Optional[int] = 1000,
              image_size: Optional[int] = 224, transforms: Optional[str] = "imagenet", **_):
    if format not in ("folder", "imagefolder", "lmdb"):
        raise DataConfigError(f"imagenet: dataset.format={format!r} is not allowed: use imagefolder or lmdb")
    build = _lmdb if format == "lmdb" else _imagefolder
    return build(root=root, image_size=image_size or 224, transforms=transforms or "imagenet",
                 num_classes=num_classes, name="imagenet")


_BUILDERS: dict[str, Callable] = {
    "synthetic": _synthetic,
    "cifar10": lambda **kw: _cifar("cifar10", tv_datasets.CIFAR10, tfm.CIFAR10_MEAN, tfm.CIFAR10_STD, **kw),
    "cifar100": lambda **kw: _cifar("cifar100", tv_datasets.CIFAR100, tfm.CIFAR100_MEAN, tfm.CIFAR100_STD, **kw),
    "imagefolder": _imagefolder,
    "lmdb": _lmdb,
    "imagenet": _imagenet,
}

DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_datasets(name: str, **kwargs) -> tuple[Dataset, Dataset, dict]:
    """``(train_ds, val_ds, info)`` for data set ``name`` (one of ``DATASET_NAMES``).

    synthetic: num_classes=10, image_size=32, train_size=2048, val_size=512, seed=0.
    cifar10 / cifar100: root (the folder holding cifar-10-batches-py / cifar-100-python), download=False.
    imagefolder: root with train/ and val/ (or test/); transforms="cifar"|"imagenet" (default by
        image size: "cifar" up to 64 pixels), image_size (default: the stored size, 224 for "imagenet").
    lmdb: root with train.lmdb and val.lmdb (or test.lmdb) from data/folder2lmdb.py; as imagefolder.
    imagenet: root, format="imagefolder"|"lmdb", num_classes=1000, image_size=224, ImageNet transforms.
    All: num_classes, if not None, must match the data.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    kwargs.pop("name", None)  # a config group may carry its own name alongside the options
    return builder(**kwargs)
