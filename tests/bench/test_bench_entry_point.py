"""`python -m cbdm_fast.bench` (bench/__main__.py): what every subcommand shares. Each needs --json, and
--device cuda on a machine without CUDA is a usage error (exit 2), before any work."""
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
