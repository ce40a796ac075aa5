"""Resumable sampling runs (cbdm_fast.sampling.shards, python -m cbdm_fast.sample): shards, manifest,
resume after an interruption with exactly the same images, and clear errors for other arguments.
A tiny authors'-format model (ch 32, T = 20, 8x8 images), run in-process."""
import json

import numpy as np
import pytest

from cbdm_fast import sample as sample_cli
from cbdm_fast.sampling.shards import ShardMismatch, ShardRun, plan, shards_folder
from sample_helpers import shard_writes
from test_sample import load_npz, run_error, run_ok, write_authors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_authors(tmp_path_factory.mktemp("shards"))


BASE = ["--per-class", 1, "--omega", 1.0, "--seed", 2, "--shard-size", 3]  # 10 images: 4 shards (3, 3, 3, 1)


def test_plan_and_folder(tmp_path):
    assert plan(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)] and plan(0, 4) == []
    assert shards_folder(tmp_path / "a" / "s.npz") == tmp_path / "a" / "s.shards"


def test_interrupted_run_resumes_to_the_same_images(ckpt, tmp_path, capsys):
    full = tmp_path / "full.npz"
    run_ok("--ckpt", ckpt, *BASE, "--batch-size", 4, "--out", full)
    expected = load_npz(full)
    assert not shards_folder(full).exists()  # removed after the merge

    # a run killed (Ctrl-C) after 2 of 4 shards, then resumed: only the missing shards are sampled
    out = tmp_path / "resumed.npz"
    with shard_writes(interrupt_after=2):
        assert sample_cli.main([str(a) for a in ["--ckpt", ckpt, *BASE, "--batch-size", 2, "--out", out,
                                                 "--no-progress"]]) == 130
    assert "2 of 4 shards" in capsys.readouterr().err and not out.exists()
    folder = shards_folder(out)
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "shard_00000.npz", "shard_00001.npz"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["n"] == 10 and manifest["shards"] == [[0, 3], [3, 6], [6, 9], [9, 10]]

    # resumed with another batch size: the images do not depend on it
    with shard_writes() as written:
        run_ok("--ckpt", ckpt, *BASE, "--batch-size", 3, "--out", out)
    assert written == [2, 3]
    assert "resuming: 2 of 4 shards" in capsys.readouterr().out
    got = load_npz(out)
    assert np.array_equal(got["images"], expected["images"]) and np.array_equal(got["labels"], expected["labels"])
    assert not folder.exists()


def test_resume_with_other_arguments_is_an_error_naming_the_flags(ckpt, tmp_path, capsys):
    out = tmp_path / "s.npz"
    run_ok("--ckpt", ckpt, *BASE, "--out", out, "--keep-shards")
    assert (shards_folder(out) / "shard_00003.npz").is_file()
    err = run_error(capsys, "--ckpt", ckpt, *BASE[:-2], "--shard-size", 3, "--omega", 2.0, "--seed", 5,
                    "--out", out)
    assert "--omega: the interrupted run used 1.0, this one 2.0" in err and "--seed" in err
    err = run_error(capsys, "--ckpt", ckpt, *BASE, "--sampler", "ddim", "--steps", 5, "--out", out)
    assert "--sampler" in err and "--steps" in err and "delete" in err
    # the same arguments: nothing left to sample, the merged file is written again
    run_ok("--ckpt", ckpt, *BASE, "--out", out)
    assert "nothing left to sample" in capsys.readouterr().out


def test_shard_run_checks_the_manifest_and_rejects_damaged_shards(tmp_path):
    key = {"--seed": 1}
    run = ShardRun(tmp_path / "r", key, 5, 2, (4, 4, 1))
    assert run.open() == [0, 1, 2]
    run.write(1, np.zeros((2, 4, 4, 1), np.uint8), np.array([3, 4]))
    (tmp_path / "r" / "shard_00002.npz").write_bytes(b"torn")
    assert ShardRun(tmp_path / "r", key, 5, 2, (4, 4, 1)).open() == [0, 2]
    with pytest.raises(ShardMismatch, match="--seed: the interrupted run used 1, this one 2"):
        ShardRun(tmp_path / "r", {"--seed": 2}, 5, 2, (4, 4, 1)).open()
    with pytest.raises(ShardMismatch, match="--shard-size"):
        ShardRun(tmp_path / "r", key, 5, 3, (4, 4, 1)).open()
    with pytest.raises(ValueError, match="shape"):
        run.write(0, np.zeros((3, 4, 4, 1), np.uint8), np.zeros(3))
    with pytest.raises(ValueError, match="missing or damaged"):
        run.merge()


@pytest.mark.gpu
def test_cuda_graph_run_resumes_to_the_same_images(ckpt, tmp_path):
    """The default fast backend on CUDA (bf16, CUDA graph replay, padded last batch), interrupted and resumed."""
    full, out = tmp_path / "full.npz", tmp_path / "resumed.npz"
    args = ["--ckpt", ckpt, *BASE, "--batch-size", 2, "--device", "cuda"]
    run_ok(*args, "--out", full)
    with shard_writes(interrupt_after=1):
        assert sample_cli.main([str(a) for a in args + ["--out", out, "--no-progress"]]) == 130
    run_ok(*args, "--out", out)
    a, b = load_npz(full), load_npz(out)
    assert np.array_equal(a["images"], b["images"]) and a["images"].std() > 0
    ref = tmp_path / "ref.npz"  # the fp32 reference sampler on the same noise: close (bf16 vs fp32)
    run_ok("--ckpt", ckpt, *BASE, "--backend", "reference", "--device", "cuda", "--out", ref)
    diff = np.abs(load_npz(ref)["images"].astype(int) - a["images"].astype(int))
    assert diff.mean() < 4
