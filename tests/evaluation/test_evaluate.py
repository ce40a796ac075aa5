"""python -m cbdm_fast.evaluate and its parts: the digits recogniser (feature space), the CLI end to end
on constructed sample files (real digits score well, noise scores badly), error messages for bad input,
the report, downstream recognition, and the FID Inception-v3's state-dict layout.

Everything runs on the CPU in well under a minute: the recogniser is trained once per session into a
temporary cache that every CLI call shares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbdm_fast import evaluate as ev
from cbdm_fast.data import load_digits_lt
from cbdm_fast.evaluation import save_stats
from cbdm_fast.evaluation.digits_classifier import (classifier_predict, digits_classifier, prepare_images,
                                                    train_classifier)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="session")
def recogniser(cache_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return digits_classifier(cache_dir=cache_dir, log=lambda msg: None)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def test_digits():
    return load_digits_lt(split="test")


def write_npz(path, images, labels=None, **extra):
    arrays = {"images": images, **extra}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="session")
def real_npz(tmp_path_factory):
    """Real TRAINING digits (disjoint from the test split the metrics use as reference) as "samples":
    30 per class, labelled."""
    data = load_digits_lt(split="train_full")
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:30] for c in range(10)])
    return write_npz(tmp_path_factory.mktemp("real") / "real.npz", data.images[idx], data.labels[idx],
                     method=np.str_("cfg"), omega=np.float64(1.0))


@pytest.fixture(scope="session")
def noise_npz(tmp_path_factory):
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (300, 16, 16, 1), dtype=np.uint8)
    return write_npz(tmp_path_factory.mktemp("noise") / "noise.npz", images, np.repeat(np.arange(10), 30))


def run_cli(cache_dir, *args):
    return ev.main(["--cache-dir", str(cache_dir), "--quiet", "--prd-runs", "2", "--kid-subsets", "20", *args])


# ------------------------------------------------------------------------------------------ recogniser

def test_recogniser_recognises_real_test_digits(recogniser, test_digits):
    feats, probs = classifier_predict(recogniser, test_digits.images)
    acc = float((probs.argmax(1) == test_digits.labels).mean())
    assert acc > 0.9, acc
    assert feats.shape == (len(test_digits), 64) and feats.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0)
    # every class, tail included, is recognised
    per_class = [(probs.argmax(1)[test_digits.labels == c] == c).mean() for c in range(10)]
    assert min(per_class) > 0.75, per_class


def test_recogniser_is_cached_and_training_is_deterministic(recogniser, cache_dir):
    files = list(Path(cache_dir).glob("digits_cnn_v*.pt"))
    assert len(files) == 1
    again = digits_classifier(cache_dir=cache_dir, log=lambda msg: pytest.fail(f"retrained: {msg}"))
    for k, v in recogniser.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # same seed, same weights; another seed, other weights
    data = load_digits_lt(split="train_full")
    a = train_classifier(data.images[:200], data.labels[:200], 10, seed=3, steps=15)
    b = train_classifier(data.images[:200], data.labels[:200], 10, seed=3, steps=15)
    c = train_classifier(data.images[:200], data.labels[:200], 10, seed=4, steps=15)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.fc2.weight, c.fc2.weight)


def test_recogniser_cache_survives_a_torn_file(tmp_path):
    model = digits_classifier(cache_dir=tmp_path, steps=5, log=lambda msg: None)
    (path,) = tmp_path.glob("digits_cnn_v*.pt")
    path.write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable classifier cache"):
        again = digits_classifier(cache_dir=tmp_path, steps=5, log=lambda msg: None)
    assert torch.equal(model.fc2.weight, again.fc2.weight)


def test_prepare_images_resizes_consistently():
    digits32 = load_digits_lt(split="test", image_size=32)
    digits16 = load_digits_lt(split="test", image_size=16)
    x = prepare_images(digits32.images[:20], 16)
    assert x.shape == (20, 1, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
    ref = prepare_images(digits16.images[:20], 16)
    assert float((x - ref).abs().mean()) < 0.1  # 32 -> 16 lands close to the native 16x16 digits


# ------------------------------------------------------------------------------------------ CLI

def test_cli_scores_real_digits_well_and_noise_badly(cache_dir, real_npz, noise_npz, tmp_path, capsys):
    out_real, out_noise = tmp_path / "real.json", tmp_path / "noise.json"
    assert run_cli(cache_dir, "--samples", str(real_npz), "--json", str(out_real),
                   "--report", str(tmp_path / "report")) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "per class" in printed and "many" in printed
    assert run_cli(cache_dir, "--samples", str(noise_npz), "--json", str(out_noise)) == 0
    real, noise = json.loads(out_real.read_text()), json.loads(out_noise.read_text())

    for res in (real, noise):
        m = res["metrics"]["overall"]
        for key in ("fid", "kid", "inception_score", "precision", "recall", "prd", "recognition_accuracy"):
            assert key in m, key
        assert set(m["prd"]) >= {"f_8", "f_1_8", "num_clusters"}
        assert set(res["metrics"]["groups"]) == {"many", "medium", "few", "all"}
        assert len(res["metrics"]["per_class"]) == 10
        assert set(res["metrics"]["per_class"][0]) >= {"class", "train_count", "group", "fid", "precision",
                                                       "recall", "accuracy", "num_samples", "num_real"}
    # digits-LT counts 140, 108, 83, ..., 18, 14 with the default thresholds: many = 0, 1 (> 100), few = 8, 9 (< 20)
    assert real["train_counts"][0] == 140 and real["train_counts"][9] == 14
    groups = real["groups"]
    assert groups == {"many": [0, 1], "medium": [2, 3, 4, 5, 6, 7], "few": [8, 9]}
    assert sorted(groups["many"] + groups["medium"] + groups["few"]) == list(range(10))
    assert real["reference"]["num_images"] == len(load_digits_lt(split="test"))
    assert real["sample_meta"]["method"] == "cfg"

    rm, nm = real["metrics"]["overall"], noise["metrics"]["overall"]
    assert rm["recognition_accuracy"] > 0.9 and nm["recognition_accuracy"] < 0.35
    assert rm["fid"] < nm["fid"] / 10, (rm["fid"], nm["fid"])
    assert rm["kid"]["mean"] < nm["kid"]["mean"]
    assert rm["precision"] > 0.6 and rm["recall"] > 0.6 and nm["precision"] < 0.1
    assert rm["inception_score"]["mean"] > 7 and rm["inception_score"]["splits"] == 10
    assert rm["prd"]["f_8"] > nm["prd"]["f_8"] and rm["prd"]["f_1_8"] > nm["prd"]["f_1_8"]
    for row in real["metrics"]["per_class"]:
        assert row["fid"] is not None and row["accuracy"] > 0.6, row
    assert real["metrics"]["groups"]["few"]["accuracy"] > 0.8

    report = tmp_path / "report"
    md = (report / "report.md").read_text()
    for name in ("per_class.png", "per_class_fid.png", "grid.png"):
        assert name in md
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.width > 100
    assert "| FID |" in md or "| FID" in md


def test_cli_too_few_samples_per_class_gives_null_and_a_note(cache_dir, tmp_path, capsys):
    data = load_digits_lt(split="train_full")
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:12] for c in range(9)]
                         + [np.flatnonzero(data.labels == 9)[:1]])  # class 9: one sample
    path = write_npz(tmp_path / "few.npz", data.images[idx], data.labels[idx])
    out = tmp_path / "few.json"
    assert run_cli(cache_dir, "--samples", str(path), "--json", str(out)) == 0
    res = json.loads(out.read_text())
    row9 = res["metrics"]["per_class"][9]
    assert row9["fid"] is None and row9["recall"] is None and row9["num_samples"] == 1
    assert res["metrics"]["per_class"][0]["fid"] is not None
    assert any("class(es) 9 (1 generated" in n for n in res["metrics"]["notes"])
    assert "note:" in capsys.readouterr().out


def test_cli_unlabelled_samples(cache_dir, tmp_path):
    data = load_digits_lt(split="train_full")
    path = write_npz(tmp_path / "uncond.npz", data.images[:200], np.full(200, -1))
    out = tmp_path / "u.json"
    save_stats(tmp_path / "stats.npz", np.zeros(64), np.eye(64))
    assert run_cli(cache_dir, "--samples", str(path), "--json", str(out), "--report", str(tmp_path / "r"),
                   "--fid-stats", str(tmp_path / "stats.npz")) == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["overall"]["fid_vs_stats"] > 0
    assert res["labelled"] is False and res["metrics"]["per_class"] == []
    assert res["metrics"]["overall"]["fid"] is not None and res["metrics"]["overall"]["recognition_accuracy"] is None
    assert (tmp_path / "r" / "grid.png").is_file()


def test_cli_downstream(cache_dir, real_npz, noise_npz, tmp_path):
    out = tmp_path / "d.json"
    assert run_cli(cache_dir, "--samples", str(real_npz), "--json", str(out), "--downstream",
                   "--downstream-steps", "150") == 0
    ds = json.loads(out.read_text())["downstream"]
    assert ds["accuracy"] > 0.8, ds
    assert set(ds["groups"]) == {"many", "medium", "few", "all"} and len(ds["per_class"]) == 10
    assert ds["num_test_real"] == len(load_digits_lt(split="test"))
    assert run_cli(cache_dir, "--samples", str(noise_npz), "--json", str(out), "--downstream",
                   "--downstream-steps", "150") == 0
    assert json.loads(out.read_text())["downstream"]["accuracy"] < 0.4


# ------------------------------------------------------------------------------------------ errors

def cli_error(cache_dir, capsys, *args) -> str:
    assert run_cli(cache_dir, *args) == 2
    return capsys.readouterr().err


def test_error_messages(cache_dir, tmp_path, capsys):
    digits = load_digits_lt(split="test")
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "nope.npz"))
    assert "samples file not found" in err and "nope.npz" in err

    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip archive at all")
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "garbage.npz"))
    assert "cannot read" in err and "garbage.npz" in err

    good = write_npz(tmp_path / "good.npz", digits.images[:50], digits.labels[:50])
    raw = good.read_bytes()
    (tmp_path / "torn.npz").write_bytes(raw[:len(raw) // 2])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "torn.npz"))
    assert "cannot read" in err and "torn.npz" in err

    np.savez(tmp_path / "noimages.npz", pictures=digits.images[:3])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "noimages.npz"))
    assert "no 'images' array" in err

    labels = digits.labels[:50].copy()
    labels[7] = 10
    write_npz(tmp_path / "badlabel.npz", digits.images[:50], labels)
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "badlabel.npz"))
    assert "label 10 at index 7 is out of range" in err and "0..9" in err

    big = load_digits_lt(split="test", image_size=32)
    write_npz(tmp_path / "big.npz", big.images[:50], big.labels[:50])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "big.npz"))
    assert "32x32" in err and "16x16" in err and "--image-size 32" in err

    write_npz(tmp_path / "rgb.npz", np.repeat(digits.images[:50], 3, axis=3), digits.labels[:50])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "rgb.npz"))
    assert "3 channel" in err

    write_npz(tmp_path / "float.npz", digits.images[:50].astype(np.float32), digits.labels[:50])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "float.npz"))
    assert "float32" in err and "uint8" in err

    write_npz(tmp_path / "short.npz", digits.images[:50], digits.labels[:40])
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "short.npz"))
    assert "50 images but 40 labels" in err

    write_npz(tmp_path / "uncond.npz", digits.images[:50], np.full(50, -1))
    err = cli_error(cache_dir, capsys, "--samples", str(tmp_path / "uncond.npz"), "--downstream")
    assert "--downstream needs labelled samples" in err

    save_stats(tmp_path / "stats10.npz", np.zeros(10), np.eye(10))
    err = cli_error(cache_dir, capsys, "--samples", str(good), "--fid-stats", str(tmp_path / "stats10.npz"))
    assert "10-d statistics" in err and "64-d" in err

    with pytest.raises(SystemExit):
        ev.main(["--samples", str(good), "--groups-few", "200"])
    assert "--groups-few" in capsys.readouterr().err


def test_cli_scales_to_a_32px_model_with_image_size(cache_dir, tmp_path):
    big = load_digits_lt(split="train_full", image_size=32)
    idx = np.concatenate([np.flatnonzero(big.labels == c)[:15] for c in range(10)])
    path = write_npz(tmp_path / "big.npz", big.images[idx], big.labels[idx])
    out = tmp_path / "big.json"
    assert run_cli(cache_dir, "--samples", str(path), "--image-size", "32", "--json", str(out)) == 0
    res = json.loads(out.read_text())
    assert res["image_size"] == 32 and res["metrics"]["overall"]["recognition_accuracy"] > 0.85


def test_inception_features_need_the_weights_file(cache_dir, real_npz, tmp_path, capsys, monkeypatch):
    from cbdm_fast.evaluation.inception import WEIGHTS_NAME, WEIGHTS_URL

    monkeypatch.delenv("CBDM_FAST_INCEPTION", raising=False)
    err = cli_error(cache_dir, capsys, "--samples", str(real_npz), "--features", "inception")
    assert WEIGHTS_NAME in err and "pytorch-fid" in err and WEIGHTS_URL in err
    err = cli_error(cache_dir, capsys, "--samples", str(real_npz), "--features", "inception",
                    "--inception-weights", str(tmp_path))
    assert "not found" in err and str(tmp_path / WEIGHTS_NAME) in err


def test_module_entry_point_runs(cache_dir, real_npz, tmp_path):
    out = tmp_path / "m.json"
    result = subprocess.run([sys.executable, "-m", "cbdm_fast.evaluate", "--samples", str(real_npz),
                             "--cache-dir", str(cache_dir), "--json", str(out), "--prd-runs", "0",
                             "--kid-subsets", "5", "--quiet"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "recognised as its label" in result.stdout
    assert json.loads(out.read_text())["metrics"]["overall"]["prd"]["f_8"] is None


# ------------------------------------------------------------------------------------------ --ckpt

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An (untrained) tiny digits checkpoint, T = 20, as tests/sampling/test_sample.py builds them."""
    from cbdm_fast.training import Trainer
    from train_helpers import tiny_config

    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("ckpt"), diffusion__T=20), log=lambda s: None)
    return trainer.save_checkpoint()


