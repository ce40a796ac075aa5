"""The numbers a short CPU training run produces, pinned BEFORE the program layer was reorganised (#13,
recorded at commit b8ea466): per-step losses and checksums of the model and EMA parameters after 12
steps of the tiny digits UNet, for the eager reference step and the fused step in fp32 and bf16. A
restructuring that changes no algorithm changes none of these; one that does fails here.

The run goes through the CLI (python -m cbdm_fast.train's main, in-process), so the test does not
depend on where the library keeps its classes. Losses are read back from the run's TensorBoard log
(float32), parameters from its checkpoint. Tolerance 1e-6 relative: bit-identical on the machine
that recorded them (two runs agreed exactly), with room for another CPU kind's float rounding.
"""
import pytest
import torch

from cbdm_fast.evaluation.run_log import loss_curves
from cbdm_fast.train import main
from train_helpers import TINY_FLAGS

STEPS = 12
PINNED = {
    ("eager", "fp32"): dict(
        loss=[1.062699317932129, 0.9602386951446533, 0.9861297011375427, 0.975037693977356, 0.8744577169418335, 0.8063622713088989, 0.6569081544876099, 0.5476142168045044, 0.5235636830329895, 0.39280441403388977, 0.35495296120643616, 0.2670644521713257],
        loss_reg=[0.0, 1.03664103209781e-19, 1.4611928236263338e-06, 1.865986814664211e-05, 3.8771329855080694e-05, 9.290433081332594e-05, 0.00024617445887997746, 0.00026464072288945317, 0.00032369617838412523, 0.00047826842637732625, 0.0007179945823736489, 0.0],
        model=(2349.157637721185, -46.0224341064171, 32445.851306570275),
        ema=(2368.9118368517143, -46.70124200774437, 31382.212738364742)),
    ("fused", "fp32"): dict(
        loss=[1.062699317932129, 0.9562282562255859, 0.9828794598579407, 0.9738932847976685, 0.8487916588783264, 0.7883923649787903, 0.6984004974365234, 0.5779491066932678, 0.6261692047119141, 0.42954352498054504, 0.4483819603919983, 0.3838888704776764],
        loss_reg=[0.0, 1.4335025798377191e-19, 2.740556510616443e-06, 2.4412689526798204e-05, 0.00011081887350883335, 0.0002842872345354408, 0.00038007955299690366, 0.0003301432298030704, 0.00036251297569833696, 0.0008658195147290826, 0.0009459907887503505, 0.0007071332656778395],
        model=(2301.6547170061326, -44.44354343102897, 32409.25046106676),
        ema=(2367.31638204543, -46.52921967060744, 31380.962911996146)),
    ("fused", "bf16"): dict(
        loss=[1.062699317932129, 0.9562282562255859, 0.9828242659568787, 0.9733184576034546, 0.8488690853118896, 0.7868599891662598, 0.6994990110397339, 0.5828384160995483, 0.6300201416015625, 0.4299432635307312, 0.4505285918712616, 0.38733118772506714],
        loss_reg=[0.0, 5.568440758545396e-15, 2.6184470698353834e-06, 2.6883215468842536e-05, 0.00011211547825951129, 0.0003226393018849194, 0.00036650121910497546, 0.000291613454464823, 0.00039030687185004354, 0.0006224604439921677, 0.0007862134370952845, 0.0006143712089397013],
        model=(2301.607277131351, -41.36758180051676, 32411.55291271767),
        ema=(2367.3160054811615, -46.463046445283126, 31380.976621645506)),
}


def checksums(state_dict) -> tuple:
    """(sum, cosine-weighted sum, sum of |.|) over every floating tensor, in float64: a change of any
    value, or values swapped between positions or tensors, moves the second."""
    s1 = s2 = s3 = 0.0
    for key in sorted(state_dict):
        t = state_dict[key]
        if not torch.is_floating_point(t):
            continue
        d = t.detach().double().flatten()
        w = torch.cos(torch.arange(d.numel(), dtype=torch.float64) * 0.37 + len(key))
        s1 += float(d.sum())
        s2 += float((d * w).sum())
        s3 += float(d.abs().sum())
    return s1, s2, s3


@pytest.mark.parametrize("backend, precision", list(PINNED))
def test_a_short_run_reproduces_the_numbers_recorded_before_the_redesign(tmp_path, backend, precision):
    want = PINNED[(backend, precision)]
    logdir = tmp_path / "run"
    argv = TINY_FLAGS + ["--steps", str(STEPS), "--warmup", "2", "--device", "cpu", "--backend", backend,
                         "--precision", precision, "--logdir", str(logdir), "--log-every", "1",
                         "--save-every", str(STEPS), "--threads", "1", "--seed", "3"]
    assert main(argv) == 0
    curves = loss_curves(logdir)
    assert curves["train/loss"][0] == list(range(1, STEPS + 1))
    assert curves["train/loss"][1] == pytest.approx(want["loss"], rel=1e-6, abs=1e-12)
    assert curves["train/loss_reg"][1] == pytest.approx(want["loss_reg"], rel=1e-6, abs=1e-12)
    state = torch.load(logdir / f"ckpt_{STEPS}.pt", weights_only=False, map_location="cpu")
    for name in ("model", "ema"):
        got, pinned = checksums(state[name]), want[name]
        scale = pinned[2]  # sum of |values|: the tolerance's scale for sums that may be near 0
        assert all(abs(g - p) <= 1e-6 * scale for g, p in zip(got, pinned)), (name, got, pinned)
