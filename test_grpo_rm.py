"""Tests of grpo_rm.py, in the order of its sections: the method, model, data, training (one
process, then DDP and resume), evaluation, main and the command line, config. Tools have theirs in
tools/. No network beyond 127.0.0.1. A tiny torch.hub repository (a ViT with DINOv2's interface)
and tiny datasets in the real on-disk layouts come from conftest.py. Where a clone of
facebookresearch/dinov2 exists (the folder named by GRPO_RM_DINOV2) the real classes are tested
too; where a GPU exists the device-parametrised cases also run on CUDA."""
import copy
import errno
import functools
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import re
import torch
import torch.nn.functional as F
from PIL import Image

import grpo_rm as G
from conftest import SHARED, image, palette_png

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
GPU_ONLY = pytest.mark.skipif(not CUDA, reason="a CUDA path: runs where a GPU is visible")
PIN = '{"pretrained": false}'


# =============================================================================
# Fixtures (conftest.py has the shared ones): argument lists, helpers

def _tinyimagenet(root, size=64):
    """Tiny-ImageNet as tools/prepare_data.py leaves it: {train,val}/<wnid>/*.JPEG, 2 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(["n01", "n02"]):
            os.makedirs(root / split / wnid)
            for i in range(n):
                image(rng, c, size).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    return str(root)


def cls_args(hub, data, out, *extra):
    return ["--dataset", "imagefolder", "--data-dir", data, "--hub-repo", hub, "--model",
            "dinov2_vitt_test", "--img-size", "16", "--batch-size", "8", "--epochs", "2",
            "--eval-epochs", "3", "--lr", "0.01", "--workers", "0", "--out", str(out),
            "--log-every", "1", "--device", "cpu", *extra]


def seg_args(hub, data, out, *extra):
    return ["--task", "seg", "--dataset", "voc", "--num-classes", "3", "--data-dir", data,
            "--hub-repo", hub, "--model", "dinov2_vitt_test", "--img-size", "16", "--seg-size",
            "8", "--batch-size", "4",
            "--epochs", "2", "--eval-epochs", "2", "--lr", "0.01", "--workers", "0", "--out",
            str(out), "--ms-scales", "1.0", "1.5", "--device", "cpu", *extra]


def real_args(repo, data, out, *extra, task="cls"):
    base = (["--dataset", "imagefolder", "--img-size", "28"] if task == "cls" else
            ["--dataset", "voc", "--num-classes", "3", "--img-size", "28", "--seg-size", "8",
             "--ms-scales", "1.0", "1.5"])
    return [*base, "--data-dir", data, "--hub-repo", repo, "--model", "dinov2_vits14",
            "--hub-kwargs", PIN, "--batch-size", "8", "--epochs", "1", "--eval-epochs", "1",
            "--lr", "0.001", "--workers", "0", "--out", str(out), "--device", "cpu", *extra]


def _run_dir(root, prefix):
    """The one run folder under root whose name starts with prefix (then a hash of the flags)."""
    [d] = root.glob(prefix + "-*")
    return d


def _trainable(net):
    return {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}


def _capture_init(monkeypatch):
    """Record a copy of the Net that main() builds, before any training."""
    seen, build = [], G.build_net

    def capture(*a):
        net = build(*a)
        seen.append(copy.deepcopy(net))
        return net
    monkeypatch.setattr(G, "build_net", capture)
    return seen


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, out, stop_at):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if stop_at is not None and rank == 0:  # a real SIGTERM to rank 0 after step stop_at
        step, calls = G.train_step, []
        G.train_step = lambda *a: (calls.append(1), len(calls) == stop_at and os.kill(
            os.getpid(), signal.SIGTERM), step(*a))[2]
    try:
        result, net = G.main(argv)
        torch.save({"state": {k: v.cpu() for k, v in net.state_dict().items()}, "result": result},
                   os.path.join(out, f"rank{rank}.pt"))
    except G.RunStopped as e:
        torch.save({"stopped": str(e)}, os.path.join(out, f"rank{rank}.pt"))


def _with_out(argv, out):
    """argv with another --out."""
    i = argv.index("--out")
    return [*argv[:i], "--out", str(out), *argv[i + 2:]]


def _ddp(argv, out, world=2, stop_at=None):
    os.makedirs(out, exist_ok=True)
    torch.multiprocessing.spawn(_ddp_worker, args=(world, _free_port(), argv, str(out), stop_at),
                                nprocs=world, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def _cli(*argv, env=None):
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_rm.py"), *argv],
                       capture_output=True, text=True, timeout=300, env=env)
    return p.returncode, p.stderr, [ln for ln in p.stderr.strip().splitlines() if "error:" in ln]


def _popen_until(argv, marker, launcher=(), **kw):
    """Start grpo_rm.py (under launcher), read its output until a line starts with marker; -> the
    process."""
    p = subprocess.Popen([sys.executable, "-u", *launcher, os.path.join(HERE, "grpo_rm.py"), *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    for line in p.stdout:
        if line.startswith(marker):
            return p
    raise AssertionError(p.stderr.read())


# =============================================================================
# Method: rewards (Eqs. 3-6), advantages (Eq. 2), the loss (Eq. 1), its gradient, diagnostics

P_OLD = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)  # c = 3, old-policy probabilities


LABEL = torch.tensor([1])  # true class k = 1


@pytest.mark.parametrize("uniformity,penalty,expected", [
    # Eq. (3): r_acc = [0, c, 0] = [0, 3, 0].
    # Eq. (4): r_uni = -p = [-0.5, -0.3, -0.2]                      -> r = [-0.5, 2.7, -0.2]
    ("eq4", False, [-0.5, 2.7, -0.2]),
    # Eq. (5): i != k: (1 - p_k)/(c - 1) - p_i = 0.35 - [0.5, ., 0.2] = [-0.15, ., 0.15];
    #          i = k: p_k = 0.3                                      -> r = [-0.15, 3.3, 0.15]
    ("eq5", False, [-0.15, 3.3, 0.15]),
    ("none", False, [0.0, 3.0, 0.0]),  # the accuracy reward alone
    # background penalty: r_0 -= c/2 = 1.5
    ("eq4", True, [-2.0, 2.7, -0.2]),
    ("eq5", True, [-1.65, 3.3, 0.15]),
    ("none", True, [-1.5, 3.0, 0.0]),
])
def test_rewards_by_hand(uniformity, penalty, expected):
    r = G.rewards(P_OLD, LABEL, uniformity, background_penalty=penalty)
    torch.testing.assert_close(r, torch.tensor([expected], dtype=torch.float64), atol=1e-12, rtol=0)


def test_eq5_sums_to_pk():
    # After Eq. (5): -0.15 + 0.3 + 0.15 = 0.3 = p_k for p = [0.5, 0.3, 0.2], k = 1.
    assert G.uniformity_eq5(P_OLD, LABEL).sum().item() == pytest.approx(0.3)


@pytest.mark.parametrize("r,expected", [
    # r = [0, 3, 0]: mean 1, deviations [-1, 2, -1], unbiased var (1 + 4 + 1)/2 = 3, std 1.7320508
    # A = [-1, 2, -1] / (1.7320508 + 1e-4) = [-0.5773169, 1.1546339, -0.5773169]
    ([0.0, 3.0, 0.0], [-0.5773169, 1.1546339, -0.5773169]),
    # r = [-0.5, 2.7, -0.2]: mean 2/3, deviations [-1.1666667, 2.0333333, -0.8666667],
    # var (1.3611111 + 4.1344444 + 0.7511111)/2 = 3.1233333, std 1.7672955
    # A = deviations / 1.7673955 = [-0.6601050, 1.1504688, -0.4903637]
    ([-0.5, 2.7, -0.2], [-0.6601050, 1.1504688, -0.4903637]),
])
def test_advantages_by_hand(r, expected):
    A = G.advantages(torch.tensor([r], dtype=torch.float64))
    torch.testing.assert_close(A, torch.tensor([expected], dtype=torch.float64), atol=1e-6, rtol=0)


def _known_ratio_batch():
    """Three samples, c = 3, old logits 0 (p_old = 1/3 each), label 0. New p = [0.5, 0.25, 0.25]
    (ρ = [1.5, 0.75, 0.75]: all three terms clipped), then twice [0.36, 0.32, 0.32] (ρ = [1.08,
    0.96, 0.96]: none clipped). A shift of the logits changes no probability."""
    old = torch.zeros(3, 3, dtype=torch.float64)
    p = torch.tensor([[0.5, 0.25, 0.25], [0.36, 0.32, 0.32], [0.36, 0.32, 0.32]],
                     dtype=torch.float64)
    return torch.log(p) + 7, old, torch.tensor([0, 0, 0])


def test_loss_clipped_by_hand():
    # Eq. (4) with p_old = 1/3: r = [3 - 1/3, -1/3, -1/3], deviations [2, -1, -1], std sqrt(3):
    # A = [2, -1, -1] / s, s = sqrt(3) + 1e-4 = 1.7321508.
    # sample 1: min(1.5 A0, 1.2 A0) = 2.4/s; min(0.75 A, 0.8 A) = -0.8/s twice -> J = 0.8/(3 s)
    #           = 0.1539512
    # samples 2, 3: all ρ within [0.8, 1.2]: J = (1.08·2 - 0.96 - 0.96)/(3 s) = 0.0461854
    # loss = -(0.1539512 + 2 · 0.0461854)/3 = -0.0821073
    new, old, y = _known_ratio_batch()
    assert G.grpo_rm_loss(new, old, y).item() == pytest.approx(-0.0821073, abs=1e-7)
    assert G.grpo_rm_loss(new[:1], old[:1], y[:1]).item() == pytest.approx(-0.1539512, abs=1e-7)


def test_diagnostics_by_hand():
    # clip fraction: 3 of the 9 terms (all of sample 1). |ρ - 1|: [0.5, 0.25, 0.25] and twice
    # [0.08, 0.04, 0.04], mean 1.32/9 = 0.1466667, max 0.5.
    # KL(old || new) per sample, Σ_i p_old [(ρ-1) - ln ρ]:
    # sample 1: (1/3)[(0.5 - ln 1.5) + 2(-0.25 - ln 0.75)] = (1/3)(0.0945349 + 0.0753641)
    #         = 0.0566330
    # samples 2, 3: (1/3)[(0.08 - ln 1.08) + 2(-0.04 - ln 0.96)] = (1/3)(0.0030390 + 0.0016434)
    #         = 0.0015610
    # mean (0.0566330 + 2 · 0.0015610)/3 = 0.0199183 (= Σ p_old ln(p_old / p), the exact KL: the
    # group is every class)
    new, old, y = _known_ratio_batch()
    _, diag = G.grpo_rm_loss(new, old, y, with_diagnostics=True)
    torch.testing.assert_close(diag, torch.tensor([1 / 3, 0.0199183, 0.1466667, 0.5, 0.0],
                                                  dtype=torch.float64), atol=1e-6, rtol=0)
    exact_kl = (old.softmax(-1) * (old.log_softmax(-1) - new.log_softmax(-1))).sum(-1).mean()
    assert diag[1].item() == pytest.approx(exact_kl.item(), abs=1e-12)


def test_dual_clip_by_hand():
    # c = 3, p_old = 1/3 each, label 0: A = [2, -1, -1] / s, s = sqrt(3) + 1e-4 = 1.7321508.
    # New p = [0.1, 0.1, 0.8]: ρ = [0.3, 0.3, 2.4]. Terms: 0.3 A_0 = 0.6/s (A > 0, below the
    # clip: unclipped); min(0.3, 0.8)·(-1/s) = -0.8/s; min(-2.4/s, -1.2/s) = -2.4/s.
    # Paper: loss = (2.4 + 0.8 - 0.6)/(3 s) = 0.5003413. Dual clip C = 2: the last term is
    # max(-2.4/s, -2/s) = -2/s: loss = (2 + 0.8 - 0.6)/(3 s) = 0.4233658. C = 3 > 2.4: no bound.
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.log(torch.tensor([[0.1, 0.1, 0.8]], dtype=torch.float64)).requires_grad_()
    y = torch.tensor([0])
    assert G.grpo_rm_loss(new, old, y).item() == pytest.approx(0.5003413, abs=1e-7)
    assert G.grpo_rm_loss(new, old, y, dual_clip=3).item() == pytest.approx(0.5003413, abs=1e-7)
    loss, diag = G.grpo_rm_loss(new, old, y, dual_clip=2, with_diagnostics=True)
    assert loss.item() == pytest.approx(0.4233658, abs=1e-7)
    assert diag[4].item() == pytest.approx(1 / 3)  # one of the three terms bounded
    # beyond the bound the term is the constant C·A: no gradient through ρ_2
    (g,) = torch.autograd.grad(loss, new)
    s = 3 ** 0.5 + 1e-4
    ratio = torch.tensor([0.3, 0.3, 2.4], dtype=torch.float64)
    A = torch.tensor([2.0, -1.0, -1.0], dtype=torch.float64) / s
    w = ratio * A * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # only ρ_0 A_0 is live
    p = ratio / 3  # ∂ρ_i/∂z_j = ρ_i (δ_ij - p_j): -∂J/∂z = -(w - p Σ w) / 3
    torch.testing.assert_close(g[0], -(w - p * w.sum()) / 3, atol=1e-12, rtol=0)
    # A > 0 terms are never bounded: new p = [0.38, 0.31, 0.31], ρ = [1.14, 0.93, 0.93]; with
    # C = 1.1 (below 1 + ε, where the clip would not yet bind) the term 1.14 A_0 stays as it is
    near = torch.log(torch.tensor([[0.38, 0.31, 0.31]], dtype=torch.float64))
    assert G.grpo_rm_loss(near, old, y, dual_clip=1.1).item() == pytest.approx(
        G.grpo_rm_loss(near, old, y).item(), abs=1e-12)


def test_dual_clip_gradient_finite_differences():
    new, old = _batch(9, 6, 4, 1.5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ratio = new.softmax(-1) / old.softmax(-1)
    assert (ratio > 1.5).any() and (ratio < 1.5).any()
    assert torch.autograd.gradcheck(
        lambda z: G.grpo_rm_loss(z, old, labels, 0.2, "eq4", False, dual_clip=1.5),
        (new.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dual_clip_keeps_an_overflowing_ratio_finite(dtype):
    # A wrong class (A < 0) whose old log-probability is -200 and new one near 0: log ρ ≈ 200,
    # ρ = inf in float32. The paper's form is not finite; the dual clip bounds ρ in log space.
    # The third sample: the true class (A > 0) has the old log-probability -200, now near 0.
    old = torch.tensor([[5.0, 0.0, -200.0], [0.0, 1.0, 2.0], [0.0, 5.0, -200.0]]).to(dtype)
    new = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 2.5], [0.0, 0.0, 1.0]]).to(dtype)
    new = new.requires_grad_()
    y = torch.tensor([0, 1, 2])
    assert not torch.isfinite(G.grpo_rm_loss(new, old, y))
    loss = G.grpo_rm_loss(new, old, y, dual_clip=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad.float()).all()
    assert new.grad[1].abs().sum() > 0  # the sample without overflow still learns


def test_kl_penalty_by_hand():
    # c = 2, p_old = [3/4, 1/4], p = [1/2, 1/2]: KL(old || new) = 3/4 ln(3/2) + 1/4 ln(1/2)
    # = 0.1308120, and its gradient in the logits p - p_old = [-1/4, 1/4] (one sample: no mean).
    old = torch.log(torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    new = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1])
    with_kl, plain = G.grpo_rm_loss(new, old, y, kl_coef=2.0), G.grpo_rm_loss(new, old, y)
    assert (with_kl - plain).item() == pytest.approx(2 * 0.1308120, abs=1e-7)
    g_kl, g = (torch.autograd.grad(v, new)[0] for v in (with_kl, plain))
    torch.testing.assert_close(g_kl - g, torch.tensor([[-0.5, 0.5]], dtype=torch.float64))


def test_kl_penalty_gradient_finite_differences():
    new, old = _batch(9, 6, 4, 1.5)  # with the dual clip: terms at its bound, inside and clipped
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(
        lambda z: G.grpo_rm_loss(z, old, labels, dual_clip=1.5, kl_coef=0.5),
        (new.requires_grad_(),), eps=1e-6, atol=1e-7)


def plain_grpo_rm_loss(logits, old_logits, labels, eps=0.2, uniformity="eq4", penalty=False,
                       ignore=-100, dual=None, kl=None):
    """Eq. (1), β = 0, as the paper writes it, differentiated by autograd: the reference."""
    keep = labels != ignore
    y = labels.masked_fill(~keep, 0)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logp = F.log_softmax(logits.to(dtype), -1)
    logp_old = F.log_softmax(old_logits.detach().to(dtype), -1)
    with torch.no_grad():
        A = G.advantages(G.rewards(logp_old.exp(), y, uniformity, penalty))
    ratio = torch.exp(logp - logp_old)
    terms = torch.minimum(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)
    if dual:  # dual-clip PPO as Ye et al. write it: max(min(ρA, clip(ρ)A), C·A) for A < 0
        terms = torch.where(A < 0, torch.maximum(terms, dual * A), terms)
    J = terms.mean(-1)
    if kl:  # PPO's penalty: KL(π_θold || π_θ) = Σ_i p_old,i (log p_old,i - log p_i)
        J = J - kl * (logp_old.exp() * (logp_old - logp)).sum(-1)
    return -(J * keep).sum() / keep.sum().clamp(min=1)


def naive_loss(logits, old_logits, labels, eps=0.2, uniformity="eq4", penalty=False, ignore=-100):
    """Eq. (1) with β = 0, by loops over samples and classes in Python floats."""
    total, n = 0.0, 0
    for z, zo, k in zip(logits.tolist(), old_logits.tolist(), labels.tolist()):
        if k == ignore:
            continue
        c = len(z)
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        po = [math.exp(v) / sum(math.exp(u) for u in zo) for v in zo]
        r = []
        for i in range(c):
            uni = {"eq4": -po[i], "none": 0.0,
                   "eq5": po[k] if i == k else (1 - po[k]) / (c - 1) - po[i]}[uniformity]
            r.append((c if i == k else 0.0) + uni - (c / 2 if penalty and i == 0 else 0.0))
        mean = sum(r) / c
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (c - 1))
        J = 0.0
        for i in range(c):
            A, rho = (r[i] - mean) / (std + 1e-4), p[i] / po[i]
            J += min(rho * A, min(max(rho, 1 - eps), 1 + eps) * A) / c
        total, n = total + J, n + 1
    return -total / n


def _batch(seed, n=6, c=4, spread=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, c, generator=g, dtype=dtype)
    return old + spread * torch.randn(n, c, generator=g, dtype=dtype), old


@pytest.mark.parametrize("uniformity,penalty", [("eq4", False), ("eq5", False), ("none", False),
                                                ("eq4", True)])
def test_loss_matches_naive_loop(uniformity, penalty):
    new, old = _batch(0)
    labels = torch.tensor([0, 1, 2, 3, -100, 1])
    loss = G.grpo_rm_loss(new, old, labels, 0.2, uniformity, penalty)
    expected = naive_loss(new, old, labels, 0.2, uniformity, penalty)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    ratio = new.softmax(-1) / old.softmax(-1)
    assert ((ratio > 1.2) | (ratio < 0.8)).any() and ((ratio < 1.2) & (ratio > 0.8)).any()


@pytest.mark.parametrize("uniformity,penalty", [("eq4", False), ("eq5", True)])
def test_loss_gradient_finite_differences(uniformity, penalty):
    new, old = _batch(1, 5, 3, 0.4)
    labels = torch.tensor([0, 2, 1, 1, 0])
    assert torch.autograd.gradcheck(
        lambda z: G.grpo_rm_loss(z, old, labels, 0.2, uniformity, penalty),
        (new.requires_grad_(),), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("spread,eps", [(0.02, 0.2), (0.8, 0.2), (0.8, 0.05)])  # unclipped, both
@pytest.mark.parametrize("penalty,ignore", [(False, -100), (True, 255)])
def test_loss_equals_the_plain_reference(spread, eps, penalty, ignore):
    new, old = _batch(5, 40, 7, spread)
    labels = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(6))
    labels[::5] = ignore  # unlabelled pixels: no loss, no gradient
    z1, z2 = new.clone().requires_grad_(), new.clone().requires_grad_()
    l1 = G.grpo_rm_loss(z1, old, labels, eps, "eq4", penalty, ignore)
    l2 = plain_grpo_rm_loss(z2, old, labels, eps, "eq4", penalty, ignore)
    (3.0 * l1).backward()  # an upstream gradient other than 1
    (3.0 * l2).backward()
    assert l1.item() == pytest.approx(l2.item(), abs=1e-14)
    torch.testing.assert_close(z1.grad, z2.grad, atol=1e-14, rtol=0)
    assert (z1.grad[::5] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 1e-2)])
def test_compiled_loss_equals_eager(dtype, tol):
    """--compile runs the loss through torch.compile: the same numbers."""
    torch._dynamo.reset()  # a fresh cache: past dynamo's recompile limit it would run eagerly
    new, old = _batch(7, 64, 21, 0.5, torch.float32)
    labels = torch.randint(0, 21, (64,), generator=torch.Generator().manual_seed(8))
    labels[::9] = 255
    fn = functools.partial(G.grpo_rm_loss, clip_eps=0.2, uniformity="eq5", ignore_index=255,
                           background_penalty=True, with_diagnostics=True)
    fast = torch.compile(fn, dynamic=True)
    out = []
    for f in (fn, fast):
        z = new.to(dtype).requires_grad_()
        loss, diag = f(z, old.to(dtype), labels)
        loss.backward()
        assert loss.dtype == torch.promote_types(dtype, torch.float32) and z.grad.dtype == dtype
        out.append((loss.detach(), diag, z.grad.float()))
    (l1, d1, g1), (l2, d2, g2) = out
    torch.testing.assert_close(l2, l1, atol=tol, rtol=0)
    torch.testing.assert_close(d2, d1, atol=tol, rtol=tol)
    torch.testing.assert_close(g2, g1, atol=tol * g1.abs().max().item(), rtol=0)


def test_compiled_loss_compiles_once_under_autocast():
    """--compile: the loss is one graph with dynamic shapes, compiled at training's first call
    (bf16 logits under autocast) and reused for every batch size after, with no graph break."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss = G.make_loss("grpo", 255, compile=True, dual_clip=3, kl_coef=1)
    for n in (6, 9, 40):
        z = torch.randn(n, 5, dtype=torch.bfloat16, requires_grad=True)
        with G.autocast(torch.device("cpu"), torch.bfloat16):
            out = loss(z, z.detach() + 0.1, torch.randint(0, 5, (n,)))[0]
        out.backward()
    assert counters["frames"]["total"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_at_theta_old_ratio_one_and_policy_gradient():
    # At θ = θ_old, ρ = 1 and ∇ loss = -(1/N) Σ_n Σ_i A_i ∇ log p_i / c;
    # with ∇_z log p_i = e_i - p
    # and Σ_i A_i = 0 this is -(1/N) A / c per sample's logits.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    loss, diag = G.grpo_rm_loss(z, z.detach().clone(), labels, with_diagnostics=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and diag.abs().max().item() < 1e-12
    loss.backward()
    A = G.advantages(G.rewards(z.detach().softmax(-1), labels))
    logp = F.log_softmax(z, -1)
    expected = torch.autograd.grad(-(A * logp).sum() / (5 * 4), z)[0]
    torch.testing.assert_close(z.grad, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(z.grad, -A / 5 / 4, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_finite_when_old_probs_underflow(dtype):
    # Logits ±100: p_old underflows to 0 in float32 and bfloat16, while old and new logits stay
    # close (as within an epoch). p / p_old would be 0/0; in log space it is finite.
    g = torch.Generator().manual_seed(3)
    old = (100 * torch.sign(torch.randn(8, 10, generator=g))).to(dtype)
    new = (old.float() + 0.05 * torch.randn(8, 10, generator=g)).to(dtype).requires_grad_()
    assert (old.float().softmax(-1) == 0).any()
    loss = G.grpo_rm_loss(new, old, torch.randint(0, 10, (8,), generator=g))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad.float()).all()


def test_overflowing_ratio_of_a_positive_advantage_stays_finite():
    # The true class (A > 0) had the old log-probability -200 and now has the largest logit: ρ
    # overflows float32, the clip holds the term at (1 + ε)A, and the paper's form (no dual clip)
    # must still give a finite loss and gradient (an unbounded ρ would give 0·inf = NaN).
    old = torch.tensor([[5.0, 0.0, -200.0]])
    new = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    loss = G.grpo_rm_loss(new, old, torch.tensor([2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0


def test_ignore_index():
    g = torch.Generator().manual_seed(4)
    old, new = torch.randn(6, 300, generator=g), torch.randn(6, 300, generator=g)
    labels = torch.tensor([255, 3, -100, 299, -100, 0])  # 255 is a real class here (ImageNet)
    keep = labels != -100
    torch.testing.assert_close(G.grpo_rm_loss(new, old, labels),
                               G.grpo_rm_loss(new[keep], old[keep], labels[keep]))
    z = new.clone().requires_grad_()
    loss = G.grpo_rm_loss(z, old, torch.full((6,), 255), ignore_index=255)  # nothing labelled
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()
    # An ignored pixel whose ρ overflows float32 (no dual clip) leaves the loss, its gradient and
    # the diagnostics finite, and changes nothing.
    old[1, 0], new[1, 0] = -100.0, 100.0
    z = new.clone().requires_grad_()
    loss, diag = G.grpo_rm_loss(z, old, labels.masked_fill(labels == 3, -100),
                                with_diagnostics=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and torch.isfinite(diag).all()
    keep = (labels != -100) & (labels != 3)
    torch.testing.assert_close(loss, G.grpo_rm_loss(new[keep], old[keep], labels[keep]))


def test_background_penalty_pushes_background_down():
    # At θ = θ_old the logit gradient is -A/c: the penalty lowers A_0, so the background logit is
    # pushed down harder (its gradient is larger) than without the penalty.
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for pen in (False, True):
        z.grad = None
        G.grpo_rm_loss(z, z.detach(), torch.tensor([1]), background_penalty=pen).backward()
        grads.append(z.grad[0, 0].item())
    assert grads[1] > grads[0] > 0


def test_old_model_is_frozen_copy():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    old = G.make_old(net)
    assert all(not p.requires_grad for p in old.parameters()) and not old.training
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(old[0].weight, net[0].weight)
    G.refresh_old(old, net)
    assert torch.equal(old[0].weight, net[0].weight) and not old[0].weight.requires_grad


# =============================================================================
# Model: torch.hub (local source), --weights, the segmentation head

def test_hub_local_load_and_weights(hub, tmp_path):
    m = G.load_backbone(hub, "dinov2_vitt_test")
    assert m.embed_dim == 16 and m.patch_size == 4
    x = torch.randn(2, 3, 16, 16)
    assert m.forward_features(x)["x_norm_clstoken"].shape == (2, 16)
    assert m.get_intermediate_layers(x, n=4, reshape=True)[0].shape == (2, 16, 4, 4)
    state = {k: v + 1 for k, v in m.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    loaded = G.load_backbone(hub, "dinov2_vitt_test", str(tmp_path / "w.pth"),
                             {"pretrained": False})
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_hub_errors(hub, tmp_path):
    with pytest.raises(G.UserError, match="--model dinov2_nope: .*has no such entry point"):
        G.load_backbone(hub, "dinov2_nope")
    with pytest.raises(G.UserError, match="hubconf.py"):
        G.load_backbone(str(tmp_path), "dinov2_vitt_test")
    for typo in [hub + "x", "../tinyvit", "tinyvit"]:  # a folder that is not there, not GitHub
        with pytest.raises(G.UserError, match=f"--hub-repo {re.escape(typo)}: no such folder"):
            G.load_backbone(typo, "dinov2_vitt_test")
    Image.new("RGB", (8, 8)).save(tmp_path / "some.jpg")
    with pytest.raises(G.UserError, match=r"some.jpg: cannot load into dinov2_vitt_test \(Unpickl"):
        G.load_backbone(hub, "dinov2_vitt_test", str(tmp_path / "some.jpg"))
    own = G.load_backbone(hub, "dinov2_vitt_test").state_dict()
    bad = {k: v for k, v in own.items() if "blocks.3" not in k}
    bad["pos_embed"] = torch.zeros(1, 5, 16)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(G.UserError, match=r"--weights .*bad.pth: cannot load .*blocks\.3"):
        G.load_backbone(hub, "dinov2_vitt_test", str(tmp_path / "bad.pth"))


def test_hub_load_on_a_silent_network_ends_with_the_offline_hint(hub, imagefolder, tmp_path):
    """A firewall that drops packets (a cluster node) must not leave torch.hub waiting forever."""
    silent = socket.create_server(("127.0.0.1", 0))  # a proxy that accepts and never answers
    proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    env.update(https_proxy=proxy, HTTPS_PROXY=proxy, TORCH_HOME=str(tmp_path))
    argv = cls_args(hub, imagefolder, tmp_path, "--hub-repo", "no-such-owner-x/no-such-x")
    code = f"import grpo_rm as G; G.HUB_TIMEOUT_S = 0.5; G.cli({argv!r})"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=120, env=env)
    silent.close()
    assert p.returncode == 2 and "offline" in p.stderr and time.time() - t0 < 60, p.stderr


def test_pinned_hub_commit_skips_the_branch_check(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.hub, "load", lambda repo, name, **kw: seen.update(kw, repo=repo))
    with pytest.raises(G.UserError):  # the stub returns None; only the call matters here
        G.load_backbone(G.HUB_REPOS["dinov2"], "dinov2_vits14", "missing.pth")
    # a commit that heads no branch passes torch.hub only without its fork check; --weights
    # disables the hub's own download
    assert seen["repo"] == G.HUB_REPOS["dinov2"] and seen["skip_validation"]
    assert seen["pretrained"] is False
    with pytest.raises(G.UserError):  # DINOv3's pin, an abbreviated commit, skips it too
        G.load_backbone(G.HUB_REPOS["dinov3"], "dinov3_vits16", "missing.pth")
    assert seen["repo"] == G.HUB_REPOS["dinov3"] and seen["skip_validation"]
    with pytest.raises(G.UserError):  # a branch is checked
        G.load_backbone("facebookresearch/dinov2:main", "dinov2_vits14", "missing.pth")
    assert not seen["skip_validation"]


def test_seg_head_projects_before_upsampling_exactly():
    head = G.SegHead(12, 5, 3, 16).double()
    tokens = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    up = F.interpolate(tokens, size=(16, 16), mode="bilinear", align_corners=False)  # upsample,
    hidden = torch.einsum("bdhw,kd->bkhw", up, head.proj.weight) + head.proj.bias[:, None, None]
    paper = torch.einsum("bkhw,ck->bchw", hidden.relu(), head.out.weight)
    paper = paper + head.out.bias[:, None, None]  # then project
    torch.testing.assert_close(head(tokens), paper, atol=1e-12, rtol=0)
    assert head(tokens, size=(24, 24)).shape == (2, 3, 24, 24)


# =============================================================================
# Data: real layouts, the input size, joint transforms, downloads

@pytest.mark.parametrize("dataset,patch,expected", [
    ("cifar10", 14, 42), ("cifar100", 14, 42), ("stl10", 14, 98), ("tinyimagenet", 14, 70),
    ("imagenet", 14, 224), ("voc", 14, 448), ("tinyimagenet", 8, 64), ("cifar10", 8, 32),
    ("cifar10", 16, 48), ("stl10", 16, 112), ("tinyimagenet", 16, 80), ("imagenet", 16, 224),
    ("ade20k", 16, 448)])
def test_default_img_size(dataset, patch, expected):
    # The paper's token counts, from ViT-S/14 at the native size rounded up: 32 -> 42, 96 -> 98,
    # 64 -> 70 (3, 7, 5 patches a side). Patch 16 keeps them (48, 112, 80 px); patch 8 stays at the
    # native size (32, 64: more patches, never a downscaled image). ImageNet 224, segmentation 448.
    assert G.default_img_size(G.DATASETS[dataset], patch) == expected


def test_image_folder_reads_val_before_test(imagefolder, tmp_path):
    """ImageNet's test/ has no labels: where both are there, val/ is the evaluation split."""
    shutil.copytree(os.path.join(imagefolder, "test"), tmp_path / "val")
    shutil.copytree(os.path.join(imagefolder, "train"), tmp_path / "train")
    os.makedirs(tmp_path / "test" / "unlabelled")
    image(np.random.default_rng(0), 0).save(tmp_path / "test" / "unlabelled" / "0.png")
    test = G.DATASETS["imagenet"].build(str(tmp_path), "test", None)
    assert test.root == str(tmp_path / "val") and len(test) == 12


def _label_coded_pair(size=128):
    """An image whose colour encodes its own label: a 4 x 4 grid of 16 classes, each its colour."""
    rows, cols = np.indices((size, size)) // (size // 4)
    label = (rows * 4 + cols).astype(np.uint8)  # (H, W), 0..15, left/right and up/down asymmetric
    colours = np.array([[60 * (k % 4), 60 * (k // 4), 120] for k in range(16)], np.float32)
    return colours[label], label, colours


def test_joint_crop_and_flip_keep_image_and_mask_aligned(tmp_path):
    img, label, colours = _label_coded_pair()
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(base / sub)
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    Image.fromarray(img.astype(np.uint8)).save(base / "JPEGImages" / "a.jpg", quality=100)
    palette_png(label, base / "SegmentationClass" / "a.png")
    ds = G.DATASETS["voc"].build(str(tmp_path), "train", G.seg_transform(64, True), 21)
    mean, std = torch.tensor(G.MEAN), torch.tensor(G.STD)
    torch.manual_seed(0)
    for _ in range(20):  # the dataset's own __getitem__: one crop and flip for both
        xi, mi = ds[0]
        rgb = ((xi.permute(1, 2, 0) * std + mean) * 255).reshape(-1, 1, 3)  # (H·W, 1, 3)
        decoded = (rgb - torch.from_numpy(colours)).norm(dim=-1).argmin(1)  # the nearest colour
        agree = (decoded == mi.reshape(-1)).float().mean().item()
        assert agree > 0.85, agree  # all but the blended pixels at cell borders
        assert set(mi.unique().tolist()) <= set(range(16))  # nearest neighbour: no blended ids


def test_resize_labels_never_blends():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 5, 255])[torch.randint(0, 3, (2, 13, 13), generator=g)]
    for size in (4, 8, 26):
        assert set(G.resize_labels(y, size).unique().tolist()) <= {0, 5, 255}


def test_seg_dataset_joint_transform(vocfolder):
    ds = G.DATASETS["voc"].build(vocfolder, "train", G.seg_transform(32, True), 21)
    img, mask = ds[0]
    assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}


def test_voc_downloads_through_torchvision(server, vocfolder, tmp_path, monkeypatch):
    import hashlib
    import tarfile
    www, url = server
    with tarfile.open(www / "voc.tar", "w") as tar:
        tar.add(os.path.join(vocfolder, "VOCdevkit"), "VOCdevkit")
    md5 = hashlib.md5((www / "voc.tar").read_bytes()).hexdigest()
    year = dict(G.torchvision.datasets.voc.DATASET_YEAR_DICT["2012"], url=f"{url}/voc.tar",
                md5=md5)
    monkeypatch.setitem(G.torchvision.datasets.voc.DATASET_YEAR_DICT, "2012", year)
    ds = G.DATASETS["voc"].build(str(tmp_path / "voc"), "test", G.seg_transform(16, False), 21)
    assert len(ds) == 4 and ds[0][1].shape == (16, 16)
    with pytest.raises(G.UserError, match="no VOCdevkit/VOC2012 there; put it there$"):
        G.DATASETS["vocfolder"].build(str(tmp_path / "other"), "test", None, 3)  # never fetched
    with pytest.raises(G.UserError, match="prepare_data.py ade20k --data-dir"):
        G.DATASETS["ade20k"].build(str(tmp_path / "other"), "test", None, 150)


def test_offline_download_is_one_clear_line(hub, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/VOCtrainval_11-May-2012.tar"
    argv = ["--dataset", "voc", "--data-dir", str(tmp_path / "voc"), "--hub-repo", hub,
            "--model", "dinov2_vitt_test", "--out", str(tmp_path), "--device", "cpu"]
    code = ("import grpo_rm as G, torchvision.datasets.voc as V; "
            f"V.DATASET_YEAR_DICT['2012'] = dict(V.DATASET_YEAR_DICT['2012'], url={dead!r}); "
            f"G.cli({argv!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: --data-dir") and f"downloading {dead} failed" in lines[0]
    assert "Connection refused" in lines[0], lines  # the cause, and the URL it failed on


def test_data_is_checked_before_training(hub, imagefolder, vocfolder, tmp_path, monkeypatch):
    """A VOC-layout folder with fewer classes than --dataset voc's 21, and a broken test image,
    are refused before the first training step."""
    monkeypatch.setattr(G, "train", lambda *a: pytest.fail("training started"))
    argv = seg_args(hub, vocfolder, tmp_path)
    i = argv.index("--num-classes")
    with pytest.raises(G.UserError, match="test masks hold classes 0-2, not the 21 of --dataset"):
        G.main(argv[:i] + argv[i + 2:])
    d = tmp_path / "data"
    shutil.copytree(imagefolder, d)
    (d / "test" / "class2" / "3.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(G.UserError, match="3.png: cannot read image"):
        G.main(cls_args(hub, str(d), tmp_path))


def test_an_incomplete_voc_layout_is_one_line(hub, vocfolder, tmp_path):
    v = tmp_path / "voc"
    shutil.copytree(vocfolder, v)
    os.remove(v / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt")
    with pytest.raises(G.UserError, match=r"--data-dir .*voc: .*val.txt"):  # not a traceback
        G.main(seg_args(hub, str(v), tmp_path / "out"))


@pytest.mark.parametrize("name,kwargs", [("cifar10", {"train": False}),
                                         ("stl10", {"split": "test"})])
def test_torchvision_sets_get_their_split(monkeypatch, name, kwargs):
    seen = {}
    monkeypatch.setattr(G.DATASETS[name].build.args[0], "__init__",
                        lambda self, root, download, transform, **kw: seen.update(kw))
    G.DATASETS[name].build("data", "test", None)
    assert seen == kwargs


def test_training_files_are_read_before_training(hub, imagefolder, vocfolder, tmp_path,
                                                 monkeypatch):
    """A truncated training image or a missing training mask is found before the first step, and
    the run leaves no folder behind."""
    monkeypatch.setattr(G, "train", lambda *a: pytest.fail("training started"))
    d = tmp_path / "cls"
    shutil.copytree(imagefolder, d)
    path = d / "train" / "class1" / "4.png"
    path.write_bytes(path.read_bytes()[:60])  # truncated: its header reads, its pixels do not
    with pytest.raises(G.UserError, match="4.png: cannot read image"):
        G.main(cls_args(hub, str(d), tmp_path / "out", "--subset", "0.25"))
    v = tmp_path / "voc"
    shutil.copytree(vocfolder, v)
    os.remove(v / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "train2.png")
    with pytest.raises(G.UserError, match="train2.png: cannot read image"):
        G.main(seg_args(hub, str(v), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_normalisation_is_dinov2s():
    """The backbones were pretrained on inputs normalised by ImageNet's mean and std: DINOv2's
    own transforms where the clone is at hand, its published constants otherwise."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    clone = os.path.join(SHARED, "dinov2")
    if os.path.isdir(clone):
        sys.path.insert(0, clone)
        try:
            from dinov2.data import transforms as T
            mean, std = T.IMAGENET_DEFAULT_MEAN, T.IMAGENET_DEFAULT_STD
        finally:
            sys.path.remove(clone)
    img = Image.new("RGB", (16, 16), (255, 128, 0))
    for x in [G.cls_transform(16, False)(img), G.seg_transform(16, False)(
            G.tv_tensors.Image(G.v2.functional.pil_to_tensor(img)))]:
        expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(mean)) / torch.tensor(std)
        torch.testing.assert_close(x[:, 0, 0], expected.float())


# =============================================================================
# Training: an independent reference of Algorithm 1, every flag, smoke runs per device

def _read_imagefolder(root):
    """The train split as tensors, read with PIL and normalised as the paper's inputs."""
    xs, ys = [], []
    for c, cls in enumerate(sorted(os.listdir(os.path.join(root, "train")))):
        for f in sorted(os.listdir(os.path.join(root, "train", cls))):
            xs.append(_to_input(Image.open(os.path.join(root, "train", cls, f))))
            ys.append(c)
    return torch.stack(xs), torch.tensor(ys)


def _to_input(img):
    """A PIL image -> the normalised float tensor the paper's models take (torchvision's ops)."""
    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    x = G.v2.functional.to_dtype(x, torch.float32, scale=True)
    return G.v2.functional.normalize(x, G.MEAN, G.STD)


def _read_voc(root):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    xs, ys = [], []
    for i in open(os.path.join(base, "ImageSets", "Segmentation", "train.txt")).read().split():
        xs.append(_to_input(Image.open(os.path.join(base, "JPEGImages", i + ".jpg"))))
        mask = Image.open(os.path.join(base, "SegmentationClass", i + ".png"))
        ys.append(torch.from_numpy(np.array(mask)))
    return torch.stack(xs), torch.stack(ys).long()


# Adam turns the rounding noise of a gradient that is zero in exact arithmetic into steps of
# ±lr. The attention's key bias has one (softmax ignores a shift shared by all keys), so the
# models compared with the reference to 1e-6 are built without qkv biases.
NO_QKV_BIAS = ["--hub-kwargs", '{"qkv_bias": false}']


def reference_algorithm1(net, x_all, y_all, epochs, m, base_lr, method="grpo", eps=0.2,
                         uniformity="eq4", penalty=False, seed=0, seg=False, dual=None,
                         old_every=None, kl=None):
    """Algorithm 1 as the paper and NOTES.md state it, in a plain loop that uses none of
    grpo_rm.py's training code: Adam (no weight decay) with the cosine learning rate from
    base·m/256 to base/100·m/256; θ_old <- θ at the start of every epoch; the clipped loss of
    Eq. (1) (or cross-entropy). Shuffling as DistributedSampler's: randperm seeded seed + epoch."""
    params = [p for p in net.parameters() if p.requires_grad]
    hi, lo = base_lr * m / 256, base_lr / 100 * m / 256
    opt = torch.optim.Adam(params, lr=hi, weight_decay=0.0)
    n = len(x_all)
    per_epoch = math.ceil(n / m)
    total, step = epochs * per_epoch, 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for b in range(per_epoch):
            if (step % old_every == 0) if old_every else b == 0:
                old = copy.deepcopy(net)  # π_θold <- π_θ: once an epoch, or every old_every steps
            idx = order[b * m:(b + 1) * m]
            x, y = x_all[idx], y_all[idx]
            for g in opt.param_groups:
                g["lr"] = lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * step / total))
            z = net(x)
            with torch.no_grad():
                z_old = old(x)
            ignore = -100
            if seg:  # every pixel a sample; labels brought to the logit map by nearest neighbour
                S, c = z.shape[-1], z.shape[1]
                y = F.interpolate(y[:, None].float(), size=(S, S), mode="nearest")[:, 0].long()
                z, z_old = (t.permute(0, 2, 3, 1).reshape(-1, c) for t in (z, z_old))
                y, ignore = y.reshape(-1), 255
            if method == "ce":
                loss = F.cross_entropy(z, y, ignore_index=ignore)
            else:
                loss = plain_grpo_rm_loss(z, z_old, y, eps, uniformity, penalty, ignore, dual, kl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return net


@pytest.mark.parametrize("extra", [
    ["--method", "grpo"], ["--method", "grpo", "--uniformity", "eq5"],
    ["--method", "grpo", "--uniformity", "none"], ["--method", "grpo", "--clip-eps", "0.05"],
    ["--method", "ce"], ["--method", "grpo", "--dual-clip", "1.02"],
    ["--method", "grpo", "--old-every", "2"], ["--method", "grpo", "--kl-coef", "0.5"]])
def test_training_equals_reference_algorithm1(hub, imagefolder, tmp_path, monkeypatch, extra):
    seen = _capture_init(monkeypatch)
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--epochs", "3", "--no-augment",
                                  "--lr", "0.05", "--seed", "4", *NO_QKV_BIAS,
                                  *extra))
    a = G.get_args(cls_args(hub, imagefolder, tmp_path, *extra))
    x, y = _read_imagefolder(imagefolder)
    ref = reference_algorithm1(seen[0], x, y, 3, 8, 0.05, a.method, a.clip_eps, a.uniformity,
                               seed=4, dual=a.dual_clip, old_every=a.old_every, kl=a.kl_coef)
    assert _max_diff(_trainable(ref), _trainable(net)) < 2e-6
    if a.method == "grpo":  # the clip was active: the comparison covers both regimes
        assert max(result["series"]["clip_frac"]) > 0.05
    if a.dual_clip:  # and the dual clip bound some terms
        assert max(result["series"]["dual_clip_frac"]) > 0


def test_seg_training_equals_reference_algorithm1(hub, vocfolder, tmp_path, monkeypatch):
    seen = _capture_init(monkeypatch)
    _, net = G.main(seg_args(hub, vocfolder, tmp_path, "--epochs", "2", "--no-augment", "--lr",
                             "0.05", "--eval-epochs", "1", *NO_QKV_BIAS))  # VOC: penalty on
    x, y = _read_voc(vocfolder)
    ref = reference_algorithm1(seen[0], x, y, 2, 4, 0.05, penalty=True, seg=True)
    assert _max_diff(_trainable(ref), _trainable(net)) < 2e-6


@pytest.fixture(scope="module")
def base_run(hub, imagefolder, tmp_path_factory):
    """A deterministic grpo run and the evaluation head it trained, for the flag tests."""
    out = tmp_path_factory.mktemp("base")
    return _run_with_head(cls_args(hub, imagefolder, out, "--no-augment"))


def _run_with_head(argv):
    heads, fit = [], G.fit_head
    G.fit_head = lambda *a, **k: heads.append(fit(*a, **k)) or heads[-1]
    try:
        result, net = G.main(argv)
    finally:
        G.fit_head = fit
    return result, _trainable(net), _trainable(heads[0])


@pytest.mark.parametrize("flag,changes", [
    (["--clip-eps", "0.05"], "net"), (["--uniformity", "eq5"], "net"), (["--lr", "0.02"], "net"),
    (["--batch-size", "4"], "net"), (["--subset", "0.5"], "net"), (["--seed", "1"], "net"),
    (["--eval-lr", "0.05"], "head"), (["--eval-epochs", "2"], "head"), (["--augment"], "net")])
def test_every_flag_that_changes_the_math_changes_the_result(hub, imagefolder, tmp_path, base_run,
                                                             flag, changes):
    _, net, head = _run_with_head(cls_args(hub, imagefolder, tmp_path, "--no-augment", *flag))
    _, net0, head0 = base_run
    if changes == "net":
        assert _max_diff(net0, net) > 1e-4
    else:  # an evaluation flag: the same post-trained network, another evaluation head
        assert _max_diff(net0, net) == 0 and _max_diff(head0, head) > 1e-4


def test_background_penalty_flag_changes_seg_training(hub, vocfolder, tmp_path):
    nets = [G.main(seg_args(hub, vocfolder, tmp_path / f, "--no-augment", "--epochs", "1",
                            "--eval-epochs", "1", f))[1]
            for f in ("--background-penalty", "--no-background-penalty")]
    assert _max_diff(_trainable(nets[0]), _trainable(nets[1])) > 1e-4


def test_subset_trains_on_a_fixed_subset(hub, imagefolder, tmp_path, monkeypatch):
    sizes = []
    monkeypatch.setattr(G, "train", lambda args, ctx, net, ds, run_dir: sizes.append(len(ds)) or
                        {"train_loss": [], "sec_per_epoch": [], "series": {}})
    G.main(cls_args(hub, imagefolder, tmp_path, "--subset", "0.25"))
    assert sizes == [6]  # 25% of 24


def test_cross_entropy_is_the_mean_over_labelled_pixels():
    loss = G.make_loss("ce", 255, torch.device("cpu"))
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 255, 3, 255, 2])
    assert torch.allclose(loss(z, None, y)[0], F.cross_entropy(z, y, ignore_index=255))
    assert loss(z, None, torch.full((6,), 255))[0] == 0  # a crop without labels: 0, not NaN


@pytest.mark.parametrize("device", DEVICES)
def test_smoke_grpo_cls_refreshes_old_each_epoch(hub, imagefolder, tmp_path, monkeypatch, device):
    calls, refresh = [], G.refresh_old
    monkeypatch.setattr(G, "refresh_old", lambda old, model: calls.append((old, _trainable(model)))
                        or refresh(old, model))
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--device", device))
    assert len(calls) == 2  # once per epoch (Algorithm 1, line 3)
    start1, start2, final = calls[0][1], calls[1][1], _trainable(net)
    old = dict(calls[1][0].named_parameters())
    for k in final:
        assert not torch.equal(start1[k], start2[k]) and not torch.equal(start2[k], final[k]), k
        assert torch.equal(old[k], start2[k])  # θ_old = the model at the start of the last epoch
    assert len(final) == sum(1 for _ in net.parameters()) - 1  # all but DINOv2's mask_token
    run = _run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0")
    saved = json.load(open(run / "result.json"))
    assert saved["metrics"] == result["metrics"] and len(saved["train_loss"]) == 2
    assert saved["config"]["dtype"] == ("bf16" if device == "cuda" else "fp32")
    s = saved["series"]  # one entry per step: 3 steps per epoch
    tol = 1e-6 if device == "cpu" else 1e-2  # ρ = 1 up to rounding: bf16 on the GPU
    assert s["step"] == list(range(6)) and abs(s["loss"][0]) < tol > abs(s["loss"][3])
    assert saved["train_loss"][1] == pytest.approx(np.mean(s["loss"][3:]))
    assert set(s) == {"step", "lr", "loss", "grad_norm", *G.DIAGNOSTICS}
    assert not (run / "ckpt.pt").exists()
    again = G.load_backbone(hub, "dinov2_vitt_test", str(run / "backbone.pt"))
    trained = net.backbone.state_dict()
    assert all(torch.equal(again.state_dict()[k], v.cpu()) for k, v in trained.items())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [["--method", "ce"], ["--uniformity", "eq5", "--dtype", "bf16"]])
def test_smoke_every_parameter_changes(hub, imagefolder, tmp_path, monkeypatch, device, extra):
    seen = _capture_init(monkeypatch)
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--device", device, *extra))
    for k, p in _trainable(net).items():
        assert not torch.equal(_trainable(seen[0])[k], p), f"{k} did not change"
    assert all(math.isfinite(v) for v in result["series"]["loss"])


@GPU_ONLY
def test_gpu_compile_fused_adam_bf16(hub, imagefolder, tmp_path, monkeypatch):
    adams, adam = [], torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam",
                        lambda *a, **k: adams.append(adam(*a, **k)) or adams[-1])
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--device", "cuda", "--compile"))
    assert adams[0].defaults["fused"] and result["config"]["dtype"] == "bf16"
    assert next(net.parameters()).is_cuda and 0 <= result["metrics"]["sr"] <= 100


def test_frozen_changes_nothing(hub, imagefolder, tmp_path):
    ref = G.load_backbone(hub, "dinov2_vitt_test").state_dict()
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--method", "frozen"))
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in ref.items())
    assert result["train_loss"] == []
    assert not (_run_dir(tmp_path, "cls-imagefolder-frozen-s0") / "backbone.pt").exists()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["grpo", "ce"])
def test_smoke_seg(hub, vocfolder, tmp_path, monkeypatch, method, device):
    seen = _capture_init(monkeypatch)
    result, net = G.main(seg_args(hub, vocfolder, tmp_path, "--method", method, "--feature-type",
                                  "linear", "ms", "--save-vis", "2", "--device", device))
    for k, p in _trainable(net).items():
        assert not torch.equal(_trainable(seen[0])[k].to(p.device), p), f"{k} did not change"
    if device == "cuda":  # training's and evaluation's peaks apart
        assert 0 < result["eval_peak_memory_gb"] and 0 < result["peak_memory_gb"]
    for ft in ("linear", "ms"):
        m = result["metrics"][ft]
        # 4 val masks of 16x16 with one ignored row: 4 * 15 * 16 = 960 labelled pixels, each once
        # (also for multi-scale, which averages scales and flips into one prediction).
        assert m["labelled_pixels"] == 960 and 0 <= m["miou"] <= m["pixel_acc"] <= 100
    run = _run_dir(tmp_path, f"seg-voc-{method}{'-eq4' if method == 'grpo' else ''}-s0")
    vis = torch.load(run / "vis.pt", weights_only=True)  # K = 2 spread over the 4 val images
    assert vis["index"].tolist() == [0, 3]  # the first and the last, not the first two
    test = G.DATASETS["voc"].build(vocfolder, "test", G.seg_transform(16, False), 21)
    x, y = (torch.stack(t) for t in zip(test[0], test[3]))
    img = x * torch.tensor(G.STD).view(3, 1, 1) + torch.tensor(G.MEAN).view(3, 1, 1)
    assert (vis["image"].float() - 255 * img).abs().max() <= 0.5 + 1e-3  # denormalised, uint8
    assert torch.equal(vis["truth"], y.byte()) and vis["truth"].unique().tolist() == [0, 1, 2, 255]
    assert vis["pred"].shape == (2, 16, 16) and int(vis["pred"].max()) < 21
    assert result["config"]["background_penalty"] is True and result["config"]["hidden"] == 64


# =============================================================================
# Training under DDP, checkpoints and resume: 2 processes × m/2 compute what 1 process × m does

@pytest.fixture(scope="module")
def ddp_cls(hub, imagefolder, tmp_path_factory):
    """One deterministic grpo run with 2 processes × 4 images (gloo)."""
    d = tmp_path_factory.mktemp("ddp")
    argv = cls_args(hub, imagefolder, d / "runs", "--no-augment", "--epochs", "3",
                    *NO_QKV_BIAS)
    return argv, _ddp(argv, d)


def test_ddp_equals_one_process(ddp_cls, tmp_path):
    argv, (r0, r1) = ddp_cls
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # ranks in sync
    one, net = G.main(_with_out(argv, tmp_path))
    assert _max_diff({k: v.cpu() for k, v in net.state_dict().items()}, r0["state"]) < 2e-6
    assert r0["result"]["metrics"] == pytest.approx(one["metrics"], abs=1e-9)  # SR and kNN
    assert r0["result"]["train_loss"] == pytest.approx(one["train_loss"], abs=1e-6)
    assert r0["result"]["world_size"] == 2 and r1["result"] is None  # rank 0 evaluates alone


def test_ddp_seg_equals_one_process(hub, vocfolder, tmp_path):
    extra = ["--no-augment", "--feature-type", "linear", "ms", "--lr", "0.05", *NO_QKV_BIAS]
    r0, _ = _ddp(seg_args(hub, vocfolder, tmp_path / "runs", *extra), tmp_path / "ddp")
    one, net = G.main(seg_args(hub, vocfolder, tmp_path / "one", *extra))
    assert _max_diff({k: v.cpu() for k, v in net.state_dict().items()}, r0["state"]) < 2e-6
    for ft in ("linear", "ms"):  # one confusion matrix reduced over the ranks: the same metrics
        assert r0["result"]["metrics"][ft] == pytest.approx(one["metrics"][ft], abs=1e-6)


@pytest.mark.skipif(not CUDA, reason="a CUDA path: runs where a GPU is visible")
def test_ddp_on_gpu(hub, imagefolder, tmp_path):
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"  # gloo shares a single GPU
    argv = cls_args(hub, imagefolder, tmp_path / "runs", "--device", "cuda",
                    "--dist-backend", backend)
    r0, r1 = _ddp(argv, tmp_path)
    assert r0["result"]["world_size"] == 2 and r1["result"] is None  # rank 0 evaluates alone
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_sigterm_stops_and_resume_continues_exactly(hub, imagefolder, tmp_path, monkeypatch):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "3", "--no-augment")
    full, net_full = G.main([*argv, "--out", str(tmp_path / "a")])
    step, calls = G.train_step, []
    monkeypatch.setattr(G, "train_step", lambda *a: (calls.append(1), len(calls) == 5 and os.kill(
        os.getpid(), signal.SIGTERM), step(*a))[2])
    with pytest.raises(G.RunStopped, match="stopped by SIGTERM: rerun with --resume"):
        G.main([*argv, "--out", str(tmp_path / "b")])  # in step 5 = epoch 2, step 2 of 3
    monkeypatch.setattr(G, "train_step", step)
    run = _run_dir(tmp_path / "b", "cls-imagefolder-grpo-eq4-s0")
    assert torch.load(run / "ckpt.pt", weights_only=False)["epoch"] == 1  # the last one finished
    resumed, net_res = G.main([*argv, "--out", str(tmp_path / "b"), "--resume"])
    assert _max_diff(_trainable(net_full), _trainable(net_res)) < 1e-6  # θ_old = θ at epoch 2
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-7)
    assert resumed["series"]["step"] == list(range(9)) and resumed["metrics"] == full["metrics"]


def test_ddp_resume(ddp_cls, tmp_path):
    argv, (full, _) = ddp_cls
    argv = _with_out(argv, tmp_path / "runs")
    stopped, _ = _ddp([*argv, "--stop-after-epoch", "1"], tmp_path / "a")
    assert stopped["result"] is None
    with pytest.raises(G.UserError, match="written by 2 processes, not 1"):
        G.main([*argv, "--resume"])  # other shards and draws: refused
    r0, _ = _ddp([*argv, "--resume"], tmp_path / "b")
    assert _max_diff(full["state"], r0["state"]) < 1e-6
    # the per-epoch loss is the mean of the per-step losses (each the mean over ranks), whichever
    # rank wrote the checkpoint: not inflated by the number of processes
    assert r0["result"]["train_loss"] == pytest.approx(full["result"]["train_loss"], abs=1e-7)


@pytest.mark.parametrize("extra", [[], ["--old-every", "2"]])  # θ_old from inside epoch 1
def test_exact_resume_at_an_epoch_boundary(hub, imagefolder, tmp_path, extra):
    full, net_full = G.main(cls_args(hub, imagefolder, tmp_path / "a", "--epochs", "3", *extra))
    res, _ = G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3",
                             "--stop-after-epoch", "1", *extra))
    run = _run_dir(tmp_path / "b", "cls-imagefolder-grpo-eq4-" + ("old2-" if extra else "") + "s0")
    assert res is None and (run / "ckpt.pt").exists() and not (run / "result.json").exists()
    with pytest.raises(G.UserError, match="--resume: .*other settings.*--lr"):
        G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3", "--resume", "--lr",
                        "0.5", "--name", run.name, *extra))  # by name: another lr, another hash
    resumed, net_res = G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3",
                                       "--resume", "--name", run.name, *extra))  # named now
    assert _max_diff(net_full.state_dict(), net_res.state_dict()) < 1e-6
    assert resumed["metrics"] == full["metrics"] and resumed["series"] == full["series"]


