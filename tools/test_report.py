"""Tests of tools/report.py on fake result.json, bench-*.json and vis.pt files: the tables' numbers
by hand, runs of other settings kept apart, the paired confidence intervals, what is missing and
what it needs, Figures 3 and 2 (their numbers, scales, labels and colours), the command line's
errors."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402  (tools/ is no package)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.py")


@pytest.fixture
def figures(monkeypatch):
    """{file stem: Figure} of the figures the report saves (and saves)."""
    saved, save = {}, report.save

    def keep(fig, root, stem):
        saved[stem] = fig
        return save(fig, root, stem)
    monkeypatch.setattr(report, "save", keep)
    return saved


def test_paired_ci_by_hand():
    # differences 2, 4, 6 (seeds 0-2; seed 3 only in a): mean 4, sample std 2, n 3,
    # t(0.975, 2) = 4.303 -> half width 4.303 · 2 / sqrt(3) = 4.9687 -> [-0.9687, 8.9687]
    a = {0: 12.0, 1: 14.0, 2: 16.0, 3: 99.0}
    mean, lo, hi, n = report.paired_ci(a, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (mean, n) == (4.0, 3) and lo == pytest.approx(-0.96866, abs=1e-4)
    assert hi == pytest.approx(8.96866, abs=1e-4)
    assert report.paired_ci({0: 1.0}, {0: 2.0}) is None  # one pair: no interval


def _fake_run(root, name, task, dataset, method, seed, metrics, losses=(), series=None, **flags):
    """A run folder as grpo_rm.py leaves it; flags: config entries beyond these defaults."""
    cfg = {"task": task, "dataset": dataset, "data_dir": f"data/{dataset}", "method": method,
           "uniformity": "eq4", "clip_eps": 0.2, "dual_clip": None, "subset": 1.0, "seed": seed,
           "lr": 1e-3, "eval_lr": 1e-3, "eval_epochs": 50, "workers": 2, "out": "runs",
           "name": name, **flags}
    os.makedirs(root / name)
    (root / name / "result.json").write_text(json.dumps(
        {"config": cfg, "metrics": metrics, "train_loss": list(losses),
         "sec_per_epoch": [2.0, 4.0][:len(losses)], "series": series or {}}))


def _section(text, title):
    """The lines of report.md from the heading that starts with title to the next heading."""
    rest = text.split(f"### {title}", 1)[1]
    return rest.split("\n#", 1)[0]


def test_report_tables(tmp_path):
    _fake_run(tmp_path, "a", "cls", "cifar10", "frozen", 0, {"sr": 50.0, "knn": 40.0}, lr=1e-4)
    for seed, (sr, knn) in enumerate([(60.0, 58.0), (62.0, 60.0)]):
        _fake_run(tmp_path, f"ce{seed}", "cls", "cifar10", "ce", seed, {"sr": sr, "knn": knn},
                  [1.0, 0.5])
        _fake_run(tmp_path, f"ce{seed}x", "cls", "cifar10", "ce", seed, {"sr": sr - 5, "knn": knn},
                  [1.0, 0.5], lr=1e-4)
    for seed, (sr, knn) in enumerate([(64.0, 55.0), (67.0, 57.0)]):
        _fake_run(tmp_path, f"g{seed}", "cls", "cifar10", "grpo", seed, {"sr": sr, "knn": knn},
                  [0.0, -0.1])
    _fake_run(tmp_path, "g100", "cls", "cifar100", "grpo", 0, {"sr": 30.0, "knn": 31.0},
              subset=0.5)
    _fake_run(tmp_path, "g100u", "cls", "cifar100", "grpo", 0, {"sr": 29.0, "knn": 30.0},
              [0.1, 0.0], uniformity="none", subset=0.5)
    seg = {"linear": {"pixel_acc": 90.0, "iou": 80.0, "miou": 60.0}}
    _fake_run(tmp_path, "seg", "seg", "voc", "grpo", 0, seg)
    text = report.report(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text
    # ce at lr 1e-3 (its other lr ties in seeds; the higher lr is the main one): SR 60, 62 -> 61
    # ± 1.41 (sample std); kNN 58, 60 -> 59 ± 1.41, the best kNN. grpo: SR 64, 67 -> 65.50 ±
    # 2.12. The frozen run's --lr is unused: it is in the comparison.
    assert "| cifar10 | DINOv2 (frozen) | 50.00 | 40.00 |" in text
    assert "| cifar10 | Fine-tuning | 61.00 ± 1.41 | **59.00 ± 1.41** |" in text
    assert "| cifar10 | GRPO-RM | **65.50 ± 2.12** | 56.00 ± 1.41 |" in text
    assert "| cifar100 | Fine-tuning | — | — |" in text
    assert "| cifar100 | GRPO-RM (50%) | 30.00 | 31.00 |" in text  # the subset, shown
    # what differs between the datasets' runs, printed under Table 3
    assert "- cifar10: --subset 1\n- cifar100: --subset 0.5\n" in _section(text, "Table 3")
    assert "| cifar100 | set to 0 | 29.00 | 3.00 |" in text  # Table 6, and no s/epoch bold
    assert "| cifar100 | Eq. (5) | — | — |" in text
    assert "| linear | GRPO-RM | 90.00 | 80.00 | 60.00 |" in text
    # paired by seed at lr 1e-3: SR differences 4, 5 -> mean 4.5, std 0.7071, t(1) = 12.706:
    # half width 12.706 · 0.7071 / sqrt(2) = 6.353 -> [-1.85, +10.85]; GRPO-RM has no lr 1e-4
    paired = _section(text, "GRPO-RM − fine-tuning")
    assert "| cifar10 | GRPO-RM | --lr 0.001 | sr | +4.50 [-1.85, +10.85] (2) |" in paired
    assert "0.0001" not in paired
    assert "| Fine-tuning | 0.0001 | 2 | — | 56.00 ± 1.41 | 59.00 ± 1.41 |" in text  # every lr


def test_runs_of_other_settings_never_share_a_bold_or_a_paired_difference(tmp_path):
    # GRPO-RM evaluated with --eval-epochs 50, frozen and fine-tuning with 10
    for seed in (0, 1):
        _fake_run(tmp_path, f"f{seed}", "cls", "cifar10", "frozen", seed,
                  {"sr": 50.0, "knn": 40.0}, eval_epochs=10)
        _fake_run(tmp_path, f"c{seed}", "cls", "cifar10", "ce", seed,
                  {"sr": 60.0 + seed, "knn": 50.0}, eval_epochs=10, workers=seed, out=f"o{seed}")
        _fake_run(tmp_path, f"g{seed}", "cls", "cifar10", "grpo", seed,
                  {"sr": 70.0 + seed, "knn": 60.0})
    # a flag this tool has never heard of sets a run apart too
    _fake_run(tmp_path, "c2", "cls", "cifar10", "ce", 2, {"sr": 99.0, "knn": 99.0},
              eval_epochs=10, new_flag=3)
    text = report.report(str(tmp_path))
    table3 = _section(text, "Table 3")
    assert "**" not in table3
    assert "| cifar10 | GRPO-RM | 70.50 ± 0.71 | 60.00 ± 0.00 |" in table3
    assert ("- cifar10: --eval-epochs 10 (DINOv2 (frozen), Fine-tuning) vs --eval-epochs 50 "
            "(GRPO-RM): not compared, no bold") in table3
    assert "GRPO-RM − FT" not in text
    assert "- GRPO-RM − fine-tuning paired by seed: GRPO-RM and fine-tuning runs of one " in text
    # --workers and --out differ: one setting, 2 seeds; --new-flag 3: its own
    rows = _section(text, "Every setting on cifar10")
    assert "| Method | --eval-epochs | --new-flag | seeds |" in rows
    assert "| Fine-tuning | 10 | unset | 2 | — | 60.50 ± 0.71 | 50.00 ± 0.00 |" in rows
    assert "| Fine-tuning | 10 | 3 | 1 | — | 99.00 | 99.00 |" in rows


def test_missing_tables_and_figures_say_what_they_need(tmp_path):
    _fake_run(tmp_path, "c", "cls", "cifar10", "ce", 0, {"sr": 1.0, "knn": 1.0}, [1.0])
    text = report.report(str(tmp_path))
    missing = text.split("## Not in this report, and what each needs\n\n", 1)[1].splitlines()
    assert missing == [
        "- Tables 2/4 (segmentation): runs of a segmentation dataset",
        "- Table 6 (uniformity reward): GRPO-RM runs with --uniformity none and eq5 beside the "
        "paper's eq4, on one dataset",
        "- GRPO-RM − fine-tuning paired by seed: GRPO-RM and fine-tuning runs of one setting "
        "with two or more seeds in common",
        "- Table 5 (cost): tools/bench.py results (bench-*.json)",
        "- Figure 3 (cifar10): fine-tuning or GRPO-RM runs with per-step series (\"series\" "
        "in result.json, written by grpo_rm.py)",
        "- Figure 2 (segmentation examples): vis.pt (grpo_rm.py --save-vis K) in a frozen, a "
        "fine-tuning and a GRPO-RM run of one setting"]
    assert "No runs of this setting: cifar10: DINOv2 (frozen); cifar10: GRPO-RM." in text


def _bench_method(ms, **extra):
    """The fields of one method that bench_table reads (CPU: no memory numbers)."""
    return {"fwd_macs_per_batch": 3e9, "sec_per_epoch_paper": 5.0, "memory_sum_gb": None,
            "ms_per_step": ms, "flops_per_step": 18e9, "peak_memory_gb": None, **extra}


def test_bench_table(tmp_path):
    cfg = {"dataset": "voc", "model": "dinov2_vitt_test", "hub_kwargs": {"pretrained": False},
           "img_size": 16, "batch_size": 4, "dtype": "fp32", "compile": False, "no_sdpa": False}
    bench = {"config": cfg, "device": "cpu", "world_size": 1,
             "methods": {"ce": _bench_method(100.0),
                         "grpo": _bench_method(150.0, time_ratio=1.5)}}
    (tmp_path / "bench-seg-voc-dinov2_vitt_test-16px-b4-w1.json").write_text(json.dumps(bench))
    text = report.report(str(tmp_path))
    assert "0 runs in 0 settings" in text
    assert "| voc | dinov2_vitt_test | 16 px, batch 4, fp32 | cpu × 1 | grpo |" in text
    assert ("| voc | dinov2_vitt_test | 16 px, batch 4, fp32 | cpu × 1 | ce | 3.0 | 5.0 | — | "
            "100.0 | 18.0 | — |  |  |") in text
    assert "| 150.0 | 18.0 | — | x1.500 | — |" in text


def test_cli_on_an_empty_folder_prints_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {tmp_path}: no */result.json or bench-*.json there"]


def test_cli_on_a_truncated_result_names_the_file(tmp_path):
    _fake_run(tmp_path, "ok", "cls", "cifar10", "ce", 0, {"sr": 1.0, "knn": 1.0})
    os.makedirs(tmp_path / "cut")
    (tmp_path / "cut" / "result.json").write_text('{"config": {"task": "cls", "data')
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"error: {tmp_path / 'cut' / 'result.json'}: not valid JSON (Unterminated string "
        "starting at: line 1 column 28): remove or rerun it"]


def _curves(root, dataset, seeds, epochs=2, loss=None):
    """Fine-tuning and GRPO-RM runs of 2 steps an epoch. Per seed i (scale s = 1, 2, 4): ce's
    loss steps s·(1, 3, 2, 2): epoch means 2s; GRPO-RM's max |ρ - 1| steps (1, 10s, 100, 5;
    the last seed's last step inf): epoch maxima 10s, then 100 (inf)."""
    def tile(two_epochs):
        return (two_epochs * epochs)[:2 * epochs]
    for i in range(seeds):
        s, last = 2.0 ** i, np.inf if i == seeds - 1 else 5.0
        _fake_run(root, f"{dataset}-c{i}", "cls", dataset, "ce", i, {"sr": 1.0, "knn": 1.0},
                  [0] * epochs, {"loss": tile([s, 3 * s, 2 * s, 2 * s])})
        _fake_run(root, f"{dataset}-g{i}", "cls", dataset, "grpo", i, {"sr": 1.0, "knn": 1.0},
                  [0] * epochs, {"loss": loss or tile([-0.01, 0.0, -0.02, 0.0]),
                                 "clip_frac": tile([0.1] * 4),
                                 "approx_kl": tile([0.0, 1e-3, 0.0, 1e-2]),
                                 "ratio_dev_max": tile([1.0, 10 * s, 100.0, last])})


