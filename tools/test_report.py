"""Tests of tools/report.py on fake result.json and bench-*.json files: the tables' numbers by hand,
the paired confidence intervals, Figures 2 and 3 (pixels, and the words kept in their PNG text
chunks), and the command line's error."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import report  # noqa: E402  (tools/ is no package)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.py")


def test_paired_ci_by_hand():
    # differences 2, 4, 6 (seeds 0-2; seed 3 only in a): mean 4, sample std 2, n 3,
    # t(0.975, 2) = 4.303 -> half width 4.303 · 2 / sqrt(3) = 4.9687 -> [-0.9687, 8.9687]
    a = {0: 12.0, 1: 14.0, 2: 16.0, 3: 99.0}
    mean, lo, hi, n = report.paired_ci(a, {0: 10.0, 1: 10.0, 2: 10.0})
    assert (mean, n) == (4.0, 3) and lo == pytest.approx(-0.96866, abs=1e-4)
    assert hi == pytest.approx(8.96866, abs=1e-4)
    assert report.paired_ci({0: 1.0}, {0: 2.0}) is None  # one pair: no interval


def _fake_run(root, name, task, dataset, method, seed, metrics, losses=(), uniformity="eq4",
              subset=1.0, lr=1e-3, eval_lr=1e-3, series=None, data_dir=None):
    cfg = {"task": task, "dataset": dataset, "data_dir": data_dir or f"data/{dataset}",
           "method": method,
           "uniformity": uniformity, "subset": subset, "seed": seed, "lr": lr, "eval_lr": eval_lr}
    os.makedirs(root / name)
    (root / name / "result.json").write_text(json.dumps(
        {"config": cfg, "metrics": metrics, "train_loss": list(losses),
         "sec_per_epoch": [2.0, 4.0][:len(losses)], "series": series or {}}))


def test_report_tables(tmp_path):
    _fake_run(tmp_path, "a", "cls", "cifar10", "frozen", 0, {"sr": 50.0, "knn": 40.0})
    for seed, (sr, knn) in enumerate([(60.0, 58.0), (62.0, 60.0)]):
        _fake_run(tmp_path, f"ce{seed}", "cls", "cifar10", "ce", seed, {"sr": sr, "knn": knn},
                  [1.0, 0.5])
        _fake_run(tmp_path, f"ce{seed}x", "cls", "cifar10", "ce", seed, {"sr": sr - 5, "knn": knn},
                  [1.0, 0.5], lr=1e-4)
    for seed, (sr, knn) in enumerate([(64.0, 55.0), (67.0, 57.0)]):
        _fake_run(tmp_path, f"g{seed}", "cls", "cifar10", "grpo", seed, {"sr": sr, "knn": knn},
                  [0.0, -0.1])
    _fake_run(tmp_path, "g100", "cls", "cifar100", "grpo", 0, {"sr": 30.0, "knn": 31.0})
    _fake_run(tmp_path, "g100u", "cls", "cifar100", "grpo", 0, {"sr": 29.0, "knn": 30.0},
              [0.1, 0.0], uniformity="none")
    seg = {"linear": {"pixel_acc": 90.0, "iou": 80.0, "miou": 60.0}}
    _fake_run(tmp_path, "seg", "seg", "voc", "grpo", 0, seg)
    text = report.report(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text
    # ce at lr 1e-3 (its other lr ties in seeds; the higher lr is the main one): SR 60, 62 -> 61
    # ± 1.41 (sample std); kNN 58, 60 -> 59 ± 1.41, the best kNN. grpo: SR 64, 67 -> 65.50 ±
    # 2.12.
    assert "| cifar10 | DINOv2 (frozen) | 50.00 | 40.00 |" in text
    assert "| cifar10 | Fine-tuning | 61.00 ± 1.41 | **59.00 ± 1.41** |" in text
    assert "| cifar10 | GRPO-RM | **65.50 ± 2.12** | 56.00 ± 1.41 |" in text
    assert "| cifar100 | Fine-tuning | — | — |" in text
    assert "| cifar100 | GRPO-RM | 30.00 | 31.00 |" in text
    assert "| cifar100 | set to 0 | 29.00 | 3.00 |" in text  # Table 6, and no s/epoch bold
    assert "| cifar100 | Eq. (5) | — | — |" in text
    assert "| linear | GRPO-RM | 90.00 | 80.00 | 60.00 |" in text
    # paired by seed at lr 1e-3: SR differences 4, 5 -> mean 4.5, std 0.7071, t(1) = 12.706:
    # half width 12.706 · 0.7071 / sqrt(2) = 6.353 -> [-1.85, +10.85]
    assert "| cifar10 | lr 0.001 | sr | +4.50 [-1.85, +10.85] (2) |" in text
    assert "| cifar10 | best lr: 0.001 vs 0.001 | sr | +4.50" in text
    assert "| Fine-tuning | 0.0001 | 0.001 | 56.00 ± 1.41 |" in text  # the sweep's other lr


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
    assert "0 runs;" in text
    assert "| voc | dinov2_vitt_test | 16 px, batch 4, fp32 | cpu × 1 | grpo |" in text
    assert ("| voc | dinov2_vitt_test | 16 px, batch 4, fp32 | cpu × 1 | ce | 3.0 | 5.0 | — | "
            "100.0 | 18.0 | — |  |  |") in text
    assert "| 150.0 | 18.0 | — | x1.500 | — |" in text


def test_cli_on_an_empty_folder_prints_one_error_line(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [f"error: {tmp_path}: no */result.json or bench-*.json there"]


def test_cut_spikes_only_when_a_few_steps_dwarf_the_rest():
    y = -0.01 * (np.arange(400) % 4)  # a sawtooth in [-0.03, 0]: p10 = -0.03, p90 = 0
    assert report.cut_spikes(y)[1] == 0 and report.cut_spikes(y)[0] is y
    y[200] = 0.2  # beyond p90 but within 10 spreads (0.03) of it: nothing is cut
    assert report.cut_spikes(y)[1] == 0
    y[100] = 1e12  # a blow-up: drawn at p90 + one spread, with every step above that
    drawn, cut = report.cut_spikes(y)
    assert cut == 2 and drawn[100] == drawn[200] == 0.03 and y[100] == 1e12


def _fake_curves(root, epochs, per_epoch=4, grpo_loss=None, dataset="cifar10", **kw):
    """Two seeds of fine-tuning and of GRPO-RM with per-step series: ce's loss falls, GRPO-RM's
    a sawtooth restarting at 0 every epoch (or grpo_loss(step)), its clip fraction another."""
    steps = list(range(per_epoch * epochs))
    metrics = {"sr": 1.0, "knn": 1.0}
    loss = grpo_loss or (lambda s: -0.01 * (s % per_epoch))
    for seed in (0, 1):
        _fake_run(root, f"ce{seed}", "cls", dataset, "ce", seed, metrics, [1.0] * epochs,
                  series={"step": steps, "loss": [2.0 - 0.1 * s for s in steps]}, **kw)
    for seed in (0, 1):
        _fake_run(root, f"g{seed}", "cls", dataset, "grpo", seed, metrics, [0.0] * epochs,
                  series={"step": steps, "loss": [loss(s) for s in steps],
                          "clip_frac": [0.1 * (s % per_epoch) for s in steps]}, **kw)


def _in_panels(shape):
    """A (H, W) mask of Figure 3's four plotting boxes, their frames included."""
    inside = np.zeros(shape, bool)
    for i in range(4):
        x0, y0, x1, y1 = report.panel_box(i)
        inside[y0:y1 + 1, x0:x1 + 1] = True
    return inside


