"""The paper's tables and figures from a folder of GRPO-RM runs.

Reads RUNS_DIR/*/result.json (training runs) and RUNS_DIR/bench-*.json (benchmarks) and writes
RUNS_DIR/report.md: Tables 2/3/4/5/6 shaped like the paper's, GRPO-RM minus fine-tuning paired by
seed with 95% confidence intervals, every setting of an lr sweep; then Figure 3 (training curves,
PNG and CSV) and Figure 2 (segmentation examples, PNG) beside it.

    python3 tools/report.py RUNS_DIR
"""
import argparse
import glob
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

METHODS = {"frozen": "DINOv2 (frozen)", "ce": "Fine-tuning", "grpo": "GRPO-RM"}
UNIFORMITY_NAMES = {"none": "set to 0", "eq5": "Eq. (5)", "eq4": "Eq. (4) (GRPO-RM)"}
SEG_METRICS = ("pixel_acc", "iou", "miou")
CLS_METRICS = ("sr", "knn")
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # Student's t 0.975, df 1..20
FIG2_COLUMNS = ("image", "truth", "frozen", "fine-tuning", "GRPO-RM")


class ReportError(Exception):
    """Nothing to report on: the command line prints it as one `error:` line and exits 2."""


@dataclass(frozen=True, order=True)
class Key:
    """What makes runs one group: they differ by their seed only."""
    task: str
    data: str
    method: str
    uniformity: str  # "" unless grpo
    subset: float    # 1.0 for frozen runs: they post-train nothing
    lr: float        # 0.0 for frozen runs
    eval_lr: float


def read_json(path):
    with open(path) as f:
        return json.load(f)


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def data_label(cfg):
    """The dataset's name; for folder datasets also the folder's, so two folders stay apart."""
    if cfg["dataset"] not in ("imagefolder", "vocfolder"):
        return cfg["dataset"]
    return f"{cfg['dataset']}:{os.path.basename(os.path.normpath(cfg['data_dir']))}"


def variant(c):
    """What a GRPO-RM run adds to the paper's form (grpo_rm.py's flags beyond the paper)."""
    v = f" + dual-clip {c['dual_clip']:g}" if c.get("dual_clip") else ""
    v += f" + KL {c['kl_coef']:g}" if c.get("kl_coef") else ""
    return v + (f" + θ_old every {c['old_every']} steps" if c.get("old_every") else "")


def load_groups(root):
    """RUNS_DIR/*/result.json -> {Key: {seed: result}}; each result also records its folder."""
    groups = {}
    for f in sorted(glob.glob(os.path.join(root, "*", "result.json"))):
        r = read_json(f)
        r["dir"] = os.path.dirname(f)
        c = r["config"]
        frozen = c["method"] == "frozen"
        key = Key(c["task"], data_label(c), c["method"],
                  c["uniformity"] + variant(c) if c["method"] == "grpo" else "",
                  1.0 if frozen else c["subset"], 0.0 if frozen else c["lr"], c["eval_lr"])
        groups.setdefault(key, {})[c["seed"]] = r
    return groups


def values(runs, metric, ft=None):
    """{seed: value} of a metric (ft: the segmentation feature type)."""
    return {s: (r["metrics"][ft] if ft else r["metrics"])[metric] for s, r in runs.items()
            if ft is None or ft in r["metrics"]}


def main_key(groups, task, data, method, uniformity="eq4", subset=None):
    """The group a paper-shaped table shows for this method: of its settings (any subset if None),
    the one with the most seeds; ties go to the larger subset, then the larger lr."""
    keys = [k for k in groups if (k.task, k.data, k.method) == (task, data, method)
            and k.uniformity == (uniformity if method == "grpo" else "")
            and (subset is None or k.subset == subset or method == "frozen")]
    if method == "frozen":  # evaluated as the fine-tuned backbones were: with their eval lr
        ce = main_key(groups, task, data, "ce")
        keys = [k for k in keys if ce is None or k.eval_lr == ce.eval_lr] or keys
    return max(keys, key=lambda k: (len(groups[k]), k.subset, k.lr, k.eval_lr), default=None)


def main_runs(groups, *key, **kw):
    k = main_key(groups, *key, **kw)
    return groups[k] if k else {}


# -----------------------------------------------------------------------------
# Tables

