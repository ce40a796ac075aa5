"""SIGTERM and Ctrl-C (issue #17 point 6): a signal during the final sample grid skips it and says so, a
second signal stops at once with one line (exit 130), sampling and evaluation stop within a step (exit 130,
finished shards kept). The files on disk are checked afterwards. Subprocesses: real signals."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbdm_fast.evaluation import pipeline
from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast.interrupts import EXIT_INTERRUPTED, EXIT_STOPPED, Interrupted, sigterm_interrupts
from cbdm_fast.sampling.shards import shards_folder
from cbdm_fast.training import Trainer
from train_helpers import TINY_FLAGS, tiny_config

REPO = Path(__file__).resolve().parents[1]
FAST = [*TINY_FLAGS, "--backend", "eager", "--threads", 1]  # the quickest on a busy CPU
ENV = {**os.environ, "CBDM_FAST_NO_EXT": "1", "OMP_NUM_THREADS": "1"}


def start(*argv):
    return subprocess.Popen([sys.executable, "-m", *map(str, argv)], cwd=REPO, text=True, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_line(proc, prefix, timeout=300):
    """The lines printed until one starts with ``prefix`` (fails if the process ends first)."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return seen
        assert time.time() < deadline, "".join(seen)
    pytest.fail(f"the process ended before printing {prefix!r}:\n{''.join(seen)}")


def test_sigterm_during_the_final_grid_skips_it(tmp_path):
    """After the last checkpoint the grid (300 images, 100 steps: far longer than the stop) is abandoned."""
    proc = start("cbdm_fast.train", *FAST, "--steps", 2, "--sample-per-class", 30, "--logdir", tmp_path)
    wait_for_line(proc, "trained 2 steps; checkpoint")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped_in = time.monotonic() - sent
    assert proc.returncode == 0, out  # training is complete
    assert "the final sample grid was skipped (SIGTERM received)" in out and "Traceback" not in out
    assert stopped_in < 30, f"took {stopped_in:.0f} s to stop"
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_2.pt"]
    assert ckpt_io.load(tmp_path / "ckpt_2.pt")["step"] == 2
    assert not (tmp_path / "samples" / "0000002.png").exists()


def test_sigterm_during_a_mid_run_grid_stops_at_that_step(tmp_path):
    """The grid of step 2 (300 images) is abandoned, and no step is trained after it."""
    proc = start("cbdm_fast.train", *FAST, "--steps", 100000, "--log-every", 1, "--sample-every", 2,
                 "--sample-per-class", 30, "--logdir", tmp_path)
    wait_for_line(proc, "step 2/")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out
    assert "stopped at step 2 of 100000" in out and "Traceback" not in out
    assert ckpt_io.find_checkpoints(tmp_path)[-1].name == "ckpt_2.pt"
    assert ckpt_io.load(tmp_path / "ckpt_2.pt")["step"] == 2


def test_a_second_signal_stops_at_once_in_one_line(tmp_path):
    proc = start("cbdm_fast.train", *FAST, "--steps", 100000, "--log-every", 1, "--logdir", tmp_path)
    wait_for_line(proc, "step 3/")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)  # another signal number: the two are not merged into one
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    last = out.strip().splitlines()[-1]
    assert "received again: stopped at once" in last and ("last checkpoint" in last or "no checkpoint" in last)
    for path in ckpt_io.find_checkpoints(tmp_path):  # whatever is on disk loads
        ckpt_io.load(path)


def test_sigterm_during_sampling_stops_within_a_step_keeping_the_shards(tmp_path):
    ckpt = Trainer(tiny_config(tmp_path / "model"), log=lambda s: None).save_checkpoint()  # 1x16x16, T = 100
    out = tmp_path / "samples.npz"
    proc = start("cbdm_fast.sample", "--ckpt", ckpt, "--per-class", 500, "--shard-size", 100, "--batch-size", 100,
                 "--threads", 1, "--no-progress", "--out", out)
    manifest = shards_folder(out) / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, printed
    assert time.monotonic() - sent < 30
    assert "interrupted (SIGTERM received)" in printed and "Traceback" not in printed
    assert manifest.exists() and not out.exists()  # the same command resumes from the shards


def test_sigterm_during_evaluation_exits_130_in_one_line(monkeypatch, capsys):
    def evaluation_stopped_by_sigterm(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted long before
        return 0

    monkeypatch.setattr(pipeline, "_evaluation", evaluation_stopped_by_sigterm)
    handler = signal.getsignal(signal.SIGTERM)
    start_time = time.monotonic()
    assert pipeline.run_evaluation(None) == EXIT_INTERRUPTED
    assert time.monotonic() - start_time < 10
    err = capsys.readouterr().err
    assert err.strip() == "interrupted (SIGTERM received): the evaluation stopped before it finished"
    assert signal.getsignal(signal.SIGTERM) == handler  # restored


def test_a_plain_ctrl_c_in_train_says_interrupted(monkeypatch, capsys):
    """A KeyboardInterrupt without a message (Ctrl-C outside the training loop's handler): one line that says
    so, exit 130 (it printed an empty line)."""
    from cbdm_fast import train as train_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "launch", interrupted)
    assert train_cli.main([*TINY_FLAGS, "--steps", "1"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted"


def test_sigterm_interrupts_raises_where_the_program_is():
    with pytest.raises(Interrupted, match="SIGTERM received"):
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