def without_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("seconds", "samples")}


def test_cli_ckpt_samples_beside_the_checkpoint_then_evaluates(cache_dir, tiny_ckpt, tmp_path, capsys):
    assert run_cli(cache_dir, "--ckpt", str(tiny_ckpt), "--per-class", "3", "--omega", "1", "--device", "cpu",
                   "--sample-batch-size", "16") == 0
    npz = tiny_ckpt.parent / f"{tiny_ckpt.stem}_samples_cfg_w1_pc3_seed0.npz"
    assert npz.is_file() and npz.with_suffix(".png").is_file()
    printed = capsys.readouterr().out
    assert f"wrote {npz.with_name(npz.stem + '.eval.json')}" in printed
    assert "sampling 30 images" not in printed  # the sampler's chatter stays off stdout (and --quiet drops it)
    res = json.loads(npz.with_name(npz.stem + ".eval.json").read_text())
    assert res["num_samples"] == 30 and res["samples_per_class"] == [3] * 10
    meta = res["sample_meta"]
    assert (meta["ckpt"], meta["method"], meta["omega"], meta["seed"]) == (str(tiny_ckpt), "cfg", 1.0, 0)
    # evaluated exactly as --samples evaluates that file
    again = tmp_path / "again.json"
    assert run_cli(cache_dir, "--samples", str(npz), "--json", str(again)) == 0
    assert without_timing(json.loads(again.read_text())) == without_timing(res)


