"""GRPO-RM: Fine-Tuning Representation Models via GRPO-Driven Reinforcement Learning.

Xu, Jiao, Zhang & Li, arXiv 2511.15256: DINOv2 or DINOv3 post-trained with GRPO-RM (--method grpo),
fine-tuned (ce) or not (frozen), then evaluated frozen: SR and kNN, or pixel accuracy / IoU / mIoU.
"Eq. (n)" cites the paper; "Open in the paper:" marks a point it leaves open, and what is done."""
import argparse
import copy
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections import namedtuple
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2

# =============================================================================
# The method: rewards (Eqs. 3-6), advantages (Eq. 2), the clipped objective (Eq. 1, β = 0), θ_old.
# Self-contained (copy, math, torch, torch.nn.functional as F): it can be copied whole.
def uniformity_eq5(p_old, labels):
    c, k = p_old.shape[1], labels[:, None]
    p_k = p_old.gather(1, k)  # (N, 1): the old probability of the true class
    return ((1 - p_k) / (c - 1) - p_old).scatter(1, k, p_k)  # Eq. (5): i ≠ k; p_k for i = k

UNIFORMITY = {  # r_uni (N, c) from the old probabilities (N, c) and the labels (N,)
    "eq4": lambda p_old, labels: -p_old,  # Eq. (4): r_uni_i = -p_i, the GRPO-RM default
    "eq5": uniformity_eq5,
    "none": lambda p_old, labels: torch.zeros_like(p_old),  # Table 6, "set to 0": r_acc alone
}

def rewards(old_probs, labels, uniformity="eq4", background_penalty=False):
    """Algorithm 1, line 6: the rewards (N, c) from the OLD probabilities (N, c) and labels (N,)."""
    c = old_probs.shape[1]
    r = UNIFORMITY[uniformity](old_probs, labels)  # (N, c) r_uni
    r = r.scatter_add(1, labels[:, None], torch.full_like(r[:, :1], c))  # Eqs. (3), (6): +c at k
    if background_penalty:  # Section 3.3, segmentation: r_1 -= c/2 ("class 1" = index 0)
        r[:, 0] -= c / 2
    return r

def advantages(r, eps=1e-4):
    """Eq. (2) over the group, the c classes. Open in the paper: which std; the unbiased, as TRL."""
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)  # (N, c) Eq. (2)

def grpo_rm_loss(logits, old_logits, labels, clip_eps=0.2, uniformity="eq4",
                 background_penalty=False, ignore_index=-100, dual_clip=None, kl_coef=None,
                 with_diagnostics=False):
    """-J(θ) of Eq. (1), β = 0: the group is the c classes of each labelled row of logits (N, c).
    Not in the paper, off by default: dual_clip=C bounds A < 0 terms by C·A; kl_coef=k adds k·KL."""
    keep = labels != ignore_index  # (N,)
    y = labels.masked_fill(~keep, 0)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 under bf16 autocast
    logp = F.log_softmax(logits.to(dtype), -1)  # (N, c) log π_θ(o_i|q)
    logp_old = F.log_softmax(old_logits.detach().to(dtype), -1)  # (N, c) log π_θold(o_i|q)
    A = advantages(rewards(logp_old.exp(), y, uniformity, background_penalty))  # Alg. 1, l. 6-7
    # ρ in log space: p_old may underflow to 0 (in bf16 above all), p / p_old would be inf or NaN.
    log_ratio = (logp - logp_old).masked_fill(~keep[:, None], 0)  # (N, c) log ρ_i; 0 if ignored
    # A ≥ 0: once ρ > 1 + ε the term is (1 + ε)A, so capping ρ at 1 + ε changes no value and no
    # gradient; it only keeps an overflowed ρ (exp(89) in float32) from making 0·inf = NaN.
    # A < 0: unbounded; dual-clip PPO's max(min(ρA, clip(ρ)A), C·A) (Ye et al. 2020) caps ρ at C
    high = math.log(dual_clip) if dual_clip else math.inf
    ratio = torch.where(A < 0, log_ratio.clamp(max=high),
                        log_ratio.clamp(max=math.log1p(clip_eps))).exp()  # (N, c)
    # Eq. (1): 1/G Σ_i min(ρ_i A_i, clip(ρ_i, 1 - ε, 1 + ε) A_i), G = c; then the mean over q
    J = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A).mean(-1)  # (N,)
    if kl_coef:  # PPO's KL penalty (Schulman et al. 2017, Eq. 8), exact over the c classes
        kl = -(logp_old.exp() * log_ratio).sum(-1)  # (N,); its gradient, p - p_old, is bounded
        J = J - kl_coef * kl
    loss = -(J * keep).sum() / keep.sum().clamp(min=1)
    if with_diagnostics:
        return loss, diagnostics(log_ratio, A, logp_old, keep, clip_eps, dual_clip)
    return loss

@torch.no_grad()
def diagnostics(log_ratio, A, logp_old, keep, clip_eps, dual_clip=None):
    """DIAGNOSTICS over the labelled samples: clip_frac, the share of (sample, class) terms the
    clip cuts; approx_kl, KL(π_θold || π_θ) = -Σ_i p_old,i log ρ_i, exact over the c classes (PPO
    code estimates it); ratio_dev_mean/max, of |ρ - 1|; dual_clip_frac, the dual clip's share."""
    n, c = keep.sum().clamp(min=1), log_ratio.shape[1]
    ratio, k = log_ratio.exp(), keep[:, None]  # (N, c), (N, 1)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * A < ratio * A  # (N, c) min took clip
    bounded = (A < 0) & (ratio > dual_clip) if dual_clip else torch.zeros_like(clipped)
    kl = -(logp_old.exp() * log_ratio).sum(-1)  # (N,)
    dev = (ratio - 1).abs()  # (N, c)
    return torch.stack([(clipped & k).sum() / (n * c), (kl * keep).sum() / n,
                        (dev.sum(-1) * keep).sum() / (n * c), (dev.amax(-1) * keep).max(),
                        (bounded & k).sum() / (n * c)])

DIAGNOSTICS = ("clip_frac", "approx_kl", "ratio_dev_mean", "ratio_dev_max", "dual_clip_frac")
# In results/, max |ρ - 1| > 100 came before all 17 collapses, and in no healthy run but those
# with the dual clip, whose ρ overflows (results/README.md, tools/collapse.py): warned once a run
COLLAPSE_WARNING = ("ratio_dev_max", 100.0)

def make_old(model):
    """θ_old: a frozen copy of the WHOLE model (backbone + head): no gradients, no optimizer."""
    return copy.deepcopy(model).requires_grad_(False).eval()

def refresh_old(old, model):
    """Algorithm 1, line 3: π_θold <- π_θ, at the start of every epoch (or every K steps)."""
    old.load_state_dict(model.state_dict())

# =============================================================================
# Model: DINOv2 or DINOv3 from torch.hub, the classification head and the segmentation head
HUB_REPOS = {"dinov2": "facebookresearch/dinov2:b8931f7bf91576930313be2c6d6af376033b35f0",
             "dinov3": "facebookresearch/dinov3:6876159"}  # the commits tested, not main
