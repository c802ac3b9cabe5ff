"""Data sets, the LMDB converter and reader, and the loaders (CPU).

The real-JPEG tests read a few hundred files of the CIFAR-10 JPEG copy named by the environment
variable DIVISION_CIFAR10_JPEG (train/ and test/ class folders): they are skipped when the variable
is unset and fail when it names a folder that is not there. They never write next to the real data:
a small ImageFolder of symlinks is built under pytest's tmp_path.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from data import DATASET_NAMES, DeviceLoader, build_datasets, build_loaders
from data import folder2lmdb
from data.folder2lmdb import KEY_PROGRESS, LMDBRecordError, convert_split, encode_record, record_key
from data.lmdb_dataset import LMDBImageDataset
from data.on_device import Augmentation, augmentation_from_transform, decode_uint8
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS = 20, 10


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def cifar_jpeg() -> Path:
    value = os.environ.get("DIVISION_CIFAR10_JPEG")
    if not value:
        pytest.skip("DIVISION_CIFAR10_JPEG is not set (point it at the CIFAR-10 JPEG folder to run this)")
    root = Path(value)
    missing = [str(root / split) for split in ("train", "test") if not (root / split).is_dir()]
    if missing:
        pytest.fail(f"DIVISION_CIFAR10_JPEG={value}, but {', '.join(missing)} does not exist")
    return root


@pytest.fixture(scope="session")
def small_jpeg_tree(cifar_jpeg, tmp_path_factory) -> Path:
    """train/ (20 per class) and test/ (10 per class): symlinks to the real JPEGs."""
    out = tmp_path_factory.mktemp("cifar10-jpeg-small")
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for class_dir in sorted(p for p in (cifar_jpeg / split).iterdir() if p.is_dir()):
            target = out / split / class_dir.name
            target.mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:per_class]:
                (target / image.name).symlink_to(image.resolve())
    return out


@pytest.fixture
def jpeg_copy(small_jpeg_tree, tmp_path) -> Path:
    """A fresh folder per test (symlinks again), so that databases written into it start clean."""
    out = tmp_path / "cifar10-jpeg"
    for link in small_jpeg_tree.rglob("*.jpg"):
        target = out / link.relative_to(small_jpeg_tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.readlink(link))
    return out


def pixels(image: Image.Image) -> np.ndarray:
    return np.array(image.convert("RGB"))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_records(db: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


# ------------------------------------------------------------------------------- real JPEG folders
def test_imagefolder_reads_the_jpegs(jpeg_copy):
    train, val, info = build_datasets("imagefolder", root=jpeg_copy, num_classes=10, image_size=32,
                                      transforms="cifar", num_workers=4, on_device="auto", download=False)
    assert info["num_classes"] == 10 and info["image_size"] == 32
    assert info["classes"][:3] == ["airplane", "automobile", "bird"]
    assert (len(train), len(val)) == (10 * TRAIN_PER_CLASS, 10 * TEST_PER_CLASS)  # test/ stands in for val/
    image, label = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    # evaluation: ToTensor + CIFAR normalisation of the file's pixels, nothing random
    expected = (torch.from_numpy(pixels(Image.open(val.samples[0][0]))).permute(2, 0, 1) / 255.0
                - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(image, expected, atol=1e-6)


def test_imagefolder_defaults_and_imagenet_preset(jpeg_copy):
    _, _, info = build_datasets("imagefolder", root=jpeg_copy)  # size read from the files
    assert info["image_size"] == 32
    train, val, info = build_datasets("imagenet", root=jpeg_copy, num_classes=10)
    assert info["image_size"] == 224
    assert train[0][0].shape == val[0][0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="num_classes=10"):
        build_datasets("imagenet", root=jpeg_copy)  # 1000 classes by default


def test_lmdb_round_trip_matches_imagefolder(jpeg_copy):
    for split in ("train", "test"):
        convert_split(jpeg_copy, split, progress=False)
    folder_train, folder_val, folder_info = build_datasets("imagefolder", root=jpeg_copy)
    lmdb_train, lmdb_val, lmdb_info = build_datasets("lmdb", root=jpeg_copy)
    assert lmdb_info == folder_info
    for folder_ds, lmdb_ds in ((folder_train, lmdb_train), (folder_val, lmdb_val)):
        assert len(lmdb_ds) == len(folder_ds)
        assert lmdb_ds.targets == folder_ds.targets
        for index, (path, label) in enumerate(folder_ds.samples):
            stored, stored_label = lmdb_ds.read_record(index)
            assert stored == Path(path).read_bytes()  # the file's bytes, not re-encoded
            image, image_label = lmdb_ds.load_image(index)
            assert stored_label == image_label == label
            assert np.array_equal(pixels(image), pixels(Image.open(path)))


def test_lmdb_with_dataloader_workers(jpeg_copy):
    db = convert_split(jpeg_copy, "train", progress=False)
    dataset = LMDBImageDataset(db, transform=T.PILToTensor())
    dataset[3]  # opens the environment in this process: forked workers must open their own
    assert pickle.loads(pickle.dumps(dataset))[3][1] == dataset[3][1]
    loader = DataLoader(dataset, batch_size=32, num_workers=2, shuffle=False)
    images, labels = map(torch.cat, zip(*loader))
    folder = tv_datasets.ImageFolder(str(jpeg_copy / "train"), transform=T.PILToTensor())
    assert labels.tolist() == folder.targets
    assert torch.equal(images, torch.stack([folder[i][0] for i in range(len(folder))]))


def test_corrupt_or_missing_records_name_the_key(jpeg_copy):
    db = convert_split(jpeg_copy, "train", progress=False)
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        txn.put(record_key(5), txn.get(record_key(5))[:-100])  # truncated value
        txn.put(record_key(6), encode_record(0, b"not a JPEG at all"))  # intact record, undecodable image
        txn.delete(record_key(7))
    env.close()
    dataset = LMDBImageDataset(db)
    dataset[4]
    with pytest.raises(LMDBRecordError, match=r"'00000005'.*truncated") as error:
        dataset[5]
    assert str(db) in str(error.value)
    with pytest.raises(LMDBRecordError, match=r"'00000006'.*does not decode") as error:
        dataset[6]
    assert str(db) in str(error.value)
    with pytest.raises(LMDBRecordError, match=r"'00000007'.*missing") as error:
        dataset[7]
    assert str(db) in str(error.value)


def test_rerun_leaves_a_complete_database_alone(jpeg_copy):
    db = convert_split(jpeg_copy, "train", progress=False)
    before = file_digest(db / "data.mdb")
    # through the command line, as a user re-runs it
    result = subprocess.run([sys.executable, str(ROOT / "data" / "folder2lmdb.py"), "-f", str(jpeg_copy),
                             "-s", "train"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stderr
    assert file_digest(db / "data.mdb") == before
    convert_split(jpeg_copy, "train", overwrite=True, progress=False)
    assert len(LMDBImageDataset(db)) == 10 * TRAIN_PER_CLASS


def test_stopped_conversion_resumes(jpeg_copy, tmp_path):
    reference = all_records(convert_split(jpeg_copy, "train", tmp_path / "reference", progress=False))
    db = convert_split(jpeg_copy, "train", commit_every=16, stop_after=57, progress=False)
    with pytest.raises(RuntimeError, match=r"unfinished conversion \(57 records so far\).*re-run"):
        build_datasets("lmdb", root=jpeg_copy)  # no test.lmdb needed to refuse train.lmdb
    convert_split(jpeg_copy, "train", commit_every=16, progress=False)
    assert all_records(db) == reference


def test_crashed_conversion_resumes(jpeg_copy, tmp_path, monkeypatch):
    reference = all_records(convert_split(jpeg_copy, "train", tmp_path / "reference", progress=False))
    real_read, reads = folder2lmdb._read_file, [0]

    class SimulatedCrash(Exception):
        pass

    def read_then_crash(path):
        reads[0] += 1
        if reads[0] > 45:
            raise SimulatedCrash("killed in the middle of the third chunk")
        return real_read(path)

    monkeypatch.setattr(folder2lmdb, "_read_file", read_then_crash)
    with pytest.raises(SimulatedCrash):
        convert_split(jpeg_copy, "train", commit_every=20, progress=False)
    db = jpeg_copy / "train.lmdb"
    partial = all_records(db)
    assert partial[KEY_PROGRESS] == b"40"  # the interrupted third chunk left nothing behind
    assert record_key(39) in partial and record_key(40) not in partial
    monkeypatch.setattr(folder2lmdb, "_read_file", real_read)
    convert_split(jpeg_copy, "train", commit_every=20, progress=False)
    assert all_records(db) == reference


def test_device_loader_reproduces_the_folder_pipeline(jpeg_copy):
    train, val, _ = build_datasets("imagefolder", root=jpeg_copy)
    augmentation = augmentation_from_transform(train.transform, (32, 32))
    assert (augmentation.crop_padding, augmentation.flip_p) == (4, 0.5)
    train_loader, val_loader = build_loaders(train, val, batch_size=32, num_workers=2, on_device=True)
    assert len(train_loader) == 7 and len(val_loader) == 4
    # evaluation batches equal the DataLoader's, image for image
    device_images = torch.cat([x for x, _ in val_loader])
    reference = torch.cat([x for x, _ in DataLoader(val, batch_size=50)])
    assert torch.allclose(device_images, reference, atol=1e-5)


# --------------------------------------------------------------------------------------- CIFAR-10
def _fabricate_cifar(root: Path, folder: str, label_key: str, meta_file: str, meta_key: str,
                     files: dict[str, int], num_classes: int) -> dict[str, np.ndarray]:
    """torchvision's pickled CIFAR layout with a few random images per file."""
    rng = np.random.default_rng(0)
    batches = root / folder
    batches.mkdir(parents=True)
    written = {}
    for name, count in files.items():
        data = rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8)
        with open(batches / name, "wb") as f:
            pickle.dump({"data": data, label_key: rng.integers(0, num_classes, count).tolist()}, f)
        written[name] = data
    with open(batches / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(num_classes)]}, f)
    return written