def test_figure3_shows_median_and_range_over_seeds(tmp_path, figures):
    _curves(tmp_path, "cifar10", 3)
    text = report.report(str(tmp_path))
    assert ("- Figure 3 (cifar10): fig3_cifar10.png, fig3_cifar10.pdf, fig3_cifar10.csv" in text)
    assert (tmp_path / "fig3_cifar10.pdf").stat().st_size > 1000
    with open(tmp_path / "fig3_cifar10.csv") as f:
        rows = list(csv.DictReader(f))
    ce = [r for r in rows if r["method"] == "Fine-tuning"]
    # epoch means 2, 4, 8 over the seeds: median 4, min 2, max 8
    assert [(r["epoch"], r["seeds"], r["loss_median"], r["loss_min"], r["loss_max"])
            for r in ce] == [("1", "3", "4", "2", "8")] * 1 + [("2", "3", "4", "2", "8")]
    gr = [r for r in rows if r["method"] == "GRPO-RM"]
    assert [(r["ratio_dev_max_median"], r["ratio_dev_max_min"], r["ratio_dev_max_max"])
            for r in gr] == [("20", "10", "40"), ("100", "100", "inf")]
    axes = figures["fig3_cifar10"].axes
    assert all(ax.get_xlabel() == "epoch" and ax.get_ylabel() for ax in axes[:5])
    assert [ax.get_yscale() for ax in axes[:5]] == ["linear", "linear", "linear", "log", "log"]
    assert "inf, float32 overflow" in axes[4].get_title()  # the collapse drawn, not cut
    band = axes[4].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() == pytest.approx(report.F32_MAX, rel=1e-6)
    legend = [t.get_text() for t in axes[5].get_legend().get_texts()]
    assert legend == ["Fine-tuning (3 seeds)", "GRPO-RM (3 seeds)"]