HUB_TIMEOUT_S = 30  # the longest a download waits on one read (a firewall may drop packets)

class UserError(Exception):
    """Bad input: printed as one line that names the flag or file, exit code 2, no traceback."""

def load_backbone(hub_repo, name, weights=None, hub_kwargs=None):
    """torch.hub.load (GitHub owner/name[:ref] or a clone); weights: a state dict, strictly."""
    kwargs = {**(hub_kwargs or {}), **({"pretrained": False} if weights else {})}
    source = "local" if os.path.isdir(hub_repo) else "github"
    if source == "github" and not re.fullmatch(r"[\w-]+/[\w.-]+(:\S+)?", hub_repo):
        raise UserError(f"--hub-repo {hub_repo}: no such folder, nor a GitHub owner/name[:ref]")
    # torch.hub takes a commit only if it heads a branch or tag, unless validation is skipped
    pinned = re.fullmatch("[0-9a-f]{7,40}", hub_repo.rsplit(":", 1)[-1]) is not None
    try:
        model = torch.hub.load(hub_repo, name, source=source, trust_repo=True,
                               skip_validation=pinned, **kwargs)
    except ModuleNotFoundError as e:  # DINOv3's hub code imports packages DINOv2's does not
        raise UserError(f"--model {name}: its hub code needs {e.name}: pip install torchmetrics "
                        "termcolor") from None
    except Exception as e:  # no hubconf.py, no network, a bad weights file
        if str(e).startswith("Cannot find callable"):
            raise UserError(f"--model {name}: {hub_repo}'s hubconf.py has no such entry point "
                            "(torch.hub.list names them)") from None
        raise UserError(f"--hub-repo {hub_repo} --model {name}: loading failed ({type(e).__name__}"
                        f": {' '.join(str(e).split())[:300]}); offline: git clone the repository,"
                        " then --hub-repo DIR --weights FILE") from None
    if weights:
        try:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as e:  # a mismatch names its keys; not a state dict: no misleading advice
            why = " ".join(str(e).split())[:300] if type(e) is RuntimeError else type(e).__name__
            raise UserError(f"--weights {weights}: cannot load into {name} ({why})") from None
    return model

class SegHead(nn.Module):
    """Tokens (B, D, h, w) -> upsampled to size (4.2: 128) -> 2 per-pixel layers -> (B, c, S, S)."""
    def __init__(self, in_dim, hidden, num_classes, size):
        super().__init__()
        self.size, self.proj = size, nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, tokens, size=None):
        # Linear maps commute with bilinear upsampling (its weights sum to 1): projecting the tokens
        # first is the paper's upsample-then-project at 1/16 of the cost. The ReLU comes after it.
        x = self.proj(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, hidden, h, w)
        size = size or (self.size, self.size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, hidden, S, S)
        return self.out(F.relu(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, c, S, S)

class Net(nn.Module):
    """The post-trained model π_θ: backbone + task head. features() is what evaluation freezes."""
    def __init__(self, backbone, head, task):
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task

    def features(self, x, n_layers=1):  # x (B, 3, H, W)
        if self.task == "cls":
            return self.backbone.forward_features(x)["x_norm_clstoken"]  # (B, D)
        layers = self.backbone.get_intermediate_layers(x, n=n_layers, reshape=True)
        return torch.cat(layers, dim=1)  # (B, n·D, h, w): the last n layers, the last one last

    def forward(self, x):
        return self.head(self.features(x))  # (B, c) or (B, c, S, S)

def build_net(backbone, task, num_classes, hidden, seg_size):
    """Backbone + a fresh head for the task (seed torch first for a reproducible head)."""
    if hasattr(backbone, "mask_token"):  # for masked pre-training only, never trained here
        backbone.mask_token.requires_grad_(False)
    D = backbone.embed_dim
    # cls: two fully connected layers on the class token. Open in the paper: the activation.
    mlp = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    return Net(backbone, mlp if task == "cls" else SegHead(D, hidden, num_classes, seg_size), task)

# =============================================================================
# Data: torchvision's datasets and the real on-disk layouts; downloads where they are allowed
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as DINOv2
IGNORE = 255  # segmentation "no label" (VOC's 255; tools/prepare_data.py maps others to it)
BICUBIC = v2.InterpolationMode.BICUBIC
PREPARE = "python3 tools/prepare_data.py {} --data-dir {} makes it"  # the sets it converts

def read_image(path, mode="RGB"):
    """An image file, converted to mode (None: a mask keeps its own)."""
    try:
        with Image.open(path) as im:
            return im.convert(mode) if mode else im.copy()
    except (OSError, ValueError) as e:  # missing, truncated or not an image
        raise UserError(f"{path}: cannot read image ({e})") from None

def ignore_stops(worker_id=None):
    """A Ctrl-C reaches the whole process group: workers (and later signals) leave it to main()."""
    for s in (signal.SIGINT,) if worker_id is not None else (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)  # a worker dies on SIGTERM: how multiprocessing ends it

def cls_transform(img_size, augment):
    # Open in the paper: augmentation. The lightest: resize, crop (centre: evaluation), flip.
    geo = [v2.RandomCrop(img_size), v2.RandomHorizontalFlip()]
    geo = geo if augment else [v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, interpolation=BICUBIC), *geo,
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])

def seg_transform(img_size, augment):
    # Open in the paper: augmentation. One crop and flip for image and mask (nearest neighbour).
    size = (img_size, img_size)
    geo = [v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()]
    geo = geo if augment else [v2.Resize(size)]
    dtypes = {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}
    return v2.Compose([*geo, v2.ToDtype(dtypes, scale=True), v2.Normalize(MEAN, STD)])

def with_download(root, what, get, hint=None, url=None):
    """get(download): a dataset, downloaded from url if missing, unless a hint says how to make."""
    try:
        return get(False)
    except OSError as e:  # there, but incomplete: a split list is missing
        raise UserError(f"--data-dir {root}: {e}") from None
    except RuntimeError:  # torchvision: "Dataset not found or corrupted": downloaded below
        if hint:
            raise UserError(f"--data-dir {root}: no {what} there; {hint}") from None
    try:
        return get(True)
    except Exception as e:
        raise UserError(f"--data-dir {root}: no {what} there, and downloading {url} failed "
                        f"({type(e).__name__}: {e}); offline, put its files there") from None

def torchvision_set(cls, root, split, transform):
    """CIFAR-10/100 (train=bool), STL-10 (split=str): torchvision's, downloaded when missing."""
    kwargs = {"split": split} if cls is torchvision.datasets.STL10 else {"train": split == "train"}
    get = lambda d: cls(root, download=d, transform=transform, **kwargs)
    return with_download(root, cls.__name__, get, url=cls.url)

def image_folder(prepare, root, split, transform):
    """train/, val/ or test/: a folder a class. Open in the paper: ImageNet's layout; this one."""
    subs = ["train"] if split == "train" else ["val", "test"]  # ImageNet's test/: no labels
    for path in [os.path.join(root, sub) for sub in subs]:
        if os.path.isdir(path):
            try:
                return torchvision.datasets.ImageFolder(path, transform, loader=read_image)
            except (FileNotFoundError, RuntimeError) as e:
                raise UserError(f"--data-dir {root}: {e}") from None
    hint = "; " + PREPARE.format(prepare, root) if prepare else ""
    raise UserError(f"--data-dir {root}: no {' or '.join(s + '/' for s in subs)}{hint}")

