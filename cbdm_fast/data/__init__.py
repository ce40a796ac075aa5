"""Data layer: the data sets, long-tailed splits and the batches of a training run.

    images.py      LabeledImages (uint8 images and labels) and DatasetError
    cifar.py       CIFAR-10/100 from the python archives
    folder.py      image folders (one sub-folder per class)
    digits.py      the built-in long-tailed handwritten digits
    longtail.py    long-tailed class counts and the indices of a split
    resize.py      resizing with Pillow's bicubic filter
    registry.py    a data set by name (the CLIs' --dataset)
    stream.py      BatchStream: shuffled batches on the device or from pinned host memory, per rank
    ada.py         ADA augmentation as one batched warp on the device
"""

from .cifar import load_cifar
from .digits import digits_split_indices, load_digits_lt
from .folder import load_image_folder
from .images import DatasetError, LabeledImages
from .longtail import img_num_per_cls, longtail_indices, make_longtail
from .registry import DATASETS, load_dataset
from .resize import resize_dataset
from .stream import BatchStream

__all__ = [
    "BatchStream", "DATASETS", "DatasetError", "LabeledImages", "digits_split_indices", "img_num_per_cls",
    "load_cifar", "load_dataset", "load_digits_lt", "load_image_folder", "longtail_indices", "make_longtail",
    "resize_dataset",
]
