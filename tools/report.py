"""The paper's tables and figures from a folder of GRPO-RM runs.

Reads RUNS_DIR/*/result.json (runs) and RUNS_DIR/bench-*.json (benchmarks); writes report.md:
Tables 2/3/4/6 shaped like the paper's, GRPO-RM minus fine-tuning paired by seed with 95%
confidence intervals, every setting of each dataset, Table 5; beside it Figure 3 (training
curves: PNG, PDF, CSV) and Figure 2 (segmentation examples: PNG, PDF). A setting is every flag of
a run's config but the seed and LOGISTICS, so a new flag sets runs apart with no change here.
Runs of other settings never share a row, a bold or a paired difference; what differs between
the runs of a table is printed under it; what is missing is listed with what it needs.

    python3 tools/report.py RUNS_DIR [--class-names FILE]
"""
import argparse
import csv
import glob
import itertools
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
from matplotlib.figure import Figure  # noqa: E402  (after the backend)
from matplotlib.patches import Patch  # noqa: E402

METHODS = {"frozen": "DINOv2 (frozen)", "ce": "Fine-tuning", "grpo": "GRPO-RM"}
# Flags that change nothing trained or evaluated (some only in older runs' configs).
LOGISTICS = {"seed", "out", "name", "resume", "force", "workers", "log_every", "stop_after_epoch",
             "compile", "dist_backend", "eval_memory_gb", "save_vis", "no_sdpa", "preload",
             "bench", "bench_steps", "bench_warmup", "report"}
PAPER_FORM = {"uniformity": "eq4", "clip_eps": 0.2, "dual_clip": None, "kl_coef": None,
              "old_every": None}  # GRPO-RM's own flags, at the paper's values
TRAINING = {"epochs", "lr", "subset", "augment", "background_penalty"}  # unused by frozen runs
SEG_ONLY = {"seg_size", "feature_type", "ms_scales", "background_penalty"}  # unused by cls runs
DATA_KEYS = {"task", "dataset", "data_dir"}  # what a dataset label names
UNIFORMITY_NAMES = {"none": "set to 0", "eq5": "Eq. (5)", "eq4": "Eq. (4) (GRPO-RM)"}
SEG_METRICS = ("pixel_acc", "iou", "miou")
CLS_METRICS = ("sr", "knn")
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # Student's t 0.975, df 1..20
VOC_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
             "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
             "pottedplant", "sheep", "sofa", "train", "tvmonitor")
CAMVID = {"Sky": (128, 128, 128), "Building": (128, 0, 0), "Pole": (192, 192, 128),
          "Road": (128, 64, 128), "Pavement": (60, 40, 222), "Tree": (128, 128, 0),
          "SignSymbol": (192, 128, 128), "Fence": (64, 64, 128), "Car": (64, 0, 128),
          "Pedestrian": (64, 64, 0), "Bicyclist": (0, 128, 192)}  # SegNet's 11, their colours
FIG2_NEEDS = ("vis.pt (grpo_rm.py --save-vis K) in a frozen, a fine-tuning and a GRPO-RM run "
              "of one setting")


class ReportError(Exception):
    """Nothing to report on, or an unreadable file: one `error:` line, exit 2."""


@dataclass
class Group:
    """Runs that differ by their seed only."""
    task: str
    data: str
    method: str
    setting: dict  # the flags that set what is trained and evaluated (unset ones left out)
    runs: dict = field(default_factory=dict)  # {seed: result}


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:  # a run killed while writing, a copy cut short
        raise ReportError(f"{path}: not valid JSON ({e.msg}: line {e.lineno} column "
                          f"{e.colno}): remove or rerun it") from None


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def text(v):
    """A flag's value as one writes it on the command line."""
    if isinstance(v, (list, dict)):
        return " ".join(map(text, v)) if isinstance(v, list) else json.dumps(v)
    return "unset" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def flag(k, v):
    if isinstance(v, bool):
        return f"--{'' if v else 'no-'}{k.replace('_', '-')}"
    return f"--{k.replace('_', '-')} {text(v)}"


def data_label(cfg):
    """The dataset's name; for folder datasets also the folder's, so two folders stay apart."""
    if cfg["dataset"] not in ("imagefolder", "vocfolder"):
        return cfg["dataset"]
    return f"{cfg['dataset']}:{os.path.basename(os.path.normpath(cfg['data_dir']))}"