def resize_labels(y, size):
    """(B, H, W) label maps -> (B, size, size) by nearest neighbour: never blends two class ids."""
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(y.dtype)

class SegFiles(torchvision.datasets.VOCSegmentation):
    """VOC 2012's layout -> (image (3, S, S), labels (S, S)); 8-bit masks, IGNORE unlabelled."""
    def __init__(self, root, image_set, download, num_classes, transform):
        super().__init__(root, "2012", image_set, download=download)
        self.num_classes, self.transform = num_classes, transform

    def __getitem__(self, i):
        img = tv_tensors.Image(v2.functional.pil_to_tensor(read_image(self.images[i])))
        label = np.array(read_image(self.masks[i], None))  # (H, W) uint8: the classes
        bad = (label >= self.num_classes) & (label != IGNORE)
        if bad.any():
            raise UserError(f"{self.masks[i]}: label value {label[bad][0]} is not a class in [0, "
                            f"{self.num_classes}) nor {IGNORE} (check --num-classes)")
        mask = tv_tensors.Mask(torch.from_numpy(label)[None])
        img, mask = self.transform(img, mask)  # one draw of crop and flip for both
        return img, mask[0]

def voc(download, prepare, root, split, transform, c):
    """VOC (downloaded); ADE20k, COCO-stuff as tools/prepare_data.py leaves them; any VOC layout."""
    get = lambda d: SegFiles(root, "train" if split == "train" else "val", d, c, transform)
    hint = PREPARE.format(prepare, root) if prepare else "put it there"
    url = torchvision.datasets.voc.DATASET_YEAR_DICT["2012"]["url"]
    return with_download(root, "VOCdevkit/VOC2012", get, None if download else hint, url)

# build(root, split, transform[, c]); classes, native side: 0 unknown; background: class 0's penalty
Spec = namedtuple("Spec", "task build classes native background", defaults=(0, 0, False))

TV, P = torchvision.datasets, functools.partial
DATASETS = {
    "cifar10": Spec("cls", P(torchvision_set, TV.CIFAR10), 10, 32),
    "cifar100": Spec("cls", P(torchvision_set, TV.CIFAR100), 100, 32),
    "stl10": Spec("cls", P(torchvision_set, TV.STL10), 10, 96),
    "tinyimagenet": Spec("cls", P(image_folder, "tinyimagenet"), 200, 64),
    "imagenet": Spec("cls", P(image_folder, None), 1000),  # not downloaded: its licence
    "imagefolder": Spec("cls", P(image_folder, None)),  # any image folder; classes from its folders
    "voc": Spec("seg", P(voc, True, None), 21, background=True),  # ADE20k's class 0 is wall
    "ade20k": Spec("seg", P(voc, False, "ade20k"), 150),
    "cocostuff": Spec("seg", P(voc, False, "cocostuff"), 171),
    "vocfolder": Spec("seg", P(voc, False, None)),  # any VOC layout, with --num-classes
}

def default_img_size(spec, patch):
    """Open in the paper: input sizes. Table 5's FLOPs fit CIFAR, STL-10, Tiny-ImageNet at 3, 7, 5
    patches a side (ViT-S/14: 42, 98, 70 px), never below native (patch 8). Else 224, seg 448."""
    if spec.native:
        return max(math.ceil(spec.native / 14), math.ceil(spec.native / patch)) * patch
    return 448 if spec.task == "seg" else 224

def build_data(args, ctx):
    """-> (num_classes, post-training, evaluation's train and test sets); every file read first."""
    spec, root, seg = DATASETS[args.dataset], args.data_dir, args.task == "seg"
    num_classes = args.num_classes or spec.classes
    def make(split, augment):
        if seg:
            return spec.build(root, split, seg_transform(args.img_size, augment), num_classes)
        return spec.build(root, split, cls_transform(args.img_size, augment))
    train = rank0_first(ctx, lambda: make("train", args.augment))  # rank 0 downloads
    train_eval, test = make("train", False), make("test", False)
    if not seg and train.classes != test.classes:  # else the test labels would name others
        raise UserError(f"--data-dir {root}: the test/val classes differ from train/")
    if not seg and args.num_classes not in (None, len(train.classes)):
        raise UserError(f"--num-classes {args.num_classes}: --data-dir {root} has "
                        f"{len(train.classes)} classes")
    num_classes = num_classes if seg else len(train.classes)
    def read_all(data, rank=0, world=1):  # -> the highest class of the labels read
        top = -1
        part = Subset(data, range(rank, len(data), world))
        for _, y in DataLoader(part, 16, num_workers=args.workers, worker_init_fn=ignore_stops):
            top = max(top, int(y.masked_fill(y == IGNORE, -1).max()))
        return top
    agree(ctx, lambda: read_all(train_eval, ctx.rank, ctx.world))
    def check_test():
        top = read_all(test)
        if seg and not args.num_classes and top + 1 != num_classes:
            raise UserError(f"--data-dir {root}: its test masks hold classes 0-{top}, not the "
                            f"{num_classes} of --dataset {args.dataset} (else: --num-classes)")
    rank0_first(ctx, check_test, alone=True)
    if args.subset < 1.0:  # the paper's "10%" rows: a fixed random subset, for post-training only
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        k = round(args.subset * len(train))
        if k < ctx.world:  # a rank without an image: nothing to train on
            raise UserError(f"--subset {args.subset}: {k} of {len(train)} images, fewer than the "
                            f"{ctx.world} process(es)")
        train = Subset(train, keep[:k].tolist())
    return num_classes, train, train_eval, test

# =============================================================================
# Training: Adam, cosine learning rate, bf16 autocast, DDP; checkpoints at every epoch's end
Ctx = namedtuple("Ctx", "rank world device dtype wait_group")  # the process, from setup()

def autocast(device, dtype):
    """bf16 autocast (float32 weights and optimizer), or nothing for float32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=dtype == torch.bfloat16)

def setup(device, dtype, backend=None):
    """-> Ctx; under torchrun the process group (NCCL on GPU, else gloo), gloo's for long waits."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    dev = torch.device("cpu")
    if device == "cuda":
        if backend == "nccl" and local >= torch.cuda.device_count():
            raise UserError("--nproc_per_node: more processes than GPUs (NCCL needs one each)")
        dev = torch.device("cuda", local % torch.cuda.device_count())  # gloo may share one
        torch.cuda.set_device(dev)
        # Open in the paper: TF32. Matrix products under --dtype fp32 use TF32 on GPUs that have it.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)  # env:// from torchrun
    wait_group = dist.new_group(backend="gloo", timeout=timedelta(hours=12)) if world > 1 else None
    return Ctx(rank, world, dev, torch.bfloat16 if dtype == "bf16" else torch.float32, wait_group)