def test_cli_ckpt_passes_the_sampling_flags_through(cache_dir, tiny_ckpt, tmp_path):
    out = tmp_path / "sub" / "s.npz"
    assert run_cli(cache_dir, "--ckpt", str(tiny_ckpt), "--num-samples", "12", "--sampler", "ddim", "--steps", "4",
                   "--method", "cond", "--seed", "3", "--device", "cpu", "--samples-out", str(out)) == 0
    with np.load(out) as f:
        assert f["images"].shape == (12, 16, 16, 1) and f["labels"].shape == (12,)
        assert (str(f["sampler"]), int(f["steps"]), str(f["method"]), int(f["seed"])) == ("ddim", 4, "cond", 3)
    res = json.loads((tmp_path / "sub" / "s.eval.json").read_text())
    assert res["num_samples"] == 12 and res["settings"]["seed"] == 3


def test_cli_ckpt_with_the_dpm_solver(cache_dir, tiny_ckpt, tmp_path):
    """evaluate --ckpt --sampler dpm++2m --steps N [--schedule logsnr] samples with DPM-Solver++, then evaluates."""
    assert run_cli(cache_dir, "--ckpt", str(tiny_ckpt), "--per-class", "2", "--omega", "1", "--sampler", "dpm++2m",
                   "--steps", "4", "--schedule", "logsnr", "--device", "cpu") == 0
    npz = tiny_ckpt.parent / f"{tiny_ckpt.stem}_samples_cfg_w1_pc2_dpm++2m4_logsnr_seed0.npz"
    with np.load(npz) as f:
        assert (str(f["sampler"]), int(f["steps"]), str(f["schedule"])) == ("dpm++2m", 4, "logsnr")
    assert json.loads(npz.with_name(npz.stem + ".eval.json").read_text())["num_samples"] == 20


