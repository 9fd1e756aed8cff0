"""Tests for grpo_rm.py, in the order of its sections. CPU only, no network: the tests build a tiny
torch.hub repository (a ViT with DINOv2's interface and hand-written attention) and tiny datasets
in the real on-disk layouts in tmp dirs, and go through the same code paths as a real run."""
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import grpo_rm as G

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Fixtures: a tiny local torch.hub repository and tiny datasets in real layouts

HUBCONF = '''
"""A tiny ViT with DINOv2's interface and parameter names (test fixture)."""
import math, torch, torch.nn as nn, torch.nn.functional as F
dependencies = ["torch"]

class Attention(nn.Module):  # as dinov2/layers/attention.py: softmax(q k^T * scale) v by hand
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.attn_drop = nn.Linear(dim, dim * 3), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)
    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * self.scale @ qkv[1].transpose(-2, -1)).softmax(-1)
        return self.proj_drop(self.proj((self.attn_drop(attn) @ qkv[2]).transpose(1, 2).reshape(B, N, C)))

class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

class DinoVisionTransformer(nn.Module):
    def __init__(self, img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2):
        super().__init__()
        self.patch_size, self.embed_dim, self.n_blocks = patch_size, embed_dim, depth
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, embed_dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
    def prepare_tokens(self, x):
        B, _, h, w = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        s, gh, gw = int(math.sqrt(self.pos_embed.shape[1] - 1)), h // self.patch_size, w // self.patch_size
        pos = self.pos_embed[:, 1:].reshape(1, s, s, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], 1) + torch.cat([self.pos_embed[:, :1], pos], 1)
    def forward_features(self, x):
        x = self.prepare_tokens(x)
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1:], "x_prenorm": x, "masks": None}
    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        B, _, h, w = x.shape
        x, out = self.prepare_tokens(x), []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x) if norm else x)
        out = [o[:, 1:] for o in out]
        if reshape:
            out = [o.reshape(B, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2) for o in out]
        return tuple(out)
    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]

def dinov2_vitt_test(pretrained=True, **kwargs):
    torch.manual_seed(0)  # deterministic "pretrained" weights
    return DinoVisionTransformer(**kwargs)
'''


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    d = tmp_path_factory.mktemp("hub")
    (d / "hubconf.py").write_text(HUBCONF)
    return str(d)


def _image(rng, cls, size=16):
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][cls % 3], np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8))


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    """{train,test}/<class>/*.png, 3 classes: 8 train and 4 test images each, 16x16."""
    d, rng = tmp_path_factory.mktemp("imagefolder"), np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c in range(3):
            os.makedirs(d / split / f"class{c}")
            for i in range(n):
                _image(rng, c).save(d / split / f"class{c}" / f"{i}.png")
    return str(d)


def _palette_png(label, path):
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(G.voc_palette().flatten().tolist())
    im.save(path)


