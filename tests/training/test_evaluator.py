"""Evaluation during training (--eval-every): it scores the EMA model and changes nothing in training.

A tiny UNet on the built-in digits on the CPU, 6 steps, evaluated at steps 3 and 6 with 20 samples of
5 sampling steps; the same run without evaluation is the reference. Both the eager (the authors') step and
the fused step (device draws from the default generator, which the evaluation must not touch) run, the
first evaluated with DDIM samples, the second with DPM-Solver++(2M) samples (--eval-sampler).
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cbdm_fast import train as train_cli
from cbdm_fast.training.evaluator import (CACHE_FOLDER, JSONL_NAME, append_jsonl, read_jsonl,
                                                  samples_per_class)
from cbdm_fast.evaluation.run_log import loss_curves
from cbdm_fast.training import Trainer
from cbdm_fast.training.launch import fixed_option_conflicts
from train_helpers import TINY_FLAGS, tiny_config

EVAL = dict(run__eval_every=3, run__eval_samples=20, run__eval_steps=5)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(logdir, backend, **overrides):
    """Run 6 steps; returns (per-step losses, trainer, global CPU RNG state after the run). The losses are
    read back from the run's TensorBoard log (every step: log_every 1), where they are stored as the
    float32 values the step computed."""
    trainer = Trainer(tiny_config(logdir, run__backend=backend, **overrides), log=lambda s: None)
    assert trainer.run() == "done"
    return loss_curves(logdir), trainer, torch.get_rng_state()


@pytest.fixture(scope="module", params=[("eager", "ddim"), ("fused", "dpm++2m")], ids=["eager-ddim", "fused-dpm"])
def runs(request, tmp_path_factory, one_thread):
    backend, sampler = request.param
    root = tmp_path_factory.mktemp(f"eval_{backend}")
    torch.manual_seed(0)
    plain = _train(root / "plain", backend)
    torch.manual_seed(0)
    evaluated = _train(root / "eval", backend, run__eval_sampler=sampler, **EVAL)
    return {"plain": plain, "eval": evaluated, "logdir": root / "eval", "sampler": sampler}


def test_evaluation_does_not_change_training(runs):
    (losses_a, a, rng_a), (losses_b, b, rng_b) = runs["plain"], runs["eval"]
    assert set(losses_a) == {"train/loss", "train/loss_ddpm", "train/loss_reg"}
    assert all(steps == list(range(1, 7)) for steps, _ in losses_a.values())
    assert losses_a == losses_b  # bit-identical floats on CPU
    for name in ("model", "ema"):
        pa, pb = _params(getattr(a, name)), _params(getattr(b, name))
        assert all(torch.equal(pa[k], pb[k]) for k in pa), name
    assert torch.equal(rng_a, rng_b)  # the global generator (the fused step's draws) untouched
    assert json.dumps(a.stream.state_dict(), default=str) == json.dumps(b.stream.state_dict(), default=str)
    assert b.ema.training is False and all(not m.training for m in b.ema.modules())


def test_eval_jsonl_has_one_finite_line_per_evaluation(runs):
    path = runs["logdir"] / JSONL_NAME
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6]
    for r in records:
        assert r["num_samples"] == 20 and r["sampler"] == runs["sampler"] and r["steps"] == 5
        for key in ("fid", "kid", "precision", "recall", "accuracy", "fid_many", "accuracy_few", "accuracy_class_9"):
            assert math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["recall"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
    assert (runs["logdir"] / CACHE_FOLDER).is_dir()  # the recogniser and the real features, cached


def test_tensorboard_has_eval_scalars(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["logdir"]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for name in ("eval/fid", "eval/kid", "eval/recall", "eval/accuracy"):
        assert name in tags, tags
    assert [e.step for e in acc.Scalars("eval/fid")] == [3, 6]
    assert all(math.isfinite(e.value) for e in acc.Scalars("eval/fid"))


def test_evaluate_restores_modes_and_rng_states(tmp_path, one_thread):
    trainer = Trainer(tiny_config(tmp_path, **EVAL), log=lambda s: None)
    trainer.monitor.start_evaluation()
    trainer.model.train()
    trainer.ema.train()  # unusual, but whatever the modes were, they come back
    torch.manual_seed(7)
    cpu, numpy_state = torch.get_rng_state(), np.random.get_state()
    stream = json.dumps(trainer.stream.state_dict(), default=str)
    metrics = trainer.monitor.evaluate(trainer.step)
    assert metrics and math.isfinite(metrics["fid"])
    assert trainer.model.training and trainer.ema.training
    assert torch.equal(torch.get_rng_state(), cpu)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert json.dumps(trainer.stream.state_dict(), default=str) == stream


def test_jsonl_append_survives_a_torn_last_line(tmp_path):
    path = tmp_path / JSONL_NAME
    append_jsonl(path, {"step": 1, "fid": 3.0})
    with open(path, "a") as f:
        f.write('{"step": 2, "fi')  # a run killed mid-write
    append_jsonl(path, {"step": 2, "fid": 2.0})
    assert read_jsonl(path) == [{"step": 1, "fid": 3.0}, {"step": 2, "fid": 2.0}]
    assert path.read_text().splitlines()[0] == '{"step": 1, "fid": 3.0}'


def test_sample_count_is_rounded_up_to_whole_classes():
    assert samples_per_class(None, 10) == 10
    assert samples_per_class(20, 10) == 2
    assert samples_per_class(25, 10) == 3
    assert samples_per_class(1, 100) == 1


def _main(argv, capsys):
    """train's main() in this process: (exit code, stderr)."""
    try:
        code = train_cli.main(argv)
    except SystemExit as exc:  # argparse's parser.error
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags,needle", [
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--eval-samples", "0"], "--eval-samples must be >= 1"),
    (["--eval-steps", "0"], "--eval-steps must be >= 1"),
    (["--eval-every", "2", "--eval-sampler", "ddim", "--eval-steps", "101"], "--eval-steps must be <= --T (100)"),
    (["--eval-every", "2", "--eval-sampler", "dpm++2m", "--eval-steps", "100"],
     "--eval-steps must be <= --T - 1 (99) with --eval-every and --eval-sampler dpm++2m"),
    (["--eval-sampler", "ddpm"], "argument --eval-sampler: invalid choice"),
])
def test_bad_eval_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, needle):
    code, err = _main([*TINY_FLAGS, "--logdir", str(tmp_path), *flags], capsys)
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "config.json").exists()  # rejected before anything ran