def test_ckpt_flags_become_the_sampling_request(tmp_path):
    """evaluate --ckpt hands the sampling library a SampleRequest (no argv): the sampling flags given,
    evaluate's --seed and --device, the job's own defaults for the rest, quiet without a progress bar."""
    from cbdm_fast.evaluation.sampling import sample_request
    from cbdm_fast.sampling import SampleRequest

    ckpt = tmp_path / "ckpt_9.pt"
    args = ev.build_parser().parse_args(["--ckpt", str(ckpt), "--per-class", "3", "--seed", "4", "--quiet"])
    assert sample_request(args) == SampleRequest(
        ckpt=str(ckpt), per_class=3, seed=4, progress=False, out=str(tmp_path / "ckpt_9_samples_cfg_w0_pc3_seed4.npz"))
    args = ev.build_parser().parse_args(["--ckpt", str(ckpt), "--num-samples", "5", "--method", "cond", "--omega",
                                         "1.5", "--sampler", "ddim", "--steps", "7", "--sample-batch-size", "9",
                                         "--device", "cpu", "--samples-out", str(tmp_path / "s.npz")])
    r = sample_request(args)
    assert (r.num_samples, r.method, r.omega, r.sampler, r.steps, r.batch_size, r.device, r.out, r.progress) == (
        5, "cond", 1.5, "ddim", 7, 9, "cpu", str(tmp_path / "s.npz"), True)
    args = ev.build_parser().parse_args(["--ckpt", str(ckpt), "--per-class", "3", "--sampler", "dpm++2m", "--steps",
                                         "20", "--schedule", "logsnr"])
    r = sample_request(args)
    assert (r.sampler, r.steps, r.spacing) == ("dpm++2m", 20, "logsnr")
    assert r.out == str(tmp_path / "ckpt_9_samples_cfg_w0_pc3_dpm++2m20_logsnr_seed0.npz")


