"""Data layer: CIFAR archives, long-tailed splits, image folders, digits, batch streams, registry."""

from __future__ import annotations

import math
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbdm_fast.data import (DATASETS, BatchStream, DatasetError, LabeledImages, digits_split_indices,
                            longtail_indices,
                            img_num_per_cls, load_cifar, load_dataset, load_digits_lt, load_image_folder,
                            make_longtail)
from data_helpers import CIFAR, PLANTED, fake_cifar_batches, write_cifar_archive, write_cifar_folder

FIXTURE_PATH = Path("/work/shared/fixtures/reference_cbdm_small.pt")


@pytest.fixture(scope="module")
def lt_counts(request):
    """fixture['lt_counts'], from the shared conftest fixture when there is one."""
    try:
        fx = request.getfixturevalue("fixture")
    except pytest.FixtureLookupError:
        if not FIXTURE_PATH.exists():
            pytest.skip(f"{FIXTURE_PATH} not found")
        fx = torch.load(FIXTURE_PATH, weights_only=False)
    return fx["lt_counts"]


# ----------------------------------------------------------------------------------------------- CIFAR

@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("c10")
    write_cifar_archive(d / "dl", "cifar10")
    write_cifar_folder(d / "ex", "cifar10")
    return d


def _expected(name, train):
    spec = CIFAR[name]
    files = fake_cifar_batches(name)
    parts = [files[f] for f in (spec["train"] if train else [spec["test"]])]
    data = np.concatenate([p["data"] for p in parts])
    labels = np.concatenate([p[spec["labels_key"]] for p in parts])
    return data, labels