def test_eval_steps_default_per_sampler(tmp_path, capsys):
    from cbdm_fast.training.config import RunConfig, eval_steps_of
    assert eval_steps_of(RunConfig()) == 20  # dpm++2m, the default sampler
    assert eval_steps_of(RunConfig(eval_sampler="ddim")) == 50  # DDIM keeps its default from before dpm++2m
    assert eval_steps_of(RunConfig(eval_sampler="ddim", eval_steps=7)) == 7
    # a default the schedule cannot hold is named as the default, with the flag that changes it
    code, err = _main([*TINY_FLAGS, "--logdir", str(tmp_path), "--T", "40", "--eval-every", "2",
                       "--eval-sampler", "ddim"], capsys)
    assert code == 2 and "--eval-steps must be <= --T (40)" in err
    assert "got 50 (the ddim default; pass --eval-steps)" in err


def test_eval_flags_may_change_on_resume():
    saved = tiny_config("runs/x").to_dict()
    changed = {"run.eval_every": 5, "run.eval_samples": 30, "run.eval_sampler": "ddim", "run.eval_steps": 10,
               "run.inception_weights": "w.pth"}
    assert fixed_option_conflicts(saved, changed) == []


def _image_folder(root):
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), 30 * i + (c == "dogs") * 100, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_on_a_data_set_without_a_feature_network_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CBDM_FAST_INCEPTION", raising=False)
    folder = _image_folder(tmp_path / "images")
    base = [*TINY_FLAGS, "--dataset", "folder", "--data-root", str(folder), "--steps", "2", "--eval-every", "1"]
    code, err = _main([*base, "--logdir", str(tmp_path / "a")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "--eval-every on --dataset folder" in err and "--inception-weights PATH" in err
    # a weights path that does not exist: stopped at the start of the run, before any step
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    code, err = _main([*base, "--logdir", str(tmp_path / "b"), "--inception-weights", str(missing)], capsys)
    assert code == 2 and f"--inception-weights {missing}" in err and "Traceback" not in err
    assert not list((tmp_path / "b").glob("ckpt_*.pt")) and not (tmp_path / "b" / JSONL_NAME).exists()


def test_other_data_sets_are_scored_with_the_inception_network(tmp_path, one_thread):
    """An image folder with a (randomly initialised) FID Inception weights file: 2048-d features, no
    recogniser (no accuracy), the whole folder as reference."""
    from cbdm_fast.evaluation.inception import WEIGHTS_NAME, FIDInceptionV3

    torch.manual_seed(1)
    weights = tmp_path / WEIGHTS_NAME
    torch.save(FIDInceptionV3().state_dict(), weights)
    folder = _image_folder(tmp_path / "images")
    cfg = tiny_config(tmp_path / "run", steps=1, data__dataset="folder", data__root=str(folder),
                      optim__batch_size=4, run__eval_every=1, run__eval_samples=4, run__eval_steps=2,
                      run__inception_weights=str(weights))
    trainer = Trainer(cfg, log=lambda s: None)
    with warnings.catch_warnings():  # not the published file: the loader warns that FIDs will differ
        warnings.simplefilter("ignore")
        trainer.monitor.start_evaluation()
    ev = trainer.monitor.evaluator
    assert ev.num_samples == 4 and ev.num_reference == 10 and ev.ref_feats.shape == (10, 2048)
    metrics = trainer.monitor.evaluate(trainer.step)
    assert math.isfinite(metrics["fid"]) and math.isfinite(metrics["kid"]) and "accuracy" not in metrics