def test_cli_ckpt_errors(cache_dir, tiny_ckpt, tmp_path, capsys):
    def parser_error(*args):
        with pytest.raises(SystemExit) as exc:
            ev.main(list(args))
        assert exc.value.code == 2
        return capsys.readouterr().err

    assert "one of the arguments --samples --ckpt --write-ref-stats is required" in parser_error("--per-class", "1")
    assert "not allowed with argument" in parser_error("--samples", "a.npz", "--ckpt", "b.pt", "--per-class", "1")
    assert "--per-class is a sampling flag: it needs --ckpt" in parser_error("--samples", "a.npz", "--per-class", "1")
    assert "--omega, --samples-out are sampling flags: they need --ckpt" in parser_error(
        "--samples", "a.npz", "--omega", "1", "--samples-out", "b.npz")
    assert "--ckpt needs exactly one of --per-class N and --num-samples N" in parser_error("--ckpt", str(tiny_ckpt))
    assert "(not both)" in parser_error("--ckpt", "b.pt", "--per-class", "1", "--num-samples", "3")
    assert "--per-class must be >= 1" in parser_error("--ckpt", "b.pt", "--per-class", "0")
    assert "--omega must be a finite number >= 0" in parser_error("--ckpt", "b.pt", "--per-class", "1",
                                                                  "--omega", "-1")
    assert "--schedule applies to --sampler dpm++2m only (got --schedule logsnr with --sampler ddpm)" in parser_error(
        "--ckpt", "b.pt", "--per-class", "1", "--schedule", "logsnr")
    assert "--schedule is a sampling flag: it needs --ckpt" in parser_error("--samples", "a.npz", "--schedule", "time")
    assert "argument --schedule: invalid choice" in parser_error("--ckpt", "b.pt", "--per-class", "1", "--sampler",
                                                                 "dpm++2m", "--schedule", "quadratic")
    assert "--steps must be >= 1" in parser_error("--ckpt", "b.pt", "--per-class", "1", "--sampler", "dpm++2m",
                                                  "--steps", "0")
    # the sampler's own refusals: exit 2, its message, then ours; nothing is evaluated
    out = tmp_path / "s.npz"
    err = cli_error(cache_dir, capsys, "--ckpt", str(tiny_ckpt), "--per-class", "1", "--steps", "5",
                    "--device", "cpu", "--samples-out", str(out))
    assert "--sampler ddpm always runs all T = 20 steps" in err
    assert f"sampling from --ckpt {tiny_ckpt} failed (python -m cbdm_fast.sample exit status 2" in err
    assert not out.exists() and not list(tmp_path.glob("*.json"))
    err = cli_error(cache_dir, capsys, "--ckpt", str(tiny_ckpt), "--per-class", "1", "--sampler", "dpm++2m",
                    "--steps", "6", "--schedule", "logsnr", "--device", "cpu", "--samples-out", str(out))
    assert "--steps 6 with --schedule logsnr" in err and "at most 5 steps" in err and not out.exists()
    err = cli_error(cache_dir, capsys, "--ckpt", str(tmp_path / "nope.pt"), "--per-class", "1", "--device", "cpu")
    assert "checkpoint not found" in err and "nope.pt" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ Inception