def agree(ctx, fn):
    """fn() on every rank; if it fails on one, all stop, and rank 0 alone says the first failure
    (a crash keeps its traceback): the others learn of it here, not from a closed socket."""
    try:
        out, error = fn(), None
    except Exception as e:  # a bad input (UserError) or a crash: the others must not wait
        out, error = None, e
    said = [None if error is None else str(error)] * ctx.world
    if ctx.world > 1:  # over the gloo group: NCCL's watchdog would end a long wait
        dist.all_gather_object(said, said[ctx.rank], group=ctx.wait_group)
    if error is not None and (ctx.rank == 0 or not isinstance(error, UserError)):
        raise error
    if any(m is not None for m in said):
        raise UserError(next(m for m in said if m is not None))
    return out

def rank0_first(ctx, fn, alone=False):
    """fn() on rank 0 (a download, the hub cache), then, unless alone, on the others."""
    out = agree(ctx, fn if ctx.rank == 0 else lambda: None)
    return out if ctx.rank == 0 or alone else fn()

LOSS_FLAGS = ("clip_eps", "uniformity", "background_penalty", "dual_clip", "kl_coef")

def make_loss(method, ignore_index, compile=False, **options):
    """fn(logits, old logits, labels) -> (loss, diagnostics): -J (LOSS_FLAGS) or cross-entropy."""
    def cross_entropy(z, z_old, y):  # the mean over the labelled samples, 0 if there are none
        loss = F.cross_entropy(z.float(), y, ignore_index=ignore_index, reduction="sum")
        return loss / (y != ignore_index).sum().clamp(min=1), None
    if method == "ce":
        return cross_entropy
    loss = functools.partial(grpo_rm_loss, ignore_index=ignore_index, with_diagnostics=True,
                             **options)
    return torch.compile(loss, dynamic=True) if compile else loss

def make_models(net, method, world=1, compile=False):
    """-> (the model trained, DDP over several processes; θ_old or None; θ_old's forward)."""
    net.eval()  # Open in the paper: the mode. Eval as θ_old: ρ = 1 at refresh (DINOv3 jitters RoPE)
    old = make_old(net) if method == "grpo" else None
    model = DDP(net) if world > 1 else net  # gradients averaged over ranks
    model = torch.compile(model) if compile else model
    return model, old, torch.compile(old) if compile and old is not None else old

def make_optimizer(net, lr, batch_size, steps, device):
    """Adam (no weight decay), cosine over steps from lr·m/256 to (lr/100)·m/256 (Section 4.2)."""
    params = [p for p in net.parameters() if p.requires_grad]  # the mask_token is not
    opt = torch.optim.Adam(params, lr=lr * batch_size / 256, fused=str(device).startswith("cuda"))
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, lr / 100 * batch_size / 256)

def train_step(model, old, opt, loss_fn, x, y, seg=False, dtype=torch.float32, world=1):
    """One optimisation step on a device batch -> [loss, grad norm, *diagnostics]: no host sync."""
    def flat(z):  # (B, c, S, S) -> (B·S·S, c), pixel-major like the labels; a view, not a
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if seg else z  # copy: NHWC memory
    with autocast(x.device, dtype):
        with torch.no_grad():  # π_θold(·|x), Algorithm 1 line 5; first, so that its transient
            old_logits = None if old is None else flat(old(x))  # activations are freed first
        logits = model(x)  # (B, c) or (B, c, S, S)
        if seg:  # every labelled pixel of the S × S logit map is a sample
            y = resize_labels(y, logits.shape[-1]).reshape(-1)  # (B·S·S,)
        loss, diag = loss_fn(flat(logits), old_logits, y)
    if seg and world > 1:  # the mean over every rank's labelled pixels: DDP averages the ranks'
        n = (y != IGNORE).sum().float()  # gradients, so each rank's mean counts by its share
        total = n.clone()
        dist.all_reduce(total)
        loss = loss * n * world / total.clamp(min=1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], math.inf)  # measures only
    opt.step()
    diag = [] if diag is None else diag.float()
    return torch.stack([loss.detach().float(), gnorm.float(), *diag])

def train(args, ctx, net, train_set, run_dir):
    """Algorithm 1 (ce: fine-tuning) -> the history (None: stopped early); rank 0 writes the log."""
    # The same shuffle on every rank (seed, epoch), each rank its share: the global batch is m.
    loader = DataLoader(train_set, args.batch_size // ctx.world, num_workers=args.workers,
                        sampler=DistributedSampler(train_set, ctx.world, ctx.rank, seed=args.seed),
                        pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stops)
    model, old, old_fwd = make_models(net, args.method, ctx.world, args.compile)
    steps, seg = len(loader), args.task == "seg"  # a rank's steps an epoch
    opt, sched = make_optimizer(net, args.lr, args.batch_size, args.epochs * steps, ctx.device)
    loss_fn = make_loss(args.method, IGNORE if seg else -100, args.compile,
                        **{k: getattr(args, k) for k in LOSS_FLAGS})
    keys = ["step", "lr", "loss", "grad_norm", *(DIAGNOSTICS if old is not None else [])]
    hist = {"train_loss": [], "sec_per_epoch": [], "series": {k: [] for k in keys},
            "collapse_warning": None}  # the step of the collapse warning, if there was one
    ckpt, start = os.path.join(run_dir, "ckpt.pt"), 0
    if args.resume and os.path.isfile(ckpt):
        start, hist = load_checkpoint(ckpt, vars(args), ctx.world, net, old, opt, sched)
        if ctx.rank == 0:
            print(f"resumed from {ckpt}: epoch {start + 1}", flush=True)
    log = os.path.join(run_dir, "metrics.jsonl") if ctx.rank == 0 else None
    if log:  # from the history: a resumed run's log has no step twice and none missing
        append_log(log, [r for e in range(start) for r in log_rows(hist, e, steps)], "w")
    for epoch in range(start, args.stop_after_epoch or args.epochs):
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(args.seed * 100_003 + ctx.rank * 1009 + epoch)  # augmentation draws
        t0, rows = time.time(), []
        for i, (x, y) in enumerate(loader):
            s = epoch * steps + i
            if old is not None and (s % args.old_every == 0 if args.old_every else i == 0):
                refresh_old(old, net)  # Algorithm 1, line 3: once an epoch, or every --old-every
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            row = train_step(model, old_fwd, opt, loss_fn, x, y, seg, ctx.dtype, ctx.world)
            rows.append((s, sched.get_last_lr()[0], row))
            sched.step()
            if s % args.log_every == 0 or i == steps - 1:  # the loop's only host syncs
                flush(rows, hist, ctx.world, epoch, ckpt, log)
                if ctx.rank == 0:
                    progress(hist, epoch, args.epochs, steps, t0, (i + 1) * args.batch_size)
        hist["train_loss"].append(float(np.mean(hist["series"]["loss"][-steps:])))
        hist["sec_per_epoch"].append(time.time() - t0)
        if ctx.rank == 0:  # everything --resume needs, written atomically
            append_log(log, log_rows(hist, epoch, steps)[-1:])
            state = {"model": net.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1,
                     "sched": sched.state_dict(), "hist": hist, "config": vars(args),
                     "world": ctx.world, "old": old.state_dict() if old is not None else None}
            atomic_save(ckpt, functools.partial(torch.save, state))
    if args.stop_after_epoch and ctx.rank == 0:
        print(f"stopped after epoch {args.stop_after_epoch}; rerun with --resume to go on")
    return None if args.stop_after_epoch else hist

