"""The UNet a checkpoint holds: its weights (ours or the CBDM authors'), its configuration (stored in
ours; the authors' flagfile.txt or the model flags for theirs), and the model built and loaded strictly,
with messages that say in a few lines what does not fit."""
from __future__ import annotations

from pathlib import Path

import torch

from ..model import UNet
from .checkpoint import CheckpointError, is_ours, load


def _strip_module_prefix(state: dict) -> dict:
    """Remove a DataParallel/DDP 'module.' prefix if every key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def model_state(ckpt: dict, which: str = "ema") -> dict:
    """The model weights of a checkpoint of either format; which = 'ema' or 'model'. CheckpointError
    saying which formats are known (and what the dict holds) for anything else."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    keys = ("ema", "model") if is_ours(ckpt) else ("ema_model", "net_model")
    key = keys[0] if which == "ema" else keys[1]
    if key in ckpt:
        return _strip_module_prefix(ckpt[key])
    if "state_dict" in ckpt:  # a bare {state_dict: ...} export
        return _strip_module_prefix(ckpt["state_dict"])
    if is_ours(ckpt):
        raise CheckpointError(f"a cbdm_fast checkpoint without its {key!r} weights")
    shown = ", ".join(repr(k) for k in sorted(map(str, ckpt))[:8]) + (", ..." if len(ckpt) > 8 else "")
    raise CheckpointError(f"not a model checkpoint: neither cbdm_fast's (with 'format', 'ema', 'model') nor the "
                          f"CBDM authors' (with 'ema_model', 'net_model'), nor a {{'state_dict': ...}} export; "
                          f"it holds {len(ckpt)} entries ({shown or 'none'})")


def weights_mismatch(expected: dict, state: dict, limit: int = 3) -> str:
    """How ``state`` differs from a model's state dict ``expected``, in at most three lines (torch's
    load_state_dict writes one line per tensor): tensors of another shape, missing, unexpected, with the
    first ``limit`` of each. '' when every name and shape fits."""
    def shape(v):
        return list(v.shape) if hasattr(v, "shape") else type(v).__name__

    reshaped = [f"{k} ({shape(state[k])} in the checkpoint, {shape(v)} here)" for k, v in expected.items()
                if k in state and shape(state[k]) != shape(v)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    lines = []
    for what, names in (("of another shape", reshaped), ("missing from the checkpoint", missing),
                        ("in the checkpoint but not in this model", unexpected)):
        if names:
            more = f", and {len(names) - limit} more" if len(names) > limit else ""
            lines.append(f"{len(names)} tensor(s) {what}: {'; '.join(names[:limit])}{more}")
    return "\n".join(lines)


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
    try:
        state = model_state(ckpt, which)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
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

    try:
        model = UNet(**unet)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid model configuration from {info['source']}: {exc}") from exc
    problem = weights_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{path}: its {which} weights do not fit the model configured from {info['source']} "
            f"({unet}); check {_flag_list()} (or the flagfile's --ch, --ch_mult, --attn, --num_res_blocks, "
            f"--data_type, --conditional, --augm):\n{problem}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), info
