"""Bad inputs, as a demanding new user gives them (issue #17): one table of command lines and one of API
calls. For each: the exit code (or exception type), a message naming the flag or argument, no traceback.
The command lines run in-process; every case is refused before any training or sampling starts."""
import math

import pytest
import torch

from cbdm_fast import evaluate as evaluate_cli
from cbdm_fast import ops
from cbdm_fast import sample as sample_cli
from cbdm_fast import train as train_cli
from cbdm_fast.files import checkpoint as ckpt_io
from cbdm_fast.files.arrays import NpzError, open_npz
from cbdm_fast.files.models import load_model
from cbdm_fast.files.paths import PathError, check_input_file, check_output_file, check_output_folder
from cbdm_fast.training.config import validate
from cbdm_fast.training.run_folder import RunFolderError, check_new_run
from train_helpers import TINY_FLAGS, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CLIS = {"train": train_cli.main, "sample": sample_cli.main, "evaluate": evaluate_cli.main}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the bad command lines point at: a trained run folder (ckpt_2 good, ckpt_4 truncated beside it),
    a plain file, a folder, random bytes, an arbitrary torch dict, a checkpoint of another model size."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    assert train_cli.main([*TINY_FLAGS, "--steps", "2", "--device", "cpu", "--backend", "eager", "--threads", "1",
                           "--logdir", str(run)]) == 0
    good = run / "ckpt_2.pt"
    (run / "ckpt_4.pt").write_bytes(good.read_bytes()[:5000])  # a write torn by a kill
    (root / "a_file").write_text("not a folder")
    (root / "a_folder").mkdir()
    (root / "random.npz").write_bytes(bytes(range(256)) * 8)
    (root / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"weights": torch.zeros(3), "note": "not a model"}, root / "dict.pt")
    return {"root": root, "run": run, "good": good, "torn": run / "ckpt_4.pt", "file": root / "a_file",
            "folder": root / "a_folder", "random_npz": root / "random.npz", "random_pt": root / "random.pt",
            "dict": root / "dict.pt"}