def ignored(method, task):
    """The flags a method's runs (of a task) record but never use."""
    return LOGISTICS | (set() if method == "grpo" else set(PAPER_FORM)) | (
        TRAINING if method == "frozen" else set()) | (SEG_ONLY if task == "cls" else set())


def load_groups(root):
    """RUNS_DIR/*/result.json -> [Group]; each result also records its folder."""
    groups = {}
    for f in sorted(glob.glob(os.path.join(root, "*", "result.json"))):
        r = read_json(f)
        if not isinstance(r, dict) or not {"config", "metrics"} <= r.keys():
            raise ReportError(f"{f}: no \"config\" and \"metrics\": not a grpo_rm.py result")
        r["dir"], c = os.path.dirname(f), r["config"]
        skip = ignored(c["method"], c["task"])
        s = {k: v for k, v in c.items() if k not in skip and v is not None}
        key = (c["task"], data_label(c), c["method"], json.dumps(s, sort_keys=True))
        groups.setdefault(key, Group(*key[:3], s)).runs[c["seed"]] = r
    return list(groups.values())


def departures(g):
    """GRPO-RM's own flags where a group departs from the paper's form: ' --dual-clip 3'."""
    return "".join(f" {flag(k, g.setting.get(k))}" for k, v in PAPER_FORM.items()
                   if g.method == "grpo" and g.setting.get(k, v) != v)  # unset: older runs


def name(g):
    """A row's method: with its departures from the paper's form and its share of the data."""
    s = g.setting.get("subset", 1)
    return METHODS[g.method] + departures(g) + (f" ({100 * s:g}%)" if s < 1 else "")


def comparable(a, b):
    """Whether two groups differ in their method (GRPO-RM's own flags included) only."""
    skip = ignored(a.method, a.task) | ignored(b.method, b.task) | {"method", *PAPER_FORM}
    return all(a.setting.get(k) == b.setting.get(k) for k in {*a.setting, *b.setting} - skip)


def varying(gs):
    """The flags beyond the method's own whose values differ between the groups gs."""
    keys = {k for g in gs for k in g.setting} - {"method", *PAPER_FORM}
    return sorted(k for k in keys if len({text(g.setting.get(k)) for g in gs
                                          if k not in ignored(g.method, g.task)}) > 1)


def candidates(groups, task, data, method, forms=("",), **only):
    """The groups of a dataset and method whose departures() are in forms and whose flags
    match `only` (a flag a group does not use matches)."""
    return sorted((g for g in groups if (g.task, g.data, g.method) == (task, data, method)
                   and departures(g) in forms
                   and all(g.setting.get(k, v) == v for k, v in only.items())),
                  key=lambda g: json.dumps(g.setting, sort_keys=True))


def pick(cands):
    """One group (or None) per row from the lists cands: rows comparable with each other where
    they can be, then the most seeds, then the largest subset and lr (the paper's lr tops the
    sweeps here)."""
    def score(combo):
        gs = [g for g in combo if g]
        return (all(itertools.starmap(comparable, itertools.combinations(gs, 2))),
                sum(len(g.runs) for g in gs), sum(g.setting.get("subset", 0) for g in gs),
                sum(g.setting.get("lr", 0) for g in gs))
    return max(itertools.product(*[c or [None] for c in cands]), key=score)


def values(g, metric, ft=None):
    """{seed: value} of a metric (ft: the segmentation feature type); {} for no group."""
    runs = g.runs.items() if g else ()
    ms = {s: r["metrics"].get(ft, {}) if ft else r["metrics"] for s, r in runs}
    return {s: m[metric] for s, m in ms.items() if metric in m}


def metric_columns(task, groups):
    """(metric, feature type) per column: a segmentation dataset's for each feature type run."""
    fts = [ft for ft in ("linear", "ms") if any(ft in r["metrics"] for g in groups
                                                for r in g.runs.values())]
    return [(x, ft) for ft in fts for x in SEG_METRICS] if task == "seg" else [
        (x, None) for x in CLS_METRICS]


# -----------------------------------------------------------------------------
# Tables