def _conv(prefix, cin, cout, k):
    kh, kw = (k, k) if isinstance(k, int) else k
    return [(f"{prefix}.conv.weight", (cout, cin, kh, kw))] + [
        (f"{prefix}.bn.{n}", (cout,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.bn.num_batches_tracked", ())]


def _block_a(name, cin, pool):
    return (_conv(f"{name}.branch1x1", cin, 64, 1) + _conv(f"{name}.branch5x5_1", cin, 48, 1)
            + _conv(f"{name}.branch5x5_2", 48, 64, 5) + _conv(f"{name}.branch3x3dbl_1", cin, 64, 1)
            + _conv(f"{name}.branch3x3dbl_2", 64, 96, 3) + _conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
            + _conv(f"{name}.branch_pool", cin, pool, 1))


def _block_c(name, c7):
    return (_conv(f"{name}.branch1x1", 768, 192, 1) + _conv(f"{name}.branch7x7_1", 768, c7, 1)
            + _conv(f"{name}.branch7x7_2", c7, c7, (1, 7)) + _conv(f"{name}.branch7x7_3", c7, 192, (7, 1))
            + _conv(f"{name}.branch7x7dbl_1", 768, c7, 1) + _conv(f"{name}.branch7x7dbl_2", c7, c7, (7, 1))
            + _conv(f"{name}.branch7x7dbl_3", c7, c7, (1, 7)) + _conv(f"{name}.branch7x7dbl_4", c7, c7, (7, 1))
            + _conv(f"{name}.branch7x7dbl_5", c7, 192, (1, 7)) + _conv(f"{name}.branch_pool", 768, 192, 1))


def _block_e(name, cin):
    return (_conv(f"{name}.branch1x1", cin, 320, 1) + _conv(f"{name}.branch3x3_1", cin, 384, 1)
            + _conv(f"{name}.branch3x3_2a", 384, 384, (1, 3)) + _conv(f"{name}.branch3x3_2b", 384, 384, (3, 1))
            + _conv(f"{name}.branch3x3dbl_1", cin, 448, 1) + _conv(f"{name}.branch3x3dbl_2", 448, 384, 3)
            + _conv(f"{name}.branch3x3dbl_3a", 384, 384, (1, 3))
            + _conv(f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)) + _conv(f"{name}.branch_pool", cin, 192, 1))


def expected_fid_inception_layout() -> dict:
    """The key -> shape table of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 names,
    1008 classes, no AuxLogits), written out from the architecture."""
    rows = (_conv("Conv2d_1a_3x3", 3, 32, 3) + _conv("Conv2d_2a_3x3", 32, 32, 3) + _conv("Conv2d_2b_3x3", 32, 64, 3)
            + _conv("Conv2d_3b_1x1", 64, 80, 1) + _conv("Conv2d_4a_3x3", 80, 192, 3)
            + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
            + _conv("Mixed_6a.branch3x3", 288, 384, 3) + _conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
            + _conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3) + _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
            + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160)
            + _block_c("Mixed_6e", 192)
            + _conv("Mixed_7a.branch3x3_1", 768, 192, 1) + _conv("Mixed_7a.branch3x3_2", 192, 320, 3)
            + _conv("Mixed_7a.branch7x7x3_1", 768, 192, 1) + _conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7))
            + _conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)) + _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
            + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048)
            + [("fc.weight", (1008, 2048)), ("fc.bias", (1008,))])
    return dict(rows)


