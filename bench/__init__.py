"""The benchmarks, installed as cbdm_fast.bench (``python -m cbdm_fast.bench train|sample|ops|ceiling``).

    common.py          timing loops, the record fields naming the machine and commit, JSON and tables
    workload.py        the UNet sizes and synthetic long-tailed batches of the model-level benchmarks
    train.py           one CBDM training step: the eager reference against the fused and compiled backends
    sample.py          one guided sampling step: the authors' sampler against the fast one
    ceiling.py         the matrix floor of a step, and the bound it puts on any backend's speed-up
    ops/               one setup per fused op (torch / fused / compiled; fwd / bwd / full); run.py runs them
    __main__.py        the CLI; train's flags there, the others' in ops_cli.py, sample_cli.py, ceiling_cli.py
    cli_checks.py      the flags and checks the subcommands share
    profile_step.py    where a training step's time goes (python -m cbdm_fast.bench.profile_step)
    gn_sweep.py        the GroupNorm+SiLU kernel's launch configurations (python -m cbdm_fast.bench.gn_sweep)
    diffusers_bench.py the fused ops inside HF diffusers' UNet2DModel (python -m cbdm_fast.bench.diffusers_bench)
Beside the package, in the repository's bench/ folder: suites/ (pytest-benchmark: pytest bench/suites
--benchmark-only), experiments/ (quality studies), RESULTS.md and results/, run_gpu_checks.sh and
prepare_gpu_carry.sh.
"""