def cell(vals, best=False):
    """'mean ± std' over seeds (sample std; one run: its value), bold when best, '—' when none."""
    if not vals:
        return "—"
    v = list(vals.values())
    s = f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    return f"**{s}**" if best else s


def differences(rows, shown=()):
    """What differs between a table's runs beyond each row's method. rows: [(block, label of a
    row without runs, group or None)]; flags in `shown` (told by the block's label) count
    within a block only.
    -> (lines for under the table, the blocks whose own rows differ: they are not compared)."""
    rows = list({(b, n, id(g)): (b, n, g) for b, n, g in rows}.values())
    gs = [g for _, _, g in rows if g]
    per, mixed = {b: [] for b, _, _ in rows}, set()
    for k in varying(gs):
        for b in per:
            vals = {}
            for _, _, g in (r for r in rows if r[0] == b and r[2]):
                if k not in ignored(g.method, g.task):
                    vals.setdefault(flag(k, g.setting.get(k)), []).append(name(g))
            if len(vals) > 1:
                mixed.add(b)
                per[b].append(" vs ".join(f"{v} ({', '.join(ns)})" for v, ns in vals.items()))
            elif vals and k not in shown:
                per[b].append(next(iter(vals)))
    lines = [f"- {b}: {'; '.join(v)}" + (": not compared, no bold" if b in mixed else "")
             for b, v in per.items() if v]
    lines = ["Flags that differ between the runs of this table:", "", *lines, ""] if lines else []
    none = [f"{b}: {n}" for b, n, g in rows if g is None]
    return lines + ([f"No runs of this setting: {'; '.join(none)}.", ""] if none else []), mixed


def table(title, header, rows, plain=0, shown=()):
    """A markdown table. rows: [(block, cells, group or None, [{seed: value} per metric])]; the
    best mean of a column is bold among the rows that share block and first cell, unless the
    block's runs differ beyond their method (not in the last `plain` columns)."""
    notes, mixed = differences([(b, c[1], g) for b, c, g, _ in rows], shown)
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for block in dict.fromkeys((b, c[0]) for b, c, _, _ in rows):
        mine = [r for r in rows if (r[0], r[1][0]) == block]
        means = np.array([[np.mean(list(v.values())) if v else -np.inf for v in r[3]]
                          for r in mine])  # (rows, columns)
        rivals = (means > -np.inf).sum(0) > 1  # bold needs another row with a value
        for (_, cells, _, vals), m in zip(mine, means):
            best = [block[0] not in mixed and rivals[j] and j < len(m) - plain
                    and x == means[:, j].max() for j, x in enumerate(m)]
            out.append("| " + " | ".join([*cells, *map(cell, vals, best)]) + " |")
    return out + [""] + notes


def datasets(groups, task=None):
    return sorted({(g.task, g.data) for g in groups if task in (None, g.task)})


def table3(groups, missing):
    rows = [(d, [d, name(g) if g else METHODS[m]], g, [values(g, x) for x in CLS_METRICS])
            for _, d in datasets(groups, "cls")
            for m, g in zip(METHODS, pick([candidates(groups, "cls", d, m) for m in METHODS]))]
    if not rows:
        missing.append("Table 3 (classification): runs of a classification dataset")
        return []
    return table("Table 3: classification, top-1 % (SR = softmax regression)",
                 ["Dataset", "Method", "SR", "kNN"], rows, shown=DATA_KEYS)


def tables2and4(groups, missing):
    """Table 2 (all the data) and Table 4 (subsets) together: a table per dataset, a block per
    share of the data post-trained on (the frozen row in each) and feature type."""
    out = []
    for _, d in datasets(groups, "seg"):
        mine = [g for g in groups if g.data == d]
        rows = []
        for s in sorted({g.setting["subset"] for g in mine if g.method != "frozen"} or {1.0},
                        reverse=True):
            picked = pick([candidates(groups, "seg", d, m, subset=s) for m in METHODS])
            for _, ft in metric_columns("seg", mine)[::len(SEG_METRICS)]:
                rows += [(f"{100 * s:g}% of the data", [ft, name(g) if g else METHODS[m]], g,
                          [values(g, x, ft) for x in SEG_METRICS])
                         for m, g in zip(METHODS, picked)]
        out += table(f"Tables 2/4: segmentation on {d}, % (IoU: frequency-weighted)",
                     ["Feature type", "Method", "Pixel Acc", "IoU", "mIoU"], rows,
                     shown=DATA_KEYS | {"subset"})
    if not out:
        missing.append("Tables 2/4 (segmentation): runs of a segmentation dataset")
    return out