def test_figure3_from_per_step_series(tmp_path):
    per_epoch, epochs = 4, 3
    _fake_curves(tmp_path, epochs, per_epoch)
    text = report.report(str(tmp_path))
    assert "Figure 3 (cifar10): fig3_cifar10.png" in text
    rows = (tmp_path / "fig3_cifar10.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,ce_loss_mean") and len(rows) == 1 + per_epoch * epochs
    assert rows[6].split(",")[:5] == ["6", "1.5000", "1.500000", "0.000000", "-0.010000"]
    img = np.array(Image.open(tmp_path / "fig3_cifar10.png").convert("RGB"))
    blue, red = np.all(img == report.BLUE, -1), np.all(img == report.RED, -1)
    box = [report.panel_box(i) for i in range(4)]
    inside = [(slice(y0, y1 + 1), slice(x0, x1 + 1)) for x0, y0, x1, y1 in box]
    # fine-tuning's curve top left, GRPO-RM's in the three other panels, and nowhere else
    assert blue[inside[0]].sum() > 100 and blue.sum() == blue[inside[0]].sum()
    assert red[inside[0]].sum() == 0 and all(red[b].sum() > 100 for b in inside[1:])
    assert red.sum() == sum(red[b].sum() for b in inside[1:])


def test_figure3_grid_lines_stay_in_their_panels(tmp_path):
    # 2 epochs: the zoom panel's grid at epochs 0-3 once reached epoch 3, far right of its box,
    # into the clip-fraction panel
    _fake_curves(tmp_path, epochs=2)
    report.report(str(tmp_path))
    img = np.array(Image.open(tmp_path / "fig3_cifar10.png").convert("RGB"))
    inside = _in_panels(img.shape[:2])
    for colour in (report.GRID, report.RED, report.BLUE):
        drawn = np.all(img == colour, -1)
        assert drawn[inside].sum() > 50, colour  # the check sees grid lines and curves
        assert drawn[~inside].sum() == 0, colour