@pytest.fixture(scope="session")
def vocfolder(tmp_path_factory):
    """VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}: 8 train, 4 val, labels
    {0, 1, 2} in blocks with a 255 border."""
    d, rng = tmp_path_factory.mktemp("voc"), np.random.default_rng(1)
    base = d / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(base / sub)
    for split, ids in (("train", [f"tr{i}" for i in range(8)]), ("val", [f"va{i}" for i in range(4)])):
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, name in enumerate(ids):
            label = np.zeros((16, 16), np.uint8)
            label[:, 8:] = 1 + i % 2
            label[0, :] = 255
            img = np.array(_image(rng, 0)).astype(np.float32)
            img[label == 1] = [40, 200, 40]
            img[label == 2] = [40, 40, 200]
            Image.fromarray(img.astype(np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
            _palette_png(label, base / "SegmentationClass" / f"{name}.png")
    return str(d)


def cls_args(hub, data, out, *extra):
    return ["--dataset", "imagefolder", "--data-dir", data, "--hub-repo", hub, "--model", "dinov2_vitt_test",
            "--img-size", "16", "--batch-size", "8", "--epochs", "2", "--eval-epochs", "3", "--lr", "0.01",
            "--workers", "0", "--out", str(out), "--log-every", "1", *extra]


def seg_args(hub, data, out, *extra):
    return ["--task", "seg", "--dataset", "voc", "--data-dir", data, "--hub-repo", hub, "--model", "dinov2_vitt_test",
            "--img-size", "16", "--seg-size", "8", "--batch-size", "4", "--epochs", "2", "--eval-epochs", "2",
            "--lr", "0.01", "--workers", "0", "--out", str(out), "--ms-scales", "1.0,1.5", *extra]


# -----------------------------------------------------------------------------
# Method: rewards (Eqs. 3-6), advantages (Eq. 2), the loss (Eq. 1)

P_OLD = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)  # c = 3, old-policy probabilities
LABEL = torch.tensor([1])  # true class k = 1


@pytest.mark.parametrize("uniformity,penalty,expected", [
    # Eq. (3): r_acc = [0, c, 0] = [0, 3, 0].
    # Eq. (4): r_uni = -p = [-0.5, -0.3, -0.2]                      -> r = [-0.5, 2.7, -0.2]
    ("eq4", False, [-0.5, 2.7, -0.2]),
    # Eq. (5): i != k: (1 - p_k)/(c - 1) - p_i = 0.7/2 - p_i = 0.35 - [0.5, ., 0.2] = [-0.15, ., 0.15];
    #          i = k: p_k = 0.3                                      -> r = [-0.15, 3.3, 0.15]
    ("eq5", False, [-0.15, 3.3, 0.15]),
    ("none", False, [0.0, 3.0, 0.0]),  # accuracy reward alone
    # background penalty: r_0 -= c/2 = 1.5
    ("eq4", True, [-2.0, 2.7, -0.2]),
    ("eq5", True, [-1.65, 3.3, 0.15]),
    ("none", True, [-1.5, 3.0, 0.0]),
])
def test_rewards_by_hand(uniformity, penalty, expected):
    r = G.rewards(P_OLD, LABEL, uniformity, background_penalty=penalty)
    torch.testing.assert_close(r, torch.tensor([expected], dtype=torch.float64), atol=1e-12, rtol=0)


def test_eq5_sums_to_minus_pk():
    # The paper, after Eq. (5): sum_i r'_uni_i = 1 - p_k - sum_{i != k} p_i + p_k ... = -p_k + p_k ... ; with
    # p = [0.5, 0.3, 0.2], k = 1: -0.15 + 0.3 + 0.15 = 0.3 = p_k.
    assert G.uniformity_eq5(P_OLD, LABEL).sum().item() == pytest.approx(0.3)


@pytest.mark.parametrize("r,expected", [
    # r = [0, 3, 0]: mean 1, deviations [-1, 2, -1], unbiased var (1 + 4 + 1)/2 = 3, std sqrt(3) = 1.7320508
    # A = [-1, 2, -1] / (1.7320508 + 1e-4) = [-0.5773169, 1.1546339, -0.5773169]
    ([0.0, 3.0, 0.0], [-0.5773169, 1.1546339, -0.5773169]),
    # r = [-0.5, 2.7, -0.2]: mean 2/3, deviations [-7/6, 61/30, -13/15] = [-1.1666667, 2.0333333, -0.8666667],
    # var (1.3611111 + 4.1344444 + 0.7511111)/2 = 3.1233333, std 1.7672955
    # A = deviations / 1.7673955 = [-0.6601050, 1.1504688, -0.4903637]
    ([-0.5, 2.7, -0.2], [-0.6601050, 1.1504688, -0.4903637]),
])
def test_advantages_by_hand(r, expected):
    A = G.advantages(torch.tensor([r], dtype=torch.float64))
    torch.testing.assert_close(A, torch.tensor([expected], dtype=torch.float64), atol=1e-6, rtol=0)


def test_loss_clipped_by_hand():
    # old logits 0: p_old = [1/3]*3; label 0; Eq. (4): r = [3 - 1/3, -1/3, -1/3], mean 2/3, deviations
    # [2, -1, -1], std sqrt(3): A = [2, -1, -1] / (sqrt(3) + 1e-4).
    # new p = [0.5, 0.25, 0.25] -> rho = p / p_old = [1.5, 0.75, 0.75].
    # i = 0 (A > 0): min(1.5 A, clip(1.5) = 1.2 A) = 1.2 * 2 / s = 2.4 / s
    # i = 1, 2 (A < 0): min(0.75 A, clip(0.75) = 0.8 A) = 0.8 * -1 / s = -0.8 / s
    # J = (2.4 - 0.8 - 0.8) / (3 s) = 0.8 / (3 * 1.7321508) = 0.1539512; loss = -J
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.log(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)) + 7.0  # softmax ignores the shift
    loss = G.grpo_rm_loss(new, old, torch.tensor([0]))
    assert loss.item() == pytest.approx(-0.1539512, abs=1e-7)


def naive_loss(logits, old_logits, labels, eps=0.2, uniformity="eq4", penalty=False, ignore=-100):
    """Eq. (1) with β = 0, by loops over samples and classes in Python floats (float64)."""
    total, n = 0.0, 0
    for z, zo, k in zip(logits.tolist(), old_logits.tolist(), labels.tolist()):
        if k == ignore:
            continue
        c = len(z)
        p = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
        po = [math.exp(v) / sum(math.exp(u) for u in zo) for v in zo]
        r = []
        for i in range(c):
            acc = c if i == k else 0.0
            uni = {"eq4": -po[i], "none": 0.0,
                   "eq5": po[k] if i == k else (1 - po[k]) / (c - 1) - po[i]}[uniformity]
            r.append(acc + uni - (c / 2 if penalty and i == 0 else 0.0))
        mean = sum(r) / c
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (c - 1))
        J = 0.0
        for i in range(c):
            A, rho = (r[i] - mean) / (std + 1e-4), p[i] / po[i]
            J += min(rho * A, min(max(rho, 1 - eps), 1 + eps) * A) / c
        total, n = total + J, n + 1
    return -total / n


@pytest.mark.parametrize("uniformity,penalty", [("eq4", False), ("eq5", False), ("none", False), ("eq4", True)])
def test_loss_matches_naive_loop(uniformity, penalty):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(6, 4, generator=g, dtype=torch.float64)
    new = old + 0.5 * torch.randn(6, 4, generator=g, dtype=torch.float64)  # some ratios clipped, some not
    labels = torch.tensor([0, 1, 2, 3, -100, 1])
    loss = G.grpo_rm_loss(new, old, labels, 0.2, uniformity, penalty)
    assert loss.item() == pytest.approx(naive_loss(new, old, labels, 0.2, uniformity, penalty), abs=1e-12)
    ratio = (new.softmax(-1) / old.softmax(-1))
    assert ((ratio > 1.2) | (ratio < 0.8)).any() and ((ratio < 1.2) & (ratio > 0.8)).any()  # both regimes seen