@pytest.fixture(scope="module")
def inception():
    from cbdm_fast.evaluation.inception import FIDInceptionV3

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FIDInceptionV3().eval()


def test_fid_inception_state_dict_matches_the_published_layout(inception):
    expected = expected_fid_inception_layout()
    got = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert set(got) == set(expected), (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not bad, bad
    assert got["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert got["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert not any(k.startswith("AuxLogits") for k in got)
    n_params = sum(p.numel() for p in inception.parameters())
    assert n_params == 23_850_960  # torchvision's Inception3 without AuxLogits, 1008 classes


def test_fid_inception_forward_and_loading(inception, tmp_path):
    from cbdm_fast.evaluation.inception import (FIDInceptionV3, InceptionWeightsError, load_fid_inception,
                                                load_inception_state)

    with torch.no_grad():
        pool, logits = inception(torch.rand(1, 3, 32, 32))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008) and bool((pool >= 0).all())
    # the Inception Score's logits leave out the fc bias (#15): pool @ W^T, whatever the bias holds
    torch.testing.assert_close(logits, pool @ inception.fc.weight.T)
    assert float(inception.fc.bias.abs().max()) > 0  # so the check above could fail
    # the TF graph's pools: E_1 averages without the padding, E_2 takes the max
    assert inception.Mixed_7b.pool == "avg" and inception.Mixed_7c.pool == "max"

    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = load_inception_state(FIDInceptionV3(), state)
    assert torch.equal(fresh.Mixed_7c.branch_pool.conv.weight, inception.Mixed_7c.branch_pool.conv.weight)
    broken = dict(state)
    del broken["Mixed_6e.branch7x7_2.conv.weight"]
    broken["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(InceptionWeightsError, match=r"missing .*Mixed_6e.branch7x7_2.conv.weight.*wrong shape"):
        load_inception_state(FIDInceptionV3(), broken)
    bad_file = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"foo": torch.zeros(2)}, bad_file)
    with pytest.warns(UserWarning, match="SHA-256"), pytest.raises(InceptionWeightsError, match="missing"):
        load_fid_inception(tmp_path)
    bad_file.write_bytes(np.random.default_rng(1).bytes(4096))  # #17 point 8: random bytes
    with pytest.warns(UserWarning, match="SHA-256"), pytest.raises(InceptionWeightsError) as ei:
        load_fid_inception(tmp_path)
    assert "is not a PyTorch weights file" in str(ei.value) and "weights_only" not in str(ei.value)


def test_inception_features_from_a_weights_file(inception, tmp_path, monkeypatch):
    from cbdm_fast.evaluation.features import InceptionFeatures
    from cbdm_fast.evaluation.inception import WEIGHTS_NAME

    torch.save(inception.state_dict(), tmp_path / WEIGHTS_NAME)  # random weights, the published layout
    monkeypatch.setenv("CBDM_FAST_INCEPTION", str(tmp_path))  # the folder holding the file
    with pytest.warns(UserWarning, match="SHA-256"):  # not the published file
        extractor = InceptionFeatures(batch_size=1)
    grey = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    feats, probs = extractor(grey)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    assert np.allclose(probs.sum(1), 1.0) and (feats >= 0).all()
    rgb, _ = extractor(np.repeat(grey, 3, axis=3))
    np.testing.assert_allclose(rgb, feats, rtol=1e-5, atol=1e-6)  # grey is replicated to RGB