@pytest.mark.parametrize("form", ["archive", "archive_dir", "folder", "folder_parent"])
@pytest.mark.parametrize("train", [True, False])
def test_cifar10_every_root_form(cifar10_dir, form, train):
    root = {"archive": cifar10_dir / "dl" / "cifar-10-python.tar.gz", "archive_dir": cifar10_dir / "dl",
            "folder": cifar10_dir / "ex" / "cifar-10-batches-py", "folder_parent": cifar10_dir / "ex"}[form]
    ds = load_cifar(root, "cifar10", train=train)
    data, labels = _expected("cifar10", train)
    assert ds.images.shape == (50 if train else 10, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.images.flags.c_contiguous
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.labels.dtype == np.int64 and ds.num_classes == 10
    assert ds.class_names == [f"class_{k}" for k in range(10)]
    # CHW rows -> HWC images, batches in order data_batch_1..5
    np.testing.assert_array_equal(ds.images, data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def test_cifar_orientation(cifar10_dir):
    img = load_cifar(cifar10_dir / "dl", "cifar10").images[0]
    nz = {tuple(int(v) for v in i): int(img[tuple(i)]) for i in np.argwhere(img)}
    assert nz == {(r, c, ch): v for (ch, r, c), v in PLANTED.items()}
    assert img[2, 5, 0] == 200


def test_cifar10_member_order_does_not_matter(tmp_path, cifar10_dir):
    write_cifar_archive(tmp_path, "cifar10", reverse=True)
    a, b = load_cifar(tmp_path, "cifar10"), load_cifar(cifar10_dir / "dl", "cifar10")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_cifar100(tmp_path):
    write_cifar_archive(tmp_path, "cifar100")
    ds = load_cifar(tmp_path, "cifar100")
    data, labels = _expected("cifar100", True)
    assert len(ds) == 50 and ds.num_classes == 100 and len(ds.class_names) == 100
    np.testing.assert_array_equal(ds.labels, labels)
    assert load_cifar(tmp_path / "cifar-100-python.tar.gz", "cifar100", train=False).images.shape == (10, 32, 32, 3)


def _raises_layout(path, name, match_path=None):
    with pytest.raises(DatasetError) as ei:
        load_cifar(path, name)
    msg = str(ei.value)
    assert str(match_path or path) in msg, msg
    assert CIFAR[name]["archive"] in msg and CIFAR[name]["folder"] + "/" in msg, msg
    return msg


def test_cifar_missing_path(tmp_path):
    _raises_layout(tmp_path / "nope", "cifar10")


def test_cifar_truncated_archive(tmp_path, cifar10_dir):
    raw = (cifar10_dir / "dl" / "cifar-10-python.tar.gz").read_bytes()
    cut = tmp_path / "cifar-10-python.tar.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    _raises_layout(cut, "cifar10")
    _raises_layout(tmp_path, "cifar10", match_path=cut)  # the directory form reports the archive


def test_cifar_wrong_archive(tmp_path, cifar10_dir):
    msg = _raises_layout(cifar10_dir / "dl" / "cifar-10-python.tar.gz", "cifar100")
    assert "train, test, meta" in msg
    _raises_layout(cifar10_dir / "ex", "cifar100")  # folder of the other data set
    junk = tmp_path / "random.bin"
    junk.write_bytes(os.urandom(5000))
    _raises_layout(junk, "cifar10")


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar_folder(tmp_path, "cifar10")
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    msg = _raises_layout(tmp_path, "cifar10", match_path=folder / "data_batch_3")
    assert "unexpected object" in msg and not flag.exists()


def test_cifar_bad_name(cifar10_dir):
    with pytest.raises(ValueError, match="cifar100"):
        load_cifar(cifar10_dir / "dl", "cifar1000")


# ------------------------------------------------------------------------------------------- long tail

@pytest.mark.parametrize("key", ["cifar100_exp_0.01", "cifar10_exp_0.01", "cifar10_step_0.1", "cifar100_exp_0.1"])
def test_img_num_per_cls_matches_authors(lt_counts, key):
    ds, imb_type, factor = key.split("_")
    c = 100 if ds == "cifar100" else 10
    assert img_num_per_cls(50000 / c, c, imb_type, float(factor)) == lt_counts[key]


def _tiny(labels, num_classes):
    labels = np.asarray(labels, dtype=np.int64)
    imgs = (np.arange(len(labels)) % 251).astype(np.uint8).reshape(-1, 1, 1, 1)
    return LabeledImages(imgs, labels, num_classes)


def test_make_longtail_counts_on_cifar10_sized_set(lt_counts):
    rng = np.random.RandomState(1)
    ds = _tiny(rng.permutation(np.repeat(np.arange(10), 5000)), 10)
    assert make_longtail(ds, "exp", 0.01).counts().tolist() == lt_counts["cifar10_exp_0.01"]
    assert make_longtail(ds, "step", 0.1).counts().tolist() == lt_counts["cifar10_step_0.1"]


@pytest.mark.parametrize("imb_type,factor", [("exp", 0.01), ("exp", 0.1), ("step", 0.1), ("none", 1.0)])
def test_make_longtail_matches_authors_loop(imb_type, factor):
    c, per = 10, 60
    labels = np.random.RandomState(3).permutation(np.repeat(np.arange(c), per))
    ds = _tiny(labels, c)
    state = np.random.get_state()
    # the selection itself (make_longtail refuses a split with an empty class, which exp 0.01 at 60 images
    # per class is: int(60 * 0.01) = 0; the authors' loop keeps it empty)
    out = ds.subset(longtail_indices(ds.labels, c, imb_type, factor, seed=0))
    assert np.array_equal(np.random.get_state()[1], state[1])  # global numpy state untouched

    # Oracle: the authors' IMBALANCECIFAR10.gen_imbalanced_data, written out.
    np.random.seed(0)
    img_max = len(labels) / c
    nums = img_num_per_cls(img_max, c, imb_type, factor)
    sel = []
    for the_class, the_img_num in zip(np.unique(labels), nums):
        idx = np.where(labels == the_class)[0]
        np.random.shuffle(idx)
        sel.append(idx[:the_img_num])
    sel = np.concatenate(sel)
    np.random.set_state(state)
    np.testing.assert_array_equal(out.labels, labels[sel])
    np.testing.assert_array_equal(out.images, ds.images[sel])


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), "x"])
def test_longtail_rejects_bad_factor(bad):
    with pytest.raises(ValueError, match="imb_factor"):
        make_longtail(_tiny([0, 1], 2), "exp", bad)


