"""Checkpoint integrity: the sha256 trailer detects truncation and flipped bytes, --resume falls back to
the newest checkpoint that verifies, and stale temporaries of killed writes are cleaned up."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast.files import integrity
from cbdm_fast.training import Trainer
from train_helpers import TINY_FLAGS, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"format": ckpt_io.FORMAT, "step": 7, "w": torch.randn(4096, generator=g), "note": "x"}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_our_file_verifies_and_still_loads_with_plain_torch_load(tmp_path):
    path = ckpt_io.save_atomic(_state(), tmp_path / "ckpt_7.pt")
    assert ckpt_io.verify(path) is True
    loaded = ckpt_io.load(path)
    assert torch.equal(loaded["w"], _state()["w"]) and ckpt_io.INTEGRITY_KEY not in loaded
    plain = torch.load(path, weights_only=True)  # other tools read it as an ordinary torch file
    assert torch.equal(plain["w"], _state()["w"])


def test_a_file_without_trailer_loads_as_before(tmp_path):
    path = tmp_path / "ckpt_authors.pt"
    torch.save({"net_model": {"w": torch.ones(3)}, "step": 1}, path)  # as the authors' code writes it
    assert ckpt_io.verify(path) is False
    assert ckpt_io.load(path)["step"] == 1


@pytest.mark.parametrize("where", ["start", "middle", "digest", "length", "magic"])
def test_a_flipped_byte_anywhere_gives_the_documented_error(tmp_path, where):
    path = ckpt_io.save_atomic(_state(), tmp_path / "ckpt_7.pt")
    size = path.stat().st_size
    payload = size - integrity.TRAILER_SIZE
    offset = {"start": 3, "middle": payload // 2, "digest": payload + 5, "length": payload + 33,
              "magic": size - 2}[where]
    _flip(path, offset)
    with pytest.raises(ckpt_io.CorruptCheckpoint, match=f"checkpoint {path} is corrupt"):
        ckpt_io.load(path)


def test_random_flips_never_crash_inside_torch_load(tmp_path):
    rng = random.Random(0)
    good = ckpt_io.save_atomic(_state(), tmp_path / "good.pt").read_bytes()
    for _ in range(25):
        path = tmp_path / "ckpt_1.pt"
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        with pytest.raises(ckpt_io.CheckpointError, match="corrupt"):
            ckpt_io.load(path)


@pytest.mark.parametrize("keep", [0, 100, -60, -48, -1])
def test_truncation_at_any_length_is_reported(tmp_path, keep):
    path = ckpt_io.save_atomic(_state(), tmp_path / "ckpt_7.pt")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ckpt_io.CheckpointError, match="corrupt|truncated"):
        ckpt_io.load(path)


def test_a_checkpoint_re_saved_with_plain_torch_save_is_explained(tmp_path):
    """#17 point 8: not just "corrupt": the message says the trailer is missing and the two causes."""
    path = ckpt_io.save_atomic(_state(), tmp_path / "ckpt_7.pt")
    torch.save(torch.load(path, weights_only=True), path)  # a user's round trip through plain torch
    with pytest.raises(ckpt_io.CorruptCheckpoint) as ei:
        ckpt_io.load(path)
    msg = str(ei.value)
    assert "re-saved with plain torch.save" in msg and f"lost its last {integrity.TRAILER_SIZE} bytes" in msg


def test_newest_good_skips_corrupt_checkpoints_and_says_why(tmp_path):
    for step in (1, 2, 3):
        ckpt_io.save_atomic({**_state(step), "step": step}, tmp_path / f"ckpt_{step}.pt")
    _flip(tmp_path / "ckpt_3.pt", 100)
    (tmp_path / "ckpt_2.pt").write_bytes((tmp_path / "ckpt_2.pt").read_bytes()[:500])
    said = []
    path, skipped = ckpt_io.newest_good(tmp_path, log=said.append)
    assert path == tmp_path / "ckpt_1.pt"
    assert [p.name for p, _ in skipped] == ["ckpt_3.pt", "ckpt_2.pt"]
    assert "ckpt_3.pt" in said[0] and "sha256 mismatch" in said[0]
    assert "ckpt_2.pt" in said[1]
    for p in (tmp_path / "ckpt_1.pt", tmp_path / "ckpt_2.pt", tmp_path / "ckpt_3.pt"):
        _flip(p, 50)
    assert ckpt_io.newest_good(tmp_path)[0] is None


