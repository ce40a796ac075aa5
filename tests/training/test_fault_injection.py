"""Fault injection: a demo training run SIGKILLed at 20 random moments, some of them in the middle of
a checkpoint write, always resumes from a checkpoint that loads, and the resumed run ends with exactly
the parameters of an uninterrupted run (CPU, one thread, fp32: bit-for-bit deterministic)."""
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from cbdm_fast.files import checkpoint as ckpt_io
from train_helpers import TINY_FLAGS

REPO = Path(__file__).resolve().parents[2]
# STEPS: enough that the 20 kills land inside training even when steps run fast (an idle machine
# reached step 200 before the 20th kill once, and 374 of 400 in another run)
STEPS, KILLS = 600, 20
FLAGS = [*TINY_FLAGS, "--steps", str(STEPS), "--save-every", "2", "--keep-checkpoints", "2",
         "--sample-every", "0", "--log-every", "1", "--backend", "fused", "--precision", "fp32",
         "--threads", "1", "--seed", "3"]
ENV = {**os.environ, "CBDM_FAST_NO_EXT": "1", "OMP_NUM_THREADS": "1"}


class Run:
    """One training process; a thread drains its output and notes when the first step was logged."""

    def __init__(self, args):
        self.proc = subprocess.Popen([sys.executable, "-m", "cbdm_fast.train", *args], cwd=REPO, env=ENV,
                                     text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines, self.stepping = [], threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("step "):
                self.stepping.set()
        self.stepping.set()  # the process ended (finished or failed): nobody should wait any longer

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)

    def output(self) -> str:
        return "".join(self.lines)


def _temporaries(logdir: Path) -> list:
    return [p for p in logdir.iterdir() if ckpt_io.TMP_PATTERN.match(p.name)] if logdir.is_dir() else []


def _kill_at_a_random_moment(run: Run, logdir: Path, mode: int, rng: random.Random) -> None:
    if mode == 0:    # anywhere: start-up, a step, a write, the shutdown
        time.sleep(rng.uniform(0.5, 8.0))
    else:            # somewhere in the training loop
        run.stepping.wait(timeout=120)
        time.sleep(rng.uniform(0.0, 1.5))
    if mode == 2:    # inside the next checkpoint write: as soon as its temporary file appears
        before = set(_temporaries(logdir))
        deadline = time.time() + 30
        while not set(_temporaries(logdir)) - before and run.proc.poll() is None and time.time() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0.0, 0.002))
    run.kill()


def _final_state(logdir: Path) -> dict:
    state = ckpt_io.load(ckpt_io.checkpoint_path(logdir, STEPS))
    assert state["step"] == STEPS
    return state


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_sigkill_at_20_random_moments_resumes_to_the_uninterrupted_parameters(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = Run([*FLAGS, "--logdir", str(reference_dir)])  # runs on the other core meanwhile

    rng = random.Random(20261125)
    resumed_steps, killed_mid_write = [], 0
    for k in range(KILLS):
        fresh = not ckpt_io.find_checkpoints(killed_dir)
        run = Run([*FLAGS, "--logdir", str(killed_dir)] if fresh else ["--resume", "--logdir", str(killed_dir)])
        before = set(_temporaries(killed_dir))
        _kill_at_a_random_moment(run, killed_dir, k % 3, rng)
        out = run.output()
        assert run.proc.returncode == -signal.SIGKILL, f"kill {k}: the run ended by itself:\n{out[-2000:]}"
        assert "Traceback" not in out, out[-3000:]
        killed_mid_write += bool(set(_temporaries(killed_dir)) - before)
        # every checkpoint on disk is whole (atomic rename) and verifies; none is ever lost
        for path in ckpt_io.find_checkpoints(killed_dir):
            ckpt_io.load(path)
        newest, skipped = ckpt_io.newest_good(killed_dir)
        assert not skipped
        resumed_steps.append(ckpt_io.load(newest)["step"] if newest else 0)
    print(f"checkpoint step after each kill: {resumed_steps}; {killed_mid_write} kills inside a write")
    assert resumed_steps == sorted(resumed_steps) and resumed_steps[-1] < STEPS, resumed_steps
    assert killed_mid_write >= 3, f"only {killed_mid_write} of {KILLS} kills landed inside a checkpoint write"

    finish = Run(["--resume", "--logdir", str(killed_dir)])
    assert finish.proc.wait(timeout=600) == 0, finish.output()[-3000:]
    finish._reader.join(timeout=60)
    assert f"at step {resumed_steps[-1]}" in finish.output()
    assert not _temporaries(killed_dir)  # the killed writers' leftovers were cleaned up
    assert reference.proc.wait(timeout=600) == 0, reference.output()[-3000:]

    a, b = _final_state(reference_dir), _final_state(killed_dir)
    for key in ("model", "ema", "optimizer", "scheduler", "data"):
        _assert_same_tensors(a[key], b[key], key)
