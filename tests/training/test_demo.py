"""The README's demo: `python -m cbdm_fast.train` on the built-in long-tailed digits.

The fast test runs the CLI with a short schedule and checks every artefact a user is promised;
the slow one runs the real demo (about 6 minutes on 2 cores) and checks that the grid shows
digits a classifier trained on real digits recognises, row by row (`pytest -m slow`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def run_train(*args, timeout):
    return subprocess.run([sys.executable, "-m", "cbdm_fast.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def grid_tiles(png: Path, per_class: int, classes: int = 10, size: int = 16, pad: int = 2) -> np.ndarray:
    """Cut the training grid (upscaled 64 // size times, nearest) back into (classes, per_class, size, size)."""
    grid = np.array(Image.open(png))
    up = 64 // size
    assert grid.shape == (up * (classes * (size + pad) + pad), up * (per_class * (size + pad) + pad))
    grid = grid[::up, ::up]
    return np.stack([np.stack([grid[pad + r * (size + pad):pad + r * (size + pad) + size,
                                    pad + c * (size + pad):pad + c * (size + pad) + size]
                               for c in range(per_class)]) for r in range(classes)])


def test_short_demo_run_leaves_every_artefact(tmp_path):
    result = run_train("--steps", "20", "--T", "50", "--sample-per-class", "2", "--logdir", str(tmp_path),
                       "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "per-class counts (class 0 = head): 0:140, 1:108" in out and "9:14" in out
    assert (tmp_path / "ckpt_20.pt").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"]["dataset"] == "digits" and config["optim"]["steps"] == 20
    assert config["model"]["ch"] == 32 and config["method"]["method"] == "cbdm"
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert events, "no TensorBoard log"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"train/loss", "train/loss_ddpm", "train/loss_reg", "train/img_per_s"} <= set(acc.Tags()["scalars"])
    tiles = grid_tiles(tmp_path / "samples" / "0000020.png", per_class=2)
    assert tiles.shape == (10, 2, 16, 16)


@pytest.mark.slow
def test_full_demo_draws_recognisable_digits_of_every_class(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from cbdm_fast.data import load_digits_lt

    result = run_train("--logdir", str(tmp_path), "--no-progress", timeout=1800)
    assert result.returncode == 0, result.stderr
    real = load_digits_lt(split="train_full")
    clf = LogisticRegression(max_iter=2000).fit(real.images.reshape(len(real.labels), -1) / 255.0, real.labels)
    steps = json.loads((tmp_path / "config.json").read_text())["optim"]["steps"]
    tiles = grid_tiles(tmp_path / "samples" / f"{steps:07d}.png", per_class=6)
    pred = clf.predict(tiles.reshape(60, -1) / 255.0).reshape(10, 6)
    per_class = (pred == np.arange(10)[:, None]).mean(axis=1)
    assert per_class.mean() >= 0.8, per_class
    assert per_class.min() >= 0.5, per_class  # the tail classes too
