"""python -m cbdm_fast.sample end to end: our checkpoints and the authors' ckpt + flagfile.txt,
the .npz and PNG outputs, reproducibility, label protocols, and every user error (exit 2, no traceback).
Tiny models (ch 32, ch_mult 1 2, T = 20, 8x8 or 16x16 images), run through main(argv) in-process."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbdm_fast.files.models import load_model
from cbdm_fast.model import UNet
from cbdm_fast.sample import main
from cbdm_fast.samplers import uniform_labels
from sample_helpers import shard_writes
from train_helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
T = 20
FLAGFILE = """--attn=1
--batch_size=48
--beta_1=0.0001
--beta_T=0.02
--ch=32
--ch_mult=1
--ch_mult=2
--{cond}conditional
--data_type={data_type}
--dropout=0.1
--img_size=8
--noaugm
--num_res_blocks=1
--T=20
--var_type=fixedlarge
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our checkpoint of a tiny CBDM model on the built-in digits (10 classes, 1x16x16)."""
    from cbdm_fast.training import Trainer

    logdir = tmp_path_factory.mktemp("ours")
    trainer = Trainer(tiny_config(logdir, diffusion__T=T), log=lambda s: None)
    return trainer.save_checkpoint()


def write_authors(folder: Path, cond=True, data_type="cifar10lt", flagfile=True, seed=0) -> Path:
    """A tiny model saved as the authors' main.py saves it, with their absl flagfile.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = UNet(T=T, ch=32, ch_mult=[1, 2], attn=[1], num_res_blocks=1, dropout=0.1, cond=cond, augm=False,
                 num_class=10, in_ch=3)
    with torch.no_grad():  # make eps depend visibly on the label
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = {"net_model": model.state_dict(), "ema_model": model.state_dict(), "sched": {}, "optim": {},
            "step": 20, "fixed_x_T": torch.randn(4, 3, 8, 8)}
    path = folder / "ckpt.pt"
    torch.save(ckpt, path)
    if flagfile:
        (folder / "flagfile.txt").write_text(FLAGFILE.format(cond="" if cond else "no", data_type=data_type))
    return path


@pytest.fixture(scope="module")
def authors(tmp_path_factory):
    return write_authors(tmp_path_factory.mktemp("authors"))


def run_ok(*argv):
    assert main([str(a) for a in argv] + ["--no-progress"]) == 0


def run_error(capsys, *argv, parser=False):
    """main must fail with exit status 2 and one `error: ...` message; returns stderr."""
    argv = [str(a) for a in argv] + ["--no-progress"]
    if parser:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    else:
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def grid_size(n_rows, n_cols, size, upscale, padding=2):
    return ((n_cols * (size + padding) + padding) * upscale, (n_rows * (size + padding) + padding) * upscale)