def cell(vals, best=False):
    """'mean ± std' over seeds (sample std; one run: its value), bold when best, '—' when none."""
    if not vals:
        return "—"
    v = list(vals.values())
    text = f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    return f"**{text}**" if best else text


def table(title, header, rows, plain=0):
    """rows: [(first cells, [{seed: value} per metric column])]. Within each block of rows that
    share the first cell, the best mean of each column is bold (not in the last `plain` ones)."""
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blocks = list(dict.fromkeys(first[0] for first, _ in rows))
    for block in blocks:
        mine = [(first, vals) for first, vals in rows if first[0] == block]
        means = np.array([[np.mean(list(v.values())) if v else -np.inf for v in vals]
                          for _, vals in mine])  # (rows, columns)
        for (first, vals), m in zip(mine, means):
            # bold needs a rival: another row of the block with a value in that column
            best = [len(mine) > 1 and np.isfinite(x) and x == means[:, j].max()
                    and (means[:, j] > -np.inf).sum() > 1 and j < len(m) - plain
                    for j, x in enumerate(m)]
            cells = [*first, *(cell(v, b) for v, b in zip(vals, best))]
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def table3(groups):
    rows = [((d, name), [values(main_runs(groups, "cls", d, m), x) for x in CLS_METRICS])
            for d in sorted({k.data for k in groups if k.task == "cls"})
            for m, name in METHODS.items()]
    if not rows:
        return []
    return table("Table 3: classification, top-1 % (SR = softmax regression)",
                 ["Dataset", "Method", "SR", "kNN"], rows)


def tables2and4(groups):
    """Table 2 (all the data) and Table 4 (the subsets) together: one table per dataset."""
    out = []
    for d in sorted({k.data for k in groups if k.task == "seg"}):
        subsets = sorted({k.subset for k in groups if k.data == d and k.method != "frozen"})
        results = [r for k, g in groups.items() if k.data == d for r in g.values()]
        fts = [ft for ft in ("linear", "ms") if any(ft in r["metrics"] for r in results)]
        rows = []
        for ft in fts:
            for m, name in METHODS.items():
                for s in [1.0] if m == "frozen" else subsets:
                    runs = main_runs(groups, "seg", d, m, subset=s)
                    rows.append(((ft, name + (f" ({100 * s:g}%)" if s < 1 else "")),
                                 [values(runs, x, ft) for x in SEG_METRICS]))
        out += table(f"Tables 2/4: segmentation on {d}, % (IoU: frequency-weighted)",
                     ["Feature type", "Method", "Pixel Acc", "IoU", "mIoU"], rows)
    return out


def table6(groups):
    rows = []
    for t, d in sorted({(k.task, k.data) for k in groups if k.uniformity in ("eq5", "none")}):
        for u, name in UNIFORMITY_NAMES.items():
            runs = main_runs(groups, t, d, "grpo", u)
            if t == "cls":
                accuracy = values(runs, "sr")
            else:
                accuracy = values(runs, "pixel_acc", "linear")
            seconds = {s: float(np.mean(r["sec_per_epoch"])) for s, r in runs.items()
                       if r["sec_per_epoch"]}
            rows.append(((d, name), [accuracy, seconds]))
    if not rows:
        return []
    title = "Table 6: uniformity reward (SR % for cls, linear pixel acc % for seg; s/epoch)"
    # s/epoch is not bold: the fastest is no winner
    return table(title, ["Dataset", "Uniformity reward", "Accuracy", "s/epoch"], rows, plain=1)


def paired_ci(a, b):
    """Mean of the differences a[s] - b[s] over the seeds s of both, with its 95% confidence
    interval (Student's t, n - 1 degrees of freedom). -> (mean, low, high, n) or None."""
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(d) < 2:
        return None
    t = T975[len(d) - 2] if len(d) <= 21 else 1.96  # beyond the table t is about normal
    half = t * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half, len(d)


