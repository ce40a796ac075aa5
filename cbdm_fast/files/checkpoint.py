"""Checkpoints: atomic writes, and loading ours or the CBDM authors' ckpt_*.pt files.

Ours hold {format, model, ema, optimizer, scheduler, step, rng, data, config, ...}; the authors'
hold {net_model, ema_model, sched, optim, step, fixed_x_T} and no model config (it lives in their
flagfile.txt, which ``read_authors_flagfile`` parses). Everything is saved as tensors and plain
Python values so ``torch.load(weights_only=True)`` can read it safely.

Integrity: the files we write end with a 48-byte trailer (cbdm_fast.files.integrity) holding the sha256 of
everything before it, so a truncated file or a flipped byte is reported as such by ``load`` instead of
surfacing (or not) deep inside torch.load; plain ``torch.load`` still reads them. ``newest_good``
picks the newest checkpoint of a run folder that verifies, which is what ``--resume`` falls back to.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import integrity
from .atomic import atomic_write

FORMAT = "cbdm_fast/1"
CKPT_PATTERN = re.compile(r"^ckpt_(\d+)\.pt$")
# the temporary name atomic_write gives a checkpoint while it is written: .ckpt_<step>.pt.tmp<pid>
TMP_PATTERN = re.compile(r"^\.ckpt_\d+\.pt\.tmp(\d+)$")
INTEGRITY_KEY = "_integrity"  # stored in our dict payloads: a file that lacks its trailer was altered


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or not in a format this project knows."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's bytes are not the bytes that were written (checksum mismatch, truncation)."""


def save_atomic(obj: Any, path) -> Path:
    """torch.save through a temporary file, fsync and rename (see cbdm_fast.files.atomic), ending the file
    with a sha256 trailer. A dict payload also records that it has a trailer (INTEGRITY_KEY)."""
    if isinstance(obj, dict):
        obj = {**obj, INTEGRITY_KEY: integrity.SCHEME}

    def write(f):
        hashing = integrity.HashingWriter(f)
        torch.save(obj, hashing)
        f.write(hashing.trailer())
    return atomic_write(path, write)