@pytest.mark.parametrize("uniformity,penalty", [("eq4", False), ("eq5", True)])
def test_loss_gradient_finite_differences(uniformity, penalty):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(5, 3, generator=g, dtype=torch.float64)
    new = (old + 0.4 * torch.randn(5, 3, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 2, 1, 1, 0])
    assert torch.autograd.gradcheck(lambda z: G.grpo_rm_loss(z, old, labels, 0.2, uniformity, penalty), (new,),
                                    eps=1e-6, atol=1e-7)


def test_at_theta_old_ratio_one_and_policy_gradient():
    # At θ = θ_old, ρ = 1 and ∇ loss = -(1/N) Σ_n Σ_i A_i ∇ log p_i / c; with ∇_z log p_i = e_i - p and
    # Σ_i A_i = 0 this is -(1/N) A / c per sample's logits.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 4, 2, 2])
    loss = G.grpo_rm_loss(z, z.detach().clone(), labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-15)  # J = mean_i A_i = 0 at ρ = 1
    loss.backward()
    A = G.advantages(G.rewards(z.detach().softmax(-1), labels))
    logp = F.log_softmax(z, -1)
    expected = torch.autograd.grad(-(A * logp).sum() / (5 * 4), z)[0]  # -Σ A_i ∇ log p_i / c, mean over N
    torch.testing.assert_close(z.grad, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(z.grad, -A / 5 / 4, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_finite_when_old_probs_underflow(dtype):
    # Logits ±100: p_old = exp(-200)/... underflows to 0 in float32 and bfloat16, while old and new logits
    # stay close (as within an epoch). p / p_old would be 0/0; log space is finite.
    g = torch.Generator().manual_seed(3)
    old = (100 * torch.sign(torch.randn(8, 10, generator=g))).to(dtype)
    new = (old.float() + 0.05 * torch.randn(8, 10, generator=g)).to(dtype).requires_grad_()
    assert (old.float().softmax(-1) == 0).any()  # the underflow is real
    labels = torch.randint(0, 10, (8,), generator=g)
    loss = G.grpo_rm_loss(new, old, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(new.grad.float()).all()
    assert loss.dtype == torch.float32  # float32 loss under low-precision inputs


def test_ignore_index():
    g = torch.Generator().manual_seed(4)
    old, new = torch.randn(6, 300, generator=g), torch.randn(6, 300, generator=g)
    labels = torch.tensor([255, 3, -100, 299, -100, 0])  # 255 is a real class here (ImageNet has one)
    keep = labels != -100
    torch.testing.assert_close(G.grpo_rm_loss(new, old, labels), G.grpo_rm_loss(new[keep], old[keep], labels[keep]))
    z = new.clone().requires_grad_()
    loss = G.grpo_rm_loss(z, old, torch.full((6,), 255), ignore_index=255)  # nothing labelled
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()


def test_old_model_is_frozen_copy():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    old = G.make_old(net)
    assert all(not p.requires_grad for p in old.parameters()) and not old.training
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(old[0].weight, net[0].weight)
    G.refresh_old(old, net)
    assert torch.equal(old[0].weight, net[0].weight) and not old[0].weight.requires_grad


# -----------------------------------------------------------------------------
# Model: torch.hub (local source), --weights, SDPA

def test_hub_local_load_and_weights(hub, tmp_path):
    m = G.load_backbone(hub, "dinov2_vitt_test")
    assert m.embed_dim == 16 and m.patch_size == 4
    x = torch.randn(2, 3, 16, 16)
    assert m.forward_features(x)["x_norm_clstoken"].shape == (2, 16)
    assert m.get_intermediate_layers(x, n=4, reshape=True)[0].shape == (2, 16, 4, 4)
    state = {k: v + 1 for k, v in m.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    loaded = G.load_backbone(hub, "dinov2_vitt_test", str(tmp_path / "w.pth"))
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_hub_errors(hub, tmp_path):
    with pytest.raises(G.UserError, match="--model dinov2_nope"):
        G.load_backbone(hub, "dinov2_nope")
    with pytest.raises(G.UserError, match="no hubconf.py"):
        G.load_backbone(str(tmp_path), "dinov2_vitt_test")
    bad = {k: v for k, v in G.load_backbone(hub, "dinov2_vitt_test").state_dict().items() if "blocks.3" not in k}
    bad["pos_embed"] = torch.zeros(1, 5, 16)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(G.UserError, match=r"--weights .*bad.pth does not fit.*blocks\.3"):
        G.load_backbone(hub, "dinov2_vitt_test", str(tmp_path / "bad.pth"))


def test_sdpa_patch_is_equivalent(hub):
    plain, patched = G.load_backbone(hub, "dinov2_vitt_test"), G.load_backbone(hub, "dinov2_vitt_test")
    assert G.use_sdpa(patched) == 4  # every block's attention
    x = torch.randn(3, 3, 24, 16)
    torch.testing.assert_close(patched.forward_features(x)["x_norm_clstoken"],
                               plain.forward_features(x)["x_norm_clstoken"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patched.get_intermediate_layers(x, 4), plain.get_intermediate_layers(x, 4),
                               atol=1e-5, rtol=1e-5)


def test_seg_head_projects_before_upsampling_exactly():
    head = G.SegHead(12, 5, 3, 16).double()
    tokens = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    paper = head.mlp(F.interpolate(tokens, size=(16, 16), mode="bilinear", align_corners=False))  # upsample, project
    torch.testing.assert_close(head(tokens), paper, atol=1e-12, rtol=0)
    assert head(tokens, size=(24, 24)).shape == (2, 3, 24, 24)


# -----------------------------------------------------------------------------
# Data: real layouts

def test_tinyimagenet_layout(tmp_path):
    rng = np.random.default_rng(0)
    wnids = ["n01", "n02"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        os.makedirs(tmp_path / "train" / w / "images")
        for i in range(3):
            _image(rng, 0, 8).save(tmp_path / "train" / w / "images" / f"{w}_{i}.JPEG")
    os.makedirs(tmp_path / "val" / "images")
    rows = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
    for f, _ in rows:
        _image(rng, 0, 8).save(tmp_path / "val" / "images" / f)
    (tmp_path / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t7\t7\n" for f, w in rows))
    train = G.TinyImageNet(str(tmp_path), "train", G.cls_transform(8, True))
    val = G.TinyImageNet(str(tmp_path), "test", G.cls_transform(8, False))
    assert len(train) == 6 and train.targets == [0, 0, 0, 1, 1, 1]
    assert val.targets == [1, 0, 1] and val[0][0].shape == (3, 8, 8)


def test_seg_dataset_joint_transform(vocfolder):
    ds = G.DATASETS["voc"].build(vocfolder, "train", G.seg_transform(32, True), 21)
    img, mask = ds[0]
    assert img.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}  # nearest neighbour: no blended label values


def test_cocostuff_and_ade_tables():
    coco = G.coco_table(171)  # stored ids 0..181; 11 is an unused thing id; 12 is the 12th used id
    assert len(G.COCO_IDS) == 171 and coco[0] == 0 and coco[11] == 255 and coco[12] == 11 and coco[181] == 170
    assert coco[255] == 255
    ade = G.ade_table(150)  # 0 = "other" -> ignore; 1..150 -> 0..149; anything else is invalid
    assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149 and ade[151] == -1


def test_ade20k_and_cocostuff_layouts(tmp_path):
    rng = np.random.default_rng(2)
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    coco = tmp_path / "coco"
    for images, masks, raw in ((ade / "images" / "validation", ade / "annotations" / "validation", [0, 1, 150]),
                               (coco / "images" / "val2017", coco / "stuffthingmaps" / "val2017", [0, 12, 181, 255])):
        os.makedirs(images)
        os.makedirs(masks)
        _image(rng, 0, 8).save(images / "a.jpg")
        Image.fromarray(np.resize(np.array(raw, np.uint8), (8, 8))).save(masks / "a.png")  # grey PNG
    y_ade = G.DATASETS["ade20k"].build(str(tmp_path / "ade"), "test", G.seg_transform(8, False), 150)[0][1]
    y_coco = G.DATASETS["cocostuff"].build(str(coco), "test", G.seg_transform(8, False), 171)[0][1]
    # ADE20k: 0 -> ignore, 1 -> 0, 150 -> 149. COCO-stuff: 0 -> 0, 12 -> 11 (id 11 is unused), 181 -> 170.
    assert y_ade[0, :3].tolist() == [255, 0, 149] and y_coco[0, :4].tolist() == [0, 11, 170, 255]
    with pytest.raises(G.UserError, match="no images found"):
        G.DATASETS["ade20k"].build(str(tmp_path / "ade"), "train", G.seg_transform(8, True), 150)


# -----------------------------------------------------------------------------
# Evaluation: kNN, confusion matrix, metrics

def _at(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_by_hand():
    # Training points on the unit circle at 0°, 10° (class 0), 20°, 90° (class 1), 180° (class 2).
    train = torch.tensor([_at(0), _at(10), _at(20), _at(90), _at(180)]) * torch.tensor([[1.0], [2], [3], [1], [5]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    # Query 12°, k = 3: nearest are 10° (0), 20° (1), 0° (0) -> votes 0:2, 1:1 -> class 0.
    # Query 16°, k = 2: nearest 20° (1), 10° (0) -> tie 1:1 -> nearest wins -> class 1.
    # Query 16°, k = 4: 20° (1), 10° (0), 0° (0), 90° (1) -> tie 2:2 -> nearest (20°) -> class 1.
    # Query 170°, k = 3: 180° (2), 90° (1), 20° (1) -> class 1 (majority beats nearest).
    q = torch.tensor([_at(12), _at(16), _at(170)])
    assert G.knn_predict(train, labels, q[:1], k=3).tolist() == [0]
    assert G.knn_predict(train, labels, q[1:2], k=2).tolist() == [1]
    assert G.knn_predict(train, labels, q[1:2], k=4).tolist() == [1]
    assert G.knn_predict(train, labels, q[2:], k=3).tolist() == [1]
    # Cosine, not Euclidean: scaling a training point (x5 above) changes nothing. Accuracy in %:
    # queries 12°, 170° with true labels 0, 2 and k = 3 -> predictions 0, 1 -> 1 of 2 = 50%.
    assert G.knn_accuracy(train, labels, q[[0, 2]], torch.tensor([0, 2]), k=3) == pytest.approx(50.0)


def test_confusion_and_metrics_by_hand():
    # 3 classes; class 2 is absent from both truth and prediction (its one prediction is on an ignored pixel).
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 1, 1, 0, 2, 1])
    conf = G.confusion_matrix(pred, target, 3, 255)
    # rows = truth: class 0 -> predicted 0, 0, 1; class 1 -> predicted 1, 0.
    assert conf.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 0]]
    m = G.segmentation_metrics(conf)
    # tp = [2, 1], gt = [3, 2], pred = [3, 2], union = gt + pred - tp = [4, 3]
    # pixel acc = 3/5 = 60%; IoU_0 = 2/4 = 0.5, IoU_1 = 1/3
    # mIoU over present classes = (0.5 + 0.3333)/2 = 41.667% (counting class 2 as 0 would give 27.78%)
    # frequency-weighted IoU = (3/5)(0.5) + (2/5)(1/3) = 0.3 + 0.1333 = 43.333%
    assert m["pixel_acc"] == pytest.approx(60.0)
    assert m["miou"] == pytest.approx(41.6666667)
    assert m["iou"] == pytest.approx(43.3333333)


# -----------------------------------------------------------------------------
# Training: tiny smoke runs through main(), every trainable parameter must change

def _trainable(net):
    return {k: p.detach().clone() for k, p in net.named_parameters() if p.requires_grad}


def test_smoke_grpo_cls_refreshes_old_each_epoch(hub, imagefolder, tmp_path, monkeypatch):
    calls = []
    refresh = G.refresh_old

    def spy(old, model):
        calls.append((old, _trainable(model)))
        refresh(old, model)
    monkeypatch.setattr(G, "refresh_old", spy)
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--method", "grpo"))
    assert len(calls) == 2  # once per epoch (Algorithm 1, line 3)
    start1, start2, final = calls[0][1], calls[1][1], _trainable(net)
    old = dict(calls[1][0].named_parameters())
    for k in final:
        assert not torch.equal(start1[k], final[k]), f"{k} did not change"
        assert not torch.equal(start1[k], start2[k]), f"{k} did not change in epoch 1"
        assert torch.equal(old[k], start2[k])  # θ_old = the model at the start of the last epoch
    assert len(final) == sum(1 for p in net.parameters()) - 1  # all but DINOv2's mask_token train
    saved = json.load(open(tmp_path / "cls-imagefolder-grpo-eq4-s0" / "result.json"))
    assert saved["metrics"] == result["metrics"] and len(saved["train_loss"]) == 2
    assert 0 <= saved["metrics"]["sr"] <= 100 and 0 <= saved["metrics"]["knn"] <= 100
    assert saved["config"]["method"] == "grpo" and saved["peak_memory_gb"] > 0
    run = tmp_path / "cls-imagefolder-grpo-eq4-s0"
    assert not (run / "ckpt.pt").exists()  # a finished run keeps its backbone, not its resume state
    again = G.load_backbone(hub, "dinov2_vitt_test", str(run / "backbone.pt"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in net.backbone.state_dict().items())


@pytest.mark.parametrize("extra", [["--method", "ce"], ["--method", "grpo", "--uniformity", "eq5", "--dtype", "bf16"]])
def test_smoke_every_parameter_changes(hub, imagefolder, tmp_path, monkeypatch, extra):
    built = []
    build = G.build_model
    monkeypatch.setattr(G, "build_model", lambda *a: built.append(build(*a)) or (built.append(_trainable(built[-1])) or built[0]))
    _, net = G.main(cls_args(hub, imagefolder, tmp_path, *extra))
    for k, p in _trainable(net).items():
        assert not torch.equal(built[1][k], p), f"{k} did not change"


def test_frozen_changes_nothing_and_subset(hub, imagefolder, tmp_path):
    ref = G.load_backbone(hub, "dinov2_vitt_test").state_dict()
    result, net = G.main(cls_args(hub, imagefolder, tmp_path, "--method", "frozen"))
    assert all(torch.equal(net.backbone.state_dict()[k], v) for k, v in ref.items())
    assert result["train_loss"] == []
    result, _ = G.main(cls_args(hub, imagefolder, tmp_path, "--subset", "0.5", "--epochs", "1"))
    assert result["config"]["subset"] == 0.5 and os.path.isdir(tmp_path / "cls-imagefolder-grpo-eq4-sub0.5-s0")


@pytest.mark.parametrize("method,feature", [("grpo", "linear"), ("ce", "linear"), ("grpo", "ms"), ("ce", "ms")])
def test_smoke_seg(hub, vocfolder, tmp_path, monkeypatch, method, feature):
    built = []
    build = G.build_model
    monkeypatch.setattr(G, "build_model", lambda *a: built.append(build(*a)) or (built.append(_trainable(built[-1])) or built[0]))
    result, net = G.main(seg_args(hub, vocfolder, tmp_path, "--method", method, "--feature-type", feature,
                                  "--save-vis", "2"))
    for k, p in _trainable(net).items():
        assert not torch.equal(built[1][k], p), f"{k} did not change"
    m = result["metrics"]
    # 4 val masks of 16x16 with one ignored row: 4 * 15 * 16 = 960 labelled pixels, each counted once
    # (also for the multi-scale path, which averages several scales and flips into one prediction).
    assert m["labelled_pixels"] == 960 and 0 <= m["miou"] <= m["pixel_acc"] <= 100
    run = tmp_path / f"seg-voc-{method}{'-eq4' if method == 'grpo' else ''}-{feature}-s0"
    pngs = sorted(os.listdir(run / "vis"))
    assert pngs == ["000.png", "001.png"] and Image.open(run / "vis" / pngs[0]).size == (48, 16)
    # K = 2 of the 4 val images, spread out: the first (va0, label 1 on the right) and the last (va3, label 2)
    truth = [np.array(Image.open(run / "vis" / p))[8, 28] for p in pngs]  # columns 16-31: the truth panel
    assert truth[0].tolist() == G.voc_palette()[1].tolist() and truth[1].tolist() == G.voc_palette()[2].tolist()
    assert result["config"]["background_penalty"] is True and result["config"]["hidden"] == 64  # VOC defaults


def test_background_penalty_pushes_background_down():
    # At θ = θ_old the logit gradient is -A/c: the penalty lowers A_0, so the background logit is pushed
    # down harder (its gradient, the negative of the push, is larger) than without the penalty.
    z = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    grads = []
    for pen in (False, True):
        z.grad = None
        G.grpo_rm_loss(z, z.detach(), torch.tensor([1]), background_penalty=pen).backward()
        grads.append(z.grad[0, 0].item())
    assert grads[1] > grads[0] > 0


# -----------------------------------------------------------------------------
# DDP: 2 CPU processes with gloo stay in sync

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, argv, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result, net = G.main(argv)
    torch.save({"state": net.state_dict(), "metrics": result["metrics"]}, os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_stay_in_sync(hub, imagefolder, tmp_path):
    argv = cls_args(hub, imagefolder, tmp_path / "runs", "--method", "grpo", "--preload")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["metrics"] == r1["metrics"]
    assert json.load(open(tmp_path / "runs" / "cls-imagefolder-grpo-eq4-s0" / "result.json"))["world_size"] == 2


def _fit_head_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)  # each rank its own shard of cached features
    feats, labels = torch.randn(10 + rank, 6, generator=g), torch.randint(0, 3, (10 + rank,), generator=g)
    args = G.get_args(["--dataset", "imagefolder", "--batch-size", "8", "--eval-epochs", "3", "--eval-lr", "0.1"])
    ctx = G.Ctx(rank, world, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    head = G.fit_head(torch.nn.Linear(6, 3), feats, labels, 21, args, ctx)
    torch.save(head.state_dict(), os.path.join(out, f"head{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_eval_head_stays_in_sync(tmp_path):
    torch.multiprocessing.spawn(_fit_head_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    h0, h1 = (torch.load(tmp_path / f"head{r}.pt") for r in (0, 1))
    assert all(torch.equal(h0[k], h1[k]) for k in h0)  # different shards, averaged gradients, one head
    assert not torch.equal(h0["weight"], torch.nn.Linear(6, 3).weight)


def test_torchrun_cli(hub, vocfolder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           os.path.join(HERE, "grpo_rm.py"), *seg_args(hub, vocfolder, tmp_path, "--epochs", "1")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(tmp_path / "seg-voc-grpo-eq4-linear-s0" / "result.json"))
    assert res["world_size"] == 2 and res["metrics"]["labelled_pixels"] == 960  # every val pixel once


# -----------------------------------------------------------------------------
# Bad input: one clear line, non-zero exit

def _cli(*argv):
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_rm.py"), *argv], capture_output=True, text=True,
                       timeout=120)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:") or "error:" in ln]
    return p.returncode, p.stderr, lines


def test_cli_bad_inputs(hub, imagefolder, vocfolder, tmp_path, monkeypatch):
    base = cls_args(hub, imagefolder, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached hub repositories
    cases = [
        (["--dataset", "nope"], "--dataset"),
        (base + ["--model", "dinov2_vitx99"], "--model dinov2_vitx99"),
        (base + ["--data-dir", str(tmp_path / "missing")], "--data-dir"),
        (base + ["--num-classes", "2"], "--num-classes 2"),
        (base + ["--subset", "1.5"], "--subset"),
        (base + ["--hub-repo", str(tmp_path)], "hubconf.py"),
        (base + ["--img-size", "18"], "--img-size 18"),
        (base + ["--task", "seg"], "--task"),
        (base + ["--method", "ppo"], "--method"),
        (base + ["--uniformity", "eq7"], "--uniformity"),
        (base + ["--data-dir", str(empty)], "--data-dir"),
        (base + ["--out", str(tmp_path / "a_file" / "runs")], "--out"),
        (base + ["--hub-repo", "no-such-owner-x/no-such-repo-x"], "offline"),
    ]
    bad = {k: v for k, v in G.load_backbone(hub, "dinov2_vitt_test").state_dict().items() if k != "norm.weight"}
    torch.save(bad, tmp_path / "bad.pth")
    cases.append((base + ["--weights", str(tmp_path / "bad.pth")], "norm.weight"))
    for argv, needle in cases:
        rc, err, lines = _cli(*argv)
        assert rc != 0 and len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err


def test_cli_bad_seg_files(hub, vocfolder, tmp_path):
    import shutil
    d = tmp_path / "voc"
    shutil.copytree(vocfolder, d)
    masks = d / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    _palette_png(np.full((16, 16), 30, np.uint8), masks / "tr3.png")  # 30 >= 21 classes, not 255
    rc, err, lines = _cli(*seg_args(hub, str(d), tmp_path, "--epochs", "1"))
    assert rc != 0 and len(lines) == 1 and "tr3.png" in lines[0] and "label value 30" in lines[0], err
    os.remove(masks / "tr3.png")
    rc, err, lines = _cli(*seg_args(hub, str(d), tmp_path, "--epochs", "1"))
    assert rc != 0 and len(lines) == 1 and "tr3.png" in lines[0] and "missing" in lines[0], err
    assert not list(tmp_path.glob("*/result.json"))  # nothing reported as final


def test_cli_corrupt_image_and_batch_split(hub, imagefolder, tmp_path):
    import shutil
    d = tmp_path / "data"
    shutil.copytree(imagefolder, d)
    (d / "test" / "class1" / "2.png").write_bytes(b"not a png")
    rc, err, lines = _cli(*cls_args(hub, str(d), tmp_path, "--method", "frozen"))
    assert rc != 0 and len(lines) == 1 and "2.png" in lines[0] and "cannot read image" in lines[0], err
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_rm.py"), *cls_args(hub, imagefolder, tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and "--batch-size 8 is not divisible by the 3 processes" in p.stderr


# -----------------------------------------------------------------------------
# Reliability: checkpoints, exact resume, signals, non-finite stop, atomic writes, failing ranks

def test_exact_resume(hub, imagefolder, tmp_path):
    full, net_full = G.main(cls_args(hub, imagefolder, tmp_path / "a", "--epochs", "3"))
    res, _ = G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3", "--stop-after-epoch", "1"))
    run = tmp_path / "b" / "cls-imagefolder-grpo-eq4-s0"
    assert res is None and (run / "ckpt.pt").exists() and not (run / "result.json").exists()
    assert torch.load(run / "ckpt.pt", weights_only=False)["state"]["epoch"] == 1
    with pytest.raises(G.UserError, match="--resume: .*other settings.*--lr"):
        G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3", "--resume", "--lr", "0.5"))
    resumed, net_res = G.main(cls_args(hub, imagefolder, tmp_path / "b", "--epochs", "3", "--resume"))
    a, b = net_full.state_dict(), net_res.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert resumed["metrics"] == full["metrics"]
    assert resumed["train_loss"] == pytest.approx(full["train_loss"], abs=1e-6)


def test_nonfinite_loss_stops_and_keeps_checkpoint(hub, imagefolder, tmp_path, monkeypatch):
    calls, real = [], G.step_loss

    def poisoned(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) == 5 else loss  # epoch 2 (3 steps an epoch), its 2nd step
    monkeypatch.setattr(G, "step_loss", poisoned)
    with pytest.raises(G.RunStopped, match=r"non-finite .* epoch 2, step 5; last good checkpoint: .*ckpt.pt"):
        G.main(cls_args(hub, imagefolder, tmp_path, "--epochs", "3", "--log-every", "100"))
    ckpt = torch.load(tmp_path / "cls-imagefolder-grpo-eq4-s0" / "ckpt.pt", weights_only=False)
    assert ckpt["state"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "cls-imagefolder-grpo-eq4-s0" / "result.json").exists()


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    G.atomic_save(path, lambda f: torch.save({"epoch": 1}, f))

    def crash(src, dst):
        raise OSError("power cut between the temp write and the rename")
    monkeypatch.setattr(G.os, "replace", crash)
    with pytest.raises(OSError):
        G.atomic_save(path, lambda f: torch.save({"epoch": 2}, f))
    assert torch.load(path) == {"epoch": 1}


def test_sigterm_checkpoints_and_resumes(hub, imagefolder, tmp_path):
    import signal
    argv = [sys.executable, "-u", os.path.join(HERE, "grpo_rm.py"), *cls_args(hub, imagefolder, tmp_path)]
    p = subprocess.Popen(argv + ["--epochs", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:  # wait until training runs
        if line.startswith("epoch 3/"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "stopped by SIGTERM" in err and "--resume" in err, err
    run = tmp_path / "cls-imagefolder-grpo-eq4-s0"
    st = torch.load(run / "ckpt.pt", weights_only=False)["state"]
    assert not (run / "result.json").exists() and st["epoch"] >= 2
    # The run goes on from the checkpoint (mid-epoch or at an epoch's end) and finishes 2 epochs later.
    p = subprocess.run(argv + ["--epochs", str(st["epoch"] + 2), "--resume"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"resumed from {run / 'ckpt.pt'}: epoch {st['epoch'] + 1}, step {st['step_in_epoch']}" in p.stdout
    assert len(json.load(open(run / "result.json"))["train_loss"]) == st["epoch"] + 2


def test_failing_rank_stops_all(hub, imagefolder, tmp_path):
    import shutil
    import time
    d = tmp_path / "data"
    shutil.copytree(imagefolder, d)
    (d / "test" / "class0" / "1.png").write_bytes(b"broken")  # test index 1 -> rank 1's shard only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           os.path.join(HERE, "grpo_rm.py"), *cls_args(hub, str(d), tmp_path, "--method", "frozen")]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and time.time() - t0 < 90
    assert "1.png: cannot read image" in p.stderr
    assert not list(tmp_path.glob("*/result.json"))


# -----------------------------------------------------------------------------
# Performance: preloaded batches, θ_old outside the optimizer, one feature pass per split, --bench

def test_preload_matches_dataloader(imagefolder):
    ds = G.DATASETS["imagefolder"].build(imagefolder, "test", G.cls_transform(24, False))
    raw = G.Preloaded.decode(G.DATASETS["imagefolder"].build(imagefolder, "test", G.v2.ToImage()), torch.device("cpu"), 0)
    idx = [5, 0, 11, 3]
    x, y = next(raw.batches(idx, 4, False, 24))
    ref = torch.stack([ds[i][0] for i in idx])
    assert y.tolist() == [ds[i][1] for i in idx] and x.shape == (4, 3, 24, 24)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=0)  # the same ops, batched
    xt, _ = next(raw.batches(idx, 4, True, 24))  # training: each image is itself or its mirror
    assert all(torch.allclose(a, r, atol=1e-5) or torch.allclose(a, r.flip(-1), atol=1e-5) for a, r in zip(xt, ref))


def test_old_model_outside_optimizer_and_preload_smoke(hub, imagefolder, tmp_path, monkeypatch):
    seen = {}
    prepare = G.prepare_training

    def spy(args, ctx, net):
        seen["model"], seen["params"], seen["opt"] = prepare(args, ctx, net)
        return seen["model"], seen["params"], seen["opt"]
    refresh = G.refresh_old
    monkeypatch.setattr(G, "prepare_training", spy)
    monkeypatch.setattr(G, "refresh_old", lambda old, model: (seen.setdefault("old", old), refresh(old, model)))
    _, net = G.main(cls_args(hub, imagefolder, tmp_path, "--preload"))
    in_opt = {id(p) for g in seen["opt"].param_groups for p in g["params"]}
    assert all(not p.requires_grad and id(p) not in in_opt and p.grad is None for p in seen["old"].parameters())
    assert all(id(p) not in seen["opt"].state for p in seen["old"].parameters())
    assert in_opt == {id(p) for p in net.parameters() if p.requires_grad}


@pytest.mark.parametrize("preload", ["--preload", "--no-preload"])
def test_evaluation_is_one_feature_pass_per_split(hub, imagefolder, tmp_path, monkeypatch, preload):
    images = []
    features = G.Net.features
    monkeypatch.setattr(G.Net, "features", lambda self, x: images.append(len(x)) or features(self, x))
    G.main(cls_args(hub, imagefolder, tmp_path, "--method", "frozen", "--eval-epochs", "5", preload))
    assert sum(images) == 24 + 12  # every train and test image exactly once, for SR and kNN together


def test_bench_smoke(hub, tmp_path):
    argv = ["--bench", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "none"), "--hub-repo", hub,
            "--model", "dinov2_vitt_test", "--img-size", "16", "--batch-size", "8", "--bench-steps", "2",
            "--bench-warmup", "1", "--out", str(tmp_path), "--workers", "0"]
    p = subprocess.run([sys.executable, os.path.join(HERE, "grpo_rm.py"), *argv], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "grpo/ce: time x" in p.stdout
    res = json.load(open(next(tmp_path.glob("bench-*.json"))))
    ce, grpo = res["methods"]["ce"], res["methods"]["grpo"]
    # One extra forward of θ_old: FLOPs between 1x and 1.5x of fine-tuning (forward ≈ 1/3 of a step).
    assert 1.0 < grpo["flops_per_step"] / ce["flops_per_step"] < 1.5
    assert ce["ms_per_step"] > 0 and ce["peak_memory_gb"] > 0


# -----------------------------------------------------------------------------
# Report: tables from run JSONs

def _fake_run(root, name, task, dataset, method, seed, metrics, losses=(), uniformity="eq4", subset=1.0):
    cfg = {"task": task, "dataset": dataset, "data_dir": f"data/{dataset}", "method": method, "uniformity": uniformity,
           "feature_type": "linear", "subset": subset, "seed": seed}
    os.makedirs(root / name)
    (root / name / "result.json").write_text(json.dumps(
        {"config": cfg, "metrics": metrics, "train_loss": list(losses), "sec_per_epoch": [2.0, 4.0][:len(losses)]}))


def test_report_tables(tmp_path):
    _fake_run(tmp_path, "a", "cls", "cifar10", "frozen", 0, {"sr": 50.0, "knn": 40.0})
    for seed, (sr, knn) in enumerate([(60.0, 58.0), (62.0, 60.0)]):
        _fake_run(tmp_path, f"ce{seed}", "cls", "cifar10", "ce", seed, {"sr": sr, "knn": knn}, [1.0, 0.5])
    for seed, (sr, knn) in enumerate([(64.0, 55.0), (66.0, 57.0)]):
        _fake_run(tmp_path, f"g{seed}", "cls", "cifar10", "grpo", seed, {"sr": sr, "knn": knn}, [0.0, -0.1])
    _fake_run(tmp_path, "g100", "cls", "cifar100", "grpo", 0, {"sr": 30.0, "knn": 31.0})
    _fake_run(tmp_path, "g100u", "cls", "cifar100", "grpo", 0, {"sr": 29.0, "knn": 30.0}, [0.1, 0.0], uniformity="none")
    _fake_run(tmp_path, "seg", "seg", "voc", "grpo", 0, {"pixel_acc": 90.0, "iou": 80.0, "miou": 60.0})
    text = G.main(["--report", str(tmp_path)])[0]
    # ce: SR 60, 62 -> mean 61, sample std sqrt(((-1)^2 + 1^2)/1) = 1.41; kNN 58, 60 -> 59 ± 1.41 (best kNN)
    # grpo: SR 64, 66 -> 65 ± 1.41 (best SR); kNN 55, 57 -> 56 ± 1.41; frozen: one run, no ±
    assert "| cifar10 | DINOv2 (frozen) | 50.00 | 40.00 |" in text
    assert "| cifar10 | Fine-tuning | 61.00 ± 1.41 | **59.00 ± 1.41** |" in text
    assert "| cifar10 | GRPO-RM | **65.00 ± 1.41** | 56.00 ± 1.41 |" in text
    assert "| cifar100 | Fine-tuning | — | — |" in text and "| cifar100 | GRPO-RM | 30.00 | 31.00 |" in text
    # Table 6 (cifar100): "set to 0" 29.00 at 3.00 s/epoch (mean of 2 and 4), Eq. (5) missing, Eq. (4) 30.00 best
    assert "| cifar100 | set to 0 | 29.00 | 3.00 |" in text and "| cifar100 | Eq. (5) | — | — |" in text
    assert "| cifar100 | Eq. (4) (GRPO-RM) | **30.00** | — |" in text  # no epoch times: "—", never nan
    assert "| Linear | GRPO-RM | 90.00 | 80.00 | 60.00 |" in text and "| Linear | Fine-tuning | — | — | — |" in text
    curve = (tmp_path / "fig3_cifar10.csv").read_text().splitlines()
    assert curve[0] == "epoch,ce_mean,ce_std,grpo_mean,grpo_std" and curve[2].startswith("2,0.500000,0.000000,-0.100000")
    assert Image.open(tmp_path / "fig3_cifar10.png").size[0] > 0 and (tmp_path / "report.md").exists()
