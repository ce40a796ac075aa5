"""`python -m cbdm_fast.bench` (bench/__main__.py): what every subcommand shares. Each needs --json,
--device cuda on a machine without CUDA is a usage error (exit 2), and every bad flag is named in a usage
error before any work (one table for all subcommands)."""
import pytest
import torch

from cbdm_fast.bench.__main__ import main
from cli_helpers import usage_error

SUBCOMMANDS = ("ops", "sample", "train", "ceiling")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_json_is_required(command, capsys):
    assert "--json" in usage_error(main, [command, "--device", "cpu"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cuda_without_cuda_exits_2(command, tmp_path, capsys):
    err = usage_error(main, [command, "--device", "cuda", "--json", str(tmp_path / "x.json")], capsys)
    assert "CUDA is not available" in err
    assert not (tmp_path / "x.json").exists()


# One bad command line a row: `python -m cbdm_fast.bench <row> --device cpu --json X` | what its usage error
# must say.
BAD_FLAGS = [tuple(part.strip() for part in row.split("|", 1)) for row in """
ops --ops q_sample,softmax           | --ops: unknown name(s) softmax
ops --ops ,                          | --ops: unknown name(s) (none given)
ops --providers torch,triton         | --providers: unknown name(s) triton
ops --modes fwd,fwd                  | --modes: duplicate
ops --modes forward                  | --modes: unknown name(s) forward
ops --reps 0                         | --reps must be >= 1
ops --warmup -1                      | --warmup must be >= 0
ops --size huge                      | invalid choice
ops --dtype int8                     | invalid choice
ops --layout nhwc                    | invalid choice
ops --timing graph                   | --timing graph (CUDA-graph replay) needs --device cuda
sample --batch-size 0                | --batch-size must be >= 1
sample --steps-timed 0               | --steps-timed must be >= 1
sample --warmup -1                   | --warmup must be >= 0
sample --omega 0                     | --omega must be a finite number > 0
sample --backends reference,turbo    | unknown backend(s) turbo
sample --backends fast,fast          | duplicate
sample --backends fast_graph         | needs --device cuda
sample --sampler ddpm,plms           | --sampler: unknown sampler(s) plms
sample --model small --image-size 7  | --image-size must be a positive multiple of 2
sample --image-size 12               | --image-size must be a positive multiple of 8 for --model default
sample --num-class 0                 | --num-class must be >= 1
sample --peak-tflops -1              | --peak-tflops must be > 0
sample --model huge                  | invalid choice
train --compile-mode reduce-overhead | invalid choice: 'reduce-overhead'
train --batch-size 0                 | --batch-size must be >= 1
train --iters 0                      | --iters must be >= 1
train --warmup -1                    | --warmup must be >= 0
train --backends eager,turbo,fast    | unknown backend(s) turbo, fast
train --backends fused,fused         | duplicate
train --kernels fused,triton         | --kernels: unknown kernel choice(s) triton
train --kernels fused,fused          | duplicate
train --model small --image-size 15  | --image-size must be a positive multiple of 2
train --num-class 0                  | --num-class must be >= 1
train --peak-tflops 0                | --peak-tflops must be > 0
train --model huge                   | invalid choice
ceiling --work train,infer           | --work: unknown work(s) infer
ceiling --dtypes fp16                | --dtypes: unknown dtype(s) fp16
ceiling --iters 0                    | --iters must be >= 1
ceiling --batch-size 0               | --batch-size must be >= 1
""".strip().splitlines()]


@pytest.mark.parametrize("command_line, message", BAD_FLAGS, ids=[row[0] for row in BAD_FLAGS])
def test_bad_flag_is_named_before_any_work(command_line, message, tmp_path, capsys):
    out = tmp_path / "x.json"
    command, *flags = command_line.split()
    assert message in usage_error(main, [command, "--device", "cpu", "--json", str(out)] + flags, capsys)
    assert not out.exists()