def test_figure3_keeps_each_methods_colour_and_shows_a_blow_up(tmp_path, figures):
    def variant(dataset, epochs, **flags):
        _fake_run(tmp_path, f"{dataset}{flags}", "cls", dataset, "grpo", 0, {}, [0] * epochs,
                  {"loss": [0.0] * 2 * epochs, "ratio_dev_max": [1.0] * 2 * epochs}, **flags)
    _curves(tmp_path, "cifar10", 2)  # no blow-up in the loss: a linear scale
    variant("cifar10", 2, old_every=8)
    loss = [-0.01, 0.0] * 10
    loss[5] = 1e9  # a blow-up in epoch 3 of 10: a symmetric log scale
    _curves(tmp_path, "stl10", 2, epochs=10, loss=loss)
    variant("stl10", 10, dual_clip=3.0)
    variant("stl10", 10, old_every=8)
    report.report(str(tmp_path))
    a, b = figures["fig3_cifar10"].axes, figures["fig3_stl10"].axes
    assert a[1].get_yscale() == "linear" and b[1].get_yscale() == "symlog"

    def colours(axes):
        return {ln.get_label(): ln.get_color() for ax in axes for ln in ax.get_lines()}
    ca, cb = colours(a), colours(b)
    assert len(set(cb.values())) == 4  # each variant its own
    for method in ("Fine-tuning (2 seeds)", "GRPO-RM (2 seeds)", "GRPO-RM --old-every 8 (1 seed)"):
        assert ca[method] == cb[method]