def comparisons(groups, t, d, lead):
    """The (name, grpo key, ce key) pairs to compare on one dataset: every (subset, lr) both ran,
    and, where an lr sweep exists, each method at its own best lr (by the metric `lead`)."""
    ce = {(k.subset, k.lr): k for k in groups if (k.task, k.data, k.method) == (t, d, "ce")}
    gr = {(k.subset, k.lr): k for k in groups
          if (k.task, k.data, k.method, k.uniformity) == (t, d, "grpo", "eq4")}
    pairs = []
    for s, lr in sorted(set(ce) & set(gr), reverse=True):
        name = f"lr {lr:g}" + (f", {100 * s:g}% of the data" if s < 1 else "")
        pairs.append((name, gr[s, lr], ce[s, lr]))
    for s in {s for s, _ in ce} & {s for s, _ in gr}:
        if sum(k.subset == s for k in (*ce.values(), *gr.values())) <= 2:
            continue  # one lr each: nothing to choose

        def mean_lead(k):
            return np.mean(list(values(groups[k], *lead).values()) or [-1])
        best = [max((k for k in ks.values() if k.subset == s), key=mean_lead) for ks in (gr, ce)]
        pairs.append((f"best lr: {best[0].lr:g} vs {best[1].lr:g}", *best))
    return pairs


def paired_table(groups):
    """GRPO-RM minus fine-tuning per dataset, paired by seed (same seed: same subset, same head
    initialisation), with 95% confidence intervals."""
    out = ["### GRPO-RM − fine-tuning, paired by seed: mean [95% CI] (n seeds)", "",
           "| Dataset | Setting | Metric | GRPO-RM − FT |", "|---|---|---|---|"]
    for t, d in sorted({(k.task, k.data) for k in groups}):
        if t == "cls":
            metrics = [(x, None) for x in CLS_METRICS]
            lead = ("sr", None)
        else:
            metrics = [(x, ft) for ft in ("linear", "ms") for x in SEG_METRICS]
            lead = ("miou", "linear")
        for name, kg, kc in comparisons(groups, t, d, lead):
            for x, ft in metrics:
                ci = paired_ci(values(groups[kg], x, ft), values(groups[kc], x, ft))
                if ci:
                    metric = f"{ft} {x}" if ft else x
                    out.append(f"| {d} | {name} | {metric} | {ci[0]:+.2f} "
                               f"[{ci[1]:+.2f}, {ci[2]:+.2f}] ({ci[3]}) |")
    return out + [""] if len(out) > 4 else []


def stable_table(groups):
    """Beyond the paper: each GRPO-RM variant beside the paper's form and fine-tuning, the
    difference to fine-tuning paired by seed, and the largest |ρ - 1| of every run."""
    out = []
    for t, d in sorted({(k.task, k.data) for k in groups if " + " in k.uniformity}):
        ms = [(x, None) for x in CLS_METRICS] if t == "cls" else [("miou", "linear")]
        kc = main_key(groups, t, d, "ce")
        keys = [k for k in (kc, main_key(groups, t, d, "grpo")) if k]
        keys += sorted(k for k in groups if (k.task, k.data) == (t, d) and " + " in k.uniformity)
        out += [f"### Beyond the paper on {d}: GRPO-RM's variants (lr {keys[-1].lr:g})", "",
                "| Method | seeds | " + " | ".join(x for x, _ in ms) + " | "
                + " | ".join(f"{x} − fine-tuning [95% CI]" for x, _ in ms)
                + " | max \\|ρ − 1\\| per run |", "|---" * (3 + 2 * len(ms)) + "|"]
        for k in keys:
            runs = groups[k]
            name = METHODS[k.method] + k.uniformity.replace("eq4", "", 1)
            cells = [cell(values(runs, x, ft)) for x, ft in ms]
            for x, ft in ms:
                ci = paired_ci(values(runs, x, ft), values(groups[kc], x, ft)) if kc else None
                cells.append(f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]" if ci else "—")
            dev = [max(r["series"]["ratio_dev_max"]) for r in runs.values()
                   if r.get("series", {}).get("ratio_dev_max")]
            cells.append(", ".join(f"{v:.3g}" for v in dev) or "—")
            out.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def settings_table(groups):
    """Every setting of each dataset that has more than one (an lr sweep, other eval lrs)."""
    out = []
    for t, d in sorted({(k.task, k.data) for k in groups}):
        keys = sorted((k for k in groups if (k.task, k.data) == (t, d)), key=lambda k: (
            list(METHODS).index(k.method), k.uniformity, k.subset, -k.lr, -k.eval_lr))
        if len(keys) <= len({(k.method, k.uniformity, k.subset) for k in keys}):
            continue
        if t == "cls":
            ms = [(x, None) for x in CLS_METRICS]
        else:  # the linear features' metrics
            ms = [(x, "linear") for x in SEG_METRICS]
        rows = []
        for k in keys:
            name = METHODS[k.method]
            name += f" {k.uniformity}" if k.uniformity not in ("", "eq4") else ""
            name += f" ({100 * k.subset:g}%)" if k.subset < 1 else ""
            lr = "—" if k.method == "frozen" else f"{k.lr:g}"
            rows.append(((name, lr, f"{k.eval_lr:g}"), [values(groups[k], x, ft) for x, ft in ms]))
        out += table(f"Every setting on {d}" + (" (linear features)" if t == "seg" else ""),
                     ["Method", "lr", "eval lr", *(x for x, _ in ms)], rows)
    return out


