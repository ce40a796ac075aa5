"""python -m cbdm_fast.sample under torchrun: 2 CPU ranks (gloo) each sample their share of the shards,
rank 0 merges them, and the .npz equals the single-process run's exactly; a partial shard folder
resumes on any number of ranks; a mismatched one stops every rank with exit status 2, without hanging.

A tiny authors'-format model (ch 32, T = 20, 8x8 images, 10 classes), DDIM with 5 steps, 10 images in
shards of 2 (5 shards: an odd count, so the ranks get 3 and 2). The single-process reference runs
in-process (main(argv)); the ranks are subprocesses with a timeout.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cbdm_fast import sample as sample_cli
from cbdm_fast.sampling.shards import rank_shards, shards_folder
from sample_helpers import shard_writes
from test_sample import load_npz, run_ok, write_authors

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FLAGS = ["--per-class", 1, "--omega", 1.0, "--seed", 2, "--shard-size", 2, "--batch-size", 2,
         "--sampler", "ddim", "--steps", 5, "--device", "cpu", "--threads", 1, "--no-progress"]
SHARDS = 5  # 10 images in shards of 2
TIMEOUT = 90  # seconds: a hang fails the test instead of stalling the suite
MISMATCH = "--omega: the interrupted run used 1.0, this one 2.0"


def torchrun(nproc, *args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "cbdm_fast.sample", *[str(a) for a in args]],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, env=ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(nproc, *args):
    """The ranks started as torchrun would start them (RANK, WORLD_SIZE, ...), but without its agent,
    which stops the other ranks as soon as one fails: so every rank's own exit status is seen.
    Returns [(returncode, stdout, stderr)] in rank order."""
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc)}
    procs = [subprocess.Popen([sys.executable, "-m", "cbdm_fast.sample", *[str(a) for a in args]], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r in range(nproc)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def assert_same_samples(path, expected):
    got = load_npz(path)
    assert np.array_equal(got["images"], expected["images"]) and got["images"].std() > 0
    assert np.array_equal(got["labels"], expected["labels"])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_authors(tmp_path_factory.mktemp("dist_sample"))


@pytest.fixture(scope="module")
def single(ckpt, tmp_path_factory):
    """The single-process run (in-process) that every multi-rank run must reproduce: (.npz path, arrays)."""
    out = tmp_path_factory.mktemp("single") / "one.npz"
    run_ok("--ckpt", ckpt, *FLAGS, "--out", out)
    return out, load_npz(out)


def test_shards_are_dealt_round_robin_over_the_pending_list():
    pending = [0, 2, 3, 5, 6]
    parts = [rank_shards(pending, r, 2) for r in range(2)]
    assert parts == [[0, 3, 6], [2, 5]]
    assert rank_shards(pending, 0, 1) == pending


def test_two_ranks_write_exactly_the_single_process_samples(ckpt, single, tmp_path):
    one_path, one = single
    out = tmp_path / "two.npz"
    res = torchrun(2, "--ckpt", ckpt, *FLAGS, "--out", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = load_npz(out)
    assert two.keys() == one.keys()
    for name in one:  # images and labels, and the recorded settings: every array equal
        if name != "ckpt":
            assert np.array_equal(two[name], one[name]), name
    assert str(two["ckpt"]) == str(ckpt)
    assert out.with_suffix(".png").read_bytes() == one_path.with_suffix(".png").read_bytes()
    assert not shards_folder(out).exists()  # removed by rank 0 after the merge
    # rank 0 alone reports; rank 1 prints nothing
    assert res.stdout.count("model: UNet") == 1 and res.stdout.count(f"wrote 10 images to {out}") == 1
    assert f"data parallel: {SHARDS} shards to sample over 2 ranks" in res.stdout
    assert "error" not in res.stderr and "[rank 1]" not in res.stdout + res.stderr


def test_a_partial_shard_folder_resumes_on_two_ranks_and_on_one(ckpt, single, tmp_path, capsys):
    _, one = single
    out = tmp_path / "resumed.npz"
    folder = shards_folder(out)
    # a run killed after its first 2 shards (one process, interrupted as in test_sample_shards.py)
    with shard_writes(interrupt_after=2):
        assert sample_cli.main([str(a) for a in ["--ckpt", ckpt, *FLAGS, "--out", out]]) == 130
    assert "2 of 5 shards" in capsys.readouterr().err
    assert sorted(p.name for p in folder.glob("shard_*")) == ["shard_00000.npz", "shard_00001.npz"]

    # resumed on 2 ranks: the 3 pending shards are shared out (2 and 1), the images are the same
    res = torchrun(2, "--ckpt", ckpt, *FLAGS, "--out", out, "--keep-shards")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming: 2 of {SHARDS} shards already in {folder}" in res.stdout
    assert "data parallel: 3 shards to sample over 2 ranks" in res.stdout
    assert_same_samples(out, one)

    # a 2-rank run's folder with holes, resumed in one process: the same images again
    for i in (0, 3):
        (folder / f"shard_0000{i}.npz").unlink()
    out.unlink()
    run_ok("--ckpt", ckpt, *FLAGS, "--out", out)
    assert f"resuming: 3 of {SHARDS} shards" in capsys.readouterr().out
    assert_same_samples(out, one)
    assert not folder.exists()


def test_a_mismatched_shard_folder_stops_every_rank_with_status_2(ckpt, tmp_path):
    out = tmp_path / "m.npz"
    run_ok("--ckpt", ckpt, *FLAGS, "--out", out, "--keep-shards")
    other = [*FLAGS[:2], "--omega", 2.0, *FLAGS[4:]]

    # under torchrun: one clear message (rank 0 found the mismatch and told rank 1), no hang
    res = torchrun(2, "--ckpt", ckpt, *other, "--out", out)
    assert res.returncode != 0  # torchrun's own status (1) once a rank exits with 2
    assert res.stderr.count(MISMATCH) == 1, res.stderr[-3000:]
    assert f'File "{REPO / "cbdm_fast"}' not in res.stderr  # our message, not a traceback of ours

    # every rank's own exit status: 2 on both; rank 1 says nothing (rank 0 speaks for the run)
    (rc0, out0, err0), (rc1, out1, err1) = spawn_ranks(2, "--ckpt", ckpt, *other, "--out", out)
    assert (rc0, rc1) == (2, 2), err0[-2000:] + err1[-2000:]
    assert err0.startswith("error: ") and MISMATCH in err0 and "Traceback" not in err0
    assert out1 == err1 == ""
    assert sorted(p.name for p in shards_folder(out).glob("shard_*")) == [f"shard_0000{i}.npz" for i in range(5)]


def test_a_missing_checkpoint_stops_every_rank_with_one_message(tmp_path):
    results = spawn_ranks(2, "--ckpt", tmp_path / "nope.pt", *FLAGS, "--out", tmp_path / "x.npz")
    assert [rc for rc, _, _ in results] == [2, 2]
    (_, _, err0), (_, out1, err1) = results
    assert "error: checkpoint not found" in err0 and "nope.pt" in err0
    assert out1 == err1 == ""
    assert not (tmp_path / "x.shards").exists()