def table6(groups, missing):
    rows = []
    for t, d in datasets(groups):
        forms = [f" --uniformity {u}" if u != "eq4" else "" for u in UNIFORMITY_NAMES]
        if not any(candidates(groups, t, d, "grpo", forms[:2])):
            continue
        picked = pick([candidates(groups, t, d, "grpo", (f,)) for f in forms])
        x, ft = ("sr", None) if t == "cls" else ("pixel_acc", "linear")
        for u, g in zip(UNIFORMITY_NAMES.values(), picked):
            secs = {s: float(np.mean(r["sec_per_epoch"])) for s, r in (g.runs if g else {}).items()
                    if r.get("sec_per_epoch")}
            rows.append((d, [d, u], g, [values(g, x, ft), secs]))
    if not rows:
        missing.append("Table 6 (uniformity reward): GRPO-RM runs with --uniformity none and "
                       "eq5 beside the paper's eq4, on one dataset")
        return []
    title = "Table 6: uniformity reward (SR % for cls, linear pixel acc % for seg; s/epoch)"
    # s/epoch is not bold: the fastest is no winner
    return table(title, ["Dataset", "Uniformity reward", "Accuracy", "s/epoch"], rows, plain=1,
                 shown=DATA_KEYS)


def paired_ci(a, b):
    """Mean of the differences a[s] - b[s] over the seeds s of both, with its 95% confidence
    interval (Student's t, n - 1 degrees of freedom). -> (mean, low, high, n) or None."""
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(d) < 2:
        return None
    t = T975[len(d) - 2] if len(d) <= 21 else 1.96  # beyond the table t is about normal
    half = t * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half, len(d)


def paired_table(groups, missing):
    """Each GRPO-RM form minus fine-tuning of the same setting, paired by seed (same seed: same
    subset, same head initialisation), with 95% confidence intervals."""
    out, pairs, shown = [], [], set(DATA_KEYS)
    for t, d in datasets(groups):
        mine = [g for g in groups if g.data == d]
        keys = varying(mine)
        shown |= set(keys)  # in the Setting column
        for g, c in itertools.product(candidates(mine, t, d, "grpo", {departures(g) for g in mine}),
                                      candidates(mine, t, d, "ce")):
            where = ", ".join(flag(k, c.setting.get(k)) for k in keys
                              if k not in ignored("ce", t)) or "—"
            for x, ft in metric_columns(t, mine) if comparable(g, c) else ():
                ci = paired_ci(values(g, x, ft), values(c, x, ft))
                if ci:
                    out.append(f"| {d} | {name(g)} | {where} | {ft + ' ' if ft else ''}{x} | "
                               f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}] ({ci[3]}) |")
                    pairs += [(f"{d}, {where}", name(g), g), (f"{d}, {where}", name(c), c)]
    if not out:
        missing.append("GRPO-RM − fine-tuning paired by seed: GRPO-RM and fine-tuning runs of "
                       "one setting with two or more seeds in common")
        return []
    return ["### GRPO-RM − fine-tuning of the same setting, paired by seed: mean [95% CI] (n)", "",
            "| Dataset | GRPO-RM | Setting | Metric | GRPO-RM − FT |", "|---|---|---|---|---|",
            *out, "", *differences(pairs, shown)[0]]


