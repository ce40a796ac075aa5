"""DDPM+CFG against CBDM on digits-LT over several seeds: train, sample, evaluate, summarise.

Each (method, seed) runs the three CLIs with the same budget (the demo preset: 1000 steps at batch 32),
draws --per-class samples per class with guidance --omega through the authors' 1000-step sampler (or
DDIM with --sampler ddim, ten times cheaper on a CPU), and
scores them with ``python -m cbdm_fast.evaluate --downstream``. Finished stages are skipped when the
script is run again (a checkpoint, .npz or eval JSON already there), so a killed run continues.
The summary gives the mean and standard deviation over seeds of each metric, overall and for the
many / medium / few-shot class groups, as markdown (printed and written to OUT/summary.md) and JSON.

    python bench/experiments/digits_lt_experiment.py --out runs/digits_lt_exp --seeds 0 1 2 [--sampler ddim]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from cbdm_fast.samplers import SAMPLERS

COMPARED = ("cfg", "cbdm")  # the training methods compared: the DDPM+CFG baseline and CBDM
LABELS = {"cfg": "DDPM+CFG", "cbdm": "CBDM"}
GROUPS = ("many", "medium", "few")


def run(cmd: list[str], log: Path) -> None:
    """Run one CLI, its output appended to ``log``; a failure stops the experiment naming the log."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}; see {log}")


def stages(out: Path, method: str, seed: int, args) -> list:
    """[(output path, command)] of one (method, seed): train, sample, evaluate."""
    folder = out / f"{method}_seed{seed}"
    py = sys.executable
    ckpt, samples, result = folder / f"ckpt_{args.steps}.pt", folder / "samples.npz", folder / "eval.json"
    return [
        (ckpt, [py, "-m", "cbdm_fast.train", "--method", method, "--seed", str(seed), "--steps", str(args.steps),
                "--logdir", str(folder), "--sample-every", "0", "--no-progress", "--resume"]),
        (samples, [py, "-m", "cbdm_fast.sample", "--ckpt", str(ckpt), "--per-class", str(args.per_class),
                   "--omega", str(args.omega), "--seed", str(seed), "--out", str(samples), "--no-progress",
                   "--sampler", args.sampler] + (["--steps", str(args.sample_steps)] if args.sampler != "ddpm" else [])),
        (result, [py, "-m", "cbdm_fast.evaluate", "--samples", str(samples), "--downstream", "--seed", str(seed),
                  "--json", str(result), "--quiet"]),
    ]


def metrics_of(r: dict) -> dict:
    """The summary's numbers from one evaluate JSON."""
    m, g = r["metrics"]["overall"], r["metrics"]["groups"]
    out = {"fid": m.get("fid"), "recall": m.get("recall"), "precision": m.get("precision"),
           "recognised": g.get("all", {}).get("accuracy")}
    if "downstream" in r:
        out["downstream"] = r["downstream"].get("accuracy")
    for name in GROUPS:
        grp = g.get(name) or {}
        out[f"{name}_fid_pooled"] = grp.get("fid_pooled")
        out[f"{name}_recall"] = grp.get("recall")
        out[f"{name}_recognised"] = grp.get("accuracy")
        if "downstream" in r:
            down = r["downstream"]["groups"].get(name)
            out[f"{name}_downstream"] = down.get("accuracy") if isinstance(down, dict) else down
    return out


def mean_std(values: list) -> tuple:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mu, sd


def summarise(per_run: dict, seeds: list[int]) -> tuple[dict, str]:
    keys = list(metrics_of_keys(per_run))
    summary = {m: {k: mean_std([per_run[m][s].get(k) for s in seeds]) for k in keys} for m in COMPARED}
    lower_better = lambda k: "fid" in k
    lines = [f"| metric (mean ± sd over seeds {', '.join(map(str, seeds))}) | "
             + " | ".join(LABELS[m] for m in COMPARED) + " | CBDM better in |",
             "| --- | --- | --- | --- |"]
    for k in keys:
        cells, wins = [], 0
        for m in COMPARED:
            mu, sd = summary[m][k]
            cells.append("-" if mu is None else f"{mu:.3f} ± {sd:.3f}")
        pairs = [(per_run["cfg"][s].get(k), per_run["cbdm"][s].get(k)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        wins = sum((b < a) if lower_better(k) else (b > a) for a, b in pairs)
        lines.append(f"| {k} ({'lower' if lower_better(k) else 'higher'} is better) | " + " | ".join(cells)
                     + f" | {wins}/{len(pairs)} seeds |")
    return summary, "\n".join(lines) + "\n"


def metrics_of_keys(per_run: dict):
    seen = []
    for m in per_run.values():
        for r in m.values():
            for k in r:
                if k not in seen:
                    seen.append(k)
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits_lt_exp", help="folder for the runs and the summary")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000, help="training steps (the demo preset's 1000)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class")
    p.add_argument("--omega", type=float, default=1.0, help="guidance strength for sampling")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: the authors' 1000-step ancestral sampler (default); ddim: --sample-steps steps, eta 0")
    p.add_argument("--sample-steps", type=int, default=100,
                   help="the sampler's steps, for every sampler but ddpm (which runs all 1000)")
    args = p.parse_args(argv)
    out = Path(args.out)
    runs = [(m, s) for s in args.seeds for m in COMPARED]
    for stage, name in enumerate(("train", "sample", "evaluate")):  # stage by stage over all runs
        for method, seed in runs:
            path, cmd = stages(out, method, seed, args)[stage]
            if path.exists():
                continue
            print(f"[{name} {LABELS[method]}, seed {seed}]", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            run(cmd, path.parent / "experiment.log")
    per_run = {m: {s: metrics_of(json.loads(stages(out, m, s, args)[2][0].read_text())) for s in args.seeds}
               for m in COMPARED}
    summary, table = summarise(per_run, args.seeds)
    (out / "summary.md").write_text(table)
    (out / "summary.json").write_text(json.dumps({"seeds": args.seeds, "steps": args.steps,
                                                  "per_class": args.per_class, "omega": args.omega,
                                                  "sampler": args.sampler, "sample_steps": args.sample_steps,
                                                  "per_run": per_run, "summary": summary}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