def flush(rows, hist, world, epoch, ckpt, log=None):
    """Buffered steps -> hist["series"] (the mean over ranks, ratio_dev_max the max) and the log."""
    steps, lrs, rows_t = zip(*rows)
    t = torch.stack(rows_t)  # (steps, values)
    keys = [k for k in hist["series"] if k not in ("step", "lr")]
    if world > 1:
        top = t.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(t)
        is_max = torch.tensor([k == "ratio_dev_max" for k in keys], device=t.device)
        t = torch.where(is_max, top, t / world)
    rows.clear()
    values = dict(zip(keys, t.T.tolist()))
    for s, a, b in zip(steps, values["loss"], values["grad_norm"]):
        if not math.isfinite(a + b):
            last = ckpt if os.path.isfile(ckpt) else "none"
            raise RunStopped(f"non-finite loss or gradient at epoch {epoch + 1}, step {s + 1}; "
                             f"last good checkpoint: {last} (lower --lr or use --dtype fp32)")
    for k, v in [("step", steps), ("lr", lrs), *values.items()]:
        hist["series"][k] += list(v)
    if log:  # rank 0, whose history is kept: the live log, and the warning once a run
        append_log(log, [dict(zip(hist["series"], r)) for r in zip(steps, lrs, *values.values())])
    key, limit = COLLAPSE_WARNING
    over = [s for s, v in zip(steps, values.get(key, ())) if v > limit]
    if log and over and hist["collapse_warning"] is None:
        hist["collapse_warning"] = over[0]
        print(f"warning: {key} > {limit:g} at step {over[0] + 1}: in our runs a collapse followed; "
              "--dual-clip 3 --kl-coef 1, or a lower --lr, kept them stable", flush=True)

def log_rows(hist, epoch, per_epoch):
    """The live log's objects for one finished epoch: its steps (the series' keys), then its own."""
    s, steps = hist["series"], range(epoch * per_epoch, (epoch + 1) * per_epoch)
    return [{k: v[j] for k, v in s.items()} for j in steps] + [
        {"epoch": epoch + 1, "train_loss": hist["train_loss"][epoch],
         "sec_per_epoch": hist["sec_per_epoch"][epoch]}]

def append_log(path, rows, mode="a"):
    """metrics.jsonl: a JSON object a line, on disk at once (tail -f shows it; a crash keeps it)."""
    with open(path, mode) as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

def progress(hist, epoch, epochs, per_epoch, t0, n_images):
    """One line per --log-every steps: where, the last step's values, speed, training's ETA."""
    s = hist["series"]
    done = s["step"][-1] + 1
    elapsed = time.time() - t0
    eta = elapsed / (done - epoch * per_epoch) * (epochs * per_epoch - done)
    line = [f"epoch {epoch + 1}/{epochs} step {done}/{epochs * per_epoch}"]
    line += [f"{k} {v[-1]:.3g}" for k, v in s.items() if k != "step"]
    line += [f"{n_images / elapsed:.0f} img/s", f"training ETA {timedelta(seconds=round(eta))}"]
    print(" | ".join(line), flush=True)

class RunStopped(UserError):
    """Stopped early (a signal, a non-finite loss, a full disk): exit code 3; --resume goes on."""

def atomic_save(path, write):
    """A temp file, fsync, rename: never a half-written file, nor a temp file left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

# Flags that do not change what a run computes, and its evaluation's: both may change on --resume
LOGISTICS = {"out", "name", "resume", "force", "stop_after_epoch", "log_every", "eval_memory_gb",
             "compile", "dist_backend"}
RESUMABLE = LOGISTICS | {"save_vis", "eval_epochs", "eval_lr", "feature_type", "ms_scales"}

def changed(old, new, same_ok):
    """The flags (as --flag) whose values differ between two configs, those in same_ok aside."""
    keys = sorted(k for k in set(old) | set(new) if k not in same_ok and old.get(k) != new.get(k))
    return ", ".join(f"--{k.replace('_', '-')}" for k in keys)

def load_checkpoint(path, config, world, net, old, opt, sched):
    """-> (the next epoch, the history), or a UserError for other settings or world size."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["world"] != world:  # other shards, augmentation draws and steps an epoch
        raise UserError(f"--resume: {path} was written by {ckpt['world']} processes, not {world}")
    diff = changed(ckpt["config"], config, RESUMABLE)
    if diff:
        raise UserError(f"--resume: {path} was written with other settings ({diff})")
    stop = config["stop_after_epoch"]
    if (stop or math.inf) <= ckpt["epoch"]:  # the run would never stop
        raise UserError(f"--stop-after-epoch {stop}: {path} is at epoch {ckpt['epoch']}")
    for part, key in [(net, "model"), (old, "old"), (opt, "opt"), (sched, "sched")]:
        if part is not None:  # θ_old is None for fine-tuning
            part.load_state_dict(ckpt[key])
    return ckpt["epoch"], ckpt["hist"]

# =============================================================================
# Evaluation on frozen features (SR, kNN, pixel accuracy / IoU / mIoU): one backbone pass a split,
# then a fresh head on the cached features. Rank 0 alone, plain values: one result, any world size.
@torch.no_grad()
def extract(features, loader, device, dtype=torch.float32, spill=None, memory_gb=8.0,
            label_size=None):
    """A frozen model's features over a loader -> (features, labels at label_size) on the host in
    dtype; beyond memory_gb, memory-mapped from files in spill (COCO-stuff at 448 px)."""
    feats = labels = None
    i, n, t0 = 0, len(loader.dataset), time.time()
    for b, (x, y) in enumerate(loader):
        if b % max(1, len(loader) // 5) == 0 and i:  # 5 lines a split
            say_progress("features", i, n, "images", t0)
        with autocast(device, dtype):
            f = features(x.to(device, non_blocking=True)).to(dtype)
        y = y if label_size is None else resize_labels(y, label_size).to(torch.uint8)
        if feats is None:  # the shapes are known now
            per_image = f[0].numel() * f.element_size() + y[0].numel() * y.element_size()
            on_disk = spill is not None and n * per_image > memory_gb * 2**30
            feats = host_tensor((n, *f.shape[1:]), f.dtype, on_disk and f"{spill}/feats.bin")
            labels = host_tensor((n, *y.shape[1:]), y.dtype, on_disk and f"{spill}/labels.bin")
        feats[i:i + len(f)], labels[i:i + len(f)] = f.cpu(), y
        i += len(f)
    return feats[:i], labels[:i]  # a loader may skip samples (drop_last, a sampler)

def say_progress(what, done, total, unit, t0):
    """An evaluation phase's progress line: how far, and the time left at the pace so far."""
    eta = timedelta(seconds=round((time.time() - t0) / done * (total - done)))
    print(f"  {what}: {done}/{total} {unit}, ETA {eta}", flush=True)

def host_tensor(shape, dtype, path):
    """A tensor in RAM, or (path given) memory-mapped from that file, made or grown to fit."""
    if not path:
        return torch.empty(shape, dtype=dtype)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)

