"""Datasets and the device-resident loader: digits, archives, CIFAR-10, TensorLoader."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from effvision.data import DataConfig, ImageArrays, TensorLoader, decode_archive, decode_imagefolder, digits
from effvision.errors import EffVisionError

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10"
needs_cifar10 = pytest.mark.skipif(not (CIFAR10 / "test").is_dir(),
                                   reason=f"CIFAR-10 is absent ({CIFAR10}); it lives in ../shared beside the checkout")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_splits() -> dict[str, ImageArrays]:
    return digits(32)


def test_digits_sizes_dtype_and_classes(digit_splits):
    train, test = digit_splits["train"], digit_splits["test"]
    assert len(train) + len(test) == 1797
    assert (len(train), len(test)) == (1347, 450)  # a fixed 75/25 split
    for split in (train, test):
        assert split.images.dtype == torch.uint8
        assert split.images.shape == (len(split), 3, 32, 32)
        assert split.labels.dtype == torch.int64 and split.labels.shape == (len(split),)
        assert split.classes == [str(i) for i in range(10)]
        # grey digits: three identical channels, real ink on a dark background
        assert torch.equal(split.images[:, 0], split.images[:, 1])
        assert torch.equal(split.images[:, 0], split.images[:, 2])
        assert split.images.max() == 255 and split.images.min() == 0


def test_digits_split_is_stratified(digit_splits):
    train = torch.bincount(digit_splits["train"].labels, minlength=10)
    test = torch.bincount(digit_splits["test"].labels, minlength=10)
    total = train + test
    assert total.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # scikit-learn's digits
    expected = total.double() * 450 / 1797
    assert ((test.double() - expected).abs() <= 1).all(), test.tolist()


def test_digits_identical_across_calls(digit_splits):
    again = digits(32)
    for name in ("train", "test"):
        assert torch.equal(again[name].images, digit_splits[name].images)
        assert torch.equal(again[name].labels, digit_splits[name].labels)


def test_digits_other_size():
    small = digits(16)
    assert small["train"].images.shape == (1347, 3, 16, 16)


def test_subset_is_class_balanced_and_ordered(digit_splits):
    train = digit_splits["train"]
    sub = train.subset(100)
    assert len(sub) == 100
    assert torch.bincount(sub.labels, minlength=10).tolist() == [10] * 10
    # exactly the first 10 samples of each class, in their original order
    seen = torch.zeros(10, dtype=torch.long)
    keep = []
    for i, c in enumerate(train.labels.tolist()):
        if seen[c] < 10:
            keep.append(i)
        seen[c] += 1
    assert torch.equal(sub.labels, train.labels[keep])
    assert torch.equal(sub.images, train.images[keep])
    assert train.subset(None) is train and train.subset(10_000) is train


# --------------------------------------------------------------------------------------
# TensorLoader
# --------------------------------------------------------------------------------------


def _loader(data: ImageArrays, batch_size: int = 64, **kw) -> TensorLoader:
    args = dict(train=True, device="cpu", mean=MEAN, std=STD, crop_padding=2, hflip=True, seed=7)
    args.update(kw)
    return TensorLoader(data, batch_size, **args)


def _batches(loader: TensorLoader, epoch: int, start_step: int = 0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_step)]


def test_loader_batches_are_a_function_of_seed_epoch_step(digit_splits):
    data = digit_splits["train"]
    a = _batches(_loader(data), epoch=3)
    torch.manual_seed(123)  # the global RNG plays no part
    b = _batches(_loader(data), epoch=3)  # a fresh loader, same seed
    assert len(a) == 1347 // 64
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (64, 3, 32, 32) and xa.dtype == torch.float32
    other_epoch = _batches(_loader(data), epoch=4)
    assert not torch.equal(a[0][1], other_epoch[0][1])
    other_seed = _batches(_loader(data, seed=8), epoch=3)
    assert not torch.equal(a[0][1], other_seed[0][1])


def test_loader_resume_gives_the_tail_of_the_epoch(digit_splits):
    loader = _loader(digit_splits["train"])
    full = _batches(loader, epoch=2)
    for start in (1, 9, len(full) - 1):
        torch.manual_seed(start)
        tail = _batches(_loader(digit_splits["train"]), epoch=2, start_step=start)
        assert len(tail) == len(full) - start
        for (xa, ya), (xb, yb) in zip(tail, full[start:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert _batches(loader, epoch=2, start_step=len(full)) == []


def test_random_erasing_is_a_function_of_seed_epoch_step(digit_splits):
    data = digit_splits["train"]
    torch.manual_seed(0)
    full = _batches(_loader(data, random_erasing=0.5), epoch=2)
    torch.manual_seed(1)
    tail = _batches(_loader(data, random_erasing=0.5), epoch=2, start_step=3)
    for (xa, ya), (xb, yb) in zip(tail, full[3:]):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def _indexed_images(n: int = 200) -> ImageArrays:
    """Random uint8 images whose pixel (0, 0, 0) is their index, so a batch reveals its order."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return ImageArrays(images, labels, [str(i) for i in range(10)])


