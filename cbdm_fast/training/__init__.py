"""Training: the CBDM step (eager reference and fast), data parallelism, checkpoints and the loop.

    config.py      TrainConfig (saved as config.json), the option vocabularies, presets, validation
    draws.py       the random draws of a step, on the host (the authors') or on the device
    step.py        eager_step (THE reference step, on losses.cbdm_loss) and fused_step; EMA, optimizer
    fast_step.py   FastStep: draws + fused_step, optionally compiled and replayed as a CUDA graph
    ddp.py         data parallelism: DDP wrapping, the global batch's draws, rank slices
    state.py       checkpoint contents (RNG state of 1 or N ranks) and writing
    monitor.py     progress, TensorBoard, sample grids, evaluation during training
    evaluator.py   that evaluation (--eval-every): EMA samples scored with cbdm_fast.evaluation's metrics
    run_folder.py  one run per --logdir: refuse another run there, --start-over moves the old one aside
    stop.py        SIGINT/SIGTERM: stop after the step with a checkpoint, abandon grids and evaluations
    trainer.py     Trainer: build, resume, train
    launch.py      a run from command-line options (python -m cbdm_fast.train)
"""
from .config import TrainConfig
from .draws import Draws, class_cdf, draw_device, draw_host
from .fast_step import FastStep
from .launch import launch
from .step import StepConfig, TrainingDiverged, eager_step, ema_update, fused_step, make_optimizer, warmup_factor
from .trainer import Trainer, resume_trainer

__all__ = ["TrainConfig", "Draws", "class_cdf", "draw_device", "draw_host", "FastStep", "launch", "StepConfig",
           "TrainingDiverged", "eager_step", "ema_update", "fused_step", "make_optimizer", "warmup_factor",
           "Trainer", "resume_trainer"]