def settings_tables(groups):
    """Every group of each dataset, the flags that differ between them as columns, and the
    largest |ρ - 1| of each GRPO-RM run."""
    out = []
    for t, d in datasets(groups):
        mine = sorted((g for g in groups if g.data == d), key=lambda g: (
            list(METHODS).index(g.method), departures(g), json.dumps(g.setting, sort_keys=True)))
        keys, ms = varying(mine), metric_columns(t, mine)
        rows = []
        for i, g in enumerate(mine):
            dev = [max(r["series"]["ratio_dev_max"]) for r in g.runs.values()
                   if r.get("series", {}).get("ratio_dev_max")]
            flags = [text(g.setting.get(k)) if k not in ignored(g.method, t) else "—"
                     for k in keys]
            rows.append((i, [METHODS[g.method] + departures(g), *flags, str(len(g.runs)),
                             ", ".join(f"{v:.3g}" for v in dev) or "—"], g,
                         [values(g, x, ft) for x, ft in ms]))
        header = ["Method", *(flag(k, "").strip() for k in keys), "seeds",
                  "max \\|ρ − 1\\| per run", *(f"{ft} {x}" if ft else x for x, ft in ms)]
        out += table(f"Every setting on {d}", header, rows, shown=set(keys) | DATA_KEYS)
    return out


def bench_table(benches, missing):
    """Table 5 from --bench results, in the paper's units (forward MACs of the linear layers per
    batch; seconds per epoch of its training set; memory summed over GPUs) and in ours."""
    if not benches:
        missing.append("Table 5 (cost): tools/bench.py results (bench-*.json)")
        return []
    out = ["### Table 5: cost of a training step, fine-tuning vs GRPO-RM (--bench, synthetic data)",
           "", "| Dataset | Model | Setting | Device | Method | fwd GMAC/batch | s/epoch | "
           "GB summed | ms/step | GFLOP/step | GB/process | grpo/ce time | grpo/ce memory |",
           "|" + "---|" * 13]
    for b in benches:
        c, ce, g = b["config"], b["methods"]["ce"], b["methods"]["grpo"]
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

FAMILIES = ("Blues", "Reds", "Greens", "Purples", "Oranges", "RdPu", "YlOrBr", "Greys")
F32_MAX = float(np.finfo(np.float32).max)  # where an overflowed ρ (inf) is drawn
PANELS = (  # Figure 3: (series, method, title, y label, y scale)
    ("loss", "ce", "Fine-tuning: cross-entropy", "loss", "linear"),
    ("loss", "grpo", "GRPO-RM: −J", "−J", "symlog"),
    ("clip_frac", "grpo", "GRPO-RM: clipped share of the (sample, class) terms", "fraction",
     "linear"),
    ("approx_kl", "grpo", "GRPO-RM: KL(θ_old ‖ θ) (log scale, 0 not drawn)", "KL (nats)", "log"),
    ("ratio_dev_max", "grpo", "GRPO-RM: max |ρ − 1| (log scale, 0 not drawn)", "max |ρ − 1|",
     "log"))


