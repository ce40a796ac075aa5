"""Small configurations shared by the training tests (a tiny UNet on the built-in digits), and how they
compare two steps' results."""
from cbdm_fast.training.config import TrainConfig, apply_preset, validate

TINY_FLAGS = ["--ch", "32", "--ch-mult", "1", "2", "--attn", "1", "--num-res-blocks", "1", "--T", "100",
              "--batch-size", "8", "--sample-per-class", "1", "--no-progress"]


def tiny_config(logdir, steps=6, **overrides) -> TrainConfig:
    cfg = apply_preset(TrainConfig(), explicit=set())
    cfg.model.ch, cfg.model.ch_mult, cfg.model.attn, cfg.model.num_res_blocks = 32, [1, 2], [1], 1
    cfg.model.dropout = 0.1  # exercise the dropout RNG in resume tests
    cfg.diffusion.T = 100
    cfg.optim.steps, cfg.optim.batch_size, cfg.optim.warmup = steps, 8, 2
    cfg.run.logdir, cfg.run.progress, cfg.run.sample_per_class = str(logdir), False, 1
    cfg.run.save_every, cfg.run.log_every = 0, 1
    cfg.run.device, cfg.run.backend = "cpu", "eager"  # the reference path on CPU: bit-exact comparisons
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg


def max_diff(a, b) -> float:
    """The largest absolute difference between the parameters of two modules of one architecture."""
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def rel(a, b) -> float:
    """|a - b| / |b| of two scalars (tensors or floats)."""
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)
