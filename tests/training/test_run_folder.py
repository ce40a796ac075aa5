"""A run folder belongs to one run, and rotation keeps the checkpoints that verify (issue #17 points 1, 2):
the files on disk are checked after each command. Tiny model on the built-in digits, in-process."""
import json
import re
from pathlib import Path

import pytest

from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast.train import main
from train_helpers import TINY_FLAGS

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = [*TINY_FLAGS, "--device", "cpu", "--backend", "eager", "--threads", "1"]  # the quickest on a busy CPU


def train(capsys, logdir, *argv):
    code = main([*FAST, "--logdir", str(logdir), *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def final_checkpoint(out):
    """The file the run's last "checkpoint ..." line names."""
    return re.findall(r"checkpoint (\S+\.pt)", out)[-1]


def test_a_new_run_into_a_used_folder_is_refused_then_started_over(capsys, tmp_path):
    run = tmp_path / "R"
    code, out, _ = train(capsys, run, "--steps", 4, "--save-every", 2, "--seed", 0)
    assert code == 0 and {"ckpt_2.pt", "ckpt_4.pt", "config.json"} <= set(names(run))
    first = {name: (run / name).read_bytes() for name in ("ckpt_2.pt", "ckpt_4.pt", "config.json")}

    # another run (other seed, fewer steps) into the same folder: refused, nothing touched
    code, _, err = train(capsys, run, "--steps", 3, "--seed", 1)
    assert code == 2
    assert "already holds a run" in err and "--resume" in err and "--start-over" in err
    assert {name: (run / name).read_bytes() for name in first} == first
    assert not (run / "ckpt_3.pt").exists()

    # --start-over: the old run is moved aside whole, the new one has the folder to itself
    code, out, _ = train(capsys, run, "--steps", 3, "--seed", 1, "--start-over")
    assert code == 0 and "--start-over: moved the previous run" in out
    moved = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(moved) == 1
    assert {name: (moved[0] / name).read_bytes() for name in first} == first
    assert [p.name for p in ckpt_io.find_checkpoints(run)] == ["ckpt_3.pt"]
    assert json.loads((run / "config.json").read_text())["run"]["seed"] == 1
    assert Path(final_checkpoint(out)) == run / "ckpt_3.pt"


def test_start_over_into_a_folder_without_a_run_moves_nothing(capsys, tmp_path):
    """A --logdir of other files (a project folder given by mistake) is not a run: nothing is moved."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    code, out, _ = train(capsys, tmp_path, "--steps", 2, "--start-over")
    assert code == 0 and "holds no run (no checkpoint, no config.json); nothing was moved" in out
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "data").is_dir()
    assert not any(p.name.startswith("replaced-") for p in tmp_path.iterdir())
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_2.pt"]


def test_the_same_run_requeued_before_its_first_checkpoint_may_start_again(capsys, tmp_path):
    """config.json of the same configuration and no checkpoint: a job requeued before it saved anything."""
    run = tmp_path / "R"
    run.mkdir()
    code, _, _ = train(capsys, run, "--steps", 1, "--seed", 3)
    assert code == 0
    ckpt_io.checkpoint_path(run, 1).unlink()  # as if killed before its first checkpoint
    code, _, _ = train(capsys, run, "--steps", 1, "--seed", 3)
    assert code == 0 and (run / "ckpt_1.pt").exists()
    ckpt_io.checkpoint_path(run, 1).unlink()
    code, _, err = train(capsys, run, "--steps", 1, "--seed", 4)  # another configuration: another run
    assert code == 2 and "config.json" in err and "--start-over" in err


def test_rotation_moves_a_torn_checkpoint_aside_and_keeps_the_one_just_written(capsys, tmp_path):
    """A torn ckpt_5 (a killed write) beside good ckpt_2: --resume falls back to ckpt_2; with
    --keep-checkpoints 1 the old rotation kept the torn ckpt_5 and deleted the ckpt_4 just written."""
    run = tmp_path / "R"
    code, _, _ = train(capsys, run, "--steps", 2)
    assert code == 0
    good = run / "ckpt_2.pt"
    torn = good.read_bytes()[: good.stat().st_size // 2]
    (run / "ckpt_5.pt").write_bytes(torn)

    code, out, _ = train(capsys, run, "--resume", "--steps", 6, "--save-every", 2, "--keep-checkpoints", 1)
    assert code == 0
    assert "ckpt_5.pt" in out and "does not verify" in out and "moved to" in out
    assert [p.name for p in ckpt_io.find_checkpoints(run)] == ["ckpt_6.pt"]
    assert (run / "corrupt" / "ckpt_5.pt").read_bytes() == torn  # reported and kept aside, never deleted
    assert ckpt_io.load(run / "ckpt_6.pt")["step"] == 6
    assert Path(final_checkpoint(out)) == run / "ckpt_6.pt"


def test_resume_at_its_last_step_trains_and_writes_nothing(capsys, tmp_path):
    run = tmp_path / "R"
    code, _, _ = train(capsys, run, "--steps", 2)
    assert code == 0
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    code, out, _ = main_resume(capsys, run / "ckpt_2.pt", "--steps", 2)
    assert code == 0 and "nothing to train" in out and "trained" not in out
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def main_resume(capsys, ckpt, *argv):
    code = main(["--resume", str(ckpt), "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err