def bench_table(benches):
    """Table 5 from --bench results, in the paper's units (forward MACs of the linear layers per
    batch; seconds per epoch of its training set; memory summed over GPUs) and in ours."""
    out = ["### Table 5: cost of a training step, fine-tuning vs GRPO-RM (--bench, synthetic data)",
           "", "| Dataset | Model | Setting | Device | Method | fwd GMAC/batch | s/epoch | "
           "GB summed | ms/step | GFLOP/step | GB/process | grpo/ce time | grpo/ce memory |",
           "|" + "---|" * 13]
    for b in benches:
        c = b["config"]
        ce = b["methods"]["ce"]
        g = b["methods"]["grpo"]
        kw = {k: v for k, v in c.get("hub_kwargs", {}).items() if k != "pretrained"}
        model = c["model"] + (f" ({', '.join(f'{k} {v}' for k, v in kw.items())})" if kw else "")
        setting = (f"{c['img_size']} px, batch {c['batch_size']}, {c['dtype']}"
                   f"{', compile' if c['compile'] else ''}{', no-sdpa' if c['no_sdpa'] else ''}")
        # peak memory per method is measured on GPUs only (None on the CPU)
        mem = ce["peak_memory_gb"] and f"x{g['peak_memory_gb'] / ce['peak_memory_gb']:.3f}"
        for m, r in b["methods"].items():
            ratio = f"x{g['time_ratio']:.3f} | {fmt(mem, 's')}" if m == "grpo" else " | "
            cells = [c["dataset"], model, setting, f"{b['device']} × {b['world_size']}", m,
                     f"{r['fwd_macs_per_batch'] / 1e9:.1f}", fmt(r["sec_per_epoch_paper"], ".1f"),
                     fmt(r["memory_sum_gb"]), f"{r['ms_per_step']:.1f}",
                     f"{r['flops_per_step'] / 1e9:.1f}", fmt(r["peak_memory_gb"]), ratio]
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


# -----------------------------------------------------------------------------
# Figures

BLUE = (31, 119, 180)
RED = (214, 39, 40)
CUT = (255, 127, 14)    # the marks of cut steps: not the curve's colour
GRID = (222, 226, 234)  # blue-grey: black or coloured text's antialiasing never makes it
FIG2_TOP = 76           # Figure 2: two title lines, then the column titles, then the grid


def font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def put_text(d, xy, s, f, anchor="lt", fill="black"):
    """Text anchored l/m/r horizontally and t/m/b vertically (works with any PIL font)."""
    l, t, r, b = d.textbbox((0, 0), s, font=f)
    x = xy[0] - {"l": 0, "m": (r - l) / 2, "r": r - l}[anchor[0]] - l
    y = xy[1] - {"t": 0, "m": (b - t) / 2, "b": b - t}[anchor[1]] - t
    d.text((x, y), s, font=f, fill=fill)