def test_figure3_titles_name_the_data_lr_seeds_and_epochs(tmp_path):
    data = {"dataset": "imagefolder", "data_dir": "/data/cifar10_mini/"}
    _fake_curves(tmp_path, epochs=2, **data)
    for seed in (2, 3, 4):  # GRPO-RM at another lr with more seeds: its main setting
        _fake_run(tmp_path, f"g{seed}x", "cls", "imagefolder", "grpo", seed,
                  {"sr": 1.0, "knn": 1.0}, [0.0] * 2, lr=1e-4, data_dir=data["data_dir"],
                  series={"loss": [-0.01] * 8, "clip_frac": [0.1] * 8})
    report.report(str(tmp_path))
    png = Image.open(tmp_path / "fig3_imagefolder_cifar10_mini.png")
    assert png.text["Title"] == ("Figure 3: imagefolder (cifar10_mini), fine-tuning lr 0.001, "
                                 "GRPO-RM lr 0.0001, mean of 2 (fine-tuning) and 3 (GRPO-RM) seeds")
    titles = png.text["Description"].splitlines()
    assert titles[2] == "GRPO-RM: -J per step, epochs 1-2"  # a 2-epoch run: 2 epochs shown
    # one epoch; 100 steps in 3 epochs (100 / (100 / 3) is a hair over 3)
    assert report.fig3_panels(*[np.zeros((1, 4))] * 3, 4)[2][0].endswith(", epoch 1")
    assert report.fig3_panels(*[np.zeros((1, 100))] * 3, 100 / 3)[2][0].endswith("epochs 1-3")


def test_figure3_marks_cut_steps_apart_from_the_curve(tmp_path):
    # a sawtooth with 2 blow-ups (steps 5 and 39): cut, marked at the top edge, counted in a legend
    _fake_curves(tmp_path, epochs=3, per_epoch=20,
                 grpo_loss=lambda s: 1e9 if s in (5, 39) else -0.001 * (s % 20))
    report.report(str(tmp_path))
    png = Image.open(tmp_path / "fig3_cifar10.png")
    words = png.text["Description"].splitlines()
    assert words.count("2 steps above the top edge, cut") == 2  # the whole run and epochs 1-3
    img = np.array(png.convert("RGB"))
    x0, y0, x1, y1 = report.panel_box(1)
    marks = np.all(img == report.CUT, -1)
    assert marks[y0:y0 + 10, x0:x1].sum() > 20  # triangles at the top edge of the box
    assert marks[y0 - 20:y0 - 2, x0:x1].sum() > 10  # and the legend's, above it
    assert marks[y0 + 10:y1 + 1].sum() == 0
    # the curve is not joined through the cut steps: no red at the top edge
    assert not np.all(img[y0 + 1:y0 + 10, x0:x1] == report.RED, -1).any()
    loss = -0.01 * (np.arange(40) % 4)
    loss[[1, 21]] = 1e9
    drawn = report.fig3_panels(np.zeros((1, 40)), loss[None], np.zeros((1, 40)), 4)[1][2][0][1]
    assert np.flatnonzero(np.isnan(drawn)).tolist() == [1, 21]  # gaps there, values elsewhere


def _vis(root, m, image, truth, pred):
    """A seg run of method m on voc with one --save-vis example of 4 × 4 px: the image in one
    colour, truth (classes of the top and the bottom half) and prediction (one class)."""
    _fake_run(root, m, "seg", "voc", m, 0, {"linear": dict.fromkeys(report.SEG_METRICS, 1.0)})
    y = torch.full((1, 4, 4), truth[0], dtype=torch.uint8)
    y[:, 2:] = truth[-1]
    torch.save({"image": torch.tensor(image, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 4, 4),
                "truth": y, "pred": torch.full((1, 4, 4), pred, dtype=torch.uint8)},
               root / m / "vis.pt")


