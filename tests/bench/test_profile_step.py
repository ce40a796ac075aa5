"""`python -m cbdm_fast.bench.profile_step`: the step's device time split into kernel groups, and the copies
named by the operator that launched them."""
import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_profile_step_splits_the_step_time_into_kernel_groups(tmp_path, capsys):
    from cbdm_fast.bench import profile_step
    js = tmp_path / "p.json"
    assert profile_step.main(["--model", "small", "--backend", "fused", "--batch-size", "2", "--warmup", "1",
                              "--steps", "1", "--top", "5", "--json", str(js)]) == 0
    (s,) = json.loads(js.read_text())
    assert s["total_us_per_step"] > 0 and len(s["top"]) == 5
    assert sum(g["share"] for g in s["groups"].values()) == pytest.approx(1.0)
    assert s["groups"]["convolution"]["share"] > 0.3  # a UNet step on a CPU: mostly convolutions
    assert "device time per step" in capsys.readouterr().out
    assert profile_step.group_of("sm90_xmma_fprop_implicit_gemm_bf16") == "convolution"
    assert profile_step.group_of("flash_fwd_kernel") == "attention"
    assert profile_step.group_of("triton_per_fused_native_group_norm_0") == "triton"
    assert profile_step.group_of("at::native::vectorized_elementwise_kernel") == "other"
    # ours: the exact names of our kernels, not fragments of them (the fused Adam's kernel is torch's)
    assert profile_step.group_of("_bwd_apply_kernel") == "ours"
    assert profile_step.group_of("_gn_silu_fwd_kernel") == "ours"
    assert profile_step.group_of("cbdm_fast::q_sample") == "ours"
    assert profile_step.group_of("void cbdm::(anonymous namespace)::ddpm_step_kernel<float, true, false>") == "ours"
    assert profile_step.group_of("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>") == "other"


def test_explain_copies_names_the_operator_that_called_each_copy():
    from cbdm_fast.bench.profile_step import explain_copies
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(8, 8, 1)

    def step():
        return conv(x.contiguous()).sum()  # a layout copy: channels_last -> NCHW

    rows = explain_copies(step, torch.device("cpu"))
    assert rows and rows[0]["calls"] == 1
    assert rows[0]["chain"].endswith("aten::contiguous") and "[2, 8, 4, 4]" in rows[0]["shapes"]
    assert explain_copies(lambda: (x * x).sum(), torch.device("cpu")) == []  # no copy, none listed


def test_profile_step_copies_option_lists_the_copies_of_a_graph_free_step(capsys):
    from cbdm_fast.bench import profile_step
    assert profile_step.main(["--model", "small", "--backend", "fused", "--batch-size", "2", "--warmup", "1",
                              "--steps", "1", "--copies", "--channels-last"]) == 0
    assert "copy-like operators in one step without the CUDA graph" in capsys.readouterr().out