def fit_head(head, feats, labels, epochs, batch_size, lr, device, dtype=torch.float32,
             cols=slice(None), ignore_index=-100, seed=0, name="head"):
    """A fresh head on cached features (columns cols) with training's optimizer, lr and loss."""
    steps = epochs * math.ceil(len(feats) / batch_size)
    opt, sched = make_optimizer(head, lr, batch_size, steps, device)
    cross_entropy = make_loss("ce", ignore_index)
    gen, t0 = torch.Generator().manual_seed(seed), time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(feats), generator=gen).split(batch_size):
            idx = idx.sort().values  # a memory-mapped cache is read front to back
            x = feats[idx, cols].to(device).float()  # (b, D) or (b, D, h, w): those layers
            y = labels[idx].to(device).long()  # label maps cached at the head's output size
            train_step(head, None, opt, cross_entropy, x, y, False, dtype)  # training's step
            sched.step()
        if (epoch + 1) % max(1, epochs // 5) == 0:
            say_progress(name, epoch + 1, epochs, "epochs", t0)
    return head.eval()

def knn_predict(train_feats, train_labels, test_feats, k=5, chunk=1024):
    """Cosine kNN: the k nearest's majority, ties to the nearest. Open in the paper: all but k."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k, c = min(k, len(train)), int(train_labels.max()) + 1
    # The j-th nearest votes 1 + 2^-(j+1): the extras sum below 1 and only break ties, nearest first
    weight = 1 + 0.5 ** torch.arange(1, k + 1, device=train.device)  # (k,)
    preds = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):  # (q, D)
        nn_lab = train_labels[(q @ train.T).topk(k, dim=1).indices]  # (q, k), nearest first
        votes = torch.zeros(len(q), c, device=q.device)
        preds.append(votes.scatter_add_(1, nn_lab, weight.expand(len(q), k)).argmax(1))
    return torch.cat(preds)

def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE):
    """(c, c) counts, rows = ground truth, columns = prediction; ignore_index pixels skipped."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)

def segmentation_metrics(conf):
    """Pixel accuracy, IoU, mIoU (%). Open in the paper: "IoU"; here Σ_c freq_c IoU_c (true freq.),
    as its IoU is always far above its mIoU (87.0, 66.8 on VOC). mIoU: classes in truth or pred."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_acc": 100 * (tp.sum() / conf.sum()).item(),
            "iou": 100 * ((gt[present] / gt.sum()) * iou).sum().item(),
            "miou": 100 * iou.mean().item()}

def evaluate_cls(net, train_loader, test_loader, num_classes, device, dtype=torch.float32,
                 spill=None, memory_gb=8.0, **fit):
    """-> {"sr", "knn"} in % on net's frozen features. fit: fit_head's epochs, batch_size, lr."""
    tr_f, tr_y = extract(net.features, train_loader, device, dtype, spill, memory_gb)
    te_f, te_y = extract(net.features, test_loader, device, dtype)
    torch.manual_seed(fit.get("seed", 0))
    head = nn.Linear(tr_f.shape[1], num_classes).to(device)  # SR: softmax regression
    head = fit_head(head, tr_f, tr_y, device=device, dtype=dtype, name="SR head", **fit)
    with torch.no_grad(), autocast(device, dtype):
        sr = torch.cat([head(f.to(device).float()).argmax(1).cpu() for f in te_f.split(4096)])
    knn = knn_predict(tr_f.to(device), tr_y.to(device), te_f.to(device)).cpu()
    return {k: 100 * (p == te_y).double().mean().item() for k, p in (("sr", sr), ("knn", knn))}

@torch.no_grad()
def predict_seg(net, head, x, seg_size, ms_scales=(), dtype=torch.float32):
    """Probabilities (B, c, H, W): "linear" (no ms_scales) or "ms", DINOv2's scales and flips."""
    (H, W), p = x.shape[-2:], net.backbone.patch_size
    views = [(s, flip) for s in ms_scales for flip in (False, True)] or [(1, False)]
    probs = 0
    for s, flip in views:
        size = (max(p, round(H * s / p) * p), max(p, round(W * s / p) * p))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        with autocast(x.device, dtype):
            f = net.features(xs.flip(-1) if flip else xs, 4 if ms_scales else 1)  # (B, n·D, h, w)
            z = head(f, size=(round(seg_size * s),) * 2)  # (B, c, S·s, S·s)
        z = F.interpolate(z.float(), size=(H, W), mode="bilinear", align_corners=False)
        probs = probs + (z.flip(-1) if flip else z).softmax(1)  # the flip undone
    return probs / len(views)

def evaluate_seg(net, train_loader, test_loader, num_classes, hidden, seg_size, device,
                 dtype=torch.float32, feature_types=("linear",), ms_scales=(1, 1.32, 1.73, 2.28, 3),
                 save_vis=0, spill=None, memory_gb=8.0, **fit):
    """-> ({feature type: metrics}, None or save_vis test images spread evenly: uint8 "image",
    "truth", "pred", "index"); a fresh SegHead per type. test_loader: small batches (16: 1.9 GB)."""
    D, n_layers = net.backbone.embed_dim, 4 if "ms" in feature_types else 1
    tr_f, tr_y = extract(functools.partial(net.features, n_layers=n_layers), train_loader,
                         device, dtype, spill, memory_gb, seg_size)
    heads = {}
    for ft in feature_types:  # Open in the paper: the head. Training's, fresh, for each
        torch.manual_seed(fit.get("seed", 0))
        head = SegHead(D * (4 if ft == "ms" else 1), hidden, num_classes, seg_size).to(device)
        cols = slice(None) if ft == "ms" else slice(-D, None)  # linear: the last layer
        heads[ft] = fit_head(head, tr_f, tr_y, device=device, dtype=dtype, cols=cols,
                             ignore_index=IGNORE, name=f"{ft} head", **fit)
    del tr_f, tr_y
    conf = {ft: torch.zeros(num_classes, num_classes, dtype=torch.long) for ft in heads}
    n = len(test_loader.dataset)  # Figure 2's material: evenly spaced (not one scene's frames)
    picks = torch.linspace(0, n - 1, save_vis).round().long().unique() if save_vis else []
    shown, i = [], 0
    for x, y in test_loader:
        preds = {ft: predict_seg(net, h, x.to(device), seg_size, ms_scales if ft == "ms" else (),
                                 dtype).argmax(1).cpu() for ft, h in heads.items()}  # (B, H, W)
        for ft, pred in preds.items():
            conf[ft] += confusion_matrix(pred, y, num_classes)
        sel = [j for j in range(len(x)) if i + j in picks]  # the first feature type's prediction
        shown.append((x[sel], y[sel], preds[feature_types[0]][sel]))
        i += len(x)
    vis = None
    if save_vis:  # label maps keep IGNORE = 255
        x, y, pred = (torch.cat(t) for t in zip(*shown))
        img = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)  # (K, 3, H, W)
        vis = {"image": img.clamp(0, 1).mul(255).round().byte(), "truth": y.byte(),
               "pred": pred.byte(), "index": picks}
    return {ft: segmentation_metrics(cm) | {"labelled_pixels": int(cm.sum())}
            for ft, cm in conf.items()}, vis