@pytest.fixture
def no_md5_check(monkeypatch):
    """torchvision checks every CIFAR file's md5 even without downloading; fabricated files fail it."""
    monkeypatch.setattr(tv_datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def test_cifar10_from_torchvision_files(tmp_path, no_md5_check):
    files = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    written = _fabricate_cifar(tmp_path, "cifar-10-batches-py", "labels", "batches.meta", "label_names", files, 10)
    train, val, info = build_datasets("cifar10", root=tmp_path, num_classes=10, image_size=32, download=False)
    assert (len(train), len(val)) == (15, 4)
    assert info == {"num_classes": 10, "image_size": 32, "classes": [f"class{i}" for i in range(10)]}
    first = torch.from_numpy(written["test_batch"][0].reshape(3, 32, 32)).float() / 255
    expected = (first - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(val[0][0], expected, atol=1e-6)
    images, _ = decode_uint8(val)  # read straight from the arrays
    assert torch.equal(images[0], torch.from_numpy(written["test_batch"][0].reshape(3, 32, 32)))
    # the batches folder itself is accepted as the root too
    assert len(build_datasets("cifar10", root=tmp_path / "cifar-10-batches-py")[0]) == 15
    with pytest.raises(ValueError, match="dataset.num_classes=10"):
        build_datasets("cifar10", root=tmp_path, num_classes=100)  # a head sized for the wrong data


def test_cifar100_from_torchvision_files(tmp_path, no_md5_check):
    _fabricate_cifar(tmp_path, "cifar-100-python", "fine_labels", "meta", "fine_label_names",
                     {"train": 6, "test": 2}, 100)
    train, val, info = build_datasets("cifar100", root=tmp_path)
    assert (len(train), len(val), info["num_classes"]) == (6, 2, 100)


# ------------------------------------------------------------------------------------ error paths
def test_missing_folders_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        build_datasets("cifar10", root=missing)
    assert str(missing / "cifar-10-batches-py") in str(error.value)
    assert "dataset.download=true" in str(error.value) and "dataset.root=" in str(error.value)
    for name in ("imagefolder", "lmdb", "imagenet"):
        with pytest.raises(FileNotFoundError, match="dataset.root=") as error:
            build_datasets(name, root=missing)
        assert str(missing) in str(error.value)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as error:
        build_datasets("imagefolder", root=tmp_path)
    assert str(tmp_path / "val") in str(error.value) and str(tmp_path / "test") in str(error.value)
    with pytest.raises(FileNotFoundError, match="folder2lmdb") as error:
        build_datasets("lmdb", root=tmp_path)
    assert str(tmp_path / "train.lmdb") in str(error.value)
    with pytest.raises(ValueError, match="dataset.root"):
        build_datasets("cifar10", root=None)
    with pytest.raises(ValueError, match="dataset.format='tfrecord' is not allowed: use imagefolder or lmdb"):
        build_datasets("imagenet", root=tmp_path, format="tfrecord")


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_datasets("mnist")
    assert all(name in str(error.value) for name in DATASET_NAMES)


# -------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_class_structured():
    kwargs = dict(num_classes=10, image_size=32, train_size=2048, val_size=512, seed=0,
                  root=None, num_workers=0, on_device="auto", download=False)  # the config's keys
    train, val, info = build_datasets("synthetic", **kwargs)
    again, _, _ = build_datasets("synthetic", **kwargs)
    other, _, _ = build_datasets("synthetic", **{**kwargs, "seed": 1})
    assert info == {"num_classes": 10, "image_size": 32, "classes": [f"class_{i}" for i in range(10)]}
    assert train.images.shape == (2048, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    assert torch.bincount(train.labels).tolist() == [205] * 8 + [204] * 2  # balanced
    # nearest class mean on raw pixels: far above the 10% of chance
    flat, val_flat = train.images.float().flatten(1), val.images.float().flatten(1)
    means = torch.stack([flat[train.labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(val_flat, means).argmin(1) == val.labels).float().mean().item()
    assert accuracy > 0.6
    # but no single pixel gives the class away: the images are not constant per class
    assert train.images[train.labels == 0].float().std(0).mean() > 20


@pytest.mark.slow  # a real epoch (3 to 22 s on two cores); tests/test_division_training.py learns too
def test_resnet20_learns_synthetic_in_one_epoch():
    torch.manual_seed(0)
    train, val, info = build_datasets("synthetic", seed=0)
    train_loader, val_loader = build_loaders(train, val, batch_size=64, on_device=True, seed=0)
    model = build_model("resnet20", info["num_classes"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    for images, labels in train_loader:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(images).argmax(1) == labels).sum().item() for images, labels in val_loader)
    assert correct / len(val) > 0.5  # chance: 0.1; about 0.8 in practice


# ----------------------------------------------------------------------------------- DeviceLoader
def _cifar_like(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
            torch.arange(n) % 10)


CIFAR_AUGMENT = Augmentation(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_padding=4, flip_p=0.5)


def test_device_loader_shapes_and_normalisation():
    images, labels = _cifar_like(70)
    loader = DeviceLoader(images, labels, 32, augmentation=Augmentation(CIFAR_AUGMENT.mean, CIFAR_AUGMENT.std))
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [32, 32, 6]
    x, y = batches[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    expected = T.Normalize(CIFAR_AUGMENT.mean, CIFAR_AUGMENT.std)(images[:32].float() / 255)
    assert torch.allclose(x, expected, atol=1e-5)
    assert torch.equal(y, labels[:32])
    dropping = DeviceLoader(images, labels, 32, drop_last=True)
    assert len(dropping) == len(list(dropping)) == 2
    x, _ = next(iter(DeviceLoader(images, labels, 8, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_device_loader_is_deterministic_given_the_seed():
    images, labels = _cifar_like()

    def epochs(seed: int) -> list[torch.Tensor]:
        loader = DeviceLoader(images, labels, 16, augmentation=CIFAR_AUGMENT, shuffle=True, seed=seed)
        return [x for _ in range(2) for x, _ in loader]

    first, second, other = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert not torch.equal(first[0], first[4])  # the second epoch is a new draw


def test_device_augmentation_is_a_padded_crop_or_flip_of_the_image():
    images, labels = _cifar_like(32)
    labels = torch.arange(32)  # identifies each image after shuffling
    loader = DeviceLoader(images, labels, 32, augmentation=Augmentation(crop_padding=4, flip_p=0.5),
                          shuffle=True, seed=3)
    augmented, order = next(iter(loader))
    restored = (augmented * 255).round().to(torch.uint8)  # mean 0, std 1: x / 255
    changed = 0
    for image, index in zip(restored, order):
        padded = torch.nn.functional.pad(images[index], (4, 4, 4, 4))
        candidates = [padded[:, top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(image, c) for c in candidates)
        changed += not torch.equal(image, images[index])
    assert changed >= 28  # 1 in 81 * 2 draws leaves an image as it was


def test_build_loaders_chooses_the_path():
    train, val, _ = build_datasets("synthetic", train_size=100, val_size=20)
    train_loader, val_loader = build_loaders(train, val, 32, num_workers=0, device="cpu", on_device="auto")
    assert isinstance(train_loader, DataLoader) and isinstance(val_loader, DataLoader)
    first = [y for _, y in build_loaders(train, val, 32, seed=5)[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in build_loaders(train, val, 32, seed=5)[0]]))
    train_loader, val_loader = build_loaders(train, val, 32, device="cpu", on_device="true")
    assert isinstance(train_loader, DeviceLoader) and train_loader.shuffle and not val_loader.shuffle
    assert train_loader.augmentation.crop_padding == 0  # synthetic has no augmentation to reproduce
    with pytest.raises(ValueError, match="dataset.on_device='sometimes' is not allowed"):
        build_loaders(train, val, 32, on_device="sometimes")