def load_npz(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------ outputs
def test_our_checkpoint_per_class(ours, tmp_path):
    out = tmp_path / "s" / "per_class.npz"
    run_ok("--ckpt", ours, "--per-class", 3, "--omega", 1.6, "--batch-size", 8, "--out", out)
    d = load_npz(out)
    assert d["images"].dtype == np.uint8 and d["images"].shape == (30, 16, 16, 1)
    assert d["labels"].dtype == np.int64 and d["labels"].tolist() == [c for c in range(10) for _ in range(3)]
    assert float(d["omega"]) == 1.6 and str(d["method"]) == "cfg"
    assert str(d["var_type"]) == "fixedlarge" and not bool(d["clip_x0"]) and int(d["seed"]) == 0
    png = out.with_suffix(".png")  # one row per class, per_class images per row, 16 px upscaled 2x
    assert Image.open(png).size == grid_size(10, 3, 16, upscale=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["per_class.npz", "per_class.png"]  # no temp files


def test_authors_checkpoint_with_flagfile_and_default_paths(authors):
    run_ok("--ckpt", authors, "--per-class", 2, "--omega", 1.6, "--batch-size", 7)
    out = authors.parent / "samples_cfg_w1.6_20.npz"
    d = load_npz(out)
    assert d["images"].shape == (20, 8, 8, 3) and d["images"].dtype == np.uint8
    assert np.bincount(d["labels"], minlength=10).tolist() == [2] * 10
    assert Image.open(out.with_suffix(".png")).size == grid_size(10, 2, 8, upscale=4)
    assert d["images"].std() > 0


def test_same_seed_same_images_other_seed_other_images(authors, tmp_path):
    outs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        outs[name] = tmp_path / f"{name}.npz"
        run_ok("--ckpt", authors, "--per-class", 1, "--omega", 1.0, "--batch-size", 4, "--seed", seed,
               "--out", outs[name], "--grid", tmp_path / f"{name}_grid.png")
    a, b, c = (load_npz(outs[k])["images"] for k in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (tmp_path / "a_grid.png").exists()


def test_uniform_labels_protocol(authors, tmp_path):
    out = tmp_path / "u.npz"
    run_ok("--ckpt", authors, "--num-samples", 13, "--method", "cond", "--batch-size", 13, "--seed", 3,
           "--out", out)
    d = load_npz(out)
    assert d["images"].shape == (13, 8, 8, 3) and d["labels"].shape == (13,) and d["labels"].dtype == np.int64
    expected = uniform_labels(13, 10, generator=torch.Generator().manual_seed(3))  # i.i.d. uniform, from --seed
    assert d["labels"].tolist() == expected.tolist()
    assert str(d["method"]) == "cond" and float(d["omega"]) == 0.0
    # grid: the first 100 images sorted by label, 10 per row
    assert Image.open(out.with_suffix(".png")).size == grid_size(2, 10, 8, upscale=4)


def test_uncond_labels_are_minus_one(tmp_path):
    ckpt = write_authors(tmp_path / "u", cond=False)
    out = tmp_path / "uncond.npz"
    run_ok("--ckpt", ckpt, "--method", "uncond", "--num-samples", 5, "--clip-x0", "--var-type", "fixedsmall",
           "--out", out)
    d = load_npz(out)
    assert d["images"].shape == (5, 8, 8, 3) and d["labels"].tolist() == [-1] * 5
    assert str(d["method"]) == "uncond" and bool(d["clip_x0"]) and str(d["var_type"]) == "fixedsmall"


def test_authors_checkpoint_with_model_flags_instead_of_flagfile(tmp_path):
    ckpt = write_authors(tmp_path / "noflags", flagfile=False)
    out = tmp_path / "flags.npz"
    run_ok("--ckpt", ckpt, "--ch", 32, "--ch-mult", 1, 2, "--attn", 1, "--num-res-blocks", 1, "--T", T,
           "--image-size", 8, "--per-class", 1, "--which", "model", "--backend", "reference", "--out", out)
    d = load_npz(out)
    assert d["images"].shape == (10, 8, 8, 3) and str(d["which"]) == "model"


def test_load_model_reports_its_configuration(ours, authors):
    model, info = load_model(ours)
    assert info["format"] == "ours" and info["image_size"] == 16 and model.config["T"] == T
    assert not model.training and model.label_embedding is not None
    model, info = load_model(authors, which="model")
    assert info["format"] == "authors" and "flagfile" in info["source"] and info["image_size"] == 8
    assert model.num_class == 10 and model.config["ch_mult"] == [1, 2]


# ------------------------------------------------------------------------------------- errors
def test_missing_checkpoint(capsys, tmp_path):
    err = run_error(capsys, "--ckpt", tmp_path / "nope.pt", "--per-class", 1)
    assert "not found" in err and "nope.pt" in err


def test_corrupt_checkpoint(capsys, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert "corrupt" in run_error(capsys, "--ckpt", bad, "--per-class", 1)


def test_out_onto_an_existing_folder_fails_before_sampling(capsys, authors, tmp_path, monkeypatch):
    """Refused before the model is loaded: no shards under a name a corrected --out would not find."""
    import cbdm_fast.sampling.job as job

    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = tmp_path / "out"
    (folder / "kept.txt").parent.mkdir()
    (folder / "kept.txt").write_text("mine")
    beside = sorted(p.name for p in authors.parent.iterdir())
    err = run_error(capsys, "--ckpt", authors, "--per-class", 1, "--out", folder)
    assert f"--out {folder} is a folder; give a file name (e.g. {folder / 'samples.npz'})" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]
    assert sorted(p.name for p in authors.parent.iterdir()) == beside


def test_weights_that_do_not_fit_the_model_flags(capsys, ours, tmp_path):
    err = run_error(capsys, "--ckpt", ours, "--ch", 64, "--per-class", 1, "--out", tmp_path / "x.npz")
    assert "do not fit" in err and "--ch" in err
    folder = tmp_path / "wrong_flagfile"
    ckpt = write_authors(folder)
    (folder / "flagfile.txt").write_text(FLAGFILE.format(cond="", data_type="cifar10lt").replace("--ch=32", "--ch=64"))
    err = run_error(capsys, "--ckpt", ckpt, "--per-class", 1)
    assert "do not fit" in err and "--ch" in err
    assert not list(folder.glob("samples_*"))


def test_authors_checkpoint_without_configuration_names_the_flags(capsys, tmp_path):
    ckpt = write_authors(tmp_path / "bare", flagfile=False)
    err = run_error(capsys, "--ckpt", ckpt, "--per-class", 1)
    assert "--flagfile" in err and "--ch" in err and "--num-res-blocks" in err
    err = run_error(capsys, "--ckpt", ckpt, "--flagfile", tmp_path / "missing.txt", "--per-class", 1)
    assert "flagfile not found" in err


def test_class_count_mismatch(capsys, ours, tmp_path):
    err = run_error(capsys, "--ckpt", ours, "--num-class", 5, "--per-class", 1)
    assert "class count mismatch" in err and "--num-class" in err
    folder = tmp_path / "c100"
    ckpt = write_authors(folder, data_type="cifar100lt")
    err = run_error(capsys, "--ckpt", ckpt, "--per-class", 1)
    assert "class count mismatch" in err and "data_type" in err


def test_guided_methods_need_a_conditional_model(capsys, tmp_path):
    ckpt = write_authors(tmp_path / "uncond", cond=False)
    for method in ("cfg", "cond"):
        err = run_error(capsys, "--ckpt", ckpt, "--method", method, "--per-class", 1)
        assert f"--method {method}" in err and "unconditional" in err


@pytest.mark.parametrize("argv,message", [
    (["--per-class", "2", "--num-samples", "4"], "exactly one of --per-class"),
    ([], "exactly one of --per-class"),
    (["--per-class", "-1"], "--per-class must be >= 1"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--per-class", "1", "--omega", "-0.5"], "--omega must be"),
    (["--per-class", "1", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--per-class", "1", "--seed", "-3"], "--seed must be"),
    (["--per-class", "1", "--ch", "-32"], "--ch must be >= 1"),
    (["--per-class", "1", "--labels", "uniform"], "--labels goes with --num-samples"),
    (["--per-class", "1", "--device", "tpu"], "--device 'tpu': not a device"),
    (["--per-class", "1", "--threads", "0"], "--threads must be >= 1"),
])
def test_bad_options_are_parser_errors(capsys, authors, argv, message):
    err = run_error(capsys, "--ckpt", authors, *argv, parser=True)
    assert message in err


def test_help_states_the_authors_guidance_strengths(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for text in ("CBDM 1.6", "DDPM 0.8", "CBDM+ADA 1.4", "2.0", "--flagfile", "--clip-x0", "--per-class"):
        assert text in out


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cbdm_fast.sample", "--ckpt", str(tmp_path / "missing.pt"),
                           "--per-class", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr and "missing.pt" in proc.stderr


# ------------------------------------------------------------- samplers, backends, batch independence
def test_images_do_not_depend_on_batch_size_and_backends_agree(authors, tmp_path):
    outs = {}
    for name, extra in (("b2", ["--batch-size", 2]), ("b7", ["--batch-size", 7]),
                        ("ref", ["--batch-size", 5, "--backend", "reference"])):
        out = tmp_path / f"{name}.npz"
        run_ok("--ckpt", authors, "--num-samples", 7, "--omega", 1.6, "--seed", 4, "--out", out, *extra)
        outs[name] = load_npz(out)
    assert np.array_equal(outs["b2"]["images"], outs["b7"]["images"])
    # fp32 on both backends: at most one uint8 level apart (rounding of x near a level boundary)
    diff = np.abs(outs["b2"]["images"].astype(int) - outs["ref"]["images"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert str(outs["ref"]["backend"]) == "reference" and str(outs["b2"]["backend"]) == "fast"


def test_ddim_sampler_flags_are_recorded(authors, tmp_path):
    out = tmp_path / "ddim.npz"
    run_ok("--ckpt", authors, "--per-class", 1, "--omega", 1.0, "--sampler", "ddim", "--steps", 5, "--eta", 0.5,
           "--out", out)
    d = load_npz(out)
    assert str(d["sampler"]) == "ddim" and int(d["steps"]) == 5 and float(d["eta"]) == 0.5
    assert d["images"].shape == (10, 8, 8, 3) and d["images"].std() > 0
    run_ok("--ckpt", authors, "--per-class", 1, "--out", out)  # ddpm: all T steps recorded
    d = load_npz(out)
    assert str(d["sampler"]) == "ddpm" and int(d["steps"]) == T and float(d["eta"]) == 0.0


def test_dpm_solver_flags_are_recorded_and_resume_exactly(authors, tmp_path):
    """--sampler dpm++2m (default 20 steps, at most T-1 = 19 here; --schedule time by default): the npz records
    sampler, steps and schedule; a run interrupted after one shard resumes to the same images."""
    out = tmp_path / "dpm.npz"
    run_ok("--ckpt", authors, "--per-class", 1, "--omega", 1.0, "--sampler", "dpm++2m", "--out", out)
    d = load_npz(out)
    assert str(d["sampler"]) == "dpm++2m" and int(d["steps"]) == T - 1 and str(d["schedule"]) == "time"
    assert d["images"].shape == (10, 8, 8, 3) and d["images"].std() > 0
    run_ok("--ckpt", authors, "--per-class", 1, "--omega", 1.0, "--sampler", "dpm++2m", "--steps", 5,
           "--schedule", "logsnr", "--batch-size", 3, "--out", out)
    d = load_npz(out)
    assert int(d["steps"]) == 5 and str(d["schedule"]) == "logsnr"
    run_ok("--ckpt", authors, "--per-class", 1, "--sampler", "ddim", "--steps", 5, "--out", out)
    assert "schedule" not in load_npz(out)  # only dpm++2m has a grid to record

    flags = ["--ckpt", authors, "--per-class", 1, "--omega", 1.0, "--sampler", "dpm++2m", "--steps", 7,
             "--shard-size", 4, "--no-progress"]
    full = tmp_path / "full.npz"
    run_ok(*flags, "--out", full)
    part = tmp_path / "part.npz"
    with shard_writes(interrupt_after=1):
        assert main([str(a) for a in flags + ["--batch-size", 3, "--out", part]]) == 130
    run_ok(*flags[:-1], "--batch-size", 5, "--out", part)
    assert np.array_equal(load_npz(part)["images"], load_npz(full)["images"])


def test_flags_become_the_sampling_request():
    """The CLI hands the library one SampleRequest: its defaults are the flags' defaults, the --no-* flags
    are negated, the model flags go to model_kwargs, and the old backend names map to fast + step backend."""
    from cbdm_fast.sample import build_parser, check_args, sample_request
    from cbdm_fast.sampling import SampleRequest

    def request(*argv):
        parser = build_parser()
        args = parser.parse_args(["--ckpt", "c.pt", "--per-class", "2", *argv])
        check_args(parser, args)
        return sample_request(args)

    assert request() == SampleRequest(ckpt="c.pt", per_class=2)
    r = request("--no-amp", "--no-cuda-graph", "--no-progress", "--ch", "64", "--T", "50", "--backend", "extension")
    assert (r.amp, r.cuda_graph, r.progress) == (False, False, False)
    assert r.model_kwargs == {"ch": 64, "T": 50} and (r.backend, r.step_backend) == ("fast", "extension")
    r = request("--sampler", "dpm++2m", "--steps", "15", "--schedule", "logsnr")
    assert (r.sampler, r.steps, r.spacing) == ("dpm++2m", 15, "logsnr")


def test_old_backend_names_still_work(authors, tmp_path):
    out = tmp_path / "old.npz"
    run_ok("--ckpt", authors, "--per-class", 1, "--backend", "auto", "--out", out)
    assert str(load_npz(out)["backend"]) == "fast"


@pytest.mark.parametrize("argv,message", [
    (["--per-class", "1", "--eta", "0.5"], "--eta applies to --sampler ddim"),
    (["--per-class", "1", "--sampler", "ddim", "--eta", "-1"], "--eta must be"),
    (["--per-class", "1", "--sampler", "ddim", "--steps", "0"], "--steps must be >= 1"),
    (["--per-class", "1", "--sampler", "plms"], "invalid choice"),
    (["--per-class", "1", "--backend", "turbo"], "invalid choice"),
    (["--per-class", "1", "--backend", "reference", "--no-cuda-graph"], "--no-cuda-graph applies to --backend fast"),
    (["--per-class", "1", "--backend", "reference", "--step-backend", "extension"], "--step-backend applies"),
    (["--per-class", "1", "--backend", "reference", "--no-amp"], "--no-amp applies"),
    (["--per-class", "1", "--backend", "extension", "--step-backend", "reference"], "contradicts --step-backend"),
    (["--per-class", "1", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["--per-class", "1", "--schedule", "logsnr"], "--schedule applies to --sampler dpm++2m only"),
    (["--per-class", "1", "--sampler", "ddim", "--schedule", "time"], "--schedule applies to --sampler dpm++2m"),
    (["--per-class", "1", "--sampler", "dpm++2m", "--schedule", "karras"], "argument --schedule: invalid choice"),
    (["--per-class", "1", "--sampler", "dpm++2m", "--eta", "0.5"], "--eta applies to --sampler ddim"),
    (["--per-class", "1", "--sampler", "dpm++2m", "--steps", "0"], "--steps must be >= 1"),
])
def test_bad_sampler_options_are_parser_errors(capsys, authors, argv, message):
    assert message in run_error(capsys, "--ckpt", authors, *argv, parser=True)


def test_steps_with_ddpm_or_beyond_T_names_the_flag(capsys, authors, tmp_path):
    err = run_error(capsys, "--ckpt", authors, "--per-class", 1, "--steps", 10, "--out", tmp_path / "x.npz")
    assert "--steps 10" in err and "--sampler ddim" in err and f"T = {T}" in err
    run_ok("--ckpt", authors, "--per-class", 1, "--steps", T, "--out", tmp_path / "y.npz")  # == T is fine
    err = run_error(capsys, "--ckpt", authors, "--per-class", 1, "--sampler", "ddim", "--steps", T + 1,
                    "--out", tmp_path / "x.npz")
    assert f"--steps {T + 1}" in err and f"T = {T}" in err
    err = run_error(capsys, "--ckpt", authors, "--per-class", 1, "--sampler", "dpm++2m", "--steps", T,
                    "--out", tmp_path / "x.npz")
    assert f"--steps {T} with --schedule time" in err and f"[1, {T - 1}]" in err
    err = run_error(capsys, "--ckpt", authors, "--per-class", 1, "--sampler", "dpm++2m", "--steps", 6,
                    "--schedule", "logsnr", "--out", tmp_path / "x.npz")
    assert "--steps 6 with --schedule logsnr" in err and "at most 5 steps" in err
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.shards").exists()
