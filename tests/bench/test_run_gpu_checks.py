"""bench/run_gpu_checks.sh --dry-run on the CPU: the plan of the one GPU call (its stages, caps and
commands) and that every benchmark command in it parses with today's CLI flags, so a renamed flag is
caught here rather than on a lent GPU."""
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cbdm_fast.bench.__main__ import _check_train, _parser

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "run_gpu_checks.sh"
DEFAULT = ["build", "tests", "kernels", "gnsweep", "train48", "train128", "profile", "sample", "ops", "diffusers",
           "ceiling", "ddp"]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, timeout=60)


def plan(out: str) -> dict:
    """stage -> [(cap seconds, command)] from the dry-run's output."""
    stages, current = {}, None
    for line in out.splitlines():
        if m := re.match(r"stage (\w+):$", line):
            current = stages.setdefault(m.group(1), [])
        elif m := re.match(r"\s+\[cap (\d+)s\] (.*)", line):
            current.append((int(m.group(1)), m.group(2)))
    return stages


def test_dry_run_plans_every_default_stage_in_order_with_caps_inside_the_budget():
    r = dry_run("/tmp/out")
    assert r.returncode == 0, r.stderr
    assert "budget 480s" in r.stdout and "/tmp/out/gpu_checks.tar.gz" in r.stdout
    stages = plan(r.stdout)
    assert list(stages) == DEFAULT
    for name, steps in stages.items():
        assert steps, f"stage {name} has no command"
        assert all(0 < cap <= 300 for cap, _ in steps)
    build = " ".join(cmd for _, cmd in stages["build"])
    assert "CBDM_FAST_CUDA_ARCHS=" in build and "pip install --no-build-isolation --no-deps -e ." in build
    assert "-m gpu" in stages["tests"][0][1]


def test_kernels_stage_times_the_compiled_step_on_both_kernels_at_48_and_128_and_profiles_ours():
    """#14: compiled_bf16 on our kernels against inductor's in ONE bench run per batch size, and the fused
    step's device time per kernel group (the profile stage splits inductor's)."""
    stages = plan(dry_run("/tmp/out").stdout)
    train = [cmd for _, cmd in stages["kernels"] if "cbdm_fast.bench train" in cmd]
    assert len(train) == 2
    for cmd, batch in zip(train, ("48", "128")):
        argv = shlex.split(cmd)
        assert argv[argv.index("--batch-size") + 1] == batch
        assert argv[argv.index("--backends") + 1] == "compiled_bf16"
        assert argv[argv.index("--kernels") + 1] == "fused,inductor"
        assert argv[argv.index("--channels-last") + 1] == "on"
    (profile,) = [shlex.split(cmd) for _, cmd in stages["kernels"] if "profile_step" in cmd]
    assert profile[profile.index("--kernels") + 1] == "fused" and "--copies" in profile
    assert profile[profile.index("--batch-size") + 1] == "48"
    (inductor,) = [shlex.split(cmd) for _, cmd in stages["profile"]]
    assert inductor[inductor.index("--kernels") + 1] == "inductor"


def test_dry_run_takes_chosen_stages_and_budget():
    r = dry_run("--budget", "120", "/tmp/out", "ops", "autotune")
    assert r.returncode == 0, r.stderr
    assert "budget 120s" in r.stdout and list(plan(r.stdout)) == ["ops", "autotune"]


@pytest.mark.parametrize("args, message", [
    (("/tmp/out", "bogus"), "unknown stage 'bogus'"),
    (("--budget", "ten", "/tmp/out"), "--budget must be a whole number"),
])
def test_bad_arguments_are_named(args, message):
    r = dry_run(*args)
    assert r.returncode == 2 and message in r.stderr


def test_every_benchmark_command_parses_with_the_current_flags():
    r = dry_run("/tmp/out", *DEFAULT, "autotune")
    commands = [cmd.split(" ; ")[-1].strip() for steps in plan(r.stdout).values() for _, cmd in steps
                if "cbdm_fast.bench" in cmd]
    assert len(commands) >= 13

    def error(msg):
        if "CUDA is not available" not in msg:  # the one refusal a CPU machine must give
            raise AssertionError(msg)

    for cmd in commands:
        argv = shlex.split(cmd)
        module = argv[argv.index("-m") + 1]
        rest = argv[argv.index("-m") + 2:]
        if module == "cbdm_fast.bench":
            train_parser, parser, _ = _parser()
            args = parser.parse_args(rest)
            if args.command == "train":
                _check_train(args, error)
        else:
            assert module in ("cbdm_fast.bench.profile_step", "cbdm_fast.bench.gn_sweep", "cbdm_fast.bench.diffusers_bench")
            main = importlib.import_module(module).main
            with pytest.raises(SystemExit) as e:  # parses, then refuses --device cuda on a CPU machine
                main(rest)
            assert e.value.code == 2