def test_nonfinite_loss_stops_and_keeps_checkpoint(hub, imagefolder, tmp_path, monkeypatch):
    calls, real = [], G.train_step

    def poisoned(*a):
        calls.append(1)
        row = real(*a)
        return row * float("nan") if len(calls) == 5 else row  # epoch 2, its 2nd step
    monkeypatch.setattr(G, "train_step", poisoned)
    message = r"non-finite .* epoch 2, step 5; last good checkpoint: .*ckpt.pt"
    with pytest.raises(G.RunStopped, match=message):
        G.main(cls_args(hub, imagefolder, tmp_path, "--epochs", "3", "--log-every", "100"))
    ckpt = torch.load(_run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0") / "ckpt.pt",
                      weights_only=False)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (_run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0") / "result.json").exists()


def test_finished_run_is_skipped_unless_forced(hub, imagefolder, tmp_path, monkeypatch, capsys):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "1", "--eval-epochs", "1")
    first, _ = G.main(argv)
    out = capsys.readouterr().out  # the progress: training's ETA, then each evaluation phase's
    assert "| training ETA 0:00:00" in out and "  SR head: 1/1 epochs, ETA 0:00:00" in out
    assert re.search(r"\d\.\d{3}", out.splitlines()[-1]) is None, out  # metrics to 2 decimals
    assert first["eval_peak_memory_gb"] is None and first["peak_memory_gb"] is None  # CPU
    with monkeypatch.context() as m:
        m.setattr(G, "train", lambda *a: pytest.fail("a finished run was trained again"))
        again, net = G.main(argv)
    assert net is None and again["metrics"] == first["metrics"]
    assert "finished already" in capsys.readouterr().out
    with pytest.raises(G.UserError, match=r"finished with other settings \(--eval-lr\): "
                                          "another --name"):  # not its old result
        G.main([*argv, "--eval-lr", "0.5"])  # the same folder: evaluation is not in its name
    name = _run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0").name
    with pytest.raises(G.UserError, match=r"other settings \(--eval-lr, --lr, --method\)"):
        G.main([*argv, "--name", name, "--lr", "0.5", "--method", "ce"])
    assert G.main([*argv, "--log-every", "3"])[0] == again  # a logistic flag: the same result
    forced, net = G.main([*argv, "--force"])
    assert net is not None and len(list(tmp_path.glob("cls-*"))) == 1