def test_loader_without_augmentation_yields_normalized_images_in_permuted_order():
    data = _indexed_images(200)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = TensorLoader(data, 40, train=True, device="cpu", mean=mean, std=std, crop_padding=0,
                          hflip=False, seed=1)
    xs, ys = zip(*loader.epoch(0))
    x, y = torch.cat(xs), torch.cat(ys)
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    idx = (x[:, 0, 0, 0] * s[0, 0, 0, 0] + m[0, 0, 0, 0]).round().long()
    assert sorted(idx.tolist()) == list(range(200))  # every image exactly once
    assert idx.tolist() != list(range(200))  # shuffled
    assert torch.equal(x, (data.images[idx].float() - m) / s)  # exactly, bit for bit
    assert torch.equal(y, data.labels[idx])
    # another epoch, another order; the eval loader keeps the file order
    idx1 = (torch.cat([b for b, _ in loader.epoch(1)])[:, 0, 0, 0] * s[0, 0, 0, 0] + m[0, 0, 0, 0]).round().long()
    assert idx1.tolist() != idx.tolist()
    ev = TensorLoader(data, 64, train=False, device="cpu", mean=mean, std=std)
    assert torch.equal(torch.cat([b for b, _ in ev.epoch(0)]), (data.images.float() - m) / s)


def test_loader_lengths_drop_last_for_train_only():
    data = _indexed_images(200)
    train = TensorLoader(data, 64, train=True, device="cpu", mean=MEAN, std=STD)
    ev = TensorLoader(data, 64, train=False, device="cpu", mean=MEAN, std=STD)
    assert len(train) == 3 and train.num_samples == 192 and len(list(train.epoch(0))) == 3
    assert len(ev) == 4 and ev.num_samples == 200
    assert [len(y) for _, y in ev.epoch(0)] == [64, 64, 64, 8]


