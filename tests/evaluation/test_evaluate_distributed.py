"""python -m cbdm_fast.evaluate under torchrun (2 CPU ranks, gloo) against one process.

Each rank extracts the digits-recogniser features of its contiguous slice of the generated (and, on a
cache miss, the real) images; rank 0 gathers them in rank order and scores. Features are computed
per image, so the two runs agree to float rounding: the JSON results are compared with a relative
tolerance of 1e-6 (absolute 1e-9 near zero) on every number (measured: identical), everything else
exactly. 199 generated images (slices of 99 and 100) against the 355 held-out test digits.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cbdm_fast import evaluate as ev
from cbdm_fast.data import load_digits_lt
from cbdm_fast.evaluation.digits_classifier import digits_classifier
from cbdm_fast.evaluation.sharding import Shards, concat_parts, describe_errors

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CBDM_FAST_NO_EXT": "1"}
FAST = ["--prd-runs", "2", "--kid-subsets", "20", "--device", "cpu", "--threads", "1"]
RTOL, ATOL = 1e-6, 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")


def evaluate_here(*args) -> int:
    return ev.main([str(a) for a in args])


def torchrun(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "cbdm_fast.evaluate", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_same_results(a, b, path="result"):
    """Equal JSON trees, numbers within RTOL/ATOL ('seconds' is the run time, 'samples' a path)."""
    if isinstance(a, dict):
        keys = set(a) - {"seconds", "samples"}
        assert keys == set(b) - {"seconds", "samples"}, path
        for k in keys:
            assert_same_results(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_results(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.fixture(scope="module")
def recogniser_dir(tmp_path_factory):
    """The digits recogniser, trained once; each run gets a copy of this cache folder."""
    folder = tmp_path_factory.mktemp("recogniser")
    digits_classifier(cache_dir=folder, log=lambda msg: None)
    return folder


def fresh_cache(recogniser_dir, folder: Path) -> Path:
    shutil.copytree(recogniser_dir, folder)
    return folder


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """199 real training digits (about 20 per class) as labelled "samples"."""
    data = load_digits_lt(split="train_full")
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:20] for c in range(10)])[:199]
    path = tmp_path_factory.mktemp("samples") / "digits.npz"
    np.savez(path, images=data.images[idx], labels=data.labels[idx])
    return path


@pytest.fixture(scope="module")
def runs(recogniser_dir, samples, tmp_path_factory):
    """The same evaluation in one process and over 2 ranks, each with its own fresh cache folder."""
    root = tmp_path_factory.mktemp("runs")
    one_cache, two_cache = (fresh_cache(recogniser_dir, root / name) for name in ("cache1", "cache2"))
    assert evaluate_here("--samples", samples, "--cache-dir", one_cache, "--json", root / "one.json", "--quiet",
                         *FAST) == 0
    two = torchrun("--samples", samples, "--cache-dir", two_cache, "--json", root / "two.json", *FAST)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    return root, one_cache, two_cache, two


def feature_files(folder: Path) -> list:
    return sorted(folder.glob("features_*.npz"))


def test_two_ranks_give_the_metrics_of_one_process(runs):
    root, one_cache, two_cache, two = runs
    one, res = json.loads((root / "one.json").read_text()), json.loads((root / "two.json").read_text())
    assert_same_results(one, res)
    assert res["num_samples"] == 199 and res["metrics"]["overall"]["fid"] is not None
    # rank 0 alone reports: one table, one progress log (the other rank prints nothing)
    assert two.stdout.count(f"wrote {root / 'two.json'}") == 1 and two.stdout.count("per class") == 1
    assert two.stderr.count("feature extraction sharded over 2 ranks") == 1
    assert two.stderr.count("features of 199 generated images") == 1
    # the real features were extracted in slices, gathered, and cached by rank 0: one complete file
    (cached,), (reference,) = feature_files(two_cache), feature_files(one_cache)
    assert cached.name == reference.name
    assert sorted(p.name for p in two_cache.iterdir()) == sorted(p.name for p in one_cache.iterdir())
    with np.load(cached) as got, np.load(reference) as want:
        assert got["features"].shape == (355, 64)
        np.testing.assert_allclose(got["features"], want["features"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got["probs"], want["probs"], rtol=RTOL, atol=ATOL)


def test_two_ranks_read_the_cached_reference_features(runs, samples):
    root, _, two_cache, _ = runs
    (cached,) = feature_files(two_cache)
    written = cached.stat().st_mtime_ns
    again = torchrun("--samples", samples, "--cache-dir", two_cache, "--json", root / "again.json", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("features of 355 real reference images: read from the cache") == 1
    assert feature_files(two_cache) == [cached] and cached.stat().st_mtime_ns == written
    assert_same_results(json.loads((root / "again.json").read_text()), json.loads((root / "two.json").read_text()))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from cbdm_fast.training import Trainer
    from train_helpers import tiny_config

    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("ckpt"), diffusion__T=20), log=lambda s: None)
    return trainer.save_checkpoint()


def test_ckpt_under_torchrun_samples_then_evaluates(recogniser_dir, tiny_ckpt, tmp_path):
    cache = fresh_cache(recogniser_dir, tmp_path / "cache")
    out = tmp_path / "s.npz"
    res = torchrun("--ckpt", tiny_ckpt, "--per-class", 2, "--omega", 1, "--samples-out", out,
                   "--cache-dir", cache, "--quiet", *FAST)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(f"wrote {tmp_path / 's.eval.json'}") == 1
    with np.load(out) as f:
        assert f["images"].shape == (20, 16, 16, 1) and float(f["omega"]) == 1.0
    # the file the sampler wrote, evaluated in one process, scores the same
    assert evaluate_here("--samples", out, "--cache-dir", cache, "--json", tmp_path / "one.json", "--quiet",
                         *FAST) == 0
    assert_same_results(json.loads((tmp_path / "one.json").read_text()),
                        json.loads((tmp_path / "s.eval.json").read_text()))


def test_errors_stop_every_rank_with_status_2_and_one_message(recogniser_dir, tiny_ckpt, tmp_path):
    cache = fresh_cache(recogniser_dir, tmp_path / "cache")
    res = torchrun("--samples", tmp_path / "nope.npz", "--cache-dir", cache, *FAST, timeout=90)
    assert res.returncode != 0
    assert res.stderr.count("error: samples file not found") == 1
    assert re.search(r"Root Cause.*?exitcode\s*:\s*2", res.stderr, re.S), res.stderr[-2000:]
    assert f'File "{REPO / "cbdm_fast"}' not in res.stderr  # our message, not a traceback
    res = torchrun("--ckpt", tiny_ckpt, "--per-class", 1, "--steps", 5, "--samples-out", tmp_path / "s.npz",
                   "--cache-dir", cache, "--quiet", *FAST, timeout=90)
    assert res.returncode != 0
    assert res.stderr.count("--sampler ddpm always runs all T = 20 steps") == 1
    assert res.stderr.count(f"error: sampling from --ckpt {tiny_ckpt} failed") == 1
    assert re.search(r"Root Cause.*?exitcode\s*:\s*2", res.stderr, re.S), res.stderr[-2000:]
    assert not (tmp_path / "s.npz").exists() and not list(tmp_path.glob("*.json"))


# ------------------------------------------------------------------------------ in-process units
@pytest.mark.parametrize("n", [0, 1, 2, 7, 199])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_slices_are_contiguous_and_cover_every_image(n, world):
    slices = [Shards(rank, world).part(n) for rank in range(world)]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1


def test_gathered_parts_concatenate_in_rank_order_and_errors_are_named():
    parts = [{"fake": None}, {"fake": (np.ones((2, 3)), np.zeros((2, 4)))},
             {"fake": (2 * np.ones((1, 3)), np.ones((1, 4)))}]
    feats, probs = concat_parts(parts, "fake")  # rank 0 had an empty slice
    assert feats[:, 0].tolist() == [1, 1, 2] and probs.shape == (3, 4)
    assert describe_errors(["bad file", "bad file"]) == "bad file"
    assert describe_errors([None, "disk full"]) == "rank 1: disk full"
    assert describe_errors(["a", "b"]) == "rank 0: a; rank 1: b"
    one = Shards()
    assert one.gather(5) == [5] and one.broadcast(5) == 5 and one.agree_on_code(2) == 2

    def fails():
        raise OSError("unchanged")

    with pytest.raises(OSError, match="unchanged"):  # one process: the error itself, not a ShardError
        one.checked(fails)
