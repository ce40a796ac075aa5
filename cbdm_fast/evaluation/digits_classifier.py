"""A small CNN classifier: the feature space and the recogniser of digits evaluation, and the
classifier of the downstream test (train on generated images, test on real ones).

    SmallCNN(in_ch=1, num_classes=10, size=16, width=16, feature_dim=64)
        conv3x3(w) ReLU maxpool2 -> conv3x3(2w) ReLU maxpool2 -> adaptive avg pool 4x4 -> flatten
        -> Linear(32w, feature_dim) ReLU  [= features(x), the penultimate layer]  -> Linear(., num_classes)
    prepare_images(images_uint8_NHWC, size) -> float (N, C, size, size) in [-1, 1]
        resized with Pillow's bicubic filter in float when the size differs (the way the digits set
        itself is upscaled from 8x8 in cbdm_fast.data.digits), so real and generated images of any
        size reach the network through the same path.
    train_classifier(images, labels, num_classes, seed=0, steps=..., ...) -> SmallCNN (eval mode)
        deterministic for a given seed (own torch.Generator; the global RNG is left untouched),
        random +-1 pixel shifts as augmentation; seconds on a CPU.
    digits_classifier(cache_dir=None, seed=0) -> SmallCNN
        trained on the digits TRAIN split (the balanced training part, 'train_full', 16x16; never the
        held-out test split that evaluation uses as reference), cached as a .pt file keyed by the
        training data and hyper-parameters: trained once per machine, then loaded. Its features are
        scaled to mean square 1 per dimension on the real training digits (feature_scale).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..files.atomic import atomic_write

__all__ = ["SmallCNN", "prepare_images", "train_classifier", "digits_classifier", "default_cache_dir",
           "DIGITS_INPUT_SIZE", "classifier_predict"]

VERSION = 2                 # bump when the architecture or the recipe changes (invalidates caches)
DIGITS_INPUT_SIZE = 16      # the digits set's native training resolution
DIGITS_TRAIN_STEPS = 600    # ~27 epochs of the 1437 training digits at batch 64: ~2 s on one core
ENV_CACHE = "CBDM_FAST_CACHE"


def default_cache_dir() -> Path:
    """$CBDM_FAST_CACHE, else $XDG_CACHE_HOME/cbdm_fast, else ~/.cache/cbdm_fast."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cbdm_fast"


