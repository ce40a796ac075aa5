"""Benchmark runners (``python -m cbdm_fast.bench train ...``).

train_bench: the CBDM training step, the eager reference path against the fused backends, side by
side in one run on the same model and synthetic data.
"""
from .train_bench import BACKENDS, MODELS, TrainBenchConfig, run_train_bench

__all__ = ["BACKENDS", "MODELS", "TrainBenchConfig", "run_train_bench"]