def verify(path) -> bool:
    """True when ``path`` ends with a trailer whose checksum matches; False when it has no trailer
    (the authors' files, or files written before trailers existed). Raises CorruptCheckpoint when a
    trailer is there and does not match, or when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return integrity.verify_file(path)
    except integrity.ChecksumMismatch as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load(path, map_location="cpu") -> dict:
    """torch.load after the checksum check, with a clear error for a missing, truncated, altered or
    foreign file (CheckpointError; CorruptCheckpoint when the bytes are not the ones written)."""
    path = Path(path)
    has_trailer = verify(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for torn or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a "
                              f"torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if obj.pop(INTEGRITY_KEY, None) is not None and not has_trailer:
        # a complete torch file whose trailer is gone: cut short by exactly its trailer, or loaded and
        # re-saved with plain torch.save (contents kept, trailer dropped); the bytes cannot tell which
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or was re-saved: cbdm_fast wrote it with a "
                                f"sha256 trailer, which is missing, so its contents cannot be verified. Either "
                                f"the file lost its last {integrity.TRAILER_SIZE} bytes, or it was re-saved with "
                                f"plain torch.save (which drops the trailer); in that case torch.load reads it, or "
                                f"re-save it with cbdm_fast.files.checkpoint.save_atomic")
    return obj


def newest_good(logdir, log: Optional[Callable[[str], None]] = None) -> tuple[Optional[Path], list]:
    """The newest ckpt_<step>.pt of ``logdir`` that loads and verifies, and [(path, reason)] for the
    newer ones that did not (each reported through ``log``). (None, skipped) when none is good."""
    skipped = []
    for path in reversed(find_checkpoints(logdir)):
        try:
            load(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            if log is not None:
                log(f"warning: skipping {path.name}: {exc}")
            continue
        return path, skipped
    return None, skipped


def remove_stale_temporaries(logdir) -> list[Path]:
    """Delete the temporary files of checkpoint writes whose process is gone (a run killed while it
    wrote); a live process's temporary (another run writing into the same folder) is left alone."""
    removed = []
    logdir = Path(logdir)
    if not logdir.is_dir():
        return removed
    for p in logdir.iterdir():
        m = TMP_PATTERN.match(p.name)
        if m and not _process_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now (writes finish before returning)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_ours(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def _strip_module_prefix(state: dict) -> dict:
    """Remove a DataParallel/DDP 'module.' prefix if every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def model_state(ckpt: dict, which: str = "ema") -> dict:
    """The model weights of a checkpoint of either format; which = 'ema' or 'model'."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    keys = ("ema", "model") if is_ours(ckpt) else ("ema_model", "net_model")
    key = keys[0] if which == "ema" else keys[1]
    if key not in ckpt:
        if "state_dict" in ckpt:  # a bare {state_dict: ...} export
            return _strip_module_prefix(ckpt["state_dict"])
        raise CheckpointError(f"checkpoint has no {key!r} entry (keys: {sorted(ckpt)[:8]})")
    return _strip_module_prefix(ckpt[key])


def model_config(ckpt: dict) -> dict | None:
    """The UNet keyword arguments stored in one of our checkpoints (None for the authors')."""
    if is_ours(ckpt):
        return dict(ckpt["unet"])
    return None


def read_authors_flagfile(path) -> dict:
    """Parse the authors' flagfile.txt (absl flags) into UNet/schedule keyword arguments."""
    multi = {"ch_mult": [], "attn": []}
    flags: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line.startswith("--"):
            continue
        name, _, value = line[2:].partition("=")
        if name in multi:
            multi[name].append(int(value))
        elif value == "" and name.startswith("no"):
            flags[name[2:]] = "false"
        else:
            flags[name] = value if value != "" else "true"
    data_type = flags.get("data_type", "cifar10")
    return {
        "model": dict(T=int(flags.get("T", 1000)), ch=int(flags.get("ch", 128)),
                      ch_mult=multi["ch_mult"] or [1, 2, 2, 2], attn=multi["attn"] or [1],
                      num_res_blocks=int(flags.get("num_res_blocks", 2)),
                      dropout=float(flags.get("dropout", 0.1)),
                      cond=flags.get("conditional", "false") == "true",
                      augm=flags.get("augm", "false") == "true",
                      num_class=100 if "cifar100" in data_type else 10, in_ch=3),
        "beta_1": float(flags.get("beta_1", 1e-4)), "beta_T": float(flags.get("beta_T", 0.02)),
        "var_type": flags.get("var_type", "fixedlarge"), "img_size": int(flags.get("img_size", 32)),
    }


def find_checkpoints(logdir) -> list[Path]:
    """ckpt_<step>.pt files in ``logdir``, oldest step first."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in logdir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(logdir, step: int) -> Path:
    return Path(logdir) / f"ckpt_{step}.pt"


CORRUPT_FOLDER = "corrupt"  # where rotation moves checkpoints that do not verify


def rotate(logdir, keep: int, written: Path, log: Optional[Callable[[str], None]] = None) -> dict:
    """Keep the newest ``keep`` checkpoints of ``logdir`` that VERIFY, ``written`` (the one just saved)
    always among them; delete older good ones. A checkpoint that does not verify (torn by a killed write,
    altered) is never counted as one of the kept and never deleted: it is moved to <logdir>/corrupt/
    and reported through ``log``, so a bad newest file cannot push the last good one out.
    Returns {"kept": [...], "deleted": [...], "moved": [...]} (paths, oldest first)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 checkpoint, got {keep}")
    written = Path(written)
    good, moved = [], []
    for path in find_checkpoints(logdir):
        if path == written:
            good.append(path)  # verified by its own atomic write just now: no need to read it back
            continue
        try:
            load(path)
        except CheckpointError as exc:
            target = Path(logdir) / CORRUPT_FOLDER / path.name
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            moved.append(target)
            if log is not None:
                log(f"warning: {path.name} does not verify ({exc}); moved to {target}")
            continue
        good.append(path)
    kept = good[-keep:]
    if written not in kept:  # a newer good checkpoint than the one just written (a rerun into old steps)
        kept = good[-(keep - 1):] + [written] if keep > 1 else [written]
    deleted = [p for p in good if p not in kept]
    for path in deleted:
        path.unlink(missing_ok=True)
    return {"kept": kept, "deleted": deleted, "moved": moved}


# ----------------------------------------------------------------------------- building a model
# UNet keyword -> the sampling CLI's flag, for error messages that say what to check.
MODEL_FLAGS = {"ch": "--ch", "ch_mult": "--ch-mult", "attn": "--attn", "num_res_blocks": "--num-res-blocks",
               "num_class": "--num-class", "in_ch": "--in-ch", "T": "--T"}
# The authors' defaults (their main.py), used for flags not given when there is no flagfile.
AUTHORS_MODEL_DEFAULTS = dict(T=1000, ch=128, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=2, dropout=0.1,
                              in_ch=3)
_INFO_KEYS = ("image_size", "beta_1", "beta_T")


def _flag_list() -> str:
    return ", ".join(MODEL_FLAGS.values())


def load_model(path, which: str = "ema", flagfile=None, model_kwargs: dict | None = None,
               map_location="cpu"):
    """Build the UNet of a checkpoint (ours or the authors') and load its weights strictly.

    Returns ``(model, info)``; the model is in eval mode on ``map_location``. ``info`` holds
    format ('ours' or 'authors'), source (where the configuration came from), unet (the UNet keyword
    arguments), image_size (None if unknown), beta_1, beta_T, var_type (as recorded, else None),
    step (None if unknown) and which.

    The configuration comes from our checkpoint's ``unet`` entry; for the authors' ckpt_*.pt files
    (no configuration stored) from ``flagfile`` (their flagfile.txt; None: flagfile.txt next to the
    checkpoint if present), else from ``model_kwargs`` on top of the authors' defaults, with cond,
    augm and num_class read off the weights. ``model_kwargs`` (UNet keyword arguments, plus
    image_size / beta_1 / beta_T) override whatever the checkpoint or flagfile says.
    Raises CheckpointError (a ValueError) for a missing or corrupt file, a missing configuration,
    or weights that do not fit the configuration (naming the flags to check).
    """
    path = Path(path)
    ckpt = load(path, map_location="cpu")
    state = model_state(ckpt, which)
    overrides = dict(model_kwargs or {})
    info_overrides = {k: overrides.pop(k) for k in _INFO_KEYS if k in overrides}
    info = {"format": "ours" if is_ours(ckpt) else "authors", "which": which, "image_size": None,
            "beta_1": 1e-4, "beta_T": 0.02, "var_type": None, "step": ckpt.get("step")}
    if isinstance(info["step"], torch.Tensor):
        info["step"] = int(info["step"])

    if is_ours(ckpt):
        if "unet" not in ckpt:
            raise CheckpointError(f"{path}: a cbdm_fast checkpoint without its 'unet' configuration entry")
        unet = dict(ckpt["unet"])
        info["source"] = f"the checkpoint {path.name}"
        info["image_size"] = ckpt.get("image_size")
        cfg = ckpt.get("config") or {}
        diffusion = cfg.get("diffusion") or {}
        info["beta_1"] = float(diffusion.get("beta_1", 1e-4))
        info["beta_T"] = float(diffusion.get("beta_T", 0.02))
        info["var_type"] = (cfg.get("run") or {}).get("var_type")
    else:
        if flagfile is None and (path.parent / "flagfile.txt").is_file():
            flagfile = path.parent / "flagfile.txt"
        if flagfile is not None:
            flagfile = Path(flagfile)
            if not flagfile.is_file():
                raise CheckpointError(f"flagfile not found: {flagfile}")
            try:
                parsed = read_authors_flagfile(flagfile)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise CheckpointError(f"cannot read the flagfile {flagfile}: {exc}") from exc
            unet = dict(parsed["model"])
            info["source"] = f"the flagfile {flagfile}"
            info.update(image_size=parsed["img_size"], beta_1=parsed["beta_1"], beta_T=parsed["beta_T"],
                        var_type=parsed["var_type"])
        elif overrides or info_overrides:
            unet = dict(AUTHORS_MODEL_DEFAULTS)
            label = state.get("label_embedding.weight")
            unet["cond"] = label is not None
            unet["augm"] = "augm_embedding.weight" in state
            unet["num_class"] = int(label.shape[0]) if label is not None else 10
            info["source"] = "the model flags"
        else:
            raise CheckpointError(
                f"{path} is in the authors' format, which stores no model configuration, and there is no "
                f"flagfile.txt next to it: pass --flagfile (their flagfile.txt) or the model flags "
                f"{_flag_list()}, --image-size")
    if overrides:
        unknown = set(overrides) - set(AUTHORS_MODEL_DEFAULTS) - {"cond", "augm", "num_class"}
        if unknown:
            raise ValueError(f"load_model: unknown UNet keyword(s) {sorted(unknown)}")
        unet.update(overrides)
        info["source"] += " and the model flags"
    info.update(info_overrides)
    info["unet"] = unet

    label = state.get("label_embedding.weight")
    if unet.get("cond", True) and label is not None and int(label.shape[0]) != int(unet.get("num_class", 100)):
        raise CheckpointError(
            f"class count mismatch: the model configured from {info['source']} has num_class="
            f"{unet.get('num_class', 100)} but the checkpoint's label embedding has {int(label.shape[0])} classes "
            f"(check --num-class, or the flagfile's --data_type)")

    from ..model import UNet  # imported here: checkpoint.py stays free of model code

    try:
        model = UNet(**unet)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model configuration from {info['source']}: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc)
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise CheckpointError(
            f"{path}: its {which} weights do not fit the model configured from {info['source']} "
            f"({unet}); check {_flag_list()} (or the flagfile's --ch, --ch_mult, --attn, --num_res_blocks, "
            f"--data_type, --conditional, --augm): {detail}") from exc
    return model.to(map_location).eval(), info