class SmallCNN(nn.Module):
    """Two conv blocks and a 2-layer head; ``features`` is the penultimate (post-ReLU) layer."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, size: int = DIGITS_INPUT_SIZE, width: int = 16,
                 feature_dim: int = 64):
        super().__init__()
        self.config = dict(in_ch=int(in_ch), num_classes=int(num_classes), size=int(size), width=int(width),
                           feature_dim=int(feature_dim))
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        # multiplies the features handed to the metrics (forward_both): set so that the real training
        # images' features have mean square 1 per dimension, which puts FID / KID on a fixed, readable
        # scale (the classifier itself, forward, is unaffected)
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return F.relu(self.fc1(x))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features times feature_scale, logits)."""
        h = self.features(x)
        return h * self.feature_scale, self.fc2(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"images must be uint8 of shape (N, H, W, C) with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    return images


def resize_float(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, size, size, C) float32 in 0..255, Pillow bicubic per channel in float
    (no rounding to uint8 in between); unchanged (as float) when already size x size."""
    from PIL import Image

    from ..data.resize import RESAMPLE

    x = images.astype(np.float32)
    if images.shape[1:3] == (size, size):
        return x
    out = np.empty((x.shape[0], size, size, x.shape[3]), dtype=np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            out[i, :, :, c] = np.asarray(Image.fromarray(x[i, :, :, c], mode="F").resize((size, size), RESAMPLE))
    return out


def prepare_images(images, size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, size, size) in [-1, 1] (resized as in resize_float)."""
    x = resize_float(_check_images(images), size)
    x = np.clip(x, 0.0, 255.0) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random (dy, dx) in [-shift, shift]^2, filling with -1 (background)."""
    if shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    codes = offsets[:, 0] * (2 * shift + 1) + offsets[:, 1]
    for code in torch.unique(codes).tolist():
        dy, dx = divmod(code, 2 * shift + 1)
        sel = (codes == code).nonzero().squeeze(1)
        out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def train_classifier(images, labels, num_classes: int, *, size: int | None = None, seed: int = 0,
                     steps: int = DIGITS_TRAIN_STEPS, batch_size: int = 64, lr: float = 2e-3,
                     weight_decay: float = 1e-4, shift: int = 1, width: int = 16, feature_dim: int = 64,
                     device="cpu") -> SmallCNN:
    """Train a SmallCNN on uint8 (N, H, W, C) images with integer labels; returns it in eval mode.

    Adam with a cosine learning-rate decay over ``steps`` steps of ``batch_size`` (epochs of a seeded
    permutation), +-``shift`` pixel random shifts. Deterministic for a given seed and thread count.
    """
    images = _check_images(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.dim() != 1 or y.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be a vector with one entry per image ({images.shape[0]}), "
                         f"got shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("no training images")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    size = int(size or images.shape[1])
    device = torch.device(device)
    x = prepare_images(images, size)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = SmallCNN(x.shape[1], num_classes, size, width, feature_dim)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    n, step = x.shape[0], 0
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if step >= steps:
                break
            idx = perm[start:start + batch_size]
            xb = _random_shift(x[idx], shift, gen).to(device)
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return model.eval()


@torch.no_grad()
def classifier_predict(model: SmallCNN, images, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D), softmax probabilities float64 (N, num_classes)) of uint8 NHWC images."""
    device = next(model.parameters()).device
    x = prepare_images(images, model.config["size"])
    feats, probs = [], []
    for start in range(0, x.shape[0], batch_size):
        h, logits = model.forward_both(x[start:start + batch_size].to(device))
        feats.append(h.float().cpu())
        probs.append(torch.softmax(logits.double(), dim=1).cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()


def digits_classifier(cache_dir=None, seed: int = 0, steps: int = DIGITS_TRAIN_STEPS, use_cache: bool = True,
                      log=None) -> SmallCNN:
    """The digits recogniser (CPU, eval mode): loaded from the cache, else trained and cached.

    Trained on the digits TRAIN split at 16x16 ('train_full': the balanced training part; the held-out
    test split is never seen). The cache file name carries a digest of the training images, labels,
    recipe and VERSION, so a changed recipe or data set never loads stale weights. An unreadable cache
    file is retrained over; an unwritable cache folder only costs a warning.
    """
    from ..data import load_digits_lt

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    data = load_digits_lt(split="train_full", image_size=DIGITS_INPUT_SIZE)
    recipe = dict(version=VERSION, seed=int(seed), steps=int(steps), size=DIGITS_INPUT_SIZE,
                  torch=str(torch.__version__))
    key = _digest(data.images.tobytes(), data.labels.tobytes(), sorted(recipe.items()))[:16]
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"digits_cnn_v{VERSION}_{key}.pt"
    if use_cache and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = SmallCNN(**blob["config"])
            model.load_state_dict(blob["state_dict"])
            return model.eval()
        except Exception as exc:  # a torn or foreign file: retrain over it
            warnings.warn(f"ignoring unreadable classifier cache {path}: {exc}", stacklevel=2)
    log(f"training the digits recogniser on {len(data)} real training digits (seed {seed}, {steps} steps)...")
    model = train_classifier(data.images, data.labels, data.num_classes, size=DIGITS_INPUT_SIZE, seed=seed,
                             steps=steps)
    with torch.no_grad():
        h = model.features(prepare_images(data.images, DIGITS_INPUT_SIZE)).double()
        model.feature_scale.fill_(float(h.square().mean().rsqrt()))
    if use_cache:
        blob = {"config": model.config, "state_dict": model.state_dict(), "recipe": recipe}
        buf = io.BytesIO()
        torch.save(blob, buf)
        try:
            atomic_write(path, lambda f: f.write(buf.getvalue()), durable=False)
            log(f"cached the digits recogniser at {path}")
        except OSError as exc:
            warnings.warn(f"could not cache the digits recogniser in {path.parent}: {exc}", stacklevel=2)
    return model
