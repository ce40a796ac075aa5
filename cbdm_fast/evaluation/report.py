"""The evaluation report: PNG plots drawn with Pillow (no plotting library needed) and a markdown page.

    write_report(result, images, labels, out_dir) -> path of report.md
        per_class.png      per-class recall and recognition accuracy (and downstream accuracy) against the
                           class's training-set count, log x axis
        per_class_fid.png  per-class FID against the training-set count, log x axis
        grid.png           a head-to-tail sample grid: one row per class, ordered by training count
        report.md          the tables (overall, groups, per class) and links to the images
    line_plot(series, path, ...) a small Pillow line/scatter plot (also usable on its own)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_write
from ..files.images import make_grid

__all__ = ["write_report", "line_plot", "sample_grid", "format_table", "summary_lines"]

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def _save(image: Image.Image, path) -> Path:
    return atomic_write(path, lambda f: image.save(f, format="PNG"), durable=False)


def _text(d: ImageDraw.ImageDraw, xy, text: str, font, anchor: str | None = None, fill="black") -> None:
    """ImageDraw.text with an anchor, also for bitmap fonts (which take no anchor): offset by hand."""
    try:
        d.text(xy, text, fill=fill, font=font, anchor=anchor)
        return
    except ValueError:
        pass
    x, y = xy
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    if anchor:
        x -= {"l": 0, "m": (right - left) / 2, "r": right - left}.get(anchor[0], 0)
        y -= {"t": 0, "m": (bottom - top) / 2, "b": bottom - top}.get(anchor[1], 0)
    d.text((x, y), text, fill=fill, font=font)


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks or [lo, hi]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def line_plot(series, path, title: str = "", xlabel: str = "", ylabel: str = "", log_x: bool = False,
              y_range: tuple[float, float] | None = None, size=(720, 440), annotate=None) -> Path:
    """Draw ``series`` = [(name, xs, ys), ...] as markers joined by lines (points sorted by x; None/NaN
    skipped) into a PNG at ``path``. annotate: optional [(x, text)] labels written above the x axis."""
    w, h = size
    left, right, top, bottom = 70, 20, 40, 80
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = []
    for name, xs, ys in series:
        pts.append((name, [(float(x), float(y)) for x, y in zip(xs, ys)
                           if x is not None and y is not None and math.isfinite(float(y))
                           and (not log_x or float(x) > 0)]))
    all_x = [x for _, p in pts for x, _ in p] or [1.0, 10.0]
    all_y = [y for _, p in pts for _, y in p] or [0.0, 1.0]
    x_lo, x_hi = min(all_x), max(all_x)
    if log_x:
        x_lo, x_hi = x_lo / 1.25, x_hi * 1.25
    else:
        pad = (x_hi - x_lo) * 0.05 or 1.0
        x_lo, x_hi = x_lo - pad, x_hi + pad
    if y_range is not None:
        y_lo, y_hi = y_range
    else:
        y_lo, y_hi = min(all_y), max(all_y)
        pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.1, 1.0)
        y_lo, y_hi = min(0.0, y_lo - pad) if y_lo >= 0 else y_lo - pad, y_hi + pad

    def tx(x):
        if log_x:
            f = (math.log10(x) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))
        else:
            f = (x - x_lo) / (x_hi - x_lo)
        return left + f * (w - left - right)

    def ty(y):
        return h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)

    # grid and ticks
    for yt in _nice_ticks(y_lo, y_hi):
        if y_lo <= yt <= y_hi:
            d.line([(left, ty(yt)), (w - right, ty(yt))], fill=(225, 225, 225))
            _text(d, (left - 6, ty(yt)), _fmt(yt), font, "rm")
    for xt in (_log_ticks(x_lo, x_hi) if log_x else _nice_ticks(x_lo, x_hi)):
        if x_lo <= xt <= x_hi:
            d.line([(tx(xt), top), (tx(xt), h - bottom)], fill=(235, 235, 235))
            _text(d, (tx(xt), h - bottom + 6), _fmt(xt), font, "mt")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    _text(d, (w / 2, 12), title, font, "mt")
    _text(d, (w / 2, h - bottom + 24), xlabel + (" (log scale)" if log_x else ""), font, "mt")
    d.text((8, top - 22), ylabel, fill="black", font=font)
    for i, (name, p) in enumerate(pts):
        color = COLORS[i % len(COLORS)]
        p = sorted(p)
        if len(p) > 1:
            d.line([(tx(x), ty(y)) for x, y in p], fill=color, width=2)
        for x, y in p:
            d.ellipse([tx(x) - 4, ty(y) - 4, tx(x) + 4, ty(y) + 4], fill=color, outline="black")
        # legend: one row under the x axis label
        lx, ly = left + 200 * i, h - 22
        d.rectangle([lx, ly + 2, lx + 10, ly + 12], fill=color, outline="black")
        d.text((lx + 16, ly), name, fill="black", font=font)
    for x, text in annotate or []:
        if x is not None and (not log_x or x > 0) and x_lo <= x <= x_hi:
            _text(d, (tx(x), h - bottom - 4), text, font, "mb", fill=(90, 90, 90))
    return _save(img, path)


def sample_grid(images: np.ndarray, labels: np.ndarray, order: list[int], path, per_row: int = 10,
                max_rows: int = 10, names=None, counts=None) -> Path:
    """Rows of generated samples, one row per class in ``order`` (head to tail; at most ``max_rows``
    classes, evenly spaced along the order), with the class and its training count on the left."""
    order = list(order)
    if len(order) > max_rows:
        order = [order[i] for i in np.unique(np.round(np.linspace(0, len(order) - 1, max_rows)).astype(int))]
    _, hgt, wid, c = images.shape
    blank = np.full((hgt, wid, c), 255, np.uint8)
    tiles = []
    for cls in order:
        idx = np.flatnonzero(labels == cls)[:per_row]
        row = [images[i] for i in idx] + [blank] * (per_row - len(idx))
        tiles.extend(row)
    grid = make_grid(np.stack(tiles), per_row) if tiles else np.full((hgt, wid, c), 255, np.uint8)
    scale = max(1, 64 // max(hgt, wid))
    g = Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")
    g = g.resize((g.width * scale, g.height * scale), Image.NEAREST)
    label_w = 110
    canvas = Image.new("RGB", (g.width + label_w, g.height), "white")
    canvas.paste(g, (label_w, 0))
    d = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    row_h = (hgt + 2) * scale
    for r, cls in enumerate(order):
        name = names[cls] if names else str(cls)
        text = f"{name} (n={counts[cls]})" if counts is not None else name
        _text(d, (6, 2 * scale + r * row_h + (hgt * scale) / 2), text, font, "lm")
    return _save(canvas, path)


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.{digits}f}"


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(widths[i]) if i else c.ljust(widths[i]) for i, c in enumerate(cells))
    return "\n".join([fmt(header), fmt(["-" * x for x in widths])] + [fmt(r) for r in rows])


def _tables(result: dict, markdown: bool) -> list[tuple[str, str]]:
    m = result["metrics"]["overall"]
    kid_ = m["kid"]
    is_ = m["inception_score"]
    prd_ = m["prd"]
    rows = [["FID", _f(m["fid"])]]
    if m.get("fid_vs_stats") is not None:
        rows.append([f"FID vs {m['fid_stats_file']}", _f(m["fid_vs_stats"])])
    rows += [["KID", f"{_f(kid_['mean'], 5)} +- {_f(kid_['std'], 5)}"],
             ["Inception Score", f"{_f(is_['mean'])} +- {_f(is_['std'])} ({is_['splits']} splits)"],
             [f"precision (k={m['k']})", _f(m["precision"])],
             [f"recall (k={m['k']})", _f(m["recall"])],
             ["PRD F_8 (recall-like)", _f(prd_["f_8"])],
             ["PRD F_1/8 (precision-like)", _f(prd_["f_1_8"])],
             ["recognised as its label", _f(m["recognition_accuracy"])]]
    ds = result.get("downstream")
    if ds:
        rows.append(["downstream accuracy (train on generated, test on real)", _f(ds["accuracy"])])
    out = [("overall", format_table(["metric", "value"], rows, markdown))]
    groups = result["metrics"]["groups"]
    grow = []
    for g in ("many", "medium", "few", "all"):
        v = groups[g]
        row = [g, ",".join(str(c) for c in v["classes"]) or "-", _f(v["fid_mean"]), _f(v["fid_pooled"]),
               _f(v["precision"]), _f(v["recall"]), _f(v["accuracy"])]
        if ds:
            row.append(_f(ds["groups"].get(g)))
        grow.append(row)
    head = ["group", "classes", "FID (mean)", "FID (pooled)", "precision", "recall", "recognised"]
    out.append((f"groups ({result['metrics']['group_thresholds']['many']} many, "
                f"{result['metrics']['group_thresholds']['few']} few)",
                format_table(head + (["downstream"] if ds else []), grow, markdown)))
    pc = result["metrics"]["per_class"]
    if pc:
        names = result.get("class_names") or []
        ds_pc = {r["class"]: r["accuracy"] for r in ds["per_class"]} if ds else {}
        prow = []
        for r in pc:
            row = [str(r["class"]) + (f" ({names[r['class']]})" if names and names[r["class"]] != str(r["class"])
                                      else ""),
                   str(r["train_count"]), r["group"] or "-", str(r["num_samples"]), str(r["num_real"]),
                   _f(r["fid"]), _f(r["precision"]), _f(r["recall"]), _f(r["accuracy"])]
            if ds:
                row.append(_f(ds_pc.get(r["class"])))
            prow.append(row)
        head = ["class", "train", "group", "samples", "real", "FID", "precision", "recall", "recognised"]
        out.append(("per class", format_table(head + (["downstream"] if ds else []), prow, markdown)))
    return out


def summary_lines(result: dict) -> str:
    """The plain-text tables the CLI prints."""
    parts = []
    for title, table in _tables(result, markdown=False):
        parts.append(title)
        parts.append(table)
        parts.append("")
    for note in result["metrics"].get("notes", []):
        parts.append(f"note: {note}")
    return "\n".join(parts).rstrip() + "\n"


def training_plots(run_dir, out: Path) -> list[tuple[str, Path]]:
    """The training run's loss curves (TensorBoard log) and evaluation-during-training curves
    (eval.jsonl), as PNGs in ``out``; [] when the run folder has neither."""
    from .run_log import eval_curves, loss_curves

    files = []
    losses = loss_curves(run_dir)
    if losses:
        files.append((f"training losses ({run_dir})", line_plot(
            [(tag.split("/", 1)[1], *curve) for tag, curve in losses.items()], out / "losses.png",
            title="training losses", xlabel="step", ylabel="loss")))
    evals = eval_curves(run_dir)
    if evals:
        files.append(("evaluation during training", line_plot(
            [(name, *curve) for name, curve in evals.items()], out / "eval_during_training.png",
            title="evaluation during training (eval.jsonl)", xlabel="step", ylabel="value")))
    return files


def write_report(result: dict, images: np.ndarray, labels, out_dir, run_dir=None) -> Path:
    """Plots, sample grid and report.md in ``out_dir`` (created); returns the markdown path.
    run_dir: the training run folder, whose loss and evaluation curves are plotted too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pc = result["metrics"]["per_class"]
    counts = result["train_counts"]
    names = result.get("class_names")
    files = []
    if pc:
        xs = [r["train_count"] for r in pc]
        series = [("recall (k-NN)", xs, [r["recall"] for r in pc]),
                  ("recognised as its label", xs, [r["accuracy"] for r in pc])]
        if result.get("downstream"):
            series.append(("downstream accuracy", xs, [r["accuracy"] for r in result["downstream"]["per_class"]]))
        ann = [(r["train_count"], str(r["class"])) for r in pc] if len(pc) <= 20 else None
        files.append(("per-class recall and accuracy", line_plot(
            series, out / "per_class.png", title="per-class recall / accuracy vs training-set count",
            xlabel="training images of the class", ylabel="fraction", log_x=True, y_range=(0.0, 1.05),
            annotate=ann)))
        files.append(("per-class FID", line_plot(
            [("per-class FID", xs, [r["fid"] for r in pc])], out / "per_class_fid.png",
            title="per-class FID vs training-set count", xlabel="training images of the class",
            ylabel="FID", log_x=True, annotate=ann)))
    if labels is not None and (np.asarray(labels) >= 0).any():
        order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
        files.append(("samples, head (top) to tail (bottom)", sample_grid(
            images, np.asarray(labels), order, out / "grid.png", names=names, counts=counts)))
    else:
        n = min(len(images), 100)
        grid = make_grid(images[:n], 10)
        img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
        files.append(("samples", _save(img.resize((img.width * 2, img.height * 2), Image.NEAREST),
                                       out / "grid.png")))
    if run_dir is not None:
        files += training_plots(run_dir, out)
    lines = [f"# Evaluation of {result['samples']}", "",
             f"{result['num_samples']} generated images of **{result['dataset']}** "
             f"({result['image_size']}x{result['image_size']}x{result['channels']}); features: "
             f"{result['features']['description']}; reference: {result['reference']['description']}.", ""]
    for title, table in _tables(result, markdown=True):
        lines += [f"## {title}", "", table, ""]
    notes = result["metrics"].get("notes", [])
    if notes:
        lines += ["## notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## plots", ""]
    for title, path in files:
        lines += [f"### {title}", "", f"![{title}]({Path(path).name})", ""]
    md = out / "report.md"
    text = "\n".join(lines)
    atomic_write(md, lambda f: f.write(text.encode()), durable=False)
    return md