def test_write_ref_stats_round_trips_through_fid_stats(cache_dir, recogniser, test_digits, tmp_path, capsys):
    """--write-ref-stats writes mu/sigma of the reference set; scoring those very images with
    --fid-stats against the file gives FID 0, and the file has the pytorch-fid layout."""
    stats = tmp_path / "ref" / "digits_test_stats.npz"
    assert run_cli(cache_dir, "--write-ref-stats", str(stats)) == 0
    assert f"wrote {stats}: mu (64,), sigma (64, 64)" in capsys.readouterr().out
    with np.load(stats) as f:
        assert sorted(f.files) == ["mu", "sigma"] and f["mu"].dtype == np.float64
        assert np.allclose(f["sigma"], f["sigma"].T)
    same = write_npz(tmp_path / "same.npz", test_digits.images, test_digits.labels)
    out = tmp_path / "same.json"
    assert run_cli(cache_dir, "--samples", str(same), "--json", str(out), "--fid-stats", str(stats)) == 0
    overall = json.loads(out.read_text())["metrics"]["overall"]
    assert abs(overall["fid_vs_stats"]) < 1e-6 and abs(overall["fid"]) < 1e-6


def test_write_ref_stats_errors_are_named(cache_dir, tmp_path, capsys):
    assert run_cli(cache_dir, "--write-ref-stats", str(tmp_path / "s.npz"), "--dataset", "folderlt",
                   "--data-root", str(tmp_path)) == 2
    assert "--write-ref-stats with --dataset folderlt needs --image-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--write-ref-stats", str(tmp_path / "s.npz"), "--samples", "x.npz"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_report_plots_the_training_runs_losses_and_evaluations(cache_dir, recogniser, test_digits, tmp_path):
    """--report finds the run folder from the checkpoint recorded in the samples file and draws its
    loss curves (TensorBoard log, a resumed run's repeated steps de-duplicated) and eval.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    from cbdm_fast.evaluation.run_log import eval_curves, loss_curves
    run = tmp_path / "run"
    for k, (first, last) in enumerate(((1, 6), (4, 8))):  # a run resumed at step 4 logs steps 4..5 again
        before = set(run.glob("events.out.tfevents.*"))
        w = SummaryWriter(str(run))
        for step in range(first, last + 1):
            for tag in ("train/loss", "train/loss_ddpm", "train/loss_reg"):
                w.add_scalar(tag, 1.0 / step + (0.5 if first == 4 else 0.0), step)
        w.close()
        # the writer counter ends the file name and is not zero-padded: ".9" then ".10" sort the other way
        (newest,) = set(run.glob("events.out.tfevents.*")) - before
        newest.rename(newest.with_name(newest.name.rsplit(".", 1)[0] + (".9" if k == 0 else ".10")))
    (run / "eval.jsonl").write_text('{"step": 4, "fid": 2.0, "recall": 0.5}\n{"step": 8, "fid": 1.0, "re')
    losses = loss_curves(run)
    assert losses["train/loss"][0] == list(range(1, 9))
    assert losses["train/loss"][1][3] == pytest.approx(0.25 + 0.5)  # step 4: the resumed run's value
    assert eval_curves(run) == {"fid": ([4], [2.0]), "recall": ([4], [0.5])}  # the torn last line is skipped

    samples = write_npz(tmp_path / "s.npz", test_digits.images[:100], test_digits.labels[:100],
                        ckpt=np.str_(str(run / "ckpt_8.pt")))
    assert run_cli(cache_dir, "--samples", str(samples), "--json", str(tmp_path / "s.json"),
                   "--report", str(tmp_path / "rep")) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![training losses" in md and "losses.png" in md and "eval_during_training.png" in md
    for name in ("losses.png", "eval_during_training.png"):
        with Image.open(tmp_path / "rep" / name) as im:
            assert im.size[0] > 100 and len(np.unique(np.asarray(im.convert("L")))) > 2  # something was drawn
    with pytest.raises(SystemExit):
        ev.main(["--samples", str(samples), "--run-dir", str(tmp_path / "nowhere")])
