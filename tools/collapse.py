"""How well a one-line warning foretells the collapse of GRPO-RM runs.

Collapse, the outcome: the first training step whose |loss| exceeds --loss-limit (10) or is not
finite; a run that never gets there is healthy. The paper's objective has one unbounded term, ρA
for a class with A < 0: while no such class has ρ > 2, |loss| <= mean |A| < 1 (plus the KL term
where there is one), so 10 is an order of magnitude outside the normal range. A blown-up loss thus
implies a large ρ at that step: what a warning on ρ can add is lead time.
Warning, the rule under test: warn once, at the first step where series[KEY] > THRESHOLD, KEY and
THRESHOLD from grpo_rm.COLLAPSE_WARNING. A collapsed run is warned when the warning comes strictly
before its collapse (lead = collapse step - warning step); a healthy run that warns at all is a
false warning. Only GRPO-RM runs count: the others have no diagnostics.

    python3 tools/collapse.py results/mini results/mini-gpu results/stable
    python3 tools/collapse.py results/stable --sweep 10,30,100,300,1000 --runs
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # grpo_rm.py
import grpo_rm  # noqa: E402

KEY, THRESHOLD = getattr(grpo_rm, "COLLAPSE_WARNING", ("ratio_dev_max", 100.0))
LOSS_LIMIT = 10.0


class CollapseError(Exception):
    """A folder that cannot be read: the command line prints it as one `error:` line, exit 2."""


def load_runs(folder):
    """The folder's runs as (name, config, metrics, series of float arrays): GRPO-RM, others."""
    runs, others = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*", "result.json"))):
        try:
            with open(path) as f:
                r = json.load(f)
            series = {k: np.array([np.nan if v is None else v for v in vs], float)
                      for k, vs in (r.get("series") or {}).items()}  # JSON null: NaN
            run = (os.path.basename(os.path.dirname(path)), r["config"], r.get("metrics"), series)
            (runs if r["config"]["method"] == "grpo" else others).append(run)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CollapseError(f"{path}: not a readable result.json ({type(e).__name__}: {e})")
    if not runs:
        raise CollapseError(f"{folder}: no GRPO-RM run (*/result.json with method grpo)")
    return runs, others


def first_step(s, hit):
    """The step (series "step", which a resumed run continues) of the first True in hit, or None."""
    i = np.flatnonzero(hit)
    return None if not i.size else int(s["step"][i[0]]) if "step" in s else int(i[0])


def label(s, key, threshold, loss_limit):
    """(collapse step, warning step), each None where there is none; None if s lacks a series."""
    if "loss" not in s or key not in s or len(s[key]) != len(s["loss"]):
        return None  # older files: no such diagnostic
    loss, values = np.asarray(s["loss"], float), np.asarray(s[key], float)
    collapse = first_step(s, ~(np.abs(loss) <= loss_limit))  # NaN fails <=: collapsed
    return collapse, first_step(s, values > threshold)  # NaN > t is False, as in a training loop


def summarise(labels):
    """One folder: collapsed runs warned ahead, collapsed, their leads, false warnings, healthy."""
    leads = [c - w for c, w in labels if c is not None and w is not None and w < c]
    collapsed = sum(c is not None for c, _ in labels)
    false = sum(c is None and w is not None for c, w in labels)
    return len(leads), collapsed, leads, false, len(labels) - collapsed


def show(value, fmt=""):
    return "—" if value is None else format(value, fmt)


def summary_table(folders, key, thresholds, loss_limit):
    """Markdown: one row per threshold and folder."""
    out = [f"| {key} > | folder | GRPO-RM runs | collapsed runs warned | lead in steps, "
           "min / median / max | healthy runs falsely warned | runs without the series |",
           "|---|---|---|---|---|---|---|"]
    for t in thresholds:
        for folder, runs, _ in folders:
            labels = [label(s, key, t, loss_limit) for *_, s in runs]
            warned, collapsed, leads, false, healthy = summarise([x for x in labels if x])
            lead = " / ".join(f"{v:g}" for v in (min(leads), np.median(leads), max(leads))) \
                if leads else "—"
            out.append(f"| {t:g} | {folder} | {len(runs)} | {warned} / {collapsed} | {lead} | "
                       f"{false} / {healthy} | {labels.count(None)} |")
    return out


def setting(cfg):
    """What a frozen run shares with a trained one for their metrics to compare."""
    keys = ("task", "dataset", "model", "img_size", "seg_size", "eval_lr")
    return (*(cfg.get(k) for k in keys), os.path.basename(cfg.get("data_dir") or ""))


def final_metric(cfg, metrics):
    """SR for classification, linear mIoU for segmentation; None if absent."""
    m = metrics or {}
    return (m.get("linear") or {}).get("miou") if cfg.get("task") == "seg" else m.get("sr")


def runs_table(folders, key, threshold, loss_limit):
    """Markdown: every run's label, and its final metric beside the folder's frozen backbone's."""
    out = ["| folder | run | collapse step | warning step | lead | final metric | frozen |",
           "|---|---|---|---|---|---|---|"]
    for folder, runs, others in folders:
        frozen = {}
        for _, cfg, metrics, _ in others:
            if cfg.get("method") == "frozen" and final_metric(cfg, metrics) is not None:
                frozen.setdefault(setting(cfg), []).append(final_metric(cfg, metrics))
        for name, cfg, metrics, s in runs:
            c, w = label(s, key, threshold, loss_limit) or (f"no {key}", None)
            lead = c - w if isinstance(c, int) and w is not None and w < c else None
            ref = frozen.get(setting(cfg))
            out.append(f"| {folder} | {name} | {show(c)} | {show(w)} | {show(lead)} | "
                       f"{show(final_metric(cfg, metrics), '.2f')} | "
                       f"{show(np.mean(ref) if ref else None, '.2f')} |")
    return out


def floats(text):  # --sweep 10,100 -> [10.0, 100.0]
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: numbers separated by commas")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="FOLDER", help="a folder of runs (*/result.json)")
    p.add_argument("--key", default=KEY, choices=grpo_rm.DIAGNOSTICS,
                   help=f"the series warned on ({KEY})")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help=f"({THRESHOLD:g})")
    p.add_argument("--loss-limit", type=float, default=LOSS_LIMIT,
                   help=f"collapse: the first |loss| above it ({LOSS_LIMIT:g})")
    p.add_argument("--sweep", metavar="T1,T2,...", type=floats,
                   help="one row per threshold, instead of --threshold")
    p.add_argument("--runs", action="store_true", help="then every run's label and final metric")
    args = p.parse_args(argv)
    try:
        folders = [(f, *load_runs(f)) for f in args.folders]
    except CollapseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Collapse: first step with |loss| > {args.loss_limit:g} or not finite. "
          f"Warning: first step with {args.key} > threshold.\n")
    print("\n".join(summary_table(folders, args.key, args.sweep or [args.threshold],
                                  args.loss_limit)))
    if args.runs:
        print("\n" + "\n".join(runs_table(folders, args.key, args.threshold, args.loss_limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
