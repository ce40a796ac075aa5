"""cbdm_fast: a fast, faithful implementation of Class-Balancing Diffusion Models (CBDM, CVPR 2023).

Public names (see ARCHITECTURE.md): ``cbdm_fast.model.UNet``, ``cbdm_fast.schedule.Schedule``,
``cbdm_fast.losses.cbdm_loss``, ``cbdm_fast.ops`` and ``cbdm_fast.patch_model`` / ``unpatch_model``
(from cbdm_fast.nn). Submodules load lazily so that ``import cbdm_fast`` stays cheap.
"""
import importlib

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("ops", "model", "schedule", "losses", "samplers", "data", "training", "evaluation", "nn")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("patch_model", "unpatch_model"):
        return getattr(importlib.import_module(f"{__name__}.nn.patch"), name)
    raise AttributeError(f"module 'cbdm_fast' has no attribute {name!r}")