def test_longtail_rejects_bad_type():
    with pytest.raises(ValueError, match="imb_type"):
        make_longtail(_tiny([0, 1], 2), "linear", 0.1)


def test_longtail_short_class_warns_once_and_keeps_all():
    ds = _tiny([0] * 10 + [1] * 2 + [2] * 9, 3)  # n_max = 7; class 1 has 2 < int(7 * 0.5 ** 0.5) = 4
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = make_longtail(ds, "exp", 0.5)
    assert len(w) == 1 and "class 1" in str(w[0].message)
    assert out.counts().tolist() == [7, 2, 3]


def test_a_split_that_leaves_a_class_empty_is_refused_naming_classes_and_the_fix():
    """#17 point 3: 6/4/2 images of three classes at the default imb_factor 0.01 kept 4/0/0 images."""
    ds = _tiny([0] * 6 + [1] * 4 + [2] * 2, 3)
    ds.class_names = ["a_cat", "b_dog", "c_fox"]
    with pytest.raises(DatasetError) as ei:
        make_longtail(ds, "exp", 0.01)
    msg = str(ei.value)
    assert "keeps no image of 2 of 3 classes: b_dog (0 of 4), c_fox (0 of 2)" in msg
    assert "--imb-factor >= 0.25" in msg and "at least 100 images per class" in msg
    assert make_longtail(ds, "exp", 0.25).counts().tolist() == [4, 2, 1]  # the suggested factor works
    with pytest.raises(DatasetError, match="keeps no image of 2 of 3 classes.*int\\(4 \\* imb_factor\\) images of "
                                           "each of the last 2 classes"):
        make_longtail(ds, "step", 0.2)


def test_folderlt_with_too_few_images_is_refused_by_the_registry(tmp_path):
    _write_folder(tmp_path, {"a_cat": 6, "b_dog": 4, "c_fox": 2})
    with pytest.raises(DatasetError, match="b_dog \\(0 of 4\\), c_fox \\(0 of 2\\)"):
        load_dataset("folderlt", root=tmp_path)


def test_step_odd_classes_covers_every_class():
    assert img_num_per_cls(10.0, 5, "step", 0.5) == [10, 10, 5, 5, 5]


# ---------------------------------------------------------------------------------------------- folder

def _write_folder(root, spec, size=(8, 6)):
    """spec: class -> number of images; pixel values encode (class, index)."""
    for k, (cls, n) in enumerate(sorted(spec.items())):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            arr = np.full((size[1], size[0], 3), 10 * k + i, dtype=np.uint8)
            arr[0, 0] = (255, 0, 0)
            Image.fromarray(arr).save(root / cls / f"{i:03d}.png")


