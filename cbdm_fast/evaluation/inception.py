"""The FID Inception-v3: the network of the TensorFlow FID code (the 2015-12-05 Inception graph), as
ported to PyTorch by pytorch-fid, written here without torchvision.

It is Inception-v3 with the TF graph's differences: average pools that exclude the padding
(count_include_pad=False) in the A, C and first E blocks, a max pool in the last E block's pool
branch, 1008 output classes, no auxiliary classifier, BatchNorm eps 1e-3, no input transform.
Module names equal torchvision's Inception3, so the published weights file
    pt_inception-2015-12-05-6726825d.pth
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)
loads strictly. Nothing is downloaded: the file comes from the user (--inception-weights PATH, or
the environment variable CBDM_FAST_INCEPTION, a file or the folder holding it).

Input: float images in [0, 1], (N, 3, H, W); resized to 299x299 (bilinear, align_corners=False)
and scaled to [-1, 1] as pytorch-fid does. Output: 2048-d pool features and 1008 logits (the
Inception Score uses their softmax; computed without the fc bias, see FIDInceptionV3).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIDInceptionV3", "load_fid_inception", "resolve_inception_weights", "load_inception_state",
           "InceptionWeightsError", "WEIGHTS_NAME", "WEIGHTS_URL", "ENV_WEIGHTS"]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"
ENV_WEIGHTS = "CBDM_FAST_INCEPTION"
FEATURE_DIM = 2048
NUM_LOGITS = 1008


class InceptionWeightsError(ValueError):
    """The FID Inception weights are missing, unreadable or not the expected layout."""


class BasicConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_ch: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_ch: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """pool='avg': the TF graph's Mixed_7b (FIDInceptionE_1); pool='max': Mixed_7c (FIDInceptionE_2)."""

    def __init__(self, in_ch: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """forward(x in [0, 1], (N, 3, H, W)) -> (pool features (N, 2048), logits (N, 1008)).

    The logits are pool @ fc.weight^T WITHOUT fc's bias: the Inception Score's standard definition (the
    original improved-gan code's `tf.matmul(pool3, w)`, torch-fidelity's default `logits_unbiased`, the
    CBDM authors' score/inception.py with `fc.bias = None`). With the bias, scores come out ~2% higher
    and cannot be compared with published ones. The bias stays in the state dict (the weights file has it)."""

    def __init__(self, resize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must have shape (N, 3, H, W), got {tuple(x.shape)}")
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, F.linear(pool, self.fc.weight)  # no bias: see the class docstring


def resolve_inception_weights(path=None) -> Path:
    """The weights file: ``path``, else $CBDM_FAST_INCEPTION (either may name the file's folder)."""
    given = path if path is not None else os.environ.get(ENV_WEIGHTS)
    if not given:
        raise InceptionWeightsError(
            f"Inception features need the FID Inception weights file {WEIGHTS_NAME}: pass --inception-weights "
            f"PATH or set {ENV_WEIGHTS}. It is published with pytorch-fid's GitHub releases: {WEIGHTS_URL} "
            f"(nothing is downloaded automatically)")
    p = Path(given).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise InceptionWeightsError(
            f"FID Inception weights not found at {p}: expected the file {WEIGHTS_NAME}, published with "
            f"pytorch-fid's GitHub releases: {WEIGHTS_URL}")
    return p


def load_inception_state(model: FIDInceptionV3, state: dict, where: str = "state dict") -> FIDInceptionV3:
    """Load a state dict strictly (BatchNorm's num_batches_tracked may be absent); errors name the keys."""
    if not isinstance(state, dict):
        raise InceptionWeightsError(f"{where}: expected a state dict, got {type(state).__name__}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise InceptionWeightsError(f"{where} is not the FID Inception-v3 layout of {WEIGHTS_NAME}: "
                                    + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def load_fid_inception(path=None, device="cpu", check_hash: bool = True) -> FIDInceptionV3:
    """The FID Inception-v3 with the weights from ``path`` / $CBDM_FAST_INCEPTION, in eval mode."""
    p = resolve_inception_weights(path)
    if check_hash:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if not h.hexdigest().startswith(WEIGHTS_SHA256_PREFIX):
            warnings.warn(f"{p}: SHA-256 {h.hexdigest()[:8]}... differs from the published {WEIGHTS_NAME} "
                          f"({WEIGHTS_SHA256_PREFIX}...): FID values will not be comparable to published ones",
                          stacklevel=2)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, which would execute pickled code from an
        # untrusted file and cannot repair a file that is not a checkpoint: say what the file is instead
        raise InceptionWeightsError(
            f"cannot read the Inception weights {p}: it is not a PyTorch weights file (torch.load raised "
            f"{type(exc).__name__}); expected {WEIGHTS_NAME}, the FID Inception-v3 of pytorch-fid") from None
    model = load_inception_state(FIDInceptionV3(), state, str(p))
    return model.to(device).eval()
