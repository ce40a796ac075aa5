"""One entry point from a data set name (the CLIs' --dataset) to a LabeledImages."""

from __future__ import annotations

from .cifar import LAYOUTS, load_cifar
from .digits import load_digits_lt
from .folder import load_image_folder
from .images import LabeledImages
from .longtail import check_imb, make_longtail
from .resize import resize_dataset

DATASETS = ("digits", "cifar10", "cifar100", "cifar10lt", "cifar100lt", "folder", "folderlt")
LONGTAILED = ("digits", "cifar10lt", "cifar100lt", "folderlt")
DEFAULT_IMB_FACTOR = {"digits": 0.1, "cifar10lt": 0.01, "cifar100lt": 0.01, "folderlt": 0.01}


def load_dataset(name: str, root=None, imb_factor: float | None = None, imb_type: str = "exp",
                 image_size: int | None = None, train: bool = True, channels: int = 3) -> LabeledImages:
    """Load a data set by name.

    digits: built-in, long-tailed (imb_factor default 0.1), 16x16 grey; train=False is its balanced test split.
    cifar10 / cifar100: balanced. cifar10lt / cifar100lt: long-tailed training set (imb_factor default
    0.01, the paper's), train=False gives the balanced test set. folder / folderlt: root/<class>/<images>;
    folderlt is long-tailed when train=True and the whole (balanced) folder when train=False.
    root is the --data-root path (required for cifar and folder); image_size resizes (bicubic).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    if name not in LONGTAILED and imb_factor is not None:
        raise ValueError(f"imb_factor={imb_factor!r} given for the balanced data set {name!r}; "
                         f"use {name}lt for a long-tailed split")
    factor = check_imb(imb_type, DEFAULT_IMB_FACTOR[name] if imb_factor is None else imb_factor) \
        if name in LONGTAILED else None

    if name == "digits":
        if root is not None:  # silently ignoring it would train on other data than the user pointed at
            raise ValueError(f"--data-root {root} given for the built-in digits data set, which reads no files; "
                             f"use --dataset folder/folderlt for an image folder, cifar10(lt)/cifar100(lt) for CIFAR")
        return load_digits_lt(factor, imb_type, 16 if image_size is None else image_size,
                              "train" if train else "test")
    if root is None:
        where = (f"{LAYOUTS[name.removesuffix('lt')].archive} or its extracted folder" if name.startswith("cifar")
                 else "a folder root/<class_name>/<images>")
        raise ValueError(f"data set {name!r} needs --data-root (the path of {where})")
    if name.startswith("cifar"):
        data = load_cifar(root, name.removesuffix("lt"), train=train)
    else:
        data = load_image_folder(root, image_size=image_size, channels=channels)
    if name in LONGTAILED and train:
        data = make_longtail(data, imb_type, factor, seed=0)
    return resize_dataset(data, image_size)  # after the selection: fewer images to resize