def test_folder_loads_sorted_classes(tmp_path):
    _write_folder(tmp_path, {"zebra": 2, "ant": 3, "cat": 1})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.class_names == ["ant", "cat", "zebra"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert ds.images.shape == (6, 6, 8, 3) and ds.images.dtype == np.uint8
    assert ds.images[1, 3, 3].tolist() == [1, 1, 1] and ds.images[0, 0, 0].tolist() == [255, 0, 0]
    grey = load_image_folder(tmp_path, image_size=4, channels=1)
    assert grey.images.shape == (6, 4, 4, 1)


def test_folder_longtail_via_registry(tmp_path):
    _write_folder(tmp_path, {"a": 10, "b": 10, "c": 10})
    lt = load_dataset("folderlt", root=tmp_path, imb_factor=0.1)
    assert lt.counts().tolist() == [10, 3, 1]
    assert load_dataset("folderlt", root=tmp_path, train=False).counts().tolist() == [10, 10, 10]
    assert load_dataset("folder", root=tmp_path, image_size=5).images.shape == (30, 5, 5, 3)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such directory"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path / "empty_root")
    root = tmp_path / "r"
    _write_folder(root, {"a": 2})
    (root / "b").mkdir()
    with pytest.raises(DatasetError, match="no images") as ei:
        load_image_folder(root)
    assert str(root / "b") in str(ei.value)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "b" / "big.png")
    with pytest.raises(DatasetError, match="differs") as ei:
        load_image_folder(root)
    assert str(root / "b" / "big.png") in str(ei.value)
    assert load_image_folder(root, image_size=6).images.shape == (3, 6, 6, 3)
    bad = root / "b" / "broken.png"
    bad.write_bytes((root / "a" / "000.png").read_bytes()[:30])
    with pytest.raises(DatasetError, match="corrupt") as ei:
        load_image_folder(root, image_size=6)
    assert str(bad) in str(ei.value)


