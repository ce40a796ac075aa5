"""The training loop: faithful step semantics, exact resume, safe checkpoints, clean stops."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast.interrupts import EXIT_STOPPED
from cbdm_fast.training import Trainer, TrainingDiverged, draw_host, ema_update, resume_trainer, warmup_factor
from cbdm_fast.training.draws import draw_flags
from train_helpers import TINY_FLAGS, tiny_config

REPO = Path(__file__).resolve().parents[2]


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_continues_exactly(tmp_path):
    full = Trainer(tiny_config(tmp_path / "a", method__per_sample_drop=False))
    losses_full = [full.train_step() for _ in range(8)]

    part = Trainer(tiny_config(tmp_path / "b"))
    losses_part = [part.train_step() for _ in range(3)]
    path = part.save_checkpoint()
    del part
    torch.manual_seed(12345)  # scramble the global RNG: the checkpoint must restore it
    resumed = resume_trainer(path, log=lambda s: None)
    assert resumed.step == 3
    losses_part += [resumed.train_step() for _ in range(5)]

    assert losses_part == losses_full  # bit-identical floats on CPU
    a, b = _params(full.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = _params(full.ema), _params(resumed.ema)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_everything_needed(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.train_step()
    state = ckpt_io.load(trainer.save_checkpoint())
    for key in ("model", "ema", "optimizer", "scheduler", "step", "rng", "data", "config", "unet"):
        assert key in state, key
    assert state["step"] == 1 and ckpt_io.is_ours(state)


def test_atomic_write_leaves_old_file_intact_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_1.pt"
    ckpt_io.save_atomic({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_atomic({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_1.pt"]  # no temporary left behind


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "ckpt_5.pt"
    ckpt_io.save_atomic({"v": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated, corrupt"):
        ckpt_io.load(path)
    with pytest.raises(ckpt_io.CheckpointError, match="not found"):
        ckpt_io.load(tmp_path / "missing.pt")


def test_keeps_only_the_newest_checkpoints(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, run__keep_checkpoints=2))
    for _ in range(3):
        trainer.train_step()
        trainer.save_checkpoint()
    assert [p.name for p in ckpt_io.find_checkpoints(tmp_path)] == ["ckpt_2.pt", "ckpt_3.pt"]


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, backend):
    """eager: the step checks its loss before its update; fused: the loop reads the device flag at its first
    log or checkpoint point (step 4) and names step 3."""
    trainer = Trainer(tiny_config(tmp_path, steps=10, run__backend=backend, run__save_every=2, run__log_every=4),
                      log=lambda s: None)
    trainer.train_step()
    trainer.train_step()
    good = trainer.save_checkpoint()
    good_bytes = good.read_bytes()
    with torch.no_grad():
        trainer.model.head.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="at step 3"):
        trainer.run()
    assert good.read_bytes() == good_bytes
    assert ckpt_io.find_checkpoints(tmp_path) == [good]


def test_warmup_and_ema_follow_the_authors():
    f = warmup_factor(5000)
    assert (f(0), f(2500), f(5000), f(9000)) == (0.0, 0.5, 1.0, 1.0)
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expect = {k: v * 0.9 + src.state_dict()[k] * 0.1 for k, v in dst.state_dict().items()}
    ema_update(src, dst, 0.9)
    assert all(torch.allclose(dst.state_dict()[k], expect[k]) for k in expect)


def _label_draws(trainer, n):
    """n batches' draws (of 8) as the trainer's eager step draws them: its method, label drop and y_bal."""
    m = trainer.cfg.method
    drop_p, cb = draw_flags(m.method, m.label_drop)
    like = torch.zeros(8, 1, 1, 1)
    return [draw_host(like, trainer.y_bal_probs, 100, drop_p, cb, per_sample=m.per_sample_drop) for _ in range(n)]


def test_label_drop_is_one_draw_per_batch_and_y_bal_follows_the_class_frequencies(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    draws = _label_draws(trainer, 2000)
    assert all(d.keep.ndim == 0 for d in draws)  # one 0/1 flag for the whole batch
    is_dropped = [not bool(d.keep) for d in draws]
    dropped = sum(is_dropped)
    assert 140 < dropped < 260  # p = 0.1 per batch
    assert all(d.y_bal is None for d, drop in zip(draws, is_dropped) if drop)
    y_bal = torch.cat([d.y_bal for d in draws if d.y_bal is not None])
    freq = torch.bincount(y_bal, minlength=10).double() / len(y_bal)
    assert torch.allclose(freq, trainer.class_freq, atol=0.01)
    assert freq[0] > 5 * freq[9]  # long-tailed, not uniform


def test_per_sample_drop_is_an_option(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, method__per_sample_drop=True))
    masks = torch.stack([d.keep for d in _label_draws(trainer, 500)])
    assert 0.05 < 1 - masks.mean().item() < 0.15
    assert trainer.train_step()["loss"] > 0


def test_finetuning_from_an_authors_checkpoint_uses_its_ema_and_uniform_y_bal(tmp_path):
    donor = Trainer(tiny_config(tmp_path / "donor"))
    authors_ckpt = {"net_model": donor.model.state_dict(),
                    "ema_model": {k: v + 1.0 if v.is_floating_point() else v
                                  for k, v in donor.model.state_dict().items()},
                    "sched": {}, "optim": {}, "step": 200000, "fixed_x_T": torch.zeros(1)}
    path = tmp_path / "ckpt_200000.pt"
    torch.save(authors_ckpt, path)
    tuned = Trainer(tiny_config(tmp_path / "ft", method__finetune_from=str(path)))
    assert torch.equal(tuned.model.head.weight, authors_ckpt["ema_model"]["head.weight"])
    assert torch.allclose(tuned.y_bal_probs, torch.full((10,), 0.1, dtype=torch.float64))


def test_finetuning_from_a_mismatched_checkpoint_names_the_options(tmp_path):
    other = Trainer(tiny_config(tmp_path / "o", model__ch=64))
    path = other.save_checkpoint()
    with pytest.raises(ckpt_io.CheckpointError, match="--ch"):
        Trainer(tiny_config(tmp_path / "ft", method__finetune_from=str(path)))


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "cbdm_fast.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "CBDM_FAST_NO_EXT": "1"})


def test_missing_cifar_archive_is_reported_without_a_traceback(tmp_path):
    result = _cli("--dataset", "cifar10lt", "--data-root", str(tmp_path / "nowhere"), "--logdir", str(tmp_path))
    assert result.returncode == 2
    assert str(tmp_path / "nowhere") in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_with_the_stopped_code(tmp_path, signum):
    """Stopped before its last step: exit code 75 (EXIT_STOPPED), not 0, so `train && sample` stops."""
    proc = subprocess.Popen([sys.executable, "-m", "cbdm_fast.train", *TINY_FLAGS, "--steps", "100000",
                             "--log-every", "1", "--logdir", str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "CBDM_FAST_NO_EXT": "1"})
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3/") or time.time() > deadline:
            break
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, out
    assert f"{signal.Signals(signum).name} received" in out and "--resume" in out and "Traceback" not in out
    ckpts = ckpt_io.find_checkpoints(tmp_path)
    assert len(ckpts) == 1
    step = ckpt_io.load(ckpts[0])["step"]
    assert 3 <= step < 100000
    resumed = _cli("--resume", str(ckpts[0]), "--steps", str(step + 2), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {ckpts[0]} at step {step}" in resumed.stdout


def test_resume_refuses_to_change_the_method(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    path = trainer.save_checkpoint()
    result = _cli("--resume", str(path), "--method", "ddpm")
    assert result.returncode == 2 and "--method (the checkpoint has 'cbdm', this command 'ddpm')" in result.stderr


def test_one_command_starts_a_run_and_later_resumes_it(tmp_path):
    """--resume alone with no checkpoint starts afresh; repeating the original options is allowed."""
    flags = [*TINY_FLAGS, "--sample-every", "0", "--logdir", str(tmp_path), "--resume"]
    first = _cli(*flags, "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert "no checkpoint in" in first.stdout and "starting a new run" in first.stdout
    again = _cli(*flags, "--steps", "3")
    assert again.returncode == 0, again.stderr
    assert f"resuming {tmp_path / 'ckpt_2.pt'} at step 2" in again.stdout
    assert ckpt_io.load(tmp_path / "ckpt_3.pt")["step"] == 3


def test_host_data_storage_trains_exactly_like_device_storage(tmp_path):
    """--data-on host (the data set in host memory, batches copied per step) changes nothing but where
    the bytes live; a run may resume with the other storage."""
    dev = Trainer(tiny_config(tmp_path / "d", data__storage="device"))
    on_device = [dev.train_step() for _ in range(4)]  # one run after the other: eager draws the global RNG
    host = Trainer(tiny_config(tmp_path / "h", data__storage="host"))
    assert dev.stream.storage == "device" and host.stream.storage == "host"
    assert "in host memory" in host.describe()
    on_host = [host.train_step() for _ in range(3)]
    resumed = resume_trainer(host.save_checkpoint(), overrides={"data.storage": "device"}, log=lambda s: None)
    assert resumed.stream.storage == "device"
    assert on_host + [resumed.train_step()] == on_device


def test_auto_storage_is_the_device_on_a_cpu_and_bad_values_are_named(tmp_path):
    from cbdm_fast.training.trainer import resolve_storage
    assert resolve_storage("auto", 10**12, torch.device("cpu")) == "device"
    assert resolve_storage("host", 1, torch.device("cpu")) == "host"
    result = _cli("--data-on", "disk")
    assert result.returncode == 2 and "--data-on" in result.stderr and "invalid choice: 'disk'" in result.stderr