# =============================================================================
# Main: one run = data, model, post-training, evaluation, result.json
def run(args, ctx):
    """One experiment -> (result, Net); (None, Net) on the other ranks and after an early stop."""
    torch.manual_seed(args.seed)  # a randomly initialised backbone: the same on every rank
    backbone = rank0_first(ctx, lambda: load_backbone(args.hub_repo, args.model, args.weights,
                                                      args.hub_kwargs))  # the hub's cache
    patch = backbone.patch_size
    args.img_size = args.img_size or default_img_size(DATASETS[args.dataset], patch)
    if args.img_size % patch:
        raise UserError(f"--img-size {args.img_size} is not a multiple of the patch size {patch}")
    run_dir = os.path.join(args.out, args.name or run_name(args))
    done = os.path.join(run_dir, "result.json")  # a run folder is never silently overwritten:
    if os.path.exists(done) and not args.force:  # a finished run is not run again
        with open(done) as f:
            result = json.load(f)
        diff = changed(result["config"], vars(args), LOGISTICS)
        if diff:
            raise UserError(f"{run_dir} finished with other settings ({diff}): another --name, "
                            "or --force to run it again")
        print(f"{run_dir}: finished already; --force runs it again", flush=True)
        return result, None
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")) and not (args.resume or args.force):
        raise UserError(f"{run_dir} holds an unfinished run: --resume continues it, --force "
                        "starts afresh")
    num_classes, train_set, train_eval, test = build_data(args, ctx)
    torch.manual_seed(args.seed)  # the head's initialisation, reproducible
    net = build_net(backbone, args.task, num_classes, args.hidden, args.seg_size).to(ctx.device)
    try:  # only now: a run that fails before training leaves no folder behind
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot make {run_dir} ({e.strerror})") from None
    if ctx.rank == 0:
        print(f"{os.path.basename(run_dir)}: {len(train_set)} train / {len(test)} test images, "
              f"{num_classes} classes, {args.img_size} px, {ctx.world} process(es) on "
              f"{ctx.device.type}, {str(ctx.dtype)[6:]}", flush=True)
    hist = {"train_loss": [], "sec_per_epoch": [], "series": {}}
    if args.method != "frozen":
        hist = train(args, ctx, net, train_set, run_dir)
    if hist is None or ctx.rank > 0:
        return None, net
    cuda, t0 = ctx.device.type == "cuda", time.time()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    if cuda:  # evaluation's peak apart from training's
        torch.cuda.reset_peak_memory_stats()
    metrics = evaluate(args, ctx, net, train_eval, test, num_classes, run_dir)
    result = {"metrics": metrics, **hist, "eval_seconds": time.time() - t0, "config": vars(args),
              "peak_memory_gb": peak, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "eval_peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    return finish(run_dir, net, result, ctx, save_backbone=args.method != "frozen"), net

def evaluate(args, ctx, net, train_eval, test, num_classes, run_dir):
    """The frozen post-trained backbone under a fresh head -> metrics; vis.pt with --save-vis."""
    print(f"evaluating: {len(train_eval)} + {len(test)} images, {args.eval_epochs} epochs")
    loader = functools.partial(DataLoader, num_workers=args.workers,
                               pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stops)
    fit = dict(epochs=args.eval_epochs, batch_size=args.batch_size, lr=args.eval_lr, seed=args.seed)
    spill = os.path.join(run_dir, "cache")  # features beyond --eval-memory-gb go here
    net, train_loader = net.eval(), loader(train_eval, args.batch_size)
    try:
        if args.task == "cls":
            return evaluate_cls(net, train_loader, loader(test, args.batch_size), num_classes,
                                ctx.device, ctx.dtype, spill, args.eval_memory_gb, **fit)
        metrics, vis = evaluate_seg(
            net, train_loader, loader(test, 16), num_classes, args.hidden, args.seg_size,
            ctx.device, ctx.dtype, args.feature_type, args.ms_scales, args.save_vis, spill,
            args.eval_memory_gb, **fit)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    if vis:  # uint8 tensors, painted by tools/report.py
        atomic_save(os.path.join(run_dir, "vis.pt"), functools.partial(torch.save, vis))
    return metrics

def finish(run_dir, net, result, ctx, save_backbone=True):
    """backbone.pt (for --weights), then result.json: a result on disk means a finished run."""
    result |= {"world_size": ctx.world, "torch": torch.__version__,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if save_backbone:
        atomic_save(os.path.join(run_dir, "backbone.pt"),
                    functools.partial(torch.save, net.backbone.state_dict()))
    text = json.dumps(result, indent=1).encode()
    atomic_save(os.path.join(run_dir, "result.json"), lambda f: f.write(text))
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        os.remove(os.path.join(run_dir, "ckpt.pt"))
    rounded = re.sub(r"\d+\.\d{3,}", lambda m: f"{float(m[0]):.2f}", json.dumps(result["metrics"]))
    print(f"{os.path.basename(run_dir)}: {rounded}", flush=True)
    return result

# =============================================================================
# Config: every flag; the defaults reproduce the paper (Section 4.2)
def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a number of kind in [low, high], or (low, high] if low_open."""
    def parse(text):
        v = kind(text)
        if v < low or (low_open and v == low) or v > high:
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if low_open else '['}{low}, "
                                             f"{high}]")
        return v
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse

POS_INT, POS_FLOAT = number(int, 1), number(float, 0, low_open=True)  # argparse types
FRACTION = number(float, 0, 1, low_open=True)  # --clip-eps, --subset

class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" after a task-dependent default
        return action.help if action.default is None else super()._get_help_string(action)

class Parser(argparse.ArgumentParser):
    def error(self, message):  # under torchrun rank 0 alone says what is wrong; all exit with 2
        if int(os.environ.get("RANK", "0")) > 0:
            time.sleep(10)  # rank 0 may still be importing torch; torchrun would stop it unheard
            sys.exit(2)
        super().error(message)

def make_parser():
    p = Parser(description="GRPO-RM, fine-tuning or frozen DINOv2/DINOv3, evaluated frozen",
               formatter_class=Help)
    a, on_off = p.add_argument, argparse.BooleanOptionalAction
    a("--task", choices=["cls", "seg"], help="default: the dataset's")
    a("--dataset", choices=sorted(DATASETS), required=True, help="what to post-train on")
    a("--data-dir", default="data", help="dataset root (layouts in README.md)")
    a("--num-classes", type=number(int, 2), help="needed for vocfolder; default: the dataset's")
    a("--method", choices=["grpo", "ce", "frozen"], default="grpo", help="ce: fine-tuning")
    a("--model", default="dinov2_vits14", help="dinov2_vit{s,b,l,g}14[_reg], dinov3_vit*16*")
    a("--hub-repo", help="GitHub owner/name[:ref], or a local clone; default: the model's, pinned")
    a("--hub-kwargs", type=json.loads, default="{}", help='e.g. DINOv3\'s {"weights": PATH_OR_URL}')
    a("--weights", help="local state dict of the backbone (offline use); strict load")
    a("--uniformity", choices=sorted(UNIFORMITY), default="eq4", help="Table 6 ablation")
    a("--clip-eps", type=FRACTION, default=0.2, help="ε of Eq. (1)")
    a("--background-penalty", action=on_off, help="seg: r_0 -= c/2 after Eq. (6); default: voc")
    a("--dual-clip", type=number(float, 1, low_open=True), metavar="C", help="not in the paper: "
      "bound the terms of A < 0 below by C·A (dual-clip PPO uses 3)")
    a("--kl-coef", type=number(float, 0), metavar="k", help="not in the paper: + k·KL(π_θold‖π_θ)")
    a("--old-every", type=POS_INT, metavar="K", help="not in the paper: θ_old <- θ every K steps")
    a("--epochs", type=POS_INT, default=100, help="post-training epochs")
    a("--batch-size", type=POS_INT, help="global batch m; default 1024 (cls), 256 (seg)")
    a("--lr", type=POS_FLOAT, help="lr per 256 images, cosine to lr/100; default 1e-3, seg 1e-5")
    a("--subset", type=FRACTION, default=1.0, help="fraction of the training set post-trained on")
    a("--augment", action=on_off, default=True, help="random flip (and crop) in training")
    a("--seed", type=int, default=0, help="heads, shuffling, augmentation, --subset")
    a("--img-size", type=POS_INT, help="default: the paper's patches a side (CIFAR 3, STL-10 7, "
      "Tiny-ImageNet 5), at least the native size; else 224, seg 448")
    a("--seg-size", type=POS_INT, default=128, help="seg: patch tokens are upsampled to this size")
    a("--hidden", type=POS_INT, help="hidden width of the heads; default 256, 64 for voc")
    a("--eval-epochs", type=POS_INT, default=50, help="epochs of the head on frozen features")
    a("--eval-lr", type=POS_FLOAT, help="the same rule for the evaluation head; default --lr")
    a("--feature-type", nargs="+", choices=["linear", "ms"], default=["linear"], help="seg eval")
    a("--ms-scales", nargs="+", type=POS_FLOAT, default=[1, 1.32, 1.73, 2.28, 3], help="of ms")
    a("--eval-memory-gb", type=number(float, 0), default=8.0, help="features beyond go to disk")
    a("--save-vis", type=number(int, 0), default=0, metavar="K", help="seg: K examples, vis.pt")
    a("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is visible")
    a("--dtype", choices=["bf16", "fp32"], help="autocast dtype; default bf16 on GPU, else fp32")
    a("--dist-backend", choices=["nccl", "gloo"], help="torchrun; default nccl on GPU, else gloo")
    a("--compile", action="store_true", help="torch.compile the model, θ_old and the loss")
    a("--workers", type=number(int, 0), help="data loading, per process; default min(8, CPUs)")
    a("--out", default="runs", help="each run writes OUT/NAME/result.json")
    a("--name", help="run name; default: derived from the flags")
    a("--resume", action="store_true", help="continue from OUT/NAME/ckpt.pt if there is one")
    a("--force", action="store_true", help="run again over a finished or unfinished run")
    a("--stop-after-epoch", type=POS_INT, metavar="K", help="checkpoint after epoch K and stop")
    a("--log-every", type=POS_INT, default=10, help="progress line every N steps")
    return p

def get_args(argv=None):
    """Parse the flags and fill the defaults that depend on the task (Section 4.2)."""
    p = make_parser()
    args = p.parse_args(argv)
    spec = DATASETS[args.dataset]
    args.hub_repo = args.hub_repo or HUB_REPOS["dinov3" if "dinov3" in args.model else "dinov2"]
    if not isinstance(args.hub_kwargs, dict):
        p.error(f"argument --hub-kwargs: not a JSON object: {args.hub_kwargs}")
    if args.task not in (None, spec.task):
        p.error(f"--task {args.task}: --dataset {args.dataset} is a {spec.task} dataset")
    args.task, seg = spec.task, spec.task == "seg"
    args.batch_size = args.batch_size or (256 if seg else 1024)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    args.lr = args.lr or (1e-5 if seg else 1e-3)
    args.eval_lr = args.eval_lr or args.lr
    args.hidden = args.hidden or (64 if args.dataset == "voc" else 256)
    if args.background_penalty is None:
        args.background_penalty = spec.background
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    if (args.stop_after_epoch or 0) >= args.epochs:
        p.error(f"argument --stop-after-epoch: {args.stop_after_epoch} >= --epochs {args.epochs}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible")
    if seg and not (args.num_classes or spec.classes):
        p.error(f"--dataset {args.dataset} needs --num-classes")
    if seg and (args.num_classes or 0) > IGNORE:
        p.error(f"--num-classes {args.num_classes}: at most {IGNORE} segmentation classes")
    return args

def run_name(args):
    """Readable parts, then a hash of the flags that set what is trained (not RESUMABLE ones)."""
    cfg = {k: v for k, v in vars(args).items() if k not in RESUMABLE}
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:6]
    parts = [args.task, args.dataset, args.method]
    parts += [args.uniformity] if args.method == "grpo" else []
    parts += [f"sub{args.subset:g}"] if args.subset < 1 else []
    parts += [f"dc{args.dual_clip:g}"] if args.dual_clip else []
    parts += [f"old{args.old_every}"] if args.old_every else []
    return "-".join(parts + [f"s{args.seed}", digest])

STOPPED = []  # the RunStopped of the first stop signal

def stop(signum, _, main_pid=os.getpid()):
    """SIGTERM, SIGINT: one line; later ones ignored (torchrun's SIGTERM follows a Ctrl-C)."""
    if os.getpid() != main_pid:  # a DataLoader worker forked, its worker_init_fn not yet run
        os._exit(0)  # main() says it: quietly, no traceback
    ignore_stops()
    STOPPED.append(RunStopped(f"stopped by {signal.Signals(signum).name}: rerun with --resume to "
                              "go on from the last finished epoch"))
    raise STOPPED[-1]

def main(argv=None):
    args = get_args(argv)
    STOPPED.clear()  # a new run (main() may run several times in one process)
    socket.setdefaulttimeout(HUB_TIMEOUT_S)  # torch.hub's and torchvision's reads: not forever
    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return run(args, setup(args.device, args.dtype, args.dist_backend))
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()

def cli(argv=None):
    """The command line: a bad input is one line on stderr (exit 2), a stop one line (exit 3)."""
    ignore_stops()  # until main() is in charge, and after it
    try:
        main(argv)
    except Exception as e:
        full = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the OSError
        if not isinstance(e, UserError):
            if STOPPED:  # the stop signal broke a collective or a write
                e = STOPPED[0]
            elif getattr(full, "errno", None) in (errno.ENOSPC, errno.EDQUOT):  # a full disk
                e = RunStopped(f"{full.strerror}: free space at --out, then rerun with --resume")
            else:
                raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 alone says it (agree)
            msg = str(e).strip().splitlines()[-1]  # a worker's UserError comes as traceback text
            print(f"error: {msg.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(3 if isinstance(e, RunStopped) else 2)

if __name__ == "__main__":
    cli()
