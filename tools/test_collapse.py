"""Tests of tools/collapse.py on synthetic result.json files: the collapse step, the warning step,
the lead, the counts of the table, the frozen reference of --runs, and the error line."""
import importlib
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import collapse  # noqa: E402  (tools/ is no package)
import grpo_rm  # noqa: E402  (on the path since collapse's import)

N = 40  # steps of a synthetic run, 8 an epoch


def series(blow=None, warn=None, n=N, step0=0, key="ratio_dev_max"):
    """A run's series: |loss| 0.02 and key 0.5, 0 at each epoch's first step (ρ = 1 there);
    from step `warn` on key is 500, from step `blow` on the loss is 50."""
    s = {"step": list(range(step0, step0 + n)), "loss": [], key: []}
    for i in range(n):
        first = i % 8 == 0
        s["loss"].append(50.0 if blow is not None and i >= blow else 0.0 if first else -0.02)
        s[key].append(500.0 if warn is not None and i >= warn else 0.0 if first else 0.5)
    return s


def write(root, name, s=None, method="grpo", metrics=None, **cfg):
    os.makedirs(os.path.join(root, name))
    config = {"task": "cls", "dataset": "imagefolder", "data_dir": "data/cifar", "model": "m",
              "img_size": 32, "seg_size": 128, "eval_lr": 1e-3, "method": method, **cfg}
    with open(os.path.join(root, name, "result.json"), "w") as f:
        json.dump({"config": config, "metrics": metrics or {"sr": 50.0}, "series": s or {}}, f)


def test_collapse_is_the_first_loss_beyond_the_limit_or_not_finite():
    assert collapse.label(series(blow=20, warn=12), "ratio_dev_max", 100, 10) == (20, 12)
    assert collapse.label(series(), "ratio_dev_max", 100, 10) == (None, None)  # healthy
    s = series()
    s["loss"][30] = 10.0  # at the limit: not beyond it
    s["loss"][33] = -11.0  # -J jumps either way: |loss| counts
    assert collapse.label(s, "ratio_dev_max", 100, 10) == (33, None)
    s["loss"][25] = math.nan  # a non-finite loss is a collapse
    assert collapse.label(s, "ratio_dev_max", 100, 10)[0] == 25


def test_warning_is_strictly_above_the_threshold_and_steps_are_the_series_own():
    s = series(warn=12)
    assert collapse.label(s, "ratio_dev_max", 500, 10) == (None, None)  # 500 > 500 is False
    assert collapse.label(s, "ratio_dev_max", 499, 10) == (None, 12)
    s["ratio_dev_max"][5] = math.inf  # ρ past float32 warns
    assert collapse.label(s, "ratio_dev_max", 499, 10) == (None, 5)
    resumed = series(blow=20, warn=12, step0=400)  # steps come from "step", not the index
    assert collapse.label(resumed, "ratio_dev_max", 100, 10) == (420, 412)
    assert collapse.label(series(warn=3), "approx_kl", 100, 10) is None  # no such series


def test_table_counts_leads_and_false_warnings(tmp_path, capsys):
    root = str(tmp_path / "runs")
    write(root, "a", series(blow=30, warn=26))  # lead 4
    write(root, "b", series(blow=30, warn=20))  # lead 10
    write(root, "b2", series(blow=30, warn=10))  # lead 20: the median 10, not the mean 11.3
    write(root, "c", series(blow=30, warn=30))  # warned with the collapse: no lead, not warned
    write(root, "d", series(blow=30))  # collapsed, never warned
    write(root, "e", series(warn=9))  # healthy, falsely warned
    write(root, "f", series())  # healthy
    write(root, "g", series(warn=9, key="approx_kl"))  # an older file: no ratio_dev_max
    write(root, "h", {"step": [0], "loss": [99.0]}, method="ce")  # not GRPO-RM: not counted
    assert collapse.main([root, "--threshold", "100"]) == 0
    out = capsys.readouterr().out
    assert f"| 100 | {root} | 8 | 3 / 5 | 4 / 10 / 20 | 1 / 2 | 1 |" in out


def test_sweep(tmp_path, capsys):
    root = str(tmp_path / "runs")
    write(root, "a", series(blow=30, warn=26))
    assert collapse.main([root, "--sweep", "0.1,1000"]) == 0
    out = capsys.readouterr().out
    assert f"| 0.1 | {root} | 1 | 1 / 1 | 29 / 29 / 29 | 0 / 0 | 0 |" in out  # 0.5 from step 1
    assert f"| 1000 | {root} | 1 | 0 / 1 | — | 0 / 0 | 0 |" in out


def test_defaults_come_from_grpo_rm_and_fall_back_without_it(tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "runs")
    write(root, "a", series(blow=30, warn=26, key="approx_kl"))
    try:
        monkeypatch.setattr(grpo_rm, "COLLAPSE_WARNING", ("approx_kl", 0.25), raising=False)
        importlib.reload(collapse)
        assert collapse.main([root]) == 0
        assert f"| 0.25 | {root} | 1 | 1 / 1 | 29 / 29 / 29 |" in capsys.readouterr().out
        monkeypatch.delattr(grpo_rm, "COLLAPSE_WARNING", raising=False)
        assert importlib.reload(collapse).THRESHOLD == 100 and collapse.KEY == "ratio_dev_max"
    finally:
        monkeypatch.undo()
        importlib.reload(collapse)


def test_runs_table_sets_the_final_metric_beside_the_same_setting_frozen(tmp_path, capsys):
    root = str(tmp_path / "runs")
    write(root, "cls", series(blow=30, warn=26), metrics={"sr": 40.0})
    write(root, "seg", series(), task="seg", metrics={"linear": {"miou": 20.0}})
    write(root, "ce", series(), method="ce", metrics={"sr": 10.0})  # trained: no reference
    write(root, "frozen-s0", method="frozen", metrics={"sr": 55.0})
    write(root, "frozen-s1", method="frozen", metrics={"sr": 56.0})
    write(root, "frozen-64px", method="frozen", img_size=64, metrics={"sr": 99.0})  # another
    assert collapse.main([root, "--threshold", "100", "--runs"]) == 0
    out = capsys.readouterr().out
    assert f"| {root} | cls | 30 | 26 | 4 | 40.00 | 55.50 |" in out
    assert f"| {root} | seg | — | — | — | 20.00 | — |" in out  # no frozen segmentation run


@pytest.mark.parametrize("case", ["empty", "corrupt", "no config"])
def test_bad_folder_is_one_error_line_naming_it(tmp_path, capsys, case):
    root = str(tmp_path / "runs")
    write(root, "ok", series())
    bad = os.path.join(root, "bad", "result.json")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "w") as f:
        f.write({"empty": "", "corrupt": '{"config": {"method": "grpo"', "no config": "{}"}[case])
    folder = str(tmp_path / "nothing") if case == "empty" else root
    os.makedirs(folder, exist_ok=True)
    assert collapse.main([folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert (folder if case == "empty" else bad) in err[0]