def colour(families, method, shade):
    """One colour family per method (each GRPO-RM variant its own) in all figures of a report;
    within it a shade, then a line style, per setting: the darkest for the main one."""
    free = [f for f in FAMILIES if f not in families.values()] or FAMILIES
    cmap = matplotlib.colormaps[families.setdefault(method, free[0])]
    return cmap((0.8, 0.55, 0.35)[shade % 3]), ("-", "--", ":", "-.")[shade // 3 % 4]


def save(fig, root, stem):
    """fig as PNG and PDF -> the file names; no creation date, so a rebuild gives the same bytes."""
    names = [f"{stem}.png", f"{stem}.pdf"]
    for n in names:
        fig.savefig(os.path.join(root, n), dpi=110, metadata={"CreationDate": None}
                    if n.endswith(".pdf") else None)
    return names


def slug(d):
    return "".join(ch if ch.isalnum() else "_" for ch in d)


def epochs(g, key):
    """A per-step series of a group's seeds as (median, min, max) over them per epoch of each
    seed's epoch mean (of max |ρ − 1|: its max), or None if no seed has it. A seed's epochs
    after its end are left out; a ρ past float32 (inf) stays inf."""
    ss = []
    for r in g.runs.values():
        s, n = np.array(r.get("series", {}).get(key, []), float), len(r.get("train_loss", []))
        if len(s) >= n > 0:
            s = s[:len(s) // n * n].reshape(n, -1)  # (epochs, steps)
            ss.append(s.max(1) if key == "ratio_dev_max" else s.mean(1))
    a = np.full((len(ss), max(map(len, ss), default=0)), np.nan)  # (seeds, epochs)
    for i, s in enumerate(ss):
        a[i, :len(s)] = s
    with warnings.catch_warnings():  # an epoch no run reached stays NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmedian(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)) if ss else None


def curves(groups, t, d):
    """Figure 3's groups of a dataset: [(method, label, group, shade)], the main setting's
    first; label: the flags where the group's setting is its own, and its seeds."""
    mine = [g for g in groups if g.data == d and g.method != "frozen" and epochs(g, "loss")
            is not None]
    main = [g for g in pick([candidates(mine, t, d, m) for m in ("ce", "grpo")]) if g]
    keys, out = varying(mine), []

    def where(g):
        return tuple(flag(k, g.setting.get(k)) for k in keys if k not in ignored(g.method, g.task))
    shades = {where(g): 0 for g in main}
    for g in sorted(mine, key=lambda g: (g not in main, g.method != "ce", departures(g))):
        shade = shades.setdefault(where(g), len(shades))
        method = METHODS[g.method] + departures(g)
        seeds = f"{len(g.runs)} seed{'s' * (len(g.runs) > 1)}"
        out.append((method, ", ".join([method, *where(g)]) + f" ({seeds})", g, shade))
    return out


def draw_panel(ax, panel, lines, families):
    key, method, title, ylabel, scale = panel
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    drawn, peak, top = [], 1e-6, 0.0
    for m, label, g, shade in lines:
        e = epochs(g, key) if g.method == method else None
        if e is None:
            continue
        if np.isinf(e).any():  # a ρ past float32: drawn at float32's largest, said so
            ax.set_title(f"{title}\n(inf, float32 overflow, drawn at {F32_MAX:.1e})")
        med, lo, hi = np.minimum(e, F32_MAX)
        x = np.arange(1, len(med) + 1)
        colour_, style = colour(families, m, shade)
        ax.fill_between(x, lo, hi, color=colour_, alpha=0.2, lw=0)
        drawn += ax.plot(x, med, color=colour_, ls=style, lw=1.5, label=label)
        peak = max(peak, np.nanpercentile(np.abs(med), 75))
        top = max(top, np.nanmax(np.abs([lo, hi])))
    if scale == "symlog" and top > 100 * peak:  # linear where most curves are, log beyond
        ax.set_yscale("symlog", linthresh=10 ** math.ceil(math.log10(peak)), linscale=2)
        ax.set_title(title + " (symmetric log scale)")
    elif scale == "log":
        ax.set_yscale("log")  # 0 (ρ = 1 throughout) is left out, as the title says
    if not drawn:
        ax.text(0.5, 0.5, f"no {METHODS[method]} runs", ha="center", transform=ax.transAxes)
    return drawn


def figure3(root, groups, missing):
    """Figure 3 of each dataset: every fine-tuning and GRPO-RM setting (the paper's form, its
    variants, other lrs), per epoch the median over seeds and a band from min to max: the
    training loss, the clip fraction, KL(θ_old ‖ θ) and max |ρ − 1|; a CSV beside."""
    out, families = [], {"Fine-tuning": "Blues", "GRPO-RM": "Reds"}
    for t, d in datasets(groups):
        lines = curves(groups, t, d)
        if not lines:
            missing.append(f"Figure 3 ({d}): fine-tuning or GRPO-RM runs with per-step series "
                           "(\"series\" in result.json, written by grpo_rm.py)")
            continue
        fig = Figure(figsize=(16, 9), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        handles = {}
        for ax, panel in zip(axes, PANELS):
            handles |= {h.get_label(): h for h in draw_panel(ax, panel, lines, families)}
        axes[-1].axis("off")
        axes[-1].legend(handles.values(), handles.keys(), loc="center", fontsize=9,
                        title="line: median over seeds\nband: min to max", title_fontsize=9)
        fig.suptitle(f"Figure 3: {d}, training per epoch (each seed's epoch mean; "
                     "of max |ρ − 1| its epoch max)")
        stem = f"fig3_{slug(d)}"
        files = save(fig, root, stem)
        write_csv(os.path.join(root, stem + ".csv"), lines)
        out.append(f"- Figure 3 ({d}): {', '.join(files)}, {stem}.csv (its numbers)")
    if not groups:
        missing.append("Figure 3 (training curves): fine-tuning or GRPO-RM runs")
    return out


def write_csv(path, lines):
    """Figure 3's numbers: a row per method and epoch, the median, min and max of each series."""
    keys = [p[0] for p in PANELS[1:]]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "epoch", "seeds", *(f"{k}_{s}" for k in keys
                                                  for s in ("median", "min", "max"))])
        for _, label, g, _ in lines:
            per = {k: e for k in keys if (e := epochs(g, k)) is not None}
            for e in range(len(per["loss"][0])):
                w.writerow([label.rsplit(" (", 1)[0], e + 1, len(g.runs), *(
                    f"{per[k][i][e]:.6g}" if k in per else "" for k in keys for i in range(3))])


def class_colours(cfg, names=None):
    """(names, (256, 3) uint8 colours) of a segmentation dataset's classes. Index 255 is no
    label: CamVid's void black; else VOC's void cream, as VOC's background is black."""
    i = np.arange(256)[:, None]  # the VOC colour map: bit 3j + ch of i is bit 7 - j of ch
    pal = np.zeros((256, 3), np.int64)
    for j in range(8):
        pal |= ((i >> (3 * j + np.arange(3))) & 1) << (7 - j)
    pal = pal.astype(np.uint8)
    camvid = cfg.get("num_classes") == 11 and "camvid" in os.path.basename(
        os.path.normpath(cfg["data_dir"])).lower()
    if camvid:
        pal[:11], pal[255] = list(CAMVID.values()), 0
    known = list(CAMVID) if camvid else list(VOC_NAMES) if cfg["dataset"] == "voc" else []
    return names or known, pal


def draw_fig2(title, columns, image, maps, index, names, pal):
    """image (K, H, W, 3) uint8 and a (K, H, W) label map per further column, in pal's colours,
    a row per test image; the key names every class shown."""
    k, h, w = maps[0].shape
    fig = Figure(figsize=(2.1 * len(columns), 2.1 * k * h / w + 1.8), layout="constrained")
    axes = fig.subplots(k, len(columns), squeeze=False)
    for i, row in enumerate(axes):
        for j, ax in enumerate(row):  # nearest: a label map keeps its colours
            ax.imshow(image[i] if j == 0 else pal[maps[j - 1][i]], interpolation="nearest")
            ax.set(xticks=[], yticks=[])
        row[0].set_ylabel(f"test image {index[i]}")
    for ax, c in zip(axes[0], columns):
        ax.set_title(c, fontsize=10)
    shown = np.unique(np.concatenate([m.ravel() for m in maps]))
    key = [Patch(facecolor=pal[c] / 255, edgecolor="0.3", label="unlabelled" if c == 255
                 else names[c] if c < len(names) else f"class {c}") for c in shown]
    fig.legend(handles=key, loc="outside lower center", ncol=min(len(key), 6), fontsize=9)
    fig.suptitle(title)
    return fig


def vis_files(g):
    """{seed: path} of the vis.pt (grpo_rm.py --save-vis) that a group's runs wrote."""
    paths = {s: os.path.join(r["dir"], "vis.pt") for s, r in sorted(g.runs.items())}
    return {s: p for s, p in paths.items() if os.path.isfile(p)}


def load_vis(path):
    import torch  # only Figure 2 needs torch
    try:
        v = torch.load(path, weights_only=True)
        return v | {"index": v.get("index", range(len(v["pred"])))}  # older: the first K
    except Exception as e:  # a file cut short, or not a vis.pt
        raise ReportError(f"{path}: not readable as a vis.pt ({type(e).__name__}: {e})") from None


def fig2_runs(groups, d):
    """Figure 2's material on dataset d: (frozen, fine-tuning and GRPO-RM groups of one setting,
    their seeds, their vis.pt, the test images all show), or why there is none."""
    cands = [candidates(groups, "seg", d, m) for m in METHODS]
    picked = pick([[g for g in c if vis_files(g)] for c in cands])
    if None in picked or not all(comparable(a, b) for a, b in zip(picked, picked[1:])):
        have = ", ".join(f"{METHODS[m]} {sum(map(len, map(vis_files, c)))} of "
                         f"{sum(len(g.runs) for g in c)}" for m, c in zip(METHODS, cands))
        why = "" if None in picked else "; those with one differ in " + ", ".join(
            flag(k, "").strip() for k in varying(picked))
        return f"{FIG2_NEEDS}; runs here with vis.pt: {have}{why}"
    files = [vis_files(g) for g in picked]
    common = sorted(set.intersection(*map(set, files)))  # one seed for all, if there is one
    seeds = [common[0]] * 3 if common else [min(f) for f in files]
    vis = [load_vis(f[s]) for f, s in zip(files, seeds)]
    index = sorted(set.intersection(*(set(map(int, v["index"])) for v in vis)))
    if not index:
        return f"{FIG2_NEEDS} that show the same test images (one --save-vis K)"
    return picked, seeds, vis, index


def figure2(root, groups, names, missing):
    """Figure 2 of each segmentation dataset: image | truth | frozen | fine-tuning | GRPO-RM on
    the test images every run's vis.pt shows, from one seed of each method's main setting."""
    out = []
    for _, d in datasets(groups, "seg"):
        material = fig2_runs(groups, d)
        if isinstance(material, str):
            missing.append(f"Figure 2 ({d}): {material}")
            continue
        picked, seeds, vis, index = material
        rows = [[list(map(int, v["index"])).index(k) for k in index] for v in vis]
        names_, pal = class_colours(picked[0].runs[seeds[0]]["config"], names)
        ft = picked[1].setting.get("feature_type", ["linear"])[0]  # vis.pt: the first's
        seed = f"seed {seeds[0]}" if len(set(seeds)) == 1 else f"seeds {'/'.join(map(str, seeds))}"
        fig = draw_fig2(f"Figure 2: {d}, {ft} features, {seed}\n(test images spread evenly "
                        "over the test set; one run per method, not averaged)",
                        ["image", "truth", *map(name, picked)],
                        vis[0]["image"][rows[0]].permute(0, 2, 3, 1).numpy(),
                        [vis[0]["truth"][rows[0]].numpy(),
                         *(v["pred"][r].numpy() for v, r in zip(vis, rows))], index, names_, pal)
        out.append(f"- Figure 2 ({d}): {', '.join(save(fig, root, f'fig2_{slug(d)}'))}")
    if not datasets(groups, "seg"):
        missing.append(f"Figure 2 (segmentation examples): {FIG2_NEEDS}")
    return out


# -----------------------------------------------------------------------------
# Command line

def report(root, class_names=None):
    """Writes root/report.md and the figures beside it; returns the text of report.md."""
    groups = load_groups(root)
    benches = [read_json(f) for f in sorted(glob.glob(os.path.join(root, "bench-*.json")))]
    if not groups and not benches:
        raise ReportError(f"{root}: no */result.json or bench-*.json there")
    missing = []
    n = sum(len(g.runs) for g in groups)
    out = [f"# Results in {root}", "", f"{n} runs in {len(groups)} settings (runs of one setting "
           "differ in their seed only); mean ± sample std over seeds; bold: the best of rows "
           "that differ in their method only.", ""]
    out += table3(groups, missing) + tables2and4(groups, missing) + table6(groups, missing)
    out += paired_table(groups, missing) + settings_tables(groups) + bench_table(benches, missing)
    figures = figure3(root, groups, missing) + figure2(root, groups, class_names, missing)
    out += ["## Figures", "", *figures, ""] if figures else []
    out += ["## Not in this report, and what each needs", "", *(f"- {m}" for m in missing)
            ] if missing else []
    md = "\n".join(out) + "\n"
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(md)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", metavar="RUNS_DIR",
                   help="a folder of runs (*/result.json) and/or benchmarks (bench-*.json)")
    p.add_argument("--class-names", metavar="FILE",
                   help="Figure 2's class names, one a line (line i: class i), for datasets "
                        "whose names the report does not know (it knows VOC's and CamVid's)")
    args = p.parse_args(argv)
    try:
        names = None
        if args.class_names:
            with open(args.class_names) as f:
                names = [ln.strip() for ln in f if ln.strip()]
        out = report(args.runs_dir, names)
    except (ReportError, OSError) as e:  # OSError: a file that cannot be read or written
        print(f"error: {f'{e.filename}: {e.strerror}' if isinstance(e, OSError) else e}",
              file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