# (cli, argv with {placeholders} from ``files``, exit code, fragments the message must hold)
CLI_CASES = [
    ("train", ["--dataset", "imagenet"], 2, ["argument --dataset: invalid choice: 'imagenet'"]),
    ("train", ["--imb-factor", "0"], 2, ["--imb-factor must be in (0, 1], got 0.0"]),
    ("train", ["--imb-factor", "1.5"], 2, ["--imb-factor must be in (0, 1], got 1.5"]),
    ("train", ["--ch", "48"], 2, ["--ch must be a positive multiple of 32, got 48"]),
    ("train", ["--tau", "nan"], 2, ["--tau must be a finite number >= 0, got nan"]),
    ("train", ["--label-drop", "nan"], 2, ["--label-drop", "got nan"]),
    ("train", ["--steps", "-5"], 2, ["--steps must be >= 0, got -5"]),
    ("train", ["--steps", "ten"], 2, ["argument --steps: invalid int value: 'ten'"]),
    ("train", ["--batch-size", "0"], 2, ["--batch-size must be >= 1, got 0"]),
    ("train", ["--lr", "inf"], 2, ["--lr", "finite", "got inf"]),
    ("train", ["--grad-clip", "nan"], 2, ["--grad-clip must be a finite number > 0, got nan"]),
    ("train", ["--ema-decay", "nan"], 2, ["--ema-decay", "got nan"]),
    ("train", ["--sample-omega", "nan"], 2, ["--sample-omega", "finite", "got nan"]),
    ("train", ["--sample-omega", "-1"], 2, ["--sample-omega must be a finite number >= 0, got -1.0"]),
    ("train", ["--sample-per-class", "0"], 2, ["--sample-per-class must be >= 1, got 0"]),
    ("train", ["--keep-checkpoints", "0"], 2, ["--keep-checkpoints must be >= 1, got 0"]),
    ("train", ["--threads", "0"], 2, ["--threads must be >= 1, got 0"]),
    ("train", ["--device", "tpu"], 2, ["--device 'tpu': not a device", "use auto, cpu, cuda or cuda:N"]),
    ("train", ["--device", "meta"], 2, ["--device 'meta'"]),
    ("train", ["--device", "cuda:x"], 2, ["--device 'cuda:x'"]),
    ("train", ["--device", ""], 2, ["--device ''"]),
    ("train", ["--logdir", "{file}"], 2, ["--logdir", "is a file, not a folder"]),
    ("train", ["--logdir", "{file}/sub"], 2, ["--logdir", "is a file, not a folder"]),
    ("train", ["--logdir", "{run}", "--steps", "3"], 2, ["already holds a run", "--resume", "--start-over"]),
    ("train", ["--resume", "{run}"], 2, ["--resume", "is a folder", "ckpt_2.pt"]),
    ("train", ["--resume", "{torn}"], 2, ["ckpt_4.pt", "the newest checkpoint there that verifies is",
                                          "ckpt_2.pt"]),
    ("train", ["--resume", "{good}", "--steps", "1"], 2, ["--steps 1", "already at step 2", "nothing was trained"]),
    ("train", ["--resume", "{good}", "--start-over"], 2, ["--start-over", "--resume"]),
    ("train", ["--finetune-from", "{dict}", "--logdir", "{root}/ft_dict"], 2,
     ["--finetune-from", "not a model checkpoint", "'weights'"]),
    ("train", ["--finetune-from", "{random_pt}", "--logdir", "{root}/ft_random"], 2,
     ["--finetune-from", "truncated, corrupt or not a torch checkpoint"]),
    ("train", ["--finetune-from", "{folder}", "--logdir", "{root}/ft_folder"], 2, ["--finetune-from", "is a folder"]),
    ("train", ["--finetune-from", "{root}/missing.pt", "--logdir", "{root}/ft_missing"], 2,
     ["--finetune-from", "no such file"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--out", "{folder}"], 2, ["--out", "is a folder"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--out", "{file}/x.npz"], 2, ["--out", "is a file"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--grid", "{folder}"], 2, ["--grid", "is a folder"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--omega", "nan"], 2, ["--omega", "finite"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "0"], 2, ["--per-class must be >= 1"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--sampler", "ddim", "--eta", "nan"], 2, ["--eta"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--sampler", "ddim", "--eta", "2"], 2, ["--eta"]),
    ("sample", ["--ckpt", "{good}", "--per-class", "1", "--device", "xpu"], 2, ["--device 'xpu'"]),
    ("sample", ["--ckpt", "{dict}", "--per-class", "1", "--out", "{root}/s.npz"], 2, ["not a model checkpoint"]),
    ("sample", ["--ckpt", "{good}", "--num-samples", "67108865", "--out", "{root}/big.npz"], 2,
     ["67108865 images: at most 67108864 (2^26) per run"]),
    ("evaluate", ["--samples", "{random_npz}"], 2, ["not an .npz archive"]),
    ("evaluate", ["--samples", "{random_npz}", "--device", "mps"], 2, ["--device 'mps'"]),
    ("evaluate", ["--samples", "{random_npz}", "--json", "{folder}"], 2, ["--json", "is a folder"]),
    ("evaluate", ["--samples", "{random_npz}", "--report", "{file}"], 2, ["--report", "is a file"]),
    ("evaluate", ["--samples", "{random_npz}", "--cache-dir", "{file}/c"], 2, ["--cache-dir", "is a file"]),
    ("evaluate", ["--write-ref-stats", "{folder}"], 2, ["--write-ref-stats", "is a folder"]),
    ("evaluate", ["--ckpt", "{good}", "--per-class", "1", "--omega", "nan"], 2, ["--omega", "finite"]),
    ("evaluate", ["--ckpt", "{good}", "--per-class", "1", "--samples-out", "{folder}"], 2,
     ["--samples-out", "is a folder"]),
]


def _argv(argv, files):
    return [a.format(**files) for a in argv]


@pytest.mark.parametrize("cli, argv, code, fragments", CLI_CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in CLI_CASES])
def test_bad_command_line(capsys, files, cli, argv, code, fragments):
    before = sorted(p.name for p in files["run"].iterdir())
    try:
        got = CLIS[cli](_argv(argv, files) + ["--no-progress"] * (cli != "evaluate"))
    except SystemExit as exc:  # argparse's parser.error
        got = exc.code
    out, err = capsys.readouterr()
    assert got == code, err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert err.count("error:") == 1, err  # one message (after argparse's usage, for its errors)
    assert sorted(p.name for p in files["run"].iterdir()) == before  # nothing written into the run


