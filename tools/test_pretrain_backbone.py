"""Tests of tools/pretrain_backbone.py on a tiny Tiny-ImageNet: it writes a torch.hub folder that
grpo_rm.py loads, resumes exactly, and its weights load where the miniature's backbone does."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import SHARED, image

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # grpo_rm.py and tools/: no packages
import grpo_rm as G  # noqa: E402
import pretrain_backbone as P  # noqa: E402


@pytest.fixture(scope="module")
def tin(tmp_path_factory):
    """{train,val}/<wnid>/*.JPEG, 3 classes of 16 px images: 8 train and 4 val each."""
    root, rng = tmp_path_factory.mktemp("tin"), np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, wnid in enumerate(["n01", "n02", "n03"]):
            os.makedirs(root / split / wnid)
            for i in range(n):
                image(rng, c, 16).save(root / split / wnid / f"{i}.JPEG")
    return str(root)


def _pretrain(tin, out, *extra):
    return P.main(["--data-dir", tin, "--out", str(out), "--img-size", "16", "--batch-size", "6",
                   "--dtype", "fp32", "--device", "cpu", "--log-every", "2", *extra])


def test_pretraining_writes_a_hub_folder_and_resumes_exactly(tin, tmp_path, monkeypatch):
    log = _pretrain(tin, tmp_path / "a", "--epochs", "3", "--lr", "3e-3")
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[-1]["loss"] < log[0]["loss"]
    assert sorted(os.listdir(tmp_path / "a")) == ["dinov2_vitt8_tin.pth", "hubconf.py", "log.json"]
    assert json.loads((tmp_path / "a" / "log.json").read_text())["classes"] == 3
    backbone = G.load_backbone(str(tmp_path / "a"), "dinov2_vitt8_tin")  # strict, as grpo_rm does
    assert backbone.embed_dim == 192 and backbone.patch_size == 8
    _pretrain(tin, tmp_path / "b", "--epochs", "3", "--lr", "3e-3")  # deterministic
    # stopped in epoch 3 (epoch 2's checkpoint kept), then resumed: the same weights as straight
    real, calls = P.top1, []

    def top1(*a):
        calls.append(1)
        if len(calls) == 3:  # epoch 3's evaluation: a Ctrl-C
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(P, "top1", top1)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tin, tmp_path / "c", "--epochs", "3", "--lr", "3e-3")
    monkeypatch.setattr(P, "top1", real)
    assert (tmp_path / "c" / "ckpt.pt").exists()
    _pretrain(tin, tmp_path / "c", "--epochs", "3", "--lr", "3e-3", "--resume")
    a, b, c = (torch.load(tmp_path / d / "dinov2_vitt8_tin.pth") for d in "abc")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)


def test_weights_load_where_the_miniatures_backbone_does(tin, tmp_path):
    hub = os.path.join(SHARED, "hub")
    if not os.path.isfile(os.path.join(hub, "hubconf.py")):
        pytest.skip("no miniature backbone folder (../shared/hub)")
    _pretrain(tin, tmp_path, "--epochs", "1")
    weights = str(tmp_path / "dinov2_vitt8_tin.pth")
    theirs = G.load_backbone(hub, "dinov2_vitt8_tin", weights)  # strict: the same keys and shapes
    ours = G.load_backbone(str(tmp_path), "dinov2_vitt8_tin")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))  # and the same function