def test_augmentation_crops_and_flips(digit_splits):
    data = digit_splits["train"]
    plain = _batches(_loader(data, crop_padding=0, hflip=False), epoch=0)
    aug = _batches(_loader(data, crop_padding=4, hflip=True), epoch=0)
    # same order (it depends on seed and epoch only), different pixels
    assert torch.equal(plain[0][1], aug[0][1])
    assert not torch.equal(plain[0][0], aug[0][0])
    # a crop never invents pixel values: padding is black (normalized 0 -> -1)
    lo = (0 - 0.5 * 255) / (0.5 * 255)
    assert aug[0][0].min() >= lo - 1e-6 and aug[0][0].max() <= 1 + 1e-6
    # flips only: every image equals its source or its mirror
    flip = _batches(_loader(data, crop_padding=0, hflip=True), epoch=0)
    xp, xf = plain[0][0], flip[0][0]
    same = (xf == xp).flatten(1).all(1)
    mirrored = (xf == xp.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int((mirrored & ~same).sum()) < len(xf)


@pytest.mark.parametrize("aug", [dict(crop_padding=2, hflip=True), dict(crop_padding=0, hflip=False)])
def test_two_ranks_together_see_the_single_process_batch(digit_splits, aug):
    data = digit_splits["train"]
    single = _batches(_loader(data, 64, **aug), epoch=1)
    ranks = [_batches(_loader(data, 64, rank=r, world_size=2, **aug), epoch=1) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert x0.shape[0] == x1.shape[0] == 32
        assert torch.equal(torch.cat([x0, x1]), x)
        assert torch.equal(torch.cat([y0, y1]), y)


def test_two_ranks_with_random_erasing_see_the_single_process_batch(digit_splits):
    data = digit_splits["train"]
    torch.manual_seed(0)
    single = _batches(_loader(data, 64, random_erasing=0.5), epoch=1)
    ranks = []
    for r in (0, 1):
        torch.manual_seed(0)  # each process starts from the same global RNG state
        ranks.append(_batches(_loader(data, 64, random_erasing=0.5, rank=r, world_size=2), epoch=1))
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([x0, x1]), x)


def test_batch_not_divisible_by_world_size_is_refused(digit_splits):
    with pytest.raises(ValueError, match="not divisible"):
        _loader(digit_splits["train"], 63, world_size=2)


# --------------------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------------------

COLORS = {"cat": (200, 30, 30), "dog": (30, 30, 200), "emu": (30, 200, 30)}


def _image_bytes(color: tuple[int, int, int], fmt: str, size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def _make_archive(path: Path, layout: dict[str, dict[str, list[tuple[str, bytes]]]], top: str = "top") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split, classes in layout.items():
            for cls, files in classes.items():
                for name, data in files:
                    info = tarfile.TarInfo(f"{top}/{split}/{cls}/{name}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        readme = b"not an image"
        info = tarfile.TarInfo(f"{top}/README.txt")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
    return path


@pytest.fixture
def small_archive(tmp_path) -> Path:
    layout = {
        "train": {"cat": [(f"{i}.png", _image_bytes(COLORS["cat"], "PNG")) for i in range(3)],
                  "dog": [(f"{i}.png", _image_bytes(COLORS["dog"], "PNG")) for i in range(2)],
                  "emu": [("0.jpg", _image_bytes(COLORS["emu"], "JPEG"))]},
        "test": {"cat": [("0.jpg", _image_bytes(COLORS["cat"], "JPEG"))],
                 "dog": [("0.png", _image_bytes(COLORS["dog"], "PNG")), ("1.jpeg", _image_bytes(COLORS["dog"], "JPEG"))],
                 "emu": [("0.png", _image_bytes(COLORS["emu"], "PNG"))]},
    }
    return _make_archive(tmp_path / "small.tar.gz", layout)


def test_decode_archive_shapes_labels_classes(small_archive):
    splits = decode_archive(small_archive)
    assert set(splits) == {"train", "test"}
    train, test = splits["train"], splits["test"]
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 2]
    assert sorted(test.labels.tolist()) == [0, 1, 1, 2]
    # each image carries its class's colour: labels line up with pixels
    for split in (train, test):
        for img, label in zip(split.images, split.labels):
            color = torch.tensor(COLORS[split.classes[int(label)]], dtype=torch.float32)
            mean_px = img.float().mean(dim=(1, 2))
            assert (mean_px - color).abs().max() < 4, (split.classes[int(label)], mean_px)


def test_decode_archive_png_is_lossless_and_resizes(small_archive):
    splits = decode_archive(small_archive, img_size=16)
    train = splits["train"]
    assert train.images.shape == (6, 3, 16, 16)
    cat = train.images[train.labels == 0]
    assert torch.equal(cat, torch.tensor(COLORS["cat"], dtype=torch.uint8).view(1, 3, 1, 1).expand_as(cat))


def test_decode_archive_mixed_sizes_need_img_size(tmp_path):
    layout = {"train": {"a": [("0.png", _image_bytes((1, 2, 3), "PNG", 32)),
                              ("1.png", _image_bytes((1, 2, 3), "PNG", 24))]}}
    path = _make_archive(tmp_path / "mixed.tgz", layout)
    with pytest.raises(EffVisionError, match="img_size"):
        decode_archive(path)
    assert decode_archive(path, img_size=32)["train"].images.shape == (2, 3, 32, 32)


def test_load_arrays_reads_an_archive_root(small_archive):
    from effvision.data.build import load_arrays

    cfg = DataConfig(name="imagefolder", root=str(small_archive), img_size=32)
    splits = load_arrays(cfg)
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 6
    with pytest.raises(EffVisionError, match="no split 'val'"):
        load_arrays(DataConfig(name="imagefolder", root=str(small_archive), eval_split="val"))


def test_corrupt_archive_is_a_user_error(tmp_path, small_archive):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(EffVisionError, match="corrupt dataset archive"):
        decode_archive(garbage)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(small_archive.read_bytes()[: small_archive.stat().st_size // 2])
    with pytest.raises(EffVisionError):
        decode_archive(truncated)
    with pytest.raises(EffVisionError, match="not found"):
        decode_archive(tmp_path / "missing.tar.gz")


def test_archive_without_images_is_a_user_error(tmp_path):
    path = tmp_path / "empty.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("top/train/a/notes.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(EffVisionError, match="no images"):
        decode_archive(path)


def test_corrupt_image_inside_archive_is_a_user_error(tmp_path):
    layout = {"train": {"a": [("0.png", _image_bytes((1, 2, 3), "PNG")), ("1.png", b"\x89PNG garbage")]}}
    path = _make_archive(tmp_path / "badimg.tar.gz", layout)
    with pytest.raises(EffVisionError):
        decode_archive(path)


# --------------------------------------------------------------------------------------
# image folders and CIFAR-10 (read-only, from ../shared)
# --------------------------------------------------------------------------------------


def test_decode_imagefolder_and_cache(tmp_path):
    from PIL import Image

    root = tmp_path / "data" / "train"
    for cls, color in COLORS.items():
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), color).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("ignored")
    cache = tmp_path / "cache"
    first = decode_imagefolder(root, 32, cache)
    assert first.classes == ["cat", "dog", "emu"]
    assert first.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert first.images.shape == (6, 3, 32, 32)
    assert len(list(cache.glob("*.safetensors"))) == 1
    second = decode_imagefolder(root, 32, cache)  # from the cache
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    with pytest.raises(EffVisionError, match="not found"):
        decode_imagefolder(tmp_path / "nope")


@pytest.fixture(scope="module")
def cifar_cache(tmp_path_factory) -> Path:
    """One decode cache for this module (never ~/.cache): the test split is decoded once."""
    return tmp_path_factory.mktemp("cifar_cache")


@needs_cifar10
def test_cifar10_test_split_decodes(cifar_cache):
    test = decode_imagefolder(CIFAR10 / "test", 32, cache_dir=cifar_cache)
    assert test.classes == CIFAR10_CLASSES
    assert test.images.shape == (10_000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    # real photographs: far from constant, using the whole range
    assert test.images.float().std() > 40
    assert list(cifar_cache.glob("test-*.safetensors"))


@needs_cifar10
def test_cifar10_load_arrays_limits(cifar_cache, monkeypatch):
    import effvision.data.build as build

    monkeypatch.setattr(build, "CACHE_DIR", cifar_cache)  # never write into ~/.cache here
    cfg = DataConfig(name="cifar10", root=str(CIFAR10), limit_train=200, limit_eval=100)
    splits = build.load_arrays(cfg)
    train, test = splits["train"], splits["test"]
    assert train.classes == test.classes == CIFAR10_CLASSES
    assert train.images.shape == (200, 3, 32, 32) and test.images.shape == (100, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=10).tolist() == [20] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [10] * 10
    assert list(cifar_cache.glob("train-*.safetensors"))  # the decode cache went where it was told
    # the limited split is exactly the class-balanced subset of the full split
    full_test = decode_imagefolder(CIFAR10 / "test", 32, cache_dir=cifar_cache)
    expected = full_test.subset(100)
    assert torch.equal(test.images, expected.images) and torch.equal(test.labels, expected.labels)
    # and a second call gives the same arrays (from the cache)
    again = build.load_arrays(cfg)
    assert torch.equal(again["train"].images, train.images) and torch.equal(again["test"].labels, test.labels)


def test_holdout_is_a_disjoint_class_balanced_validation_split() -> None:
    """data.holdout: N training images kept out of training (early-exit calibration reads them)."""
    from effvision.data.build import build_loaders, hold_out

    train = digits()["train"]
    rest, held = hold_out(train, 100)
    assert len(rest) + len(held) == len(train) and len(held) == 100
    assert torch.bincount(held.labels, minlength=10).tolist() == [10] * 10
    flat = lambda a: {bytes(im.numpy().tobytes()) + bytes([int(y)]) for im, y in zip(a.images, a.labels)}  # noqa: E731
    assert not (flat(rest) & flat(held))  # no image is in both (digits has a few exact duplicates: labels kept)
    loaders = build_loaders(DataConfig(holdout=100), mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"), seed=0)
    assert loaders.val is not None and loaders.val.num_samples == 100
    assert loaders.train.num_samples <= len(train) - 100
    with pytest.raises(EffVisionError, match="leaves no training images"):
        hold_out(train, len(train))
