"""Data layer: CIFAR and image-folder loaders, the built-in digits set, long-tailed splits, batch streams."""

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