def test_figure2_puts_each_method_in_its_column(tmp_path):
    # image red, truth class 1, the prediction a class per method
    preds = {"frozen": 2, "ce": 3, "grpo": 4}
    for m, pred in preds.items():
        _vis(tmp_path, m, (255, 0, 0), (1,), pred)
    text = report.report(str(tmp_path))
    assert "Figure 2 (voc): fig2_voc.png (image | truth | frozen | fine-tuning | GRPO-RM)" in text
    img = np.array(Image.open(tmp_path / "fig2_voc.png").convert("RGB"))
    tile, pad, top = 160, 2, report.FIG2_TOP  # figure2's defaults, under the titles
    assert img.shape[1] == 5 * (tile + pad) + pad and img.shape[0] > top + tile + 2 * pad
    pal = report.voc_palette()
    expected = [(255, 0, 0), pal[1], *(pal[c] for c in preds.values())]
    for j, colour in enumerate(expected):
        x = pad + (tile + pad) * j
        block = img[top + pad:top + pad + tile, x:x + tile]
        assert np.all(block == colour), j


def test_voc_palette_is_vocs():
    pal = report.voc_palette()
    assert pal[[0, 1, 2, 3, 15, 255]].tolist() == [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [192, 128, 128], [224, 224, 192]]


def test_figure2_keys_the_classes_its_label_tiles_show(tmp_path):
    pal = report.voc_palette()
    # the image is painted in class 5's colour: an image is no label map, 5 is no class shown
    for m, truth, pred in (("frozen", (1, 255), 2), ("ce", (1,), 3), ("grpo", (1,), 2)):
        _vis(tmp_path, m, pal[5].tolist(), truth, pred)
    report.report(str(tmp_path))
    png = Image.open(tmp_path / "fig2_voc.png")
    assert png.text["Title"] == ("Figure 2: voc\nfine-tuning lr 0.001, GRPO-RM lr 0.001, "
                                 "one seed per method, not averaged (seed 0)")
    assert png.text["Description"].splitlines()[-1] == "classes: 1, 2, 3, 255 no label"
    img = np.array(png.convert("RGB"))
    key = img[report.FIG2_TOP + 160 + 2 * 2:]  # under the grid
    for c in (1, 2, 3, 255):
        assert np.all(key == pal[c], -1).sum() >= 13 * 13, c  # its swatch
    assert not np.all(key == pal[5], -1).any()


def test_variants_beyond_the_paper_get_their_own_rows_and_figures(tmp_path):
    steps = list(range(8))  # 2 epochs of 4 steps
    for seed, (ft, paper, dual) in enumerate([(60.0, 20.0, 58.0), (62.0, 25.0, 61.0)]):
        _fake_run(tmp_path, f"ce{seed}", "cls", "cifar10", "ce", seed, {"sr": ft, "knn": ft},
                  [1.0, 0.5], series={"step": steps, "loss": [1.0] * 8})
        for name, sr, dev, extra in (("p", paper, 1e16, {}), ("d", dual, 2.0, {"dual_clip": 3})):
            series = {"step": steps, "loss": [-0.01] * 8, "clip_frac": [0.1] * 8,
                      "ratio_dev_max": [0.5] * 7 + [dev]}
            _fake_run(tmp_path, f"{name}{seed}", "cls", "cifar10", "grpo", seed,
                      {"sr": sr, "knn": sr}, [0.0, 0.0], series=series)
            if extra:  # the run's config records the flag, as grpo_rm.py writes it
                path = tmp_path / f"{name}{seed}" / "result.json"
                r = json.loads(path.read_text())
                r["config"].update(extra)
                path.write_text(json.dumps(r))
    text = report.report(tmp_path)
    # the paper's tables show the paper's form, not the variant
    assert "| cifar10 | GRPO-RM | 22.50 ± 3.54 | 22.50 ± 3.54 |" in text
    # paired by seed: dual-clip − fine-tuning = -2, -1 -> mean -1.5, std 0.7071, t(1) = 12.706:
    # half width 6.353 -> [-7.85, +4.85]
    assert ("| GRPO-RM + dual-clip 3 | 2 | 59.50 ± 2.12 | 59.50 ± 2.12 | -1.50 [-7.85, +4.85] "
            "| -1.50 [-7.85, +4.85] | 2, 2 |") in text
    assert "| GRPO-RM | 2 | 22.50 ± 3.54 | 22.50 ± 3.54 | -38.50" in text
    assert "1e+16, 1e+16 |" in text
    assert (tmp_path / "fig3_cifar10.png").exists()
    assert (tmp_path / "fig3_cifar10_dual_clip_3.png").exists()