def test_finetune_mismatch_is_a_few_lines(capsys, files, tmp_path):
    """A checkpoint of another model size: a few lines naming the flags and what differs (torch's message
    lists every tensor: 184 lines for the default model)."""
    code = train_cli.main([*TINY_FLAGS, "--ch", "64", "--finetune-from", str(files["good"]), "--device", "cpu",
                           "--logdir", str(tmp_path / "ft"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "--finetune-from" in err and "--ch" in err and "ch=32 (here 64)" in err
    assert len(err.strip().splitlines()) <= 6, err


def _images(b=2):
    return torch.randn(b, 3, 4, 4)


def _ddpm_step(**kw):
    x = _images()
    table = torch.rand(5, 10)
    return ops.ddpm_step(x, _images(), _images(), torch.tensor([3, 4]), _images(), table, **kw)


def _ddim_step(**kw):
    x = _images()
    return ops.ddim_step(x, _images(), _images(), torch.tensor([5, 4]), torch.tensor([2, 1]), _images(),
                         torch.linspace(0.99, 0.1, 10), **kw)


def _cb_loss(tau=1.0, **kw):
    return ops.cb_loss(_images(), _images(), _images(), torch.tensor([3, 4]), 10, tau, **kw)


def _config(tmp_path, **overrides):
    cfg = tiny_config(tmp_path)
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return validate(cfg)


def _written(path, data: bytes):
    path.write_bytes(data)
    return path


def _saved(path, obj):
    torch.save(obj, path)
    return path


def _folder_with_run(tmp_path):
    (tmp_path / "ckpt_5.pt").write_bytes(b"x")
    return check_new_run(tmp_path, lambda saved: True)


# (name, call taking tmp_path, exception type, fragments of its message)
API_CASES = [
    ("ddpm_step omega nan", lambda p: _ddpm_step(omega=math.nan), ValueError, ["omega"]),
    ("ddpm_step omega inf", lambda p: _ddpm_step(omega=math.inf), ValueError, ["omega"]),
    ("ddim_step omega nan", lambda p: _ddim_step(omega=math.nan), ValueError, ["omega"]),
    ("ddim_step eta -1", lambda p: _ddim_step(eta=-1.0), ValueError, ["eta"]),
    ("cb_loss keep -1", lambda p: _cb_loss(keep=-1.0), ValueError, ["keep"]),
    ("cb_loss keep 2", lambda p: _cb_loss(keep=2.0), ValueError, ["keep"]),
    ("cb_loss tau nan", lambda p: _cb_loss(tau=math.nan), ValueError, ["tau"]),
    ("config sample_omega nan", lambda p: _config(p, run__sample_omega=math.nan), ValueError, ["--sample-omega"]),
    ("config sample_per_class 0", lambda p: _config(p, run__sample_per_class=0), ValueError,
     ["--sample-per-class"]),
    ("config device tpu", lambda p: _config(p, run__device="tpu"), ValueError, ["--device"]),
    ("config beta_T inf", lambda p: _config(p, diffusion__beta_T=math.inf), ValueError, ["--beta-T"]),
    ("output file is a folder", lambda p: check_output_file(p, "--out", "samples.npz"), PathError,
     ["--out", "is a folder", "samples.npz"]),
    ("output folder is a file", lambda p: check_output_folder(_written(p / "f", b""), "--logdir"), PathError,
     ["--logdir", "is a file"]),
    ("input file is a folder", lambda p: check_input_file(p, "--ckpt"), PathError, ["--ckpt", "is a folder"]),
    ("random bytes as .npz", lambda p: open_npz(_written(p / "r.npz", bytes(range(64)))), NpzError,
     ["not an .npz archive"]),
    ("random bytes as checkpoint", lambda p: ckpt_io.load(_written(p / "r.pt", bytes(range(64)))),
     ckpt_io.CheckpointError, ["truncated, corrupt or not a torch checkpoint"]),
    ("a folder as checkpoint", lambda p: ckpt_io.verify(p), ckpt_io.CheckpointError, ["is a folder"]),
    ("arbitrary dict as model", lambda p: load_model(_saved(p / "d.pt", {"a": 1})), ckpt_io.CheckpointError,
     ["not a model checkpoint", "'a'"]),
    ("rotate keep 0", lambda p: ckpt_io.rotate(p, 0, p / "ckpt_1.pt"), ValueError, ["keep"]),
    ("new run into a used folder", _folder_with_run, RunFolderError, ["--resume", "--start-over"]),
]


@pytest.mark.parametrize("name, call, error, fragments", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_call(tmp_path, name, call, error, fragments):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "weights_only=False" not in message and "allow_pickle" not in message