def save_png(img, path, title, texts):
    """Saves img with its title and its other words (panel titles, legends, key) as PNG text
    chunks: what the figure says stays readable without reading its pixels."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", "\n".join(texts))
    img.save(path, pnginfo=info)


def setting(d, lrs, seeds):
    """What a figure shows, for its title: (the dataset and its folder, the lr of each method in
    lrs {name: lr} and the words on seeds)."""
    name = "{} ({})".format(*d.split(":", 1)) if ":" in d else d
    return name, ", ".join([*(f"{m} lr {v:g}" for m, v in lrs.items()), seeds])


def nice_ticks(lo, hi, n=5):
    """About n round values (multiples of 1, 2 or 5 × 10^k) within [lo, hi]."""
    raw = (hi - lo) / n if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    ks = range(math.ceil(lo / step), math.floor(hi / step) + 1)
    return [float(f"{k * step:.12g}") for k in ks]  # k·step, without accumulated rounding


def plot_layer(size, X, Y, lines, xgrid, cut):
    """The inside of a plotting box as its own image, so nothing drawn there leaves the box:
    grid lines, curves, and a triangle at the top edge for each cut step."""
    layer = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(layer)
    for g in xgrid:
        d.line([(X(g), 0), (X(g), size[1])], fill=GRID)
    for x, y, colour in lines:
        ok = np.flatnonzero(np.isfinite(y))
        for run in np.split(ok, np.flatnonzero(np.diff(ok) > 1) + 1):  # a NaN (cut step): a gap
            d.line([(X(x[k]), Y(y[k])) for k in run] * (1 + (len(run) == 1)), fill=colour)
    for a in cut[0] if cut else ():
        d.polygon([(X(a) - 4, 9), (X(a) + 4, 9), (X(a), 1)], fill=CUT)
    return layer


def chart(img, box, title, xlabel, ylabel, lines, xgrid=(), cut=None):
    """A line chart whose plotting box is box: tick values, vertical grid lines at xgrid, one
    curve per (xs, ys, colour) (NaN: a gap), cut = (xs, legend label): marks at the top edge."""
    d = ImageDraw.Draw(img)
    f = font(13)
    x0, y0, x1, y1 = box
    xs = np.concatenate([v[0] for v in lines])
    ys = np.concatenate([v[1] for v in lines])
    ys = ys[np.isfinite(ys)] if np.isfinite(ys).any() else np.zeros(1)  # every step cut: 0
    xlo, xhi, ylo, yhi = xs.min(), xs.max(), ys.min(), ys.max()
    pad = (yhi - ylo) * 0.05 or 0.5  # a flat line still gets a y range
    ylo, yhi = ylo - pad, yhi + pad
    xhi = xhi if xhi > xlo else xlo + 1

    def X(v):  # in the box's own pixels
        return (x1 - x0) * (v - xlo) / (xhi - xlo)

    def Y(v):
        return (y1 - y0) * (yhi - v) / (yhi - ylo)

    img.paste(plot_layer((x1 - x0 + 1, y1 - y0 + 1), X, Y, lines, xgrid, cut), (x0, y0))
    for t in nice_ticks(ylo, yhi):
        d.line([(x0 - 4, y0 + Y(t)), (x0, y0 + Y(t))], fill="black")
        put_text(d, (x0 - 7, y0 + Y(t)), f"{t:.4g}", f, "rm")
    for t in nice_ticks(xlo, xhi, 8):
        d.line([(x0 + X(t), y1), (x0 + X(t), y1 + 4)], fill="black")
        put_text(d, (x0 + X(t), y1 + 7), f"{t:g}", f, "mt")
    d.rectangle(box, outline="black")
    put_text(d, ((x0 + x1) / 2, y0 - 24), title, font(15), "mb")
    put_text(d, ((x0 + x1) / 2, y1 + 26), xlabel, f, "mt")
    put_text(d, (x0 - 7, y0 - 6), ylabel, f, "rb")
    if cut:  # the legend, above the box: it never covers the data
        x = x1 - d.textbbox((0, 0), cut[1], font=f)[2] - 14
        d.polygon([(x - 4, y0 - 5), (x + 4, y0 - 5), (x, y0 - 13)], fill=CUT)
        put_text(d, (x1, y0 - 4), cut[1], f, "rb", CUT)


def mean_series(runs, key):
    """The per-step series `key` of every seed -> (seeds, steps), cut to the shortest."""
    ss = [r["series"][key] for r in runs.values() if r.get("series", {}).get(key)]
    n = min(map(len, ss), default=0)
    return np.array([s[:n] for s in ss]) if n else None


def cut_spikes(y):
    """y for drawing, where a few steps (a ratio blow-up) would flatten the rest to a line: when
    the max is beyond p90 + 10·(p90 − p10), values above p90 + (p90 − p10) are cut to it.
    Returns the cut values and how many steps were cut (Figure 3 marks those at the top edge)."""
    lo, hi = np.percentile(y, [10, 90])
    top = hi + (hi - lo)
    if y.max() <= hi + 10 * (hi - lo):
        return y, 0
    return np.minimum(y, top), int((y > top).sum())


def panel_box(i):
    """Figure 3's plotting box of panel i (2 × 2, row by row): (x0, y0, x1, y1) in pixels."""
    x0, y0 = 90 + 850 * (i % 2), 100 + 380 * (i // 2)
    return x0, y0, x0 + 730, y0 + 260


def fig3_panels(ce, gr, clip, per_epoch):
    """Figure 3's panels as (title, y label, lines, x grid, cut) from (seeds, steps) series. The
    steps cut_spikes cuts leave gaps in GRPO-RM's loss, cut = (their epochs, legend label)."""
    def ep(a):  # (seeds, steps) -> the epoch at the end of each step
        return (np.arange(a.shape[1]) + 1) / per_epoch

    def cut_of(x, mask):
        n = int(mask.sum())
        return (x[mask], f"{n} step{'s' * (n != 1)} above the top edge, cut") if n else None
    loss, x = gr.mean(0), ep(gr)
    drawn, _ = cut_spikes(loss)  # the CSV keeps the values
    cut = drawn < loss
    shown = np.where(cut, np.nan, loss)
    n3 = int(3 * per_epoch)  # the first three epochs, or fewer if the run has fewer
    last = math.ceil(round(x[:n3][-1], 6))  # round: 100 steps / (100 / 3) is not quite 3
    zoom = "epoch 1" if last == 1 else f"epochs 1-{last}"
    grid = np.arange(0, x[-1] + 1, max(1, round(x[-1] / 25)))
    first = [(ep(ce), ce.mean(0), BLUE)] if ce is not None else []
    return [("Fine-tuning: cross-entropy per step", "loss", first, grid, None),
            ("GRPO-RM: -J per step", "loss", [(x, shown, RED)], grid, cut_of(x, cut)),
            (f"GRPO-RM: -J per step, {zoom}", "loss", [(x[:n3], shown[:n3], RED)],
             np.arange(0, last + 1), cut_of(x[:n3], cut[:n3])),
            ("GRPO-RM: clipped (sample, class) terms per step", "fraction",
             [(ep(clip), clip.mean(0), RED)], grid, None)]


def figure3(root, groups):
    """Figure 3 from the per-step series: both methods' training loss and GRPO-RM's clip fraction
    over the epochs (an epoch grid; GRPO-RM's loss restarts at 0 with every θ_old), CSV beside.
    One figure for the paper's form and one for each variant beyond it; without fine-tuning runs
    the first panel shows GRPO-RM's largest |ρ - 1| instead."""
    out = []
    for t, d in sorted({(k.task, k.data) for k in groups}):
        kc = main_key(groups, t, d, "ce")
        main = main_key(groups, t, d, "grpo")
        extra = sorted(k for k in groups if (k.task, k.data) == (t, d) and " + " in k.uniformity)
        for kg in [main, *extra] if main or extra else []:
            if kg is not None:
                out += figure3_one(root, groups, d, kc, kg)
    return out


def figure3_one(root, groups, d, kc, kg):
    ce = mean_series(groups[kc], "loss") if kc else None
    gr = mean_series(groups[kg], "loss")
    clip = mean_series(groups[kg], "clip_frac")
    if gr is None or clip is None:
        return []
    per_epoch = len(gr[0]) / len(next(iter(groups[kg].values()))["train_loss"])
    panels = fig3_panels(ce, gr, clip, per_epoch)
    if ce is None:  # the blow-up's own measure, on a log scale (it spans 16 orders of magnitude)
        dev = np.log10(np.maximum(mean_series(groups[kg], "ratio_dev_max").max(0), 1e-12))
        x = (np.arange(len(dev)) + 1) / per_epoch
        panels[0] = ("GRPO-RM: log10 of the largest |rho - 1| per step (max over seeds)", "log10",
                     [(x, dev, RED)], panels[1][3], None)
    runs = f"{len(gr)} seed{'s' * (len(gr) != 1)}"
    seeds = f"mean of {runs}" if ce is None or len(ce) == len(gr) else (
        f"mean of {len(ce)} (fine-tuning) and {len(gr)} (GRPO-RM) seeds")
    lrs = {"GRPO-RM" + kg.uniformity.replace("eq4", "", 1): kg.lr}
    lrs = {"fine-tuning": kc.lr, **lrs} if ce is not None else lrs
    title = "Figure 3: " + ", ".join(setting(d, lrs, seeds))
    img = Image.new("RGB", (1700, 800), "white")
    put_text(ImageDraw.Draw(img), (850, 14), title, font(17), "mt")
    for i, (name, ylabel, lines, grid, cut) in enumerate(panels):
        chart(img, panel_box(i), name, "epoch", ylabel, lines, grid, cut)
    extra = kg.uniformity.split(" + ", 1)[1] if " + " in kg.uniformity else ""
    slug = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in extra)  # a file name
    name = d.replace(":", "_") + (f"_{slug}" if slug else "")
    texts = [p[0] for p in panels] + [p[4][1] for p in panels if p[4]]
    save_png(img, os.path.join(root, f"fig3_{name}.png"), title, texts)
    if ce is None:
        return [f"Figure 3 ({d}, GRPO-RM{kg.uniformity.replace('eq4', '', 1)}): fig3_{name}.png"]
    epoch = np.arange(1, gr.shape[1] + 1) / per_epoch
    write_curve_csv(os.path.join(root, f"fig3_{name}.csv"), epoch, ce, gr, clip)
    return [f"Figure 3 ({d}): fig3_{name}.png, fig3_{name}.csv "
            f"({len(groups[kc])} + {len(groups[kg])} seeds)"]


