"""Quality against steps on digits-LT: DDPM-1000 (the reference), DDIM and DPM-Solver++(2M), one CBDM checkpoint.

Trains one CBDM checkpoint (--train-steps, longer than the demo's 1000), then scores guided samples
(--per-class per class, --omega) with ``python -m cbdm_fast.evaluate --ckpt`` for every sampler setting
and every noise seed: FID, recall, precision and recognised-as-label, overall and per class group. The
summary gives, per setting, the mean and the spread (sd) over the seeds, and each setting's FID and
recall relative to DDPM-1000's. Finished stages are skipped when the script is run again (the
checkpoint, or a setting's eval JSON, already there), so a killed run continues.

One probe row is no CLI setting: dpm++2m-20 with a first-order LAST step (the solver's default makes it
first order below 15 steps only, as DPM-Solver does; diffusers' default final step is first order at
every step count). The script samples it itself (``--probe-sample``: the same checkpoint, labels, x_T
and fast sampler as the CLI, the coefficient table's threshold raised) and scores it with evaluate
--samples.

    python bench/experiments/sampler_study.py --out runs/sampler_study --results bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from digits_lt_experiment import mean_std, metrics_of, run  # the same folder: shared with the CBDM-vs-CFG study

# (name, evaluate's sampler flags); ddpm-1000 first: every ratio is taken against it
SETTINGS = [("ddpm-1000", ["--sampler", "ddpm"])]
SETTINGS += [(f"ddim-{k}", ["--sampler", "ddim", "--steps", str(k)]) for k in (10, 20, 50, 100)]
SETTINGS += [(f"dpm++2m-{k}-time", ["--sampler", "dpm++2m", "--steps", str(k), "--schedule", "time"])
             for k in (10, 20, 50, 100)]
SETTINGS += [(f"dpm++2m-{k}-logsnr", ["--sampler", "dpm++2m", "--steps", str(k), "--schedule", "logsnr"])
             for k in (10, 20)]  # the logSNR grid of T = 1000 allows at most 37 steps
PROBE = "dpm++2m-20-first-order-last"  # see the module docstring
REFERENCE = "ddpm-1000"
# every ODE sampler here solves the same probability-flow ODE from the same x_T (per seed and image index):
# the RMS pixel distance of its images to the 100-step DPM-Solver++ images measures its solver error
ODE_REFERENCE = "dpm++2m-100-time"
SHOWN = ("fid", "recall", "precision", "recognised", "many_recognised", "medium_recognised", "few_recognised",
         "few_fid_pooled", "rmse_to_ode")


def stages(args) -> list:
    """[(output path, command)]: the training run, then one evaluate --ckpt per (setting, seed) of --only."""
    out, py = Path(args.out), sys.executable
    ckpt = Path(args.ckpt) if args.ckpt else out / "cbdm" / f"ckpt_{args.train_steps}.pt"
    todo = [(ckpt, [py, "-m", "cbdm_fast.train", "--steps", str(args.train_steps), "--logdir", str(ckpt.parent),
                    "--sample-every", "0", "--no-progress", "--threads", "1", "--resume"])]
    for seed in args.seeds:
        for name, flags in SETTINGS:
            if name not in args.only:
                continue
            stem = out / f"{name}_seed{seed}"
            todo.append((stem.with_suffix(".json"),
                         [py, "-m", "cbdm_fast.evaluate", "--ckpt", str(ckpt), "--per-class", str(args.per_class),
                          "--omega", str(args.omega), "--seed", str(seed), "--sample-batch-size", "100",
                          "--samples-out", str(stem.with_suffix(".npz")), "--json", str(stem.with_suffix(".json")),
                          "--threads", "1", "--quiet"] + flags))
        if PROBE not in args.only:
            continue
        npz, result = out / f"{PROBE}_seed{seed}.npz", out / f"{PROBE}_seed{seed}.json"
        todo.append((npz, [py, __file__, "--probe-sample", str(ckpt), str(seed), str(args.per_class), str(args.omega),
                           str(npz)]))
        todo.append((result, [py, "-m", "cbdm_fast.evaluate", "--samples", str(npz), "--seed", str(seed), "--json",
                              str(result), "--threads", "1", "--quiet"]))
    return todo


def probe_sample(ckpt: str, seed: int, per_class: int, omega: float, out: str) -> None:
    """The probe's samples: DPM-Solver++(2M), 20 steps, time grid, the last step first order."""
    import numpy as np
    import torch

    import cbdm_fast.samplers.dpm_solver as dpm_solver
    from cbdm_fast.files.models import load_model
    from cbdm_fast.files.images import to_uint8
    from cbdm_fast.samplers import FastSampler, class_balanced_labels
    from cbdm_fast.schedule import Schedule

    torch.set_num_threads(1)
    dpm_solver.LOWER_ORDER_BELOW = 10 ** 9  # a first-order last step at any step count
    model, info = load_model(ckpt)
    schedule = Schedule(model.config["T"], info["beta_1"], info["beta_T"])
    size = info["image_size"] or 32
    sampler = FastSampler(model.eval(), schedule, (model.in_ch, size, size), seed=seed, sampler="dpm++2m", steps=20,
                          omega=omega, method="cfg")
    y = class_balanced_labels(per_class, model.num_class)  # global index i is the CLI's image i
    index = torch.arange(len(y))
    x = torch.cat([sampler(y[i:i + 100], index[i:i + 100]) for i in range(0, len(y), 100)])
    np.savez(out, images=to_uint8(x), labels=y.numpy())


