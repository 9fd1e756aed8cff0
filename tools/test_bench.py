"""Tests of tools/bench.py on the CPU: a Table 5 run on the tiny torch.hub model (tools/tinyvit),
the loss alone (compiled = eager), the out-of-memory line, and where a clone of
facebookresearch/dinov2 exists, ViT-S/14's MACs against the paper's Table 5. No GPU, no network."""
import json
import os
import sys

import numpy as np
import pytest
import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # grpo_rm.py and tools/: no packages
import bench as B  # noqa: E402
import grpo_rm as G  # noqa: E402
import report  # noqa: E402


def test_bench_smoke(hub, tmp_path):
    res = B.main(["--task", "seg", "--dataset", "voc", "--hub-repo", hub, "--model",
                  "dinov2_vitt_test", "--img-size", "16", "--seg-size", "8", "--batch-size", "4",
                  "--steps", "2", "--warmup", "1", "--rounds", "2", "--out", str(tmp_path),
                  "--workers", "0", "--device", "cpu"])
    ce, grpo = res["methods"]["ce"], res["methods"]["grpo"]
    # one more forward (θ_old), no backward of it: FLOPs between 1x and 1.5x of fine-tuning's
    assert 1.0 < grpo["flops_per_step"] / ce["flops_per_step"] < 1.5
    assert grpo["fwd_macs_per_image"] == 2 * ce["fwd_macs_per_image"]
    assert ce["fwd_macs_per_batch"] == 4 * ce["fwd_macs_per_image"]
    assert 0 < grpo["old_forward_ms"] < grpo["ms_per_step"]
    # VOC's 1,464 training images at batch 4: 366 steps an epoch
    assert ce["sec_per_epoch_paper"] == pytest.approx(366 * ce["ms_per_step"] / 1e3)
    assert ce["peak_memory_gb"] is None and ce["mfu"] is None  # GPU only
    L = res["loss"]
    assert (L["n"], L["c"]) == (4 * 8 * 8, 21)  # the loss's samples: every pixel of the batch
    [path] = tmp_path.glob("bench-seg-voc-dinov2_vitt_test-16px-b4-w1.json")
    rows = report.bench_table([json.loads(path.read_text())], [])
    assert any(r.startswith("| voc | dinov2_vitt_test | 16 px, batch 4, fp32 | cpu × 1 | grpo |")
               and f"x{grpo['time_ratio']:.3f}" in r for r in rows)


def test_loss_only(tmp_path, monkeypatch, capsys):
    # Fixed times per round; the time ratio is the median of the rounds' ratios (2, 1, 3 -> 2),
    # not the ratio of the medians (2 / 2 = 1).
    fake = {"ce": [1.0, 2.0, 3.0], "grpo_eager": [2.0, 2.0, 9.0], "grpo_compiled": [3.0, 2.0, 4.5]}
    monkeypatch.setattr(B, "time_rounds", lambda fns, *a: {k: np.array(fake[k]) for k in fns})
    torch._dynamo.reset()  # as in a fresh process: after many compilations of the loss in one
    # pytest process, dynamo's recompile limit would leave it running eagerly
    B.main(["--dataset", "imagefolder", "--loss-only", "64,5,32,7", "--device", "cpu",
            "--out", str(tmp_path)])
    res = json.loads((tmp_path / "loss-cpu-float32-64x5-32x7.json").read_text())
    assert res["loss_compiled"]  # the compiler works on this machine (as test_grpo_rm asserts)
    for L, (n, c) in zip(res["losses"], [(64, 5), (32, 7)]):
        ce, eager, fast = L["ce"], L["grpo_eager"], L["grpo_compiled"]
        assert (L["n"], L["c"], L["logit_bytes"]) == (n, c, n * c * 4)
        assert fast["loss"] == pytest.approx(eager["loss"], abs=1e-5)
        assert (ce["time_ratio"], eager["time_ratio"], fast["time_ratio"]) == (1.0, 2.0, 1.5)
        assert eager["ms"] == 2e3
        # cross-entropy keeps its log-probabilities (saved twice) and two scalars (its weight and
        # the labelled count); the hooks see what the compiled graph saves too, beyond the logits;
        # eager autograd keeps more than the compiled graph
        assert n * c * 4 <= ce["held_bytes"] <= n * c * 4 + 16 <= ce["saved_bytes"] - n * c * 4
        assert ce["held_bytes"] <= fast["held_bytes"] < eager["held_bytes"]
    assert "| 64 x 5 | float32 | grpo_compiled |" in capsys.readouterr().out


def test_loss_only_times_the_runs_loss():
    # --dual-clip and --kl-coef reach the loss that --loss-only times, as they reach training's
    args = G.get_args(["--dataset", "imagefolder", "--device", "cpu", "--dual-clip", "3",
                       "--kl-coef", "1"])
    fns, _ = B.loss_fns(args, G.setup(args.device, args.dtype))
    g = torch.Generator().manual_seed(0)
    z, z_old = 4 * torch.randn(8, 5, generator=g), 4 * torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    want = G.grpo_rm_loss(z, z_old, y, dual_clip=3, kl_coef=1)
    assert fns["grpo_eager"](z, z_old, y)[0].item() == pytest.approx(want.item())
    assert want.item() != pytest.approx(G.grpo_rm_loss(z, z_old, y).item())  # the flags matter


def test_out_of_memory_is_one_error_line(hub, tmp_path, monkeypatch, capsys):
    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
    monkeypatch.setattr(B, "bench_build", oom)
    with pytest.raises(SystemExit) as e:
        B.cli(["--dataset", "tinyimagenet", "--hub-repo", hub, "--model", "dinov2_vitt_test",
               "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: out of GPU memory at 8 images per process; lower --batch-size"]


def test_real_vits14_macs_match_table5(dinov2):
    # 21.23 M per token and 0.226 M per patch: 224 px -> 257 tokens -> 5.51 G per image, x 1024
    # = 5.65e12 (the paper: 5.66e12); 70 px -> 26 tokens -> 0.559 G, x 1024 = 5.72e11 (5.72e11).
    m = torch.hub.load(dinov2, "dinov2_vits14", source="local", pretrained=False).eval()
    net = G.Net(m, torch.nn.Linear(384, 1), "cls")  # the head's MACs are negligible
    for size, paper in ((224, 5.66e12), (70, 5.72e11)):
        macs = B.linear_macs(net, torch.zeros(1, 3, size, size)) * 1024
        assert macs == pytest.approx(paper, rel=0.01), (size, macs)


def test_real_dinov3_vits16_macs(dinov3):
    # ViT-S/16 has ViT-S/14's layers (21.23 M MACs per token) and a 16 x 16 patch embedding
    # (0.295 M per patch): 224 px -> 196 patches + the class token + 4 storage tokens = 201 tokens
    # -> 4.27 G + 0.06 G = 4.33 G per image, 21% below ViT-S/14's 5.51 G.
    m = torch.hub.load(dinov3, "dinov3_vits16", source="local", pretrained=False).eval()
    net = G.Net(m, torch.nn.Linear(384, 1), "cls")
    macs = B.linear_macs(net, torch.zeros(1, 3, 224, 224))
    assert macs == pytest.approx(201 * 21.23e6 + 196 * 16 * 16 * 3 * 384, rel=0.005), macs