def test_labeled_images_validation():
    with pytest.raises(ValueError, match="label 7 at index 2"):
        LabeledImages(np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1, 7]), 3)
    with pytest.raises(ValueError, match="uint8"):
        LabeledImages(np.zeros((3, 2, 2, 1), np.float32), np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        LabeledImages(np.zeros((3, 2, 2, 1), np.uint8), np.array([0, 1]), 3)
    ds = LabeledImages(np.zeros((3, 2, 2, 3), np.uint8), np.array([0, 2, 2], np.int32), 4)
    assert ds.counts().tolist() == [1, 0, 2, 0] and ds.labels.dtype == np.int64 and ds.class_names == list("0123")


# ---------------------------------------------------------------------------------------------- digits

def test_digits_long_tailed_train():
    ds = load_digits_lt(imb_factor=0.1)
    assert ds.images.shape[1:] == (16, 16, 1) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and ds.class_names == [str(c) for c in range(10)]
    counts = ds.counts()
    assert counts.argmax() == 0 and np.all(np.diff(counts) < 0)
    assert counts[-1] / counts[0] == pytest.approx(0.1, abs=0.01)
    assert ds.images.max() > 200 and ds.images.min() == 0
    assert load_digits_lt(imb_factor=0.01).counts()[-1] == 1


def test_digits_splits_balanced_and_disjoint():
    from sklearn.datasets import load_digits
    labels = load_digits().target
    train_idx, test_idx = digits_split_indices(labels)
    assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == len(labels)
    test = load_digits_lt(split="test")
    full = load_digits_lt(split="train_full")
    assert len(test) == len(test_idx) and len(full) == len(train_idx)
    np.testing.assert_array_equal(test.counts(), np.bincount(labels) // 5)
    assert test.counts().max() - test.counts().min() <= 2
    # the long-tailed train set is drawn from the training part only
    lt = load_digits_lt(split="train")
    full_rows = {row.tobytes() for row in full.images}
    assert all(row.tobytes() in full_rows for row in lt.images)
    np.testing.assert_array_equal(load_digits_lt(split="test").images, test.images)  # deterministic
    with pytest.raises(ValueError, match="split"):
        load_digits_lt(split="val")


# ----------------------------------------------------------------------------------------------- stream

def _indexed(n, c=3, size=4, channels=1):
    """Image i is constant i (n <= 256), except a bright left column so flips are visible."""
    imgs = np.repeat(np.arange(n, dtype=np.uint8), size * size * channels).reshape(n, size, size, channels)
    return LabeledImages(imgs, np.arange(n) % c, c)


def _ids(x):
    return torch.round((x[:, :, 1, 1] + 1) / 2 * 255).to(torch.int64)[:, 0]


def test_stream_batches_and_epochs():
    ds = _indexed(12)
    s = BatchStream(ds, 4, seed=5)
    assert s.batches_per_epoch == 3
    for epoch in range(3):
        seen = []
        for _ in range(3):
            x, y = s.next()
            assert x.shape == (4, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.min() >= -1 and x.max() <= 1
            ids = _ids(x)
            assert torch.equal(y, ids % 3)
            seen += ids.tolist()
        assert sorted(seen) == list(range(12)) and s.epoch == epoch
    # exact ToTensor + Normalize(0.5, 0.5) numerics
    x, _ = BatchStream(_indexed(256), 256).next()
    vals = torch.arange(256, dtype=torch.float32).div(255).sub(0.5).div(0.5)
    assert torch.equal(x[:, 0, 0, 0].sort().values, vals)


def test_stream_drop_last():
    s = BatchStream(_indexed(10), 3, seed=1)
    assert s.batches_per_epoch == 3
    epoch = [_ids(s.next()[0]) for _ in range(3)]
    ids = torch.cat(epoch)
    assert len(set(ids.tolist())) == 9 and s.epoch == 0
    s.next()
    assert s.epoch == 1 and s.pos == 3


def test_stream_hflip():
    n = 64
    imgs = np.zeros((n, 4, 4, 3), np.uint8)
    imgs[:, :, 0, :] = 255  # left column bright
    s = BatchStream(LabeledImages(imgs, np.zeros(n, np.int64), 1), 32, seed=0, hflip=True)
    flipped = 0
    for _ in range(20):
        x, _ = s.next()
        left, right = x[:, :, :, 0] == 1, x[:, :, :, -1] == 1
        assert torch.all(left.all(dim=(1, 2)) ^ right.all(dim=(1, 2)))  # each image: one or the other
        flipped += int(right.all(dim=(1, 2)).sum())
    assert abs(flipped - 320) < 4 * math.sqrt(640 * 0.25)
    x, _ = BatchStream(LabeledImages(imgs, np.zeros(n, np.int64), 1), 32).next()
    assert torch.all(x[:, :, :, 0] == 1)  # no flips without hflip


@pytest.mark.parametrize("hflip", [False, True])
def test_stream_resume_is_exact(hflip):
    ds = _indexed(22, size=5, channels=3)
    ds.images[:, :, 0] = 255
    a = BatchStream(ds, 4, seed=7, hflip=hflip)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    state = pickle.loads(pickle.dumps(state))  # survives serialisation (torch.save does the same)
    want = [a.next() for _ in range(5)]  # crosses an epoch boundary (5 batches per epoch)
    b = BatchStream(ds, 4, seed=123, hflip=hflip)
    b.next()
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(want, [b.next() for _ in range(5)]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.epoch == a.epoch == 1
    # a fresh stream with the same seed reproduces the whole sequence
    c = BatchStream(ds, 4, seed=7, hflip=hflip)
    for _ in range(3):
        c.next()
    assert all(torch.equal(c.next()[0], xa) for xa, _ in want)


def _host_and_device_streams(device, hflip, **kw):
    ds = _indexed(22, size=5, channels=3)
    ds.images[:, :, 0] = 255  # asymmetric, so a flip shows
    return (BatchStream(ds, 4, seed=7, hflip=hflip, device=device, storage="device", **kw),
            BatchStream(ds, 4, seed=7, hflip=hflip, device=device, storage="host", **kw))


def _assert_same_batches(a, b, n):
    for _ in range(n):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert xb.device == xa.device and xb.is_contiguous()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("hflip", [False, True])
def test_host_storage_yields_the_device_storage_batches(hflip):
    on_device, on_host = _host_and_device_streams("cpu", hflip)
    _assert_same_batches(on_device, on_host, 13)  # across two epoch boundaries (5 batches per epoch)
    assert on_host.images.shape == (22, 5, 5, 3)  # kept as loaded, N x H x W x C
    # one state serves both storages: resume a host-storage stream from a device-storage state
    state = on_device.state_dict()
    on_host.next()
    on_host.load_state_dict(state)
    _assert_same_batches(on_device, on_host, 6)


def test_host_storage_slices_the_global_batch_per_rank():
    ds = _indexed(24)
    one = BatchStream(ds, 8, seed=4, hflip=True)
    ranks = [BatchStream(ds, 8, seed=4, hflip=True, rank=r, world_size=2, storage="host") for r in range(2)]
    for _ in range(5):
        x, y = one.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.gpu
@pytest.mark.parametrize("hflip", [False, True])
def test_host_storage_on_cuda_copies_pinned_batches_that_equal_device_storage(hflip):
    on_device, on_host = _host_and_device_streams("cuda", hflip)
    assert on_host.images.device.type == "cpu" and on_device.images.device.type == "cuda"
    _assert_same_batches(on_device, on_host, 13)


def test_stream_errors():
    ds = _indexed(5)
    with pytest.raises(ValueError, match="batch_size 6 is larger than the data set \\(5 images\\)"):
        BatchStream(ds, 6)
    with pytest.raises(ValueError, match="storage must be one of \\('device', 'host'\\), got 'disk'"):
        BatchStream(ds, 2, storage="disk")
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(ds, 0)
    state = BatchStream(ds, 2).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(ds, 3).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_stream_on_cuda():
    s = BatchStream(_indexed(12), 4, hflip=True, device="cuda")
    x, y = s.next()
    assert x.is_cuda and y.is_cuda and x.shape == (4, 1, 4, 4)
    state = s.state_dict()
    want = [s.next() for _ in range(4)]
    t = BatchStream(_indexed(12), 4, hflip=True, device="cuda")
    t.load_state_dict(state)
    assert all(torch.equal(a[0], t.next()[0]) for a in want)


# --------------------------------------------------------------------------------------------- registry

def test_registry_names_and_errors(cifar10_dir):
    assert DATASETS == ("digits", "cifar10", "cifar100", "cifar10lt", "cifar100lt", "folder", "folderlt")
    with pytest.raises(ValueError) as ei:
        load_dataset("imagenet")
    assert all(n in str(ei.value) for n in DATASETS)
    for name in ("cifar10", "cifar100lt", "folder"):
        with pytest.raises(ValueError, match="--data-root"):
            load_dataset(name)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="imb_factor"):
            load_dataset("digits", imb_factor=bad)
        with pytest.raises(ValueError, match="imb_factor"):
            load_dataset("cifar10lt", root=cifar10_dir / "dl", imb_factor=bad)
    with pytest.raises(ValueError, match="cifar10lt"):
        load_dataset("cifar10", root=cifar10_dir / "dl", imb_factor=0.1)


def test_digits_refuses_a_data_root_it_would_ignore(tmp_path):
    with pytest.raises(ValueError, match="--data-root .* given for the built-in digits data set"):
        load_dataset("digits", root=tmp_path)


def test_registry_loads(cifar10_dir):
    assert load_dataset("digits").counts().tolist() == load_digits_lt().counts().tolist()
    assert len(load_dataset("digits", train=False)) == len(load_digits_lt(split="test"))
    c10 = load_dataset("cifar10", root=cifar10_dir / "dl")
    assert c10.counts().tolist() == [5] * 10
    lt = load_dataset("cifar10lt", root=cifar10_dir / "dl", imb_factor=0.2)  # n_max = 5
    assert lt.counts().tolist() == img_num_per_cls(5.0, 10, "exp", 0.2)
    with pytest.raises(DatasetError, match="keeps no image of 6 of 10 classes"):  # 0.01 empties the tail
        load_dataset("cifar10lt", root=cifar10_dir / "dl")
    assert load_dataset("cifar10lt", root=cifar10_dir / "dl", train=False).counts().tolist() == [1] * 10
    small = load_dataset("cifar10", root=cifar10_dir / "ex", image_size=16)
    assert small.images.shape == (50, 16, 16, 3)