def test_unfinished_run_needs_resume_or_force(hub, imagefolder, tmp_path):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "2", "--eval-epochs", "1")
    G.main([*argv, "--stop-after-epoch", "1"])
    with pytest.raises(G.UserError, match="--resume continues it, --force starts afresh"):
        G.main(argv)
    with pytest.raises(G.UserError, match=r"--stop-after-epoch 1: .*ckpt.pt is at epoch 1"):
        G.main([*argv, "--resume", "--stop-after-epoch", "1"])  # would never stop
    fresh, _ = G.main([*argv, "--force"])
    assert len(fresh["train_loss"]) == 2


def test_run_name_follows_every_flag_that_sets_training(hub, imagefolder, tmp_path):
    def name(*flags):
        return G.run_name(G.get_args(cls_args(hub, imagefolder, tmp_path, *flags)))
    names = [name(), name("--data-dir", "other"), name("--img-size", "32"), name("--epochs", "3"),
             name("--dual-clip", "3")]
    assert len(set(names)) == 5 and names[0].startswith("cls-imagefolder-grpo-eq4-s0-")
    assert name("--eval-lr", "0.5", "--log-every", "1") == names[0]  # may change on --resume
    assert name("--workers", "1") != names[0]  # another worker count draws other augmentations


def test_a_run_that_fails_before_training_leaves_no_folder(hub, tmp_path):
    with pytest.raises(G.UserError, match="--data-dir"):
        G.main(cls_args(hub, str(tmp_path / "missing"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    G.atomic_save(path, lambda f: torch.save({"epoch": 1}, f))

    def crash(src, dst):
        raise OSError("power cut between the temp write and the rename")
    monkeypatch.setattr(G.os, "replace", crash)
    with pytest.raises(OSError):
        G.atomic_save(path, lambda f: torch.save({"epoch": 2}, f))
    assert torch.load(path) == {"epoch": 1}


def test_sigterm_in_training_exits_3_and_resumes(hub, imagefolder, tmp_path):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "1000")
    p = _popen_until(argv, "epoch 3/")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and "stopped by SIGTERM" in err and "--resume" in err, err
    run = _run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0")
    done = torch.load(run / "ckpt.pt", weights_only=False)["epoch"]
    assert not (run / "result.json").exists() and done >= 2
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_rm.py"), *argv, "--resume",
                        "--stop-after-epoch", str(done + 1)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from {run / 'ckpt.pt'}: epoch {done + 1}" in p.stdout
    assert len(torch.load(run / "ckpt.pt", weights_only=False)["hist"]["train_loss"]) == done + 1


STOP_LINE = "error: stopped by {}: rerun with --resume to go on from the last finished epoch"


@pytest.mark.parametrize("marker,sig,extra", [
    ("epoch 2/", signal.SIGINT, ["--batch-size", "1"]),  # a Ctrl-C: to the whole process group
    ("evaluating", signal.SIGTERM, ["--epochs", "1", "--eval-epochs", "1000000"])])
def test_a_stop_to_the_process_group_is_one_line(hub, imagefolder, tmp_path, marker, sig, extra):
    """The data-loading workers get the signal too; the main process alone says so (in the
    middle of a 24-step epoch; a signal while a worker is being forked: the test below)."""
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "1000", "--workers", "2", *extra)
    p = _popen_until(argv, marker, start_new_session=True)
    time.sleep(0.5 if marker == "evaluating" else 0)  # the features' workers have started
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and err.splitlines() == [STOP_LINE.format(sig.name)], err


def test_torchrun_ctrl_c_is_one_line_from_rank_0(hub, imagefolder, tmp_path):
    """Under torchrun a Ctrl-C reaches both ranks and their workers, then torchrun's SIGTERM
    follows: rank 0 says it once; no traceback of ours (torchrun's own report is torchrun's)."""
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "1000", "--workers", "1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(_free_port())]
    p = _popen_until(argv, "epoch 2/", launcher, start_new_session=True,
                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert [ln for ln in err.splitlines() if "error:" in ln] == [STOP_LINE.format("SIGINT")], err
    for needle in ["grpo_rm.py\", line", "RunStopped", "DataLoader worker", "Connection closed"]:
        assert needle not in err, err


def test_a_stop_in_a_worker_before_its_init_leaves_it_to_main(tmp_path, monkeypatch):
    """A DataLoader worker inherits main()'s stop handler when it is forked; a signal to the
    process group may reach it before worker_init_fn: it exits quietly (no traceback of its own)."""
    def fork_and_signal(args, ctx):  # as a worker is forked while main()'s handlers are in place
        child = os.fork()
        if child == 0:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)
            finally:
                os._exit(7)  # the handler raised: the worker would print its traceback
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    monkeypatch.setattr(G, "run", fork_and_signal)
    assert G.main(["--dataset", "imagefolder", "--device", "cpu", "--out", str(tmp_path)]) == 0


@pytest.mark.parametrize("target", ["ckpt.pt.tmp", "metrics.jsonl"])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(hub, imagefolder, tmp_path, monkeypatch,
                                                        capsys, target):
    class FullDisk(io.FileIO):  # writes as a file system with no space left does
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")
    real_open = open
    monkeypatch.setattr(G, "ignore_stops", lambda: None)  # this process keeps its handlers
    monkeypatch.setattr(G, "open", lambda path, mode="r", *a, **k: FullDisk(path, mode[0]) if (
        target in str(path) and "r" not in mode) else real_open(path, mode, *a, **k),
        raising=False)
    with pytest.raises(SystemExit) as stop:
        G.cli(cls_args(hub, imagefolder, tmp_path))
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 3 and len(err) == 1, err
    assert err[0] == ("error: No space left on device: free space at --out, then rerun "
                      "with --resume"), err
    assert not list(tmp_path.glob("*/*.tmp*"))  # the disk is not left fuller still


def _log(run):
    return [json.loads(ln) for ln in open(run / "metrics.jsonl")]


def test_live_log_has_every_step_and_epoch_and_resumes_without_gaps(hub, imagefolder, tmp_path):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "3", "--eval-epochs", "1")
    whole, _ = G.main(_with_out(argv, tmp_path / "a"))
    log = _log(_run_dir(tmp_path / "a", "cls-imagefolder-grpo-eq4-s0"))
    steps = [r for r in log if "step" in r]
    assert [r["step"] for r in steps] == whole["series"]["step"] == list(range(9))
    assert all(list(r) == list(whole["series"]) for r in steps)  # the keys of series
    assert [(r["epoch"], r["train_loss"]) for r in log if "epoch" in r] == list(
        zip([1, 2, 3], whole["train_loss"]))
    assert [len(r) for r in log].index(3) == 3  # epoch 1's line right after its 3 steps
    b = _with_out(argv, tmp_path / "b")
    G.main([*b, "--stop-after-epoch", "1"])
    run = _run_dir(tmp_path / "b", "cls-imagefolder-grpo-eq4-s0")
    with open(run / "metrics.jsonl", "a") as f:  # a crash after epoch 2's first step was logged
        f.write(json.dumps(steps[3]) + "\n")
    G.main([*b, "--resume"])
    again = _log(run)
    assert [r for r in again if "step" in r] == steps  # none twice, none missing
    assert [r.get("epoch") for r in again] == [r.get("epoch") for r in log]