def write_curve_csv(path, epoch, ce, gr, clip):
    """Figure 3's numbers: per step, the mean and std over seeds."""
    with open(path, "w") as f:
        f.write("step,epoch,ce_loss_mean,ce_loss_std,grpo_loss_mean,grpo_loss_std,"
                "grpo_clip_frac_mean\n")
        for s in range(min(len(ce[0]), len(gr[0]))):
            f.write(f"{s + 1},{epoch[s]:.4f},{ce[:, s].mean():.6f},{ce[:, s].std():.6f},"
                    f"{gr[:, s].mean():.6f},{gr[:, s].std():.6f},{clip[:, s].mean():.6f}\n")


def voc_palette():
    """The Pascal VOC colour map: bit 3j + ch of the class index is bit 7 - j of channel ch."""
    i = np.arange(256)[:, None]  # (256, 1)
    pal = np.zeros((256, 3), np.int64)
    for j in range(8):
        pal |= ((i >> (3 * j + np.arange(3))) & 1) << (7 - j)
    return pal.astype(np.uint8)


def colour_key(classes, width):
    """Figure 2's key, a swatch and the index of each class (255: no label) in rows that fit
    width -> (its image, its words)."""
    f = font(13)
    labels = [f"{c}" + " no label" * (c == 255) for c in classes]
    per_row = max(1, (width - 110) // 56)  # 70 px for "classes:", 40 more: "255 no label"
    img = Image.new("RGB", (width, 22 * math.ceil(len(classes) / per_row) + 6), "white")
    d = ImageDraw.Draw(img)
    put_text(d, (6, 12), "classes:", f, "lm")
    for i, (c, label) in enumerate(zip(classes, labels)):
        x, y = 70 + 56 * (i % per_row), 22 * (i // per_row)
        # an outline: black and cream swatches stay visible on white
        colour = tuple(int(v) for v in voc_palette()[c])
        d.rectangle((x, y + 5, x + 14, y + 19), fill=colour, outline=(90, 90, 90))
        put_text(d, (x + 20, y + 12), label, f, "lm")
    return img, "classes: " + ", ".join(labels)


def vis_runs(groups, d):
    """{method: the vis.pt (--save-vis) of its first seed on dataset d, or None}."""
    import torch
    out = {}
    for m in METHODS:
        k = main_key(groups, "seg", d, m)
        path = os.path.join(groups[k][min(groups[k])]["dir"], "vis.pt") if k else ""
        out[m] = torch.load(path, weights_only=True) if os.path.isfile(path) else None
    return out


def vis_tiles(vis, i, tile):
    """Row i of Figure 2 as (3, tile, tile) uint8 tensors: the frozen run's image and truth, then
    every method's prediction; label maps in the VOC palette, upsampled by nearest neighbour."""
    from torchvision.transforms.functional import pil_to_tensor
    pal = voc_palette()  # (256, 3)
    maps = [vis["frozen"]["truth"][i]] + [vis[m]["pred"][i] for m in METHODS]  # (H, W) each
    tiles = [vis["frozen"]["image"][i].permute(1, 2, 0).numpy()]  # (H, W, 3)
    tiles += [pal[y.numpy()] for y in maps]  # (H, W, 3) each
    # nearest: a label map must keep its colours
    return [pil_to_tensor(Image.fromarray(t).resize((tile, tile), Image.NEAREST)) for t in tiles]


def fig2_title(groups, d):
    """Figure 2's two title lines: the dataset; the lrs and the seed of each column's run."""
    keys = {m: main_key(groups, "seg", d, m) for m in METHODS}
    lrs = {name: keys[m].lr for m, name in (("ce", "fine-tuning"), ("grpo", "GRPO-RM")) if keys[m]}
    first = [str(min(groups[k])) for k in keys.values() if k]
    seeds = f"seed {first[0]}" if len(set(first)) == 1 else "seeds " + "/".join(first)
    name, rest = setting(d, lrs, f"one seed per method, not averaged ({seeds})")
    return "Figure 2: " + name, rest


def figure2(root, groups, tile=160, pad=2):
    """Figure 2: image | truth | frozen | fine-tuning | GRPO-RM, from the vis.pt (--save-vis) of
    each method's first seed, tiles upsampled (nearest) to tile px, under column titles, over a
    key of the classes they show."""
    # torch and torchvision only for Figure 2: the tables and Figure 3 need numpy and PIL
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid
    out = []
    for d in sorted({k.data for k in groups if k.task == "seg"}):
        vis = vis_runs(groups, d)
        if None in vis.values():
            continue
        n = min(len(v["image"]) for v in vis.values())
        tiles = [t for i in range(n) for t in vis_tiles(vis, i, tile)]
        grid = to_pil_image(make_grid(tiles, nrow=len(FIG2_COLUMNS), padding=pad, pad_value=255))
        shown = [vis["frozen"]["truth"][:n]] + [v["pred"][:n] for v in vis.values()]
        classes = sorted(set().union(*(y.unique().tolist() for y in shown)))
        key, key_text = colour_key(classes, grid.width)
        img = Image.new("RGB", (grid.width, FIG2_TOP + grid.height + 8 + key.height), "white")
        img.paste(grid, (0, FIG2_TOP))
        img.paste(key, (0, FIG2_TOP + grid.height + 8))
        draw = ImageDraw.Draw(img)
        title = fig2_title(groups, d)
        for i, line in enumerate(title):
            put_text(draw, (grid.width / 2, 4 + 22 * i), line, font(15), "mt")
        for j, column in enumerate(FIG2_COLUMNS):
            put_text(draw, (pad + (tile + pad) * j + tile / 2, FIG2_TOP - 14), column, font(15),
                     "mm")
        name = f"fig2_{d.replace(':', '_')}.png"
        save_png(img, os.path.join(root, name), "\n".join(title), [*FIG2_COLUMNS, key_text])
        out.append(f"Figure 2 ({d}): {name} ({' | '.join(FIG2_COLUMNS)})")
    return out


# -----------------------------------------------------------------------------
# Command line

def report(root):
    """Writes root/report.md and the figures beside it; returns the text of report.md."""
    groups = load_groups(root)
    benches = [read_json(f) for f in sorted(glob.glob(os.path.join(root, "bench-*.json")))]
    if not groups and not benches:
        raise ReportError(f"{root}: no */result.json or bench-*.json there")
    n = sum(len(g) for g in groups.values())
    out = [f"# Results in {root}", "", f"{n} runs; mean ± sample std over seeds; best in bold.", ""]
    out += table3(groups) + tables2and4(groups) + table6(groups) + paired_table(groups)
    out += stable_table(groups) + settings_table(groups)
    out += bench_table(benches) if benches else []
    out += figure3(root, groups) + figure2(root, groups)
    text = "\n".join(out) + "\n"
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", metavar="RUNS_DIR",
                   help="a folder of runs (*/result.json) and/or benchmarks (bench-*.json)")
    args = p.parse_args(argv)
    try:
        text = report(args.runs_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)


if __name__ == "__main__":
    main()