def rmse_to_ode(out: Path, name: str, seed: int):
    """RMS difference (uint8 pixel units) between a run's images and ODE_REFERENCE's of the same seed; None
    when either sample file is missing."""
    import numpy as np

    a, b = out / f"{name}_seed{seed}.npz", out / f"{ODE_REFERENCE}_seed{seed}.npz"
    if not (a.exists() and b.exists()):
        return None
    with np.load(a) as fa, np.load(b) as fb:
        assert (fa["labels"] == fb["labels"]).all(), f"{a} and {b} hold other labels"
        diff = fa["images"].astype(np.float64) - fb["images"].astype(np.float64)
    return float(np.sqrt((diff ** 2).mean()))


def summarise(out: Path, seeds: list) -> dict:
    """{setting: {metric: (mean, sd)}} over the seeds that finished (``seeds`` lists them), plus the ratios to
    the reference's means when the reference finished. Settings with no finished seed are left out."""
    per_run, done = {}, {}
    for name in [n for n, _ in SETTINGS] + [PROBE]:
        finished = [s for s in seeds if (out / f"{name}_seed{s}.json").exists()]
        if finished:
            done[name] = finished
            per_run[name] = [{**metrics_of(json.loads((out / f"{name}_seed{s}.json").read_text())),
                              "rmse_to_ode": rmse_to_ode(out, name, s)} for s in finished]
    summary = {name: {k: mean_std([r.get(k) for r in runs]) for k in runs[0]} for name, runs in per_run.items()}
    for name, m in summary.items():
        m["seeds"] = done[name]
        ref = summary.get(REFERENCE)
        m["fid_vs_ddpm1000"] = m["fid"][0] / ref["fid"][0] if ref else None
        m["recall_vs_ddpm1000"] = m["recall"][0] / ref["recall"][0] if ref else None
    return {"per_run": per_run, "summary": summary}


def table(summary: dict, seeds: list) -> str:
    head = ["sampler", "model evals", "seeds"] + list(SHOWN) + ["FID / ddpm-1000", "recall / ddpm-1000"]
    lines = [f"Mean ± sd over the noise seeds that finished (of {', '.join(map(str, seeds))}; sd 0 for one seed). "
             "FID lower is better, the rest higher. rmse_to_ode: RMS pixel difference (0-255) to the same "
             f"images drawn by {ODE_REFERENCE} (the same x_T), the solver's error on this model, over the seeds "
             "where that reference was drawn.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if REFERENCE not in summary:
        lines[1:1] = ["", f"{REFERENCE}, the reference of the ratios, has not finished: rerun the script to add it "
                          "(it skips the finished settings)."]
    for name, m in summary.items():
        evals = name.split("-")[1]
        cells = ["-" if m[k][0] is None else f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in SHOWN]
        ratios = ["-" if m[k] is None else f"{m[k]:.2f}" for k in ("fid_vs_ddpm1000", "recall_vs_ddpm1000")]
        lines.append(f"| {name} | {evals} | {','.join(map(str, m['seeds']))} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-sample"]:
        ckpt, seed, per_class, omega, out = argv[1:]
        probe_sample(ckpt, int(seed), int(per_class), float(omega), out)
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sampler_study", help="folder for the checkpoint, samples and eval JSON")
    p.add_argument("--results", default="bench/results", help="where sampler_study_pc<per-class>.json and .md go")
    p.add_argument("--train-steps", type=int, default=3000, help="CBDM training steps (the demo trains 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="noise seeds of every setting")
    p.add_argument("--per-class", type=int, default=50, help="samples per class of every setting")
    p.add_argument("--omega", type=float, default=1.0, help="guidance strength (the digits preset's)")
    p.add_argument("--ckpt", help="score this checkpoint instead of training one into --out")
    names = [n for n, _ in SETTINGS] + [PROBE]
    p.add_argument("--only", nargs="+", choices=names, default=names, metavar="SETTING",
                   help=f"run only these settings (default all: {' '.join(names)}); the summary takes every "
                        "finished one")
    args = p.parse_args(argv)
    out = Path(args.out)
    for path, cmd in stages(args):
        if path.exists():
            continue
        print(f"[{path.name}]", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        run(cmd, out / "study.log")
    result = summarise(out, args.seeds)
    md = table(result["summary"], args.seeds)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("train_steps", "seeds", "per_class", "omega", "ckpt")}
    settings = {**dict(SETTINGS), PROBE: "probe: --sampler dpm++2m --steps 20, the last step first order"}
    (results / f"sampler_study_pc{args.per_class}.json").write_text(json.dumps({**config, "settings": settings, **result}, indent=1))
    (results / f"sampler_study_pc{args.per_class}.md").write_text(
        f"# Sampler study on digits-LT (`python bench/experiments/sampler_study.py`)\n\nCBDM, {args.train_steps} training steps, "
        f"{args.per_class} guided samples per class (omega {args.omega:g}) per setting and seed.\n\n{md}")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