def _vis(root, m, index, pred, flags=None, k_class=None):
    """A CamVid run of method m with a vis.pt of the test images `index` (4 × 6 px): the image
    grey, the truth Sky (0) on top and no label (255) below, the prediction class pred (or
    k_class[k] for the test image k)."""
    flags = {"data_dir": "data/camvid_voc", "num_classes": 11, "feature_type": ["linear", "ms"],
             **(flags or {})}
    _fake_run(root, m, "seg", "vocfolder", m, 0,
              {"linear": dict.fromkeys(report.SEG_METRICS, 1.0)}, **flags)
    k = len(index)
    truth = torch.zeros(k, 4, 6, dtype=torch.uint8)
    truth[:, 2:] = 255
    preds = [k_class.get(i, pred) if k_class else pred for i in index]
    torch.save({"image": torch.full((k, 3, 4, 6), 100, dtype=torch.uint8), "truth": truth,
                "pred": torch.tensor(preds, dtype=torch.uint8).view(k, 1, 1).expand(k, 4, 6),
                "index": torch.tensor(index)}, root / m / "vis.pt")


def test_figure2_shows_the_test_images_all_runs_show_keyed_by_name(tmp_path, figures):
    # Road, Car; GRPO-RM's vis.pt has two more test images (25, 75), predicted Tree
    _vis(tmp_path, "frozen", [0, 50, 100], 3)
    _vis(tmp_path, "ce", [0, 50, 100], 8)
    _vis(tmp_path, "grpo", [0, 25, 50, 75, 100], 10, k_class={25: 5, 75: 5})
    text = report.report(str(tmp_path))
    assert ("- Figure 2 (vocfolder:camvid_voc): fig2_vocfolder_camvid_voc.png, "
            "fig2_vocfolder_camvid_voc.pdf") in text
    assert (tmp_path / "fig2_vocfolder_camvid_voc.pdf").exists()
    fig = figures["fig2_vocfolder_camvid_voc"]
    axes = np.array(fig.axes).reshape(3, 5)
    assert [ax.get_title() for ax in axes[0]] == [
        "image", "truth", "DINOv2 (frozen)", "Fine-tuning", "GRPO-RM"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == [f"test image {i}" for i in (0, 50, 100)]
    truth = axes[1, 1].images[0].get_array()
    assert truth[0, 0].tolist() == [128, 128, 128] and truth[3, 0].tolist() == [0, 0, 0]
    grpo = axes[2, 4].images[0].get_array()
    assert (grpo == report.CAMVID["Bicyclist"]).all()
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key == ["Sky", "Road", "Car", "Bicyclist", "unlabelled"]  # no Tree: not shown


def test_figure2_class_names_from_a_file(tmp_path, figures):
    names = tmp_path / "names.txt"
    names.write_text("road\nsky\n")
    runs = tmp_path / "runs"
    for m in report.METHODS:
        _vis(runs, m, [0], 1, {"data_dir": "data/streets", "num_classes": 3})
    report.main([str(runs), "--class-names", str(names)])
    key = [t.get_text() for t in figures["fig2_vocfolder_streets"].legends[0].get_texts()]
    assert key == ["road", "sky", "unlabelled"]


def test_a_rebuilt_report_has_the_same_bytes(tmp_path, monkeypatch):
    # matplotlib dates a PDF by the clock, or by SOURCE_DATE_EPOCH: two days apart here
    _curves(tmp_path, "cifar10", 2)
    for m in report.METHODS:
        _vis(tmp_path, m, [0], 1)
    built = []
    for day in (0, 1):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", str(86400 * day))
        report.report(str(tmp_path))
        built.append({f.name: f.read_bytes() for f in tmp_path.glob("fig*")})
    assert len(built[0]) == 5 and built[0] == built[1]


def test_figure2_missing_says_what_it_has(tmp_path):
    _vis(tmp_path, "frozen", [0], 1, {"eval_lr": 1e-5})
    _vis(tmp_path, "ce", [0], 1)
    _fake_run(tmp_path, "grpo", "seg", "vocfolder", "grpo", 0, {}, data_dir="data/camvid_voc",
              num_classes=11, feature_type=["linear", "ms"])
    text = report.report(str(tmp_path))
    assert ("- Figure 2 (vocfolder:camvid_voc): vis.pt (grpo_rm.py --save-vis K) in a frozen, a "
            "fine-tuning and a GRPO-RM run of one setting; runs here with vis.pt: DINOv2 "
            "(frozen) 1 of 1, Fine-tuning 1 of 1, GRPO-RM 0 of 1\n") in text
    _vis(tmp_path / "x", "grpo", [0], 1)
    os.replace(tmp_path / "x" / "grpo" / "vis.pt", tmp_path / "grpo" / "vis.pt")
    text = report.report(str(tmp_path))
    assert "GRPO-RM 1 of 1; those with one differ in --eval-lr\n" in text