def _save_steps(folder, *steps):
    for step in steps:
        ckpt_io.save_atomic({**_state(step), "step": step}, folder / f"ckpt_{step}.pt")


def test_rotation_keeps_the_newest_that_verify_and_moves_a_torn_one_aside(tmp_path):
    """#17 point 2: a torn ckpt_50 beside a good ckpt_40 is not counted, not deleted with the good ones,
    and cannot push ckpt_40 out."""
    _save_steps(tmp_path, 30, 40, 50)
    torn = tmp_path / "ckpt_50.pt"
    torn.write_bytes(torn.read_bytes()[:700])
    _save_steps(tmp_path, 60)
    said = []
    result = ckpt_io.rotate(tmp_path, keep=2, written=tmp_path / "ckpt_60.pt", log=said.append)
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_40.pt", "ckpt_60.pt"]
    assert [p.name for p in result["deleted"]] == ["ckpt_30.pt"]
    assert result["moved"] == [tmp_path / "corrupt" / "ckpt_50.pt"] and result["moved"][0].is_file()
    assert "ckpt_50.pt does not verify" in said[0] and "corrupt" in said[0]
    assert ckpt_io.newest_good(tmp_path)[0] == tmp_path / "ckpt_60.pt"


def test_rotation_checks_sums_and_unpickles_only_files_without_one(tmp_path):
    """An altered byte under a trailer is moved aside (its sha256 disagrees); a file without a trailer
    (older or the authors') is kept when torch can load it and moved aside when it cannot."""
    _save_steps(tmp_path, 10, 20)
    _flip(tmp_path / "ckpt_20.pt", 5000)
    torch.save({**_state(15), "step": 15}, tmp_path / "ckpt_15.pt")
    (tmp_path / "ckpt_25.pt").write_bytes(b"not a pickle" * 100)
    _save_steps(tmp_path, 30)
    result = ckpt_io.rotate(tmp_path, keep=3, written=tmp_path / "ckpt_30.pt")
    assert [p.name for p in result["kept"]] == ["ckpt_10.pt", "ckpt_15.pt", "ckpt_30.pt"]
    assert sorted(p.name for p in result["moved"]) == ["ckpt_20.pt", "ckpt_25.pt"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """keep 1 with a newer good checkpoint already there (a new run into old steps): the one just
    written survives; with nothing odd, the oldest go."""
    _save_steps(tmp_path, 8, 3)
    result = ckpt_io.rotate(tmp_path, keep=1, written=tmp_path / "ckpt_3.pt")
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_3.pt"]
    assert [p.name for p in result["kept"]] == ["ckpt_3.pt"]
    _save_steps(tmp_path, 4, 5)
    ckpt_io.rotate(tmp_path, keep=2, written=tmp_path / "ckpt_5.pt")
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_4.pt", "ckpt_5.pt"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt_io.rotate(tmp_path, keep=0, written=tmp_path / "ckpt_5.pt")


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".ckpt_4.pt.tmp{dead}"
    live = tmp_path / f".ckpt_5.pt.tmp{os.getppid()}"
    other = tmp_path / ".notes.tmp1"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    assert ckpt_io.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_saving_a_checkpoint_removes_a_killed_writers_temporary(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".ckpt_9.pt.tmp{dead}"
    stale.write_bytes(b"half")
    path = trainer.save_checkpoint()
    assert not stale.exists() and ckpt_io.verify(path)


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "cbdm_fast.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "CBDM_FAST_NO_EXT": "1"})


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(tmp_path):
    first = _cli(*TINY_FLAGS, "--steps", "4", "--save-every", "2", "--sample-every", "0", "--logdir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    newest = tmp_path / "ckpt_4.pt"
    _flip(newest, newest.stat().st_size // 2)

    named = _cli("--resume", str(newest), "--steps", "6", "--logdir", str(tmp_path))
    assert named.returncode == 2 and "Traceback" not in named.stderr
    assert f"checkpoint {newest} is corrupt" in named.stderr
    assert f"--resume {tmp_path / 'ckpt_2.pt'}" in named.stderr  # names the good one to use

    auto = _cli("--resume", "--steps", "6", "--sample-every", "0", "--logdir", str(tmp_path))
    assert auto.returncode == 0, auto.stderr
    assert "skipping ckpt_4.pt" in auto.stderr and "falling back to ckpt_2.pt" in auto.stderr
    assert f"resuming {tmp_path / 'ckpt_2.pt'} at step 2" in auto.stdout
    assert ckpt_io.load(tmp_path / "ckpt_6.pt")["step"] == 6