@pytest.mark.parametrize("limit,warned", [(1e-9, True), (1e9, False)])
def test_collapse_warning_is_one_line_with_the_remedies(hub, imagefolder, tmp_path, monkeypatch,
                                                        capsys, limit, warned):
    monkeypatch.setattr(G, "COLLAPSE_WARNING", ("ratio_dev_max", limit))
    result, _ = G.main(cls_args(hub, imagefolder, tmp_path, "--epochs", "3"))
    out = capsys.readouterr().out
    s = result["series"]
    first = next((i for i, v in zip(s["step"], s["ratio_dev_max"]) if v > limit), None)
    assert result["collapse_warning"] == first and (first is not None) == warned
    assert out.count("warning: ratio_dev_max") == warned, out
    if warned:  # ρ = 1 at each refresh: the first step past it, once, with what to do
        assert first == 1 and "--dual-clip 3 --kl-coef 1, or a lower --lr" in out


# =============================================================================
# Evaluation: kNN, metrics, the SR head, multi-scale inference, the feature cache

def _at(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_by_hand():
    # Training points on the unit circle at 0°, 10° (class 0), 20°, 90° (class 1), 180° (class
    # 2).
    train = torch.tensor([_at(0), _at(10), _at(20), _at(90), _at(180)]) * torch.tensor(
        [[1.0], [2], [3], [1], [5]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    # Query 12°, k = 3: nearest 10° (0), 20° (1), 0° (0) -> votes 0:2, 1:1 -> class 0.
    # Query 16°, k = 2: 20° (1), 10° (0) -> tie -> the nearest wins -> class 1.
    # Query 16°, k = 4: 20° (1), 10° (0), 0° (0), 90° (1) -> tie 2:2 -> nearest (20°) -> 1.
    # Query 170°, k = 3: 180° (2), 90° (1), 20° (1) -> class 1 (majority beats nearest).
    q = torch.tensor([_at(12), _at(16), _at(170)])
    assert G.knn_predict(train, labels, q[:1], k=3).tolist() == [0]
    assert G.knn_predict(train, labels, q[1:2], k=2).tolist() == [1]
    assert G.knn_predict(train, labels, q[1:2], k=4).tolist() == [1]
    assert G.knn_predict(train, labels, q[2:], k=3).tolist() == [1]
    # Majority over nearness: 0° and 4° (class 0) are the two nearest to 1°, 30°, 40°, 50°
    # (class 1) the next three; k = 5 -> votes 0:2, 1:3 -> class 1.
    far = torch.tensor([_at(0), _at(4), _at(30), _at(40), _at(50)])
    assert G.knn_predict(far, torch.tensor([0, 0, 1, 1, 1]), torch.tensor([_at(1)])).tolist() == [1]
    # Cosine, not Euclidean: scaling a training point changes nothing. Queries 12°, 170° with
    # labels 0, 2 and k = 3 -> predictions 0, 1 -> 50%.
    assert G.knn_predict(train, labels, q[[0, 2]], k=3).tolist() == [0, 1]


def test_metrics_on_an_asymmetric_confusion_matrix():
    # 3 classes; rows = truth. truth 0: predicted 0, 0, 0, 1; truth 1: predicted 2, 1; truth 2:
    # nothing (its one truth pixel is ignored). Class 2 is predicted once: present.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 0, 1, 2, 1, 2, 0])
    conf = G.confusion_matrix(pred, target, 3, 255)
    assert conf.tolist() == [[3, 1, 0], [0, 1, 1], [0, 0, 0]]
    m = G.segmentation_metrics(conf)
    # tp = [3, 1, 0], gt (rows) = [4, 2, 0], pred (columns) = [3, 2, 1], union = [4, 3, 1]
    # pixel acc = 4/6 = 66.667%; IoU = [3/4, 1/3, 0]; mIoU over present (all 3) = 36.111%
    # fwIoU (weights from the truth) = (4/6)(0.75) + (2/6)(1/3) + 0 = 0.5 + 0.1111 = 61.111%
    # (with the transposed matrix, weights [3/6, 2/6, 1/6]: 0.375 + 0.1111 = 48.6%)
    assert m["pixel_acc"] == pytest.approx(66.6666667)
    assert m["miou"] == pytest.approx(36.1111111)
    assert m["iou"] == pytest.approx(61.1111111)
    # a class absent from truth and prediction does not count in mIoU: 2 of 4 classes here
    m4 = G.segmentation_metrics(G.confusion_matrix(pred[:6], target[:6], 4, 255))
    assert m4["miou"] == pytest.approx(100 * (0.75 + 1 / 3 + 0) / 3)


def _softmax_regression(feats, labels, c, epochs, m, base_lr, seed):
    """Multinomial logistic regression by hand: W, b, softmax, cross-entropy, Adam with the
    cosine rule; batches as the documented draw: randperm(N) per epoch, cut into m-sized pieces."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(feats.shape[1], c)  # the same initialisation as a fresh head
    W, b = lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    opt = torch.optim.Adam([W, b], lr=base_lr * m / 256)
    gen, per_epoch = torch.Generator().manual_seed(seed), math.ceil(len(feats) / m)
    hi, lo, total, step = base_lr * m / 256, base_lr / 100 * m / 256, epochs * per_epoch, 0
    for _ in range(epochs):
        for idx in torch.randperm(len(feats), generator=gen).split(m):
            idx = idx.sort().values
            for g in opt.param_groups:
                g["lr"] = lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * step / total))
            logp = (feats[idx] @ W.T + b).log_softmax(-1)
            keep = labels[idx] != -100  # the mean over the labelled samples
            loss = -logp[torch.arange(len(idx))[keep], labels[idx][keep]].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return W.detach(), b.detach()


@pytest.mark.parametrize("unlabelled", [False, True])
def test_sr_head_equals_a_softmax_regression_by_hand(unlabelled):
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(37, 6, generator=g), torch.randint(0, 4, (37,), generator=g)
    if unlabelled:  # as segmentation's ignored pixels: each batch's mean is over the labelled
        labels[::3] = -100
    torch.manual_seed(2)
    head = G.fit_head(torch.nn.Linear(6, 4), feats, labels, epochs=3, batch_size=8, lr=0.1,
                      device=torch.device("cpu"), seed=2)
    W, b = _softmax_regression(feats, labels, 4, 3, 8, 0.1, 2)
    torch.testing.assert_close(head.weight.detach(), W, atol=1e-6, rtol=0)
    torch.testing.assert_close(head.bias.detach(), b, atol=1e-6, rtol=0)


class _PerPixel(torch.nn.Module):
    """A flip-equivariant stand-in for a backbone: a 1×1 convolution on 4×4 average-pooled
    pixels."""
    patch_size, embed_dim = 4, 5

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 5, 1)

    def get_intermediate_layers(self, x, n=1, reshape=True):
        f = self.proj(F.avg_pool2d(x, 4))
        return tuple(f * (i + 1) for i in range(n))


def test_multiscale_inference_undoes_the_flip():
    torch.manual_seed(0)
    net = G.Net(_PerPixel(), None, "seg")
    heads = {"linear": G.SegHead(5, 4, 3, 8), "ms": G.SegHead(20, 4, 3, 8)}
    x = torch.randn(2, 3, 16, 16)
    sym = torch.cat([x[..., :8], x[..., :8].flip(-1)], -1)  # flip-symmetric
    for img in (sym, x):
        p = {ft: G.predict_seg(net, h, img, 8, [1.0] if ft == "ms" else []) for ft, h in
             heads.items()}
        # the "ms" head averages the plain and the flipped pass; with the flip undone and an
        # equivariant model both passes agree, for any input
        plain = F.interpolate(heads["ms"](net.features(img, 4), size=(8, 8)), size=(16, 16),
                              mode="bilinear", align_corners=False).softmax(1)
        torch.testing.assert_close(p["ms"], plain, atol=1e-6, rtol=0)
    assert not torch.allclose(p["ms"], p["ms"].flip(-1), atol=1e-3)  # x is not symmetric


def test_ms_evaluation_reuses_one_post_training(hub, vocfolder, tmp_path):
    both, _ = G.main(seg_args(hub, vocfolder, tmp_path / "a", "--feature-type", "linear", "ms"))
    lin, _ = G.main(seg_args(hub, vocfolder, tmp_path / "b", "--feature-type", "linear",
                             "--save-vis", "9"))
    assert both["series"] == lin["series"]  # the feature type changes evaluation only
    vis = torch.load(_run_dir(tmp_path / "b", "seg-voc-grpo-eq4-s0") / "vis.pt")
    assert vis["image"].shape == (4, 3, 16, 16)  # 9 asked, 4 test images
    assert both["metrics"]["linear"] == pytest.approx(lin["metrics"]["linear"], abs=1e-9)


def test_extract_with_plain_values(tmp_path):
    """extract() on any model and loader: every image once, in order, features in the autocast
    dtype, label maps resized by nearest neighbour; beyond memory_gb the cache is a file under
    spill, with the same values."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10, 8, 8), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    model = torch.nn.Conv2d(3, 5, 4, 4)  # (B, 5, 2, 2) "patch features"
    cpu = torch.device("cpu")
    feats, labels = G.extract(model, loader, cpu, label_size=4)
    torch.testing.assert_close(feats, model(x).detach())
    assert labels.dtype == torch.uint8 and torch.equal(labels, G.resize_labels(y, 4).byte())
    spilled, spilled_labels = G.extract(model, loader, cpu, label_size=4, spill=str(tmp_path),
                                        memory_gb=1e-9)
    assert sorted(os.listdir(tmp_path)) == ["feats.bin", "labels.bin"]
    assert torch.equal(spilled, feats) and torch.equal(spilled_labels, labels)
    half, _ = G.extract(model, loader, "cpu", torch.bfloat16)  # a device by name, too
    assert half.dtype == torch.bfloat16
    dropped = torch.utils.data.DataLoader(loader.dataset, batch_size=4, drop_last=True)
    some, some_labels = G.extract(model, dropped, cpu)  # a loader that skips samples
    assert torch.equal(some, feats[:8]) and torch.equal(some_labels, y[:8])


def _rss_anon_mb():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon")) / 1024


def test_feature_cache_beyond_the_budget_stays_on_disk(hub, tmp_path):
    """256 images whose cached 4-layer features take 256 × 4 × 256 × 16 × 16 × 4 B = 256 MiB:
    with a 16 MiB budget evaluation keeps them in files under the run folder, its peak anonymous
    memory stays far below their size, and the metrics equal those of the in-RAM cache."""
    rng, base = np.random.default_rng(0), tmp_path / "voc" / "VOCdevkit" / "VOC2012"  # 128 px
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(base / sub)
    ids = "\n".join(f"i{i}" for i in range(256))
    (base / "ImageSets" / "Segmentation" / "train.txt").write_text(ids)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("i0\ni1\n")
    for i in range(256):
        image(rng, i, 128).save(base / "JPEGImages" / f"i{i}.jpg")
        palette_png(np.full((128, 128), i % 3, np.uint8), base / "SegmentationClass" / f"i{i}.png")
    argv = seg_args(hub, str(tmp_path / "voc"), tmp_path, "--method", "frozen", "--img-size", "128",
                    "--hub-kwargs", '{"embed_dim": 256, "patch_size": 8}', "--feature-type",
                    "linear", "ms", "--eval-epochs", "1", "--batch-size", "2", "--ms-scales", "1.0")
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_mb())
            time.sleep(0.005)

    results = {}
    for budget in ("0.015625", "100"):
        base_mb, peak[0] = _rss_anon_mb(), 0.0
        done.clear()
        threading.Thread(target=sample, daemon=True).start()
        results[budget] = G.main([*argv, "--eval-memory-gb", budget, "--name", f"b{budget}"])[0]
        done.set()
        results[budget]["growth"] = peak[0] - base_mb
    assert results["0.015625"]["growth"] < 64 and results["100"]["growth"] > 240  # MiB
    assert results["0.015625"]["metrics"] == results["100"]["metrics"]
    assert not list(tmp_path.glob("*/cache"))  # the spilled files are removed


@pytest.mark.parametrize("device", DEVICES)
def test_evaluation_is_one_feature_pass_per_split(hub, imagefolder, tmp_path, monkeypatch, device):
    images, features = [], G.Net.features
    monkeypatch.setattr(G.Net, "features", lambda self, x, n=1: images.append(len(x)) or
                        features(self, x, n))
    result, _ = G.main(cls_args(hub, imagefolder, tmp_path, "--method", "frozen", "--eval-epochs",
                                "5", "--device", device))
    assert sum(images) == 24 + 12  # every train and test image exactly once, for SR and kNN
    assert 0 <= result["metrics"]["sr"] <= 100


def test_sigterm_in_evaluation_is_not_swallowed(hub, imagefolder, tmp_path):
    argv = cls_args(hub, imagefolder, tmp_path, "--epochs", "1")
    p = _popen_until([*argv, "--eval-epochs", "1000000"], "evaluating")
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 3 and "stopped by SIGTERM" in err and "--resume" in err, err
    run = _run_dir(tmp_path, "cls-imagefolder-grpo-eq4-s0")
    assert (run / "ckpt.pt").exists() and not (run / "result.json").exists()
    assert not (run / "cache").exists()
    rc, err, _ = _cli(*argv, "--resume")  # the trained model is evaluated, not trained again
    assert rc == 0 and len(json.load(open(run / "result.json"))["train_loss"]) == 1, err


# =============================================================================
# Main: whole runs on the real DINOv2 code, the command line, failing ranks

@pytest.mark.parametrize("patch,expected", [(14, 70), (8, 64)])
def test_tinyimagenet_default_size_follows_the_patch(hub, tmp_path, patch, expected):
    root = _tinyimagenet(tmp_path / "tin")
    kwargs = json.dumps({"patch_size": patch, "img_size": 64})
    result, _ = G.main(["--dataset", "tinyimagenet", "--data-dir", root, "--hub-repo", hub,
                        "--model", "dinov2_vitt_test", "--hub-kwargs", kwargs, "--batch-size", "4",
                        "--epochs", "1", "--eval-epochs", "1", "--workers", "0", "--out",
                        str(tmp_path), "--device", "cpu"])
    assert result["config"]["img_size"] == expected


@pytest.mark.parametrize("method", ["grpo", "ce"])
def test_real_dinov2_cls(dinov2, imagefolder, tmp_path, monkeypatch, method):
    seen = _capture_init(monkeypatch)
    result, net = G.main(real_args(dinov2, imagefolder, tmp_path, "--method", method))
    assert type(net.backbone).__name__ == "DinoVisionTransformer" and net.backbone.embed_dim == 384
    changed = [k for k, p in _trainable(net).items() if not torch.equal(_trainable(seen[0])[k], p)]
    assert len(changed) == len(_trainable(net)) and 0 <= result["metrics"]["sr"] <= 100


@pytest.mark.parametrize("method", ["grpo", "ce"])
def test_real_dinov2_seg_linear_and_ms(dinov2, vocfolder, tmp_path, method):
    result, net = G.main(real_args(dinov2, vocfolder, tmp_path, "--method", method, "--feature-type",
                                   "linear", "ms", "--batch-size", "4", task="seg"))
    m = result["metrics"]
    assert m["linear"]["labelled_pixels"] == m["ms"]["labelled_pixels"] > 0
    assert type(net.backbone).__name__ == "DinoVisionTransformer"


def test_real_dinov2_reg_and_weights(dinov2, imagefolder, tmp_path):
    _, net = G.main(real_args(dinov2, imagefolder, tmp_path / "a", "--model",
                              "dinov2_vits14_reg", "--method", "frozen"))
    assert net.backbone.num_register_tokens == 4
    torch.manual_seed(3)
    model = torch.hub.load(dinov2, "dinov2_vits14", source="local", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    _, net = G.main(real_args(dinov2, imagefolder, tmp_path / "b", "--weights", str(tmp_path / "w.pth"),
                              "--method", "frozen"))
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in model.state_dict().items())


def test_real_vits14_tinyimagenet_at_70px(dinov2, tmp_path):
    root = _tinyimagenet(tmp_path / "tin")
    result, _ = G.main(["--dataset", "tinyimagenet", "--data-dir", root, "--hub-repo", dinov2,
                        "--model", "dinov2_vits14", "--hub-kwargs", PIN, "--batch-size", "4",
                        "--epochs", "1", "--eval-epochs", "1", "--workers", "0", "--out",
                        str(tmp_path), "--device", "cpu"])
    assert result["config"]["img_size"] == 70


def dinov3_args(repo, data, out, *extra, task="cls"):
    base = (["--dataset", "imagefolder"] if task == "cls" else
            ["--dataset", "voc", "--num-classes", "3", "--seg-size", "8", "--ms-scales", "1.0",
             "1.5", "--feature-type", "linear", "ms"])
    return [*base, "--data-dir", data, "--hub-repo", repo, "--model", "dinov3_vits16",
            "--hub-kwargs", PIN, "--img-size", "32", "--batch-size", "8", "--epochs", "1",
            "--eval-epochs", "1", "--lr", "0.001", "--workers", "0", "--out", str(out),
            "--device", "cpu", *extra]


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_real_dinov3_trains_and_evaluates(dinov3, imagefolder, vocfolder, tmp_path, monkeypatch,
                                          task):
    seen = _capture_init(monkeypatch)
    data = imagefolder if task == "cls" else vocfolder
    result, net = G.main(dinov3_args(dinov3, data, tmp_path, task=task))
    assert type(net.backbone).__name__ == "DinoVisionTransformer" and net.backbone.patch_size == 16
    changed = [k for k, p in _trainable(net).items() if not torch.equal(_trainable(seen[0])[k], p)]
    assert len(changed) == len(_trainable(net))  # every trained parameter of DINOv3 moved
    m = result["metrics"]
    if task == "cls":
        assert 0 <= m["sr"] <= 100 and 0 <= m["knn"] <= 100
    else:  # 4 val masks of 16 x 16 px, the top row ignored: 960 labelled pixels (scored at 32)
        assert m["linear"]["labelled_pixels"] == m["ms"]["labelled_pixels"] == 4 * 30 * 32


def test_real_dinov3_storage_tokens_never_leak(dinov3):
    """The class token is the class token and the patch features hold the patches alone: none of
    DINOv3's 4 storage (register) tokens, at any layer and any input shape."""
    m = G.load_backbone(dinov3, "dinov3_vits16", hub_kwargs={"pretrained": False}).eval()
    assert m.n_storage_tokens == 4
    x = torch.randn(2, 3, 48, 64)  # 3 x 4 patches
    with torch.no_grad():
        out = m.forward_features(x)
        seg, cls = G.Net(m, None, "seg").features, G.Net(m, None, "cls").features
        patches = out["x_norm_patchtokens"].reshape(2, 3, 4, 384).permute(0, 3, 1, 2)
        torch.testing.assert_close(seg(x, 1), patches)
        four = seg(x, 4)
        assert four.shape == (2, 4 * 384, 3, 4)
        torch.testing.assert_close(four[:, -384:], patches)  # the last layer, last
        torch.testing.assert_close(cls(x), out["x_norm_clstoken"])
        head = G.SegHead(4 * 384, 8, 3, 8)
        assert G.predict_seg(G.Net(m, None, "seg"), head, x, 8, [1.0, 1.5]).shape == (2, 3, 48, 64)
    # DINOv3 jitters its RoPE coordinates in train mode: training runs the model as θ_old runs,
    # in eval mode, so that θ = θ_old gives ρ = 1 at every refresh
    net = G.build_net(m.train(), "cls", 3, 8, 8)
    model, old, _ = G.make_models(net, "grpo")
    with torch.no_grad():
        assert torch.equal(model(x), old(x)) and not model.training


def test_real_dinov3_default_size_keeps_the_papers_tokens(dinov3, tmp_path):
    root = _tinyimagenet(tmp_path / "tin")  # 64 px: 5 x 5 patches of 14 in the paper -> 80 px
    result, _ = G.main(["--dataset", "tinyimagenet", "--data-dir", root, "--hub-repo", dinov3,
                        "--model", "dinov3_vits16", "--hub-kwargs", PIN, "--batch-size", "4",
                        "--method", "frozen", "--eval-epochs", "1", "--workers", "0", "--out",
                        str(tmp_path), "--device", "cpu"])
    assert result["config"]["img_size"] == 80


@pytest.mark.parametrize("case", ["packages", "missing weights", "wrong weights"])
def test_dinov3_without_its_packages_or_weights_is_one_line(dinov3, imagefolder, tmp_path, case):
    (tmp_path / "v2.pth").write_bytes(b"")
    torch.save({"pos_embed": torch.zeros(1)}, tmp_path / "wrong.pth")
    weights = {"missing weights": str(tmp_path / "none.pth"), "wrong weights": str(tmp_path /
               "wrong.pth")}.get(case)
    argv = cls_args(dinov3, imagefolder, tmp_path, "--model", "dinov3_vits16", "--hub-kwargs",
                    json.dumps({"weights": weights} if weights else {"pretrained": False}))
    hide = "sys.modules['torchmetrics'] = None; " if case == "packages" else ""
    code = f"import sys; {hide}import grpo_rm as G; G.cli({argv!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]  # (torch.hub's "100.0%" too)
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    needle = ("needs torchmetrics: pip install torchmetrics termcolor" if case == "packages"
              else "--model dinov3_vits16: loading failed")
    assert needle in lines[0], lines


def test_cli_bad_inputs(hub, imagefolder, tmp_path, monkeypatch):
    base = cls_args(hub, imagefolder, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached hub repositories
    bad = {k: v for k, v in G.load_backbone(hub, "dinov2_vitt_test").state_dict().items()
           if k != "norm.weight"}
    torch.save(bad, tmp_path / "bad.pth")
    cases = [
        (["--dataset", "nope"], "--dataset"),
        (base + ["--model", "dinov2_vitx99"], "--model dinov2_vitx99"),
        (base + ["--data-dir", str(tmp_path / "missing")], "--data-dir"),
        (base + ["--num-classes", "2"], "--num-classes 2"),
        (base + ["--subset", "1.5"], "--subset"),
        (base + ["--subset", "1e-9"], "--subset 1e-09: 0 of 24 images"),
        (base + ["--hub-repo", str(tmp_path)], "hubconf.py"),
        (base + ["--img-size", "18"], "--img-size 18"),
        (base + ["--task", "seg"], "--task"),
        (base + ["--method", "ppo"], "--method"),
        (base + ["--uniformity", "eq7"], "--uniformity"),
        (base + ["--feature-type", "deep"], "--feature-type"),
        (base + ["--hub-kwargs", "{oops"], "--hub-kwargs"),
        (base + ["--data-dir", str(tmp_path / "empty")], "--data-dir"),
        (base + ["--out", str(tmp_path / "a_file" / "runs")], "--out"),
        (base + ["--hub-repo", "no-such-owner-x/no-such-repo-x"], "offline"),
        (base + ["--weights", str(tmp_path / "bad.pth")], "norm.weight"),
    ] + ([] if CUDA else [(base + ["--device", "cuda"], "--device cuda")])
    for argv, needle in cases:
        rc, err, lines = _cli(*argv)
        assert rc != 0 and len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err


def test_cli_bad_seg_files(hub, vocfolder, tmp_path):
    d = tmp_path / "voc"
    shutil.copytree(vocfolder, d)
    masks = d / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    palette_png(np.full((16, 16), 30, np.uint8), masks / "train3.png")  # 30 >= 21, not 255
    rc, err, lines = _cli(*seg_args(hub, str(d), tmp_path, "--epochs", "1"))
    assert rc != 0 and len(lines) == 1, err
    assert "train3.png" in lines[0] and "label value 30" in lines[0], err
    os.remove(masks / "train3.png")
    rc, err, lines = _cli(*seg_args(hub, str(d), tmp_path, "--epochs", "1"))
    assert rc != 0 and len(lines) == 1 and "train3.png" in lines[0] and "No such file" in lines[0]
    assert not list(tmp_path.glob("*/result.json"))  # nothing reported as final


def test_cli_corrupt_image_and_batch_split(hub, imagefolder, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(imagefolder, d)
    (d / "test" / "class1" / "2.png").write_bytes(b"not a png")
    rc, err, lines = _cli(*cls_args(hub, str(d), tmp_path, "--method", "frozen"))
    assert rc != 0 and len(lines) == 1, err
    assert "2.png" in lines[0] and "cannot read image" in lines[0], err
    rc, err, _ = _cli(*cls_args(hub, imagefolder, tmp_path), env={**os.environ, "WORLD_SIZE": "3",
                                                                  "RANK": "0"})
    assert rc != 0 and "--batch-size 8 is not divisible by the 3 processes" in err


def test_failing_rank_stops_all(hub, imagefolder, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(imagefolder, d)
    (d / "train" / "class0" / "1.png").write_bytes(b"broken")  # read by one rank in training
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), os.path.join(HERE, "grpo_rm.py"), *cls_args(hub, str(d), tmp_path)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and time.time() - t0 < 240 and "1.png: cannot read image" in p.stderr
    assert not list(tmp_path.glob("*/result.json"))


@pytest.mark.parametrize("bad,needle", [
    (["--batch-size", "0"], "--batch-size"),  # a flag: every rank's argparse refuses it
    (["--hub-repo", "no-such-owner-x/no-such-repo-x"], "offline"),  # rank 0 loads the hub first
    (["--data-dir", "missing"], "--data-dir"),  # rank 0 builds the data first
    (["--batch-size", "9"], "not divisible by the 2"),  # every rank finds it, rank 0 says it
])
def test_torchrun_bad_input_is_one_line_from_rank_0(hub, imagefolder, tmp_path, bad, needle):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), os.path.join(HERE, "grpo_rm.py"),
           *cls_args(hub, imagefolder, tmp_path), *bad]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "th")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert p.returncode != 0 and len(lines) == 1 and needle in lines[0], p.stderr[-3000:]
    assert "Connection closed" not in p.stderr and "exitcode  : 2" in p.stderr  # both ranks: 2
    assert "exitcode  : 1" not in p.stderr


def test_torchrun_cli(hub, vocfolder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(_free_port()), os.path.join(HERE, "grpo_rm.py"),
           *seg_args(hub, vocfolder, tmp_path, "--epochs", "1")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(_run_dir(tmp_path, "seg-voc-grpo-eq4-s0") / "result.json"))
    assert res["world_size"] == 2 and res["metrics"]["linear"]["labelled_pixels"] == 960


def test_other_ranks_exit_quietly_whatever_rank_0_said(monkeypatch, capsys):
    def fail(argv):
        raise G.UserError("")  # rank 0 failed with an empty message (a bare assert)
    monkeypatch.setattr(G, "main", fail)
    monkeypatch.setattr(G, "ignore_stops", lambda: None)  # this process keeps its handlers
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        G.cli([])
    assert stop.value.code == 2 and capsys.readouterr().err == ""


# =============================================================================
# Config

def test_defaults_follow_the_paper():
    a = G.get_args(["--dataset", "cifar10", "--device", "cpu"])
    assert (a.batch_size, a.lr, a.eval_lr, a.hidden, a.epochs, a.eval_epochs, a.clip_eps) == (
        1024, 1e-3, 1e-3, 256, 100, 50, 0.2)
    assert a.augment and a.img_size is None and a.dtype == "fp32"
    s = G.get_args(["--dataset", "voc", "--device", "cpu"])
    assert (s.task, s.batch_size, s.lr, s.hidden, s.background_penalty) == (
        "seg", 256, 1e-5, 64, True)
    assert G.get_args(["--dataset", "ade20k"]).background_penalty is False
    assert a.hub_repo == G.HUB_REPOS["dinov2"] and len(a.hub_repo.split(":")[1]) == 40
    v3 = G.get_args(["--dataset", "cifar10", "--device", "cpu", "--model", "dinov3_vits16"])
    assert v3.hub_repo.startswith("facebookresearch/dinov3:")


@pytest.mark.parametrize("flag,bad", [
    ("--batch-size", "0"), ("--hidden", "0"), ("--epochs", "0"), ("--eval-epochs", "0"),
    ("--img-size", "0"), ("--seg-size", "-1"), ("--lr", "-1"), ("--lr", "0"), ("--eval-lr", "0"),
    ("--clip-eps", "-0.1"), ("--clip-eps", "1.5"), ("--subset", "0"), ("--subset", "1.5"),
    ("--workers", "-1"), ("--log-every", "0"), ("--dual-clip", "1"), ("--old-every", "0"),
    ("--kl-coef", "-1"), ("--stop-after-epoch", "100"),
    ("--num-classes", "1"), ("--ms-scales", "0"), ("--feature-type", "deep"),
    ("--hub-kwargs", "[1]"), ("--batch-size", "x")])
def test_every_numeric_flag_is_range_checked(flag, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        G.get_args(["--dataset", "cifar10", "--device", "cpu", flag, bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert f"argument {flag}: " in err[-1] and "Traceback" not in "".join(err), err


def test_kl_coef_zero_is_off():
    assert G.get_args(["--dataset", "cifar10", "--kl-coef", "0"]).kl_coef == 0
    z, z_old, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert G.grpo_rm_loss(z, z_old, y, kl_coef=0) == G.grpo_rm_loss(z, z_old, y)


def test_help_shows_real_defaults_and_examples():
    text = G.make_parser().format_help()
    assert "default min(8, CPUs)" in text and "(default: None)" not in text
    assert "(default:" not in text.split("--workers")[-1].split("--out")[0]  # not the CPU count
    assert G.get_args(["--dataset", "cifar10"]).workers == min(8, os.cpu_count())
    assert "(default: None)" not in text and "default 1024 (cls), 256 (seg)" in text
    assert "(default: 100)" in text
