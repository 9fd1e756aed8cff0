"""GRPO-RM: Fine-Tuning Representation Models via GRPO-Driven Reinforcement Learning.

A single-file reference implementation of Xu, Jiao, Zhang & Li, arXiv 2511.15256.
DINOv2 is post-trained for image classification or semantic segmentation with GRPO-RM
(`--method grpo`) or with standard fine-tuning (`--method ce`), or left as it is
(`--method frozen`); the post-trained backbone is then frozen and evaluated with a fresh head
(softmax regression and kNN for classification; pixel accuracy, IoU and mIoU for segmentation).

    python grpo_rm.py --dataset cifar10 --data-dir data/                        # one GPU or CPU
    torchrun --nproc_per_node=4 grpo_rm.py --task seg --dataset voc --data-dir data/

The file reads top to bottom: config, data, model (torch.hub DINOv2 + heads), the method
(rewards, advantages, the clipped GRPO objective, θ_old), training (bf16, DDP), evaluation,
benchmark, report, main. "Eq. (n)" cites the paper; "Open in the paper:" marks a point the paper
leaves open and says what is done here.
"""
import argparse
import copy
import glob
import json
import math
import os
import re
import resource
import signal
import sys
import time
import types
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2


class UserError(Exception):
    """Bad input. Printed as one line that names the flag or file, exit code 2, no traceback."""


# -----------------------------------------------------------------------------
# Config: every flag, with defaults that reproduce the paper (Section 4.2)

def make_parser():
    p = argparse.ArgumentParser(description="GRPO-RM / fine-tuning / frozen evaluation of DINOv2",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", choices=["cls", "seg"], default=None, help="default: the dataset's task")
    a("--dataset", choices=sorted(DATASETS), default=None)
    a("--data-dir", default="data", help="dataset root (layouts in README)")
    a("--num-classes", type=int, default=None, help="required for vocfolder; default: the dataset's")
    a("--model", default="dinov2_vits14", help="torch.hub entry point: dinov2_vit{s,b,l,g}14[_reg]")
    a("--hub-repo", default="facebookresearch/dinov2", help="GitHub owner/name, or a local directory")
    a("--weights", default=None, help="local backbone state dict (offline use); strict load")
    a("--method", choices=["grpo", "ce", "frozen"], default="grpo")
    a("--uniformity", choices=sorted(UNIFORMITY), default="eq4", help="Table 6 ablation")
    a("--clip-eps", type=float, default=0.2, help="ε of Eq. (1)")
    a("--epochs", type=int, default=100)
    a("--eval-epochs", type=int, default=50, help="epochs of the head trained on frozen features")
    a("--batch-size", type=int, default=None, help="global batch m; default 1024 (cls) / 256 (seg)")
    a("--lr", type=float, default=None, help="start lr per 256 images; default 1e-3 (cls) / 1e-5 (seg); "
                                              "cosine-decayed to lr/100")
    a("--eval-lr", type=float, default=None, help="same rule for the evaluation head; default --lr")
    a("--img-size", type=int, default=None, help="default 224 (cls) / 448 (seg); a multiple of the patch")
    a("--seg-size", type=int, default=128, help="patch tokens are upsampled to this map size")
    a("--hidden", type=int, default=None, help="head hidden width; default 256, 64 for voc")
    a("--feature-type", choices=["linear", "ms"], default="linear", help="seg: last layer, or last 4 + "
                                                                          "multi-scale test")
    a("--ms-scales", default="1.0,1.32,1.73,2.28,3.0", help="test scales of --feature-type ms (DINOv2's)")
    a("--background-penalty", action=argparse.BooleanOptionalAction, default=None,
      help="seg: r_0 -= c/2 after Eq. (6); default on for voc only")
    a("--subset", type=float, default=1.0, help="fraction of the training set used for post-training")
    a("--seed", type=int, default=0)
    a("--out", default="runs", help="each run writes OUT/NAME/result.json")
    a("--name", default=None, help="run name; default derived from the flags")
    a("--dtype", choices=["bf16", "fp32"], default=None, help="autocast dtype; default bf16 on GPU, fp32 on CPU")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader processes per rank")
    a("--log-every", type=int, default=10, help="print progress every N steps")
    a("--save-vis", type=int, default=0, metavar="K", help="seg: write K image|truth|prediction PNGs")
    a("--no-sdpa", action="store_true", help="keep DINOv2's hand-written attention")
    a("--preload", action=argparse.BooleanOptionalAction, default=None,
      help="cls: decode the dataset once, resize/normalise batches on the device; default on for "
           "cifar10/cifar100/stl10/tinyimagenet")
    a("--compile", action="store_true", help="torch.compile the model (and θ_old)")
    a("--report", metavar="RUNS_DIR", help="aggregate RUNS_DIR/*/result.json into tables and figures, then exit")
    a("--bench", action="store_true", help="time ce vs grpo on synthetic data of this shape (no training run)")
    a("--bench-steps", type=int, default=10)
    a("--bench-warmup", type=int, default=3)
    a("--hub-kwargs", default="{}", help='JSON keyword arguments for the hub entry point, e.g. \'{"pretrained": false}\'')
    a("--resume", action="store_true", help="continue from OUT/NAME/ckpt.pt if there is one")
    a("--stop-after-epoch", type=int, default=None, metavar="K", help="checkpoint after epoch K and stop")
    return p


def get_args(argv=None):
    """Parse the flags, fill the task-dependent defaults, and check what can be checked before any work."""
    args = make_parser().parse_args(argv)
    if args.report:
        return args
    if args.dataset is None:
        raise UserError(f"--dataset is required (one of: {', '.join(sorted(DATASETS))})")
    spec = DATASETS[args.dataset]
    if args.task is not None and args.task != spec.task:
        raise UserError(f"--dataset {args.dataset} is a {spec.task} dataset, but --task is {args.task}")
    args.task = spec.task
    seg = args.task == "seg"
    args.batch_size = args.batch_size or (256 if seg else 1024)
    args.lr = args.lr if args.lr is not None else (1e-5 if seg else 1e-3)
    args.eval_lr = args.eval_lr if args.eval_lr is not None else args.lr
    args.img_size = args.img_size or (448 if seg else 224)
    args.hidden = args.hidden or (64 if args.dataset == "voc" else 256)
    if args.background_penalty is None:
        args.background_penalty = spec.background
    if args.preload is None:
        args.preload = spec.small
    if args.preload and seg:
        raise UserError("--preload is for classification datasets")
    try:
        args.ms_scales = [float(v) for v in args.ms_scales.split(",")]
    except ValueError:
        raise UserError(f"--ms-scales {args.ms_scales}: not a comma-separated list of numbers") from None
    try:
        args.hub_kwargs = json.loads(args.hub_kwargs)
    except ValueError:
        args.hub_kwargs = None
    if not isinstance(args.hub_kwargs, dict):
        raise UserError("--hub-kwargs: not a JSON object")
    if not 0.0 < args.subset <= 1.0:
        raise UserError(f"--subset must be in (0, 1], got {args.subset}")
    for flag in ("epochs", "eval_epochs", "batch_size", "img_size", "seg_size", "hidden"):
        if getattr(args, flag) < (0 if flag == "epochs" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    return args


def run_name(args):
    parts = [args.task, args.dataset, args.method]
    parts += [args.uniformity] if args.method == "grpo" else []
    parts += [args.feature_type] if args.task == "seg" else []
    parts += [f"sub{args.subset:g}"] if args.subset < 1 else []
    return args.name or "-".join(parts + [f"s{args.seed}"])


# -----------------------------------------------------------------------------
# Data: the real torchvision datasets and the real on-disk layouts of the paper's datasets

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as DINOv2
IGNORE = 255  # segmentation "no label" (VOC's 255; ADE20k's 0 is mapped to it)


def load_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # missing, truncated or not an image
        raise UserError(f"{path}: cannot read image ({e})") from None


def cls_transform(img_size, train):
    # Open in the paper: augmentation. Here the lightest standard one: resize the shorter side, crop
    # (random in training, centre in evaluation; a no-op for square images), random flip.
    crop = [v2.RandomCrop(img_size), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC),
                       *crop, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def seg_transform(img_size, train):
    # Open in the paper: augmentation. One random resized crop (scale 0.5-1) and flip, applied to image
    # and mask alike (torchvision resizes a Mask with nearest neighbour).
    size = (img_size, img_size)
    geo = [v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()] if train else [v2.Resize(size)]
    return v2.Compose([*geo, v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                       v2.Normalize(MEAN, STD)])


def torchvision_set(cls, splits):
    """CIFAR-10/100, STL-10: torchvision's own loaders; download when missing, a clear error offline."""
    def build(root, split, transform):
        kw = dict(splits[split], transform=transform)
        try:
            return cls(root, download=False, **kw)
        except RuntimeError:
            pass  # not on disk yet
        try:
            return cls(root, download=True, **kw)
        except Exception as e:
            raise UserError(f"--data-dir {root}: {cls.__name__} is not there and could not be downloaded "
                            f"({type(e).__name__}); offline, copy torchvision's files there") from None
    return build


def image_folder(root, split, transform):
    """ImageNet (train/, val/) and any image folder (train/, test/ or val/, one folder per class)."""
    for sub in (["train"] if split == "train" else ["test", "val"]):
        if os.path.isdir(os.path.join(root, sub)):
            try:
                return torchvision.datasets.ImageFolder(os.path.join(root, sub), transform, loader=load_rgb)
            except (FileNotFoundError, RuntimeError) as e:
                raise UserError(f"--data-dir {root}: {e}") from None
    raise UserError(f"--data-dir {root}: no {'train' if split == 'train' else 'test/ or val'}/ folder")


class TinyImageNet(Dataset):
    """The official tiny-imagenet-200 layout: wnids.txt, train/<wnid>/images/*.JPEG,
    val/images/*.JPEG labelled by val/val_annotations.txt (file, wnid, box)."""

    def __init__(self, root, split, transform):
        try:
            self.classes = open(os.path.join(root, "wnids.txt")).read().split()
            index = {w: i for i, w in enumerate(self.classes)}
            if split == "train":
                self.samples = [(f, index[w]) for w in self.classes
                                for f in sorted(glob.glob(os.path.join(root, "train", w, "images", "*.JPEG")))]
            else:
                lines = open(os.path.join(root, "val", "val_annotations.txt")).read().splitlines()
                self.samples = [(os.path.join(root, "val", "images", f), index[w])
                                for f, w in (ln.split("\t")[:2] for ln in lines if ln.strip())]
        except (OSError, KeyError) as e:
            raise UserError(f"--data-dir {root}: not a tiny-imagenet-200 folder ({e})") from None
        self.targets, self.transform = [y for _, y in self.samples], transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        return self.transform(load_rgb(path)), y


class Preloaded:
    """--preload, for small datasets of one image size (CIFAR, STL-10, Tiny-ImageNet): decode every image
    once into a uint8 tensor (N, 3, h, w) on the device, then resize, flip and normalise each batch there
    (the ops of cls_transform, batched), instead of decoding and resizing on the CPU every epoch."""

    def __init__(self, images, targets, classes, device):
        self.images, self.targets, self.classes = images, targets, classes  # (N, 3, h, w) uint8, list of int
        self.labels = torch.tensor(targets, device=device)

    @classmethod
    def decode(cls, ds, device, workers):
        loader = DataLoader(ds, batch_size=256, num_workers=workers)  # ds has transform = v2.ToImage()
        try:
            images = torch.cat([x.to(device) for x, _ in loader])
        except RuntimeError as e:
            raise UserError(f"--preload: the images differ in size ({str(e).splitlines()[0]}); use --no-preload") from None
        return cls(images, list(labels_of(ds)), getattr(ds, "classes", None), device)

    def select(self, keep):
        return Preloaded(self.images[keep], [self.targets[i] for i in keep], self.classes, self.labels.device)

    def __len__(self):
        return len(self.images)

    def batches(self, indices, batch_size, train, img_size):
        for idx in torch.as_tensor(indices, dtype=torch.long).split(batch_size):
            x = self.images[idx.to(self.images.device)]  # (b, 3, h, w) uint8
            x = v2.functional.resize(x, img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            x = v2.functional.center_crop(x, img_size)  # square images: a no-op, as RandomCrop is
            if train:
                flip = torch.rand(len(x), device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = v2.functional.normalize(v2.functional.to_dtype(x, torch.float32, scale=True), MEAN, STD)
            yield x, self.labels[idx.to(self.labels.device)]  # (b, 3, S, S) float32, (b,)


def resize_labels(y, size):
    """(B, H, W) label maps -> (B, size, size) by nearest neighbour (never blending two class ids)."""
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(y.dtype)


def lut(pairs, unlisted=-1):
    """A 256-entry table from the stored mask value to the class index (IGNORE, or -1 = invalid)."""
    t = np.full(256, unlisted, np.int16)
    for raw, cls in pairs:
        t[raw] = cls
    return t


# COCO-stuff-164k stuffthingmaps store the 182 COCO ids minus one; 11 thing ids are unused -> 171 classes.
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
COCO_IDS = [i for i in range(182) if i not in COCO_UNUSED]


def voc_pairs(root, split):
    base = next((b for b in (os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"), root)
                 if os.path.isdir(os.path.join(b, "ImageSets", "Segmentation"))), None)
    if base is None:
        raise UserError(f"--data-dir {root}: no VOCdevkit/VOC2012/ImageSets/Segmentation folder")
    list_file = os.path.join(base, "ImageSets", "Segmentation", "train.txt" if split == "train" else "val.txt")
    ids = open(list_file).read().split() if os.path.isfile(list_file) else []
    return [(os.path.join(base, "JPEGImages", i + ".jpg"), os.path.join(base, "SegmentationClass", i + ".png"))
            for i in ids], list_file


def folder_pairs(image_dirs, mask_dirs):
    """Images *.jpg in the first existing image dir, masks <stem>.png in the matching mask dir."""
    for im_dir, mk_dir in zip(image_dirs, mask_dirs):
        if os.path.isdir(im_dir):
            ims = sorted(glob.glob(os.path.join(im_dir, "*.jpg")))
            return [(f, os.path.join(mk_dir, os.path.basename(f)[:-4] + ".png")) for f in ims], im_dir
    return [], image_dirs[0]


def ade_pairs(root, split):
    base = os.path.join(root, "ADEChallengeData2016") if os.path.isdir(os.path.join(root, "ADEChallengeData2016")) else root
    d = "training" if split == "train" else "validation"
    return folder_pairs([os.path.join(base, "images", d)], [os.path.join(base, "annotations", d)])


def coco_pairs(root, split):
    d = "train2017" if split == "train" else "val2017"
    return folder_pairs([os.path.join(root, "images", d), os.path.join(root, d)],
                        [os.path.join(root, "stuffthingmaps", d)] * 2)


class SegFolder(Dataset):
    """(image, mask) file pairs; masks are palette or grey PNGs mapped through a lookup table."""

    def __init__(self, pairs, table, num_classes, transform):
        self.pairs, self.table, self.num_classes, self.transform = pairs, table, num_classes, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        img_path, mask_path = self.pairs[i]
        img = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(img_path)))
        try:
            with Image.open(mask_path) as m:
                raw = np.array(m)
        except OSError as e:
            raise UserError(f"{mask_path}: cannot read mask ({e})") from None
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise UserError(f"{mask_path}: mask must be a single-channel 8-bit PNG")
        label = self.table[raw]  # (H, W) int16
        invalid = (label < 0) | ((label >= self.num_classes) & (label != IGNORE))
        if invalid.any():
            bad = raw[invalid][0]
            raise UserError(f"{mask_path}: label value {bad} is not a class in [0, {self.num_classes}) "
                            f"nor the ignore label {IGNORE} (check --num-classes)")
        mask = tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8))[None])
        img, mask = self.transform(img, mask)
        return img, mask[0]


def seg_set(find_pairs, table):
    def build(root, split, transform, num_classes):
        pairs, where = find_pairs(root, split)
        if not pairs:
            raise UserError(f"--data-dir {root}: no images found ({where})")
        for files in pairs:
            for f in files:
                if not os.path.isfile(f):
                    raise UserError(f"{f}: file missing")
        return SegFolder(pairs, table(num_classes), num_classes, transform)
    return build


@dataclass(frozen=True)
class DatasetSpec:
    task: str                 # "cls" or "seg"
    build: Callable           # cls: (root, split, transform); seg: (root, split, transform, num_classes)
    num_classes: int = 0      # 0: read from the data (cls) or from --num-classes (vocfolder)
    background: bool = False  # class 0 is "background": the segmentation penalty is on by default
    downloads: bool = False   # torchvision can download it into --data-dir
    small: bool = False       # one image size, fits in memory: --preload by default


def identity_table(c):  # VOC: values are classes, 255 = ignore
    return lut([(i, i) for i in range(c)] + [(IGNORE, IGNORE)])


def ade_table(c):  # ADE20k: 0 = "other" (ignored), 1..150 -> 0..149
    return lut([(0, IGNORE)] + [(i + 1, i) for i in range(150)])


def coco_table(c):  # COCO-stuff: the 182 stored ids -> 171 contiguous classes; unused ids are ignored
    return lut([(r, i) for i, r in enumerate(COCO_IDS)] + [(IGNORE, IGNORE)], unlisted=IGNORE)


DATASETS = {
    "cifar10": DatasetSpec("cls", torchvision_set(torchvision.datasets.CIFAR10, {"train": {"train": True}, "test": {"train": False}}), downloads=True, small=True),
    "cifar100": DatasetSpec("cls", torchvision_set(torchvision.datasets.CIFAR100, {"train": {"train": True}, "test": {"train": False}}), downloads=True, small=True),
    "stl10": DatasetSpec("cls", torchvision_set(torchvision.datasets.STL10, {"train": {"split": "train"}, "test": {"split": "test"}}), downloads=True, small=True),
    "tinyimagenet": DatasetSpec("cls", TinyImageNet, small=True),
    "imagenet": DatasetSpec("cls", image_folder),
    "imagefolder": DatasetSpec("cls", image_folder),
    "voc": DatasetSpec("seg", seg_set(voc_pairs, identity_table), 21, background=True),
    "ade20k": DatasetSpec("seg", seg_set(ade_pairs, ade_table), 150),
    "cocostuff": DatasetSpec("seg", seg_set(coco_pairs, coco_table), 171),
    "vocfolder": DatasetSpec("seg", seg_set(voc_pairs, identity_table)),  # any VOC-layout set, --num-classes N
}


def labels_of(ds):
    return ds.targets if hasattr(ds, "targets") else ds.labels  # STL10 calls them labels


def build_data(args, ctx):
    """-> (num_classes, train set for post-training, train and test sets for evaluation)."""
    spec, root = DATASETS[args.dataset], args.data_dir
    if not os.path.isdir(root) and not spec.downloads:
        raise UserError(f"--data-dir {root}: no such directory")
    if spec.downloads and ctx.world > 1:  # rank 0 downloads first; the others then read its files
        if ctx.rank == 0:
            spec.build(root, "train", None), spec.build(root, "test", None)
        dist.barrier()
    if args.task == "cls":
        if args.preload:  # decoded once; batches are resized on the device
            train = train_eval = Preloaded.decode(spec.build(root, "train", v2.ToImage()), ctx.device, args.workers)
            test = Preloaded.decode(spec.build(root, "test", v2.ToImage()), ctx.device, args.workers)
        else:
            train = spec.build(root, "train", cls_transform(args.img_size, True))
            train_eval = spec.build(root, "train", cls_transform(args.img_size, False))
            test = spec.build(root, "test", cls_transform(args.img_size, False))
        classes = getattr(train, "classes", None)
        if classes is not None and getattr(test, "classes", classes) != classes:
            raise UserError(f"--data-dir {root}: the test/val class folders differ from train/")
        num_classes = args.num_classes or (len(classes) if classes else int(max(labels_of(train))) + 1)
        for ds in (train, test):
            if len(ds) == 0:
                raise UserError(f"--data-dir {root}: a split has no images")
            top = int(max(labels_of(ds)))
            if top >= num_classes:
                raise UserError(f"--num-classes {num_classes}: --data-dir {root} has label {top}")
    else:
        num_classes = args.num_classes or spec.num_classes
        if not num_classes:
            raise UserError(f"--dataset {args.dataset} needs --num-classes")
        if num_classes > IGNORE:
            raise UserError(f"--num-classes {num_classes}: at most {IGNORE} segmentation classes")
        train = spec.build(root, "train", seg_transform(args.img_size, True), num_classes)
        train_eval = spec.build(root, "train", seg_transform(args.img_size, False), num_classes)
        test = spec.build(root, "test", seg_transform(args.img_size, False), num_classes)
    if args.subset < 1.0:  # the paper's "10%" runs: a fixed random subset for post-training only
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[:max(1, round(args.subset * len(train)))].tolist()
        train = train.select(keep) if isinstance(train, Preloaded) else Subset(train, keep)
    return num_classes, train, train_eval, test


def epoch_loader(ds, sampler, epoch, skip_batches, args, ctx):
    # The same shuffle on every rank (seed, epoch), each rank its share; the global batch is m. A run
    # resumed inside an epoch skips the batches that epoch had already done.
    sampler.set_epoch(epoch)
    order = list(sampler)[skip_batches * (args.batch_size // ctx.world):]
    if isinstance(ds, Preloaded):
        return ds.batches(order, args.batch_size // ctx.world, True, args.img_size)
    return DataLoader(ds, batch_size=args.batch_size // ctx.world, sampler=order, num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


def eval_loader(ds, args, ctx):
    if isinstance(ds, Preloaded):
        return ds.batches(range(ctx.rank, len(ds), ctx.world), args.batch_size // ctx.world, False, args.img_size)
    shard = Subset(ds, range(ctx.rank, len(ds), ctx.world))  # no padding: every image counted once
    return DataLoader(shard, batch_size=args.batch_size // ctx.world, num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


# -----------------------------------------------------------------------------
# Model: DINOv2 from torch.hub, the classification head and the segmentation head

def load_backbone(hub_repo, name, weights=None, **kwargs):
    """torch.hub.load of DINOv2: a GitHub repository (online) or a local clone (source='local').
    With --weights the hub's own download is skipped and the file is loaded strictly."""
    local = os.path.isdir(hub_repo)
    if local and not os.path.isfile(os.path.join(hub_repo, "hubconf.py")):
        raise UserError(f"--hub-repo {hub_repo}: no hubconf.py in that directory")
    if not local and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+)?", hub_repo):
        raise UserError(f"--hub-repo {hub_repo}: no such directory, and not a GitHub owner/name")
    source = "local" if local else "github"
    offline_hint = ("to run offline: git clone https://github.com/facebookresearch/dinov2 and pass "
                    "--hub-repo DIR --weights dinov2_vits14_pretrain.pth")
    try:
        model = torch.hub.load(hub_repo, name, source=source, trust_repo=True,
                               **({"pretrained": False} if weights else {}), **kwargs)
    except RuntimeError as e:
        if "Cannot find callable" in str(e):
            raise UserError(f"--model {name}: no such entry point in --hub-repo {hub_repo} "
                            f"(DINOv2 has dinov2_vit{{s,b,l,g}}14 and their _reg variants)") from None
        raise UserError(f"--model {name}: loading failed ({type(e).__name__}: {e}); {offline_hint}") from None
    except Exception as e:
        raise UserError(f"--hub-repo {hub_repo} --model {name}: loading failed ({type(e).__name__}: {e}); "
                        f"{offline_hint}") from None
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--weights {weights}: cannot read ({type(e).__name__})") from None
        own = model.state_dict()
        bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
        if bad:
            raise UserError(f"--weights {weights} does not fit --model {name}: {len(bad)} mismatching keys, "
                            f"e.g. {', '.join(bad[:4])}")
        model.load_state_dict(state, strict=True)
    return model


def sdpa_attention(self, x, attn_bias=None):
    """DINOv2's Attention.forward (dinov2/layers/attention.py), with softmax(q kᵀ · scale) v computed by
    F.scaled_dot_product_attention (flash / memory-efficient kernels) instead of by hand."""
    B, N, C = x.shape
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    drop = self.attn_drop.p if self.training and hasattr(self, "attn_drop") else 0.0
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
    x = self.proj(x.transpose(1, 2).reshape(B, N, C))
    return self.proj_drop(x) if hasattr(self, "proj_drop") else x


def use_sdpa(backbone):
    n = 0
    for m in backbone.modules():
        if type(m).__name__ in ("Attention", "MemEffAttention") and all(hasattr(m, a) for a in ("qkv", "proj", "scale")):
            m.forward, n = types.MethodType(sdpa_attention, m), n + 1
    return n


def mlp_head(in_dim, hidden, num_classes):
    """The paper's classification head: a two-layer fully connected network on the class token.
    Open in the paper: the activation (ReLU here)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class SegHead(nn.Module):
    """Patch tokens (B, D, h, w) → bilinear upsampling to size × size (Section 4.2: 32×32 → 128×128)
    → a two-layer per-pixel projection (1×1 convolutions) → logits (B, c, size, size)."""

    def __init__(self, in_dim, hidden, num_classes, size):
        super().__init__()
        self.size = size
        self.mlp = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_classes, 1))

    def forward(self, tokens, size=None):
        # The first 1×1 layer is linear and bilinear upsampling is linear with weights summing to 1, so the
        # two commute: projecting at token resolution (32×32) first is the same function as the paper's
        # upsample-then-project, at 1/16 of the cost and memory. The ReLU comes after the upsampling.
        x = self.mlp[0](tokens)  # (B, hidden, h, w)
        x = F.interpolate(x, size=size or (self.size, self.size), mode="bilinear", align_corners=False)
        return self.mlp[1:](x)  # (B, c, S, S)


class Net(nn.Module):
    """The post-trained model π_θ: backbone + task head. features() is what evaluation freezes."""

    def __init__(self, backbone, head, task, n_layers=1):
        super().__init__()
        self.backbone, self.head, self.task, self.n_layers = backbone, head, task, n_layers

    def features(self, x):  # (B, 3, H, W)
        if self.task == "cls":
            return self.backbone.forward_features(x)["x_norm_clstoken"]  # (B, D)
        layers = self.backbone.get_intermediate_layers(x, n=self.n_layers, reshape=True)  # n × (B, D, h, w)
        return torch.cat(layers, dim=1)  # (B, n·D, h, w): "linear" n = 1, "multi-scale" n = 4

    def forward(self, x):
        return self.head(self.features(x))  # (B, c) or (B, c, S, S)


def build_model(args, num_classes, ctx):
    backbone = load_backbone(args.hub_repo, args.model, args.weights, **args.hub_kwargs)
    if not args.no_sdpa:
        use_sdpa(backbone)
    if hasattr(backbone, "mask_token"):  # used only by DINOv2's masked pre-training, never in forward
        backbone.mask_token.requires_grad_(False)
    if args.img_size % backbone.patch_size:
        raise UserError(f"--img-size {args.img_size} is not a multiple of the patch size {backbone.patch_size}")
    torch.manual_seed(args.seed)  # the same head on every rank
    n_layers = 4 if args.task == "seg" and args.feature_type == "ms" else 1
    dim = backbone.embed_dim * n_layers
    head = (mlp_head(dim, args.hidden, num_classes) if args.task == "cls"
            else SegHead(dim, args.hidden, num_classes, args.seg_size))
    return Net(backbone, head, args.task, n_layers).to(ctx.device)


# -----------------------------------------------------------------------------
# The method: rewards (Eqs. 3-6), advantages (Eq. 2), the clipped objective (Eq. 1, β = 0), θ_old

def uniformity_eq4(p, labels):
    return -p  # Eq. (4): r_uni_i = -p_i (the GRPO-RM default)


def uniformity_eq5(p, labels):
    c = p.shape[1]
    p_k = p.gather(1, labels[:, None])  # (N, 1) old probability of the true class
    r = (1 - p_k) / (c - 1) - p  # Eq. (5), i ≠ k
    return r.scatter(1, labels[:, None], p_k)  # Eq. (5), i = k: p_k


def uniformity_none(p, labels):
    return torch.zeros_like(p)  # Table 6 "set to 0": accuracy reward only


UNIFORMITY = {"eq4": uniformity_eq4, "eq5": uniformity_eq5, "none": uniformity_none}


def rewards(old_probs, labels, uniformity="eq4", background_penalty=False):
    """Rewards of the c outputs of each sample, from the OLD policy's probabilities (Alg. 1, line 6).
    old_probs (N, c), labels (N,) -> (N, c)."""
    N, c = old_probs.shape
    if uniformity not in UNIFORMITY:
        raise ValueError(f"uniformity must be one of {sorted(UNIFORMITY)}, got {uniformity!r}")
    r_acc = c * F.one_hot(labels, c).to(old_probs.dtype)  # Eq. (3): c for the true class, 0 otherwise
    r = r_acc + UNIFORMITY[uniformity](old_probs, labels)  # Eq. (6): r = r_acc + r_uni
    if background_penalty:  # Section 3.3, segmentation: r_1 <- r_1 - c/2 (class 1 = index 0, background)
        r = r - (c / 2) * F.one_hot(torch.zeros_like(labels), c).to(r.dtype)
    return r


def advantages(r, eps=1e-4):
    """Eq. (2): z-score of the rewards over the group (the c classes).
    Open in the paper: which std. Here the unbiased one plus eps in the denominator, as TRL's GRPO."""
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)  # (N, c)


def grpo_rm_loss(logits, old_logits, labels, clip_eps=0.2, uniformity="eq4", background_penalty=False,
                 ignore_index=-100):
    """-J(θ) of Eq. (1) with β = 0: the group is the c classes, π_θ(o_i|q) = softmax(logits)_i.
    logits, old_logits (N, c); labels (N,). Averaged over the samples whose label != ignore_index."""
    keep = labels != ignore_index  # (N,)
    y = labels.masked_fill(~keep, 0)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 under bf16 autocast (float64 stays)
    logp = F.log_softmax(logits.to(dtype), dim=-1)  # (N, c)
    logp_old = F.log_softmax(old_logits.detach().to(dtype), dim=-1)  # (N, c), θ_old carries no gradient
    with torch.no_grad():
        A = advantages(rewards(logp_old.exp(), y, uniformity, background_penalty))  # (N, c), Alg. 1 lines 6-7
    ratio = torch.exp(logp - logp_old)  # ρ_i = π_θ/π_θold in log space: p_old may underflow to 0
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # Eq. (1), inside the sum
    J = surrogate.mean(dim=-1)  # (N,): 1/G Σ_i, G = c
    return -(J * keep).sum() / keep.sum().clamp(min=1)  # loss = -J, mean over labelled samples


def make_old(model):
    """θ_old: a frozen copy of the WHOLE model (backbone + head); no gradients, no optimizer state."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def refresh_old(old, model):
    """Algorithm 1, line 3: π_θold <- π_θ, once at the start of every epoch."""
    old.load_state_dict(model.state_dict())


# -----------------------------------------------------------------------------
# Training: Adam, cosine learning rate, bf16 autocast, DDP

@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype  # bfloat16 or float32

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp_dtype == torch.bfloat16)


def setup(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")  # env:// from torchrun
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    return Ctx(rank, world, device, dtype)


def cosine_lr(step, total, lr_max, lr_min):
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * step / max(1, total)))


def lr_range(base, batch_size):
    """Section 4.2: from base·m/256 down to (base/100)·m/256 (1e-3 -> 1e-5 cls, 1e-5 -> 1e-7 seg)."""
    return base * batch_size / 256, base / 100 * batch_size / 256


def step_loss(args, model, old, x, y, num_classes):
    """The training loss of one batch: -J of Eq. (1) (GRPO-RM) or cross-entropy (fine-tuning)."""
    def flat(z):  # (B, c, S, S) -> (B·S·S, c): for segmentation every pixel is a sample
        return z.permute(0, 2, 3, 1).reshape(-1, num_classes) if args.task == "seg" else z

    if args.method == "grpo":
        with torch.no_grad():  # π_θold(·|x), Algorithm 1 line 5; run first, so that its transient
            old_logits = flat(old(x))  # activations are freed before the graph's pile up
    logits = model(x)  # (B, c) or (B, c, S, S)
    ignore = -100
    if args.task == "seg":
        y = resize_labels(y, logits.shape[-1])  # (B, S, S)
        logits, y, ignore = flat(logits), y.reshape(-1), IGNORE
    if args.method == "ce":
        return F.cross_entropy(logits.float(), y, ignore_index=ignore)
    return grpo_rm_loss(logits, old_logits, y, args.clip_eps, args.uniformity, args.background_penalty, ignore)


class RunStopped(UserError):
    """The run stopped before its end (signal, non-finite loss); the message says where and how to go on."""


def atomic_save(path, write):
    """Write to a temp file in the same folder, fsync, rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


RESUMABLE = {"epochs", "out", "resume", "stop_after_epoch", "log_every", "workers", "save_vis", "eval_epochs", "eval_lr"}


def save_checkpoint(path, args, net, old, opt, state):
    ckpt = {"model": net.state_dict(), "old": old.state_dict() if old is not None else None,
            "opt": opt.state_dict(), "state": state, "config": vars(args), "rng": torch.get_rng_state()}
    atomic_save(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, args, net, old, opt):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    diff = [k for k in set(ckpt["config"]) | set(vars(args)) if k not in RESUMABLE
            and ckpt["config"].get(k) != vars(args).get(k)]
    if diff:
        raise UserError(f"--resume: {path} was written with other settings ({', '.join(f'--{k.replace(chr(95), chr(45))}' for k in sorted(diff))})")
    net.load_state_dict(ckpt["model"])
    if old is not None:
        old.load_state_dict(ckpt["old"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]


def stop_signals():
    """SIGTERM / SIGINT (pre-emption, Ctrl-C) set a flag; the loop checkpoints after the current step."""
    flag = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: flag.update(signal=signal.Signals(signum).name))
    return flag


def agreed(value, ctx):
    """True on every rank if it is true on any (ranks must stop at the same step)."""
    if ctx.world == 1:
        return bool(value)
    t = torch.tensor([float(bool(value))], device=ctx.device)
    dist.all_reduce(t)
    return t.item() > 0


def prepare_training(args, ctx, net):
    """DDP wrapper (gradients averaged across ranks), optional torch.compile, Adam (fused on GPU)."""
    model = DDP(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.world > 1 else net
    model = torch.compile(model) if args.compile else model
    params = [p for p in net.parameters() if p.requires_grad]  # θ_old is not among them
    lr_max, _ = lr_range(args.lr, args.batch_size)
    return model, params, torch.optim.Adam(params, lr=lr_max, weight_decay=0.0, fused=ctx.device.type == "cuda")


def train_step(args, ctx, model, old, opt, params, x, y, lr, num_classes):
    """One optimisation step. Returns the loss and the gradient norm as device tensors (no host sync)."""
    for g in opt.param_groups:
        g["lr"] = lr
    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
    with ctx.amp():
        loss = step_loss(args, model, old, x, y, num_classes)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, never clips
    opt.step()
    return loss.detach(), gnorm


def train(args, ctx, net, train_set, num_classes, run_dir):
    """Algorithm 1 (and, with --method ce, standard fine-tuning with the same network and schedule).
    Returns the history, or None when --stop-after-epoch ended it early."""
    old = make_old(net) if args.method == "grpo" else None
    model, params, opt = prepare_training(args, ctx, net)
    old_fwd = torch.compile(old) if args.compile and old is not None else old
    lr_max, lr_min = lr_range(args.lr, args.batch_size)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=args.seed)
    per_epoch = math.ceil(len(sampler) / (args.batch_size // ctx.world))
    total, ckpt = args.epochs * per_epoch, os.path.join(run_dir, "ckpt.pt")
    st = {"epoch": 0, "step_in_epoch": 0, "loss_sum": 0.0, "train_loss": [], "sec_per_epoch": []}
    if args.resume and os.path.isfile(ckpt):
        st = load_checkpoint(ckpt, args, net, old, opt)
        if ctx.rank == 0:
            print(f"resumed from {ckpt}: epoch {st['epoch'] + 1}, step {st['step_in_epoch']}", flush=True)
    stop = stop_signals()
    for epoch in range(st["epoch"], args.epochs):
        skip = st["step_in_epoch"] if epoch == st["epoch"] else 0
        torch.manual_seed(args.seed * 100_003 + ctx.rank * 1009 + epoch)  # augmentation: per rank, per epoch
        if old is not None and skip == 0:
            refresh_old(old, net)  # Algorithm 1, line 3
        t0 = t_log = time.time()
        loss_sum, n_seen = torch.full((), st["loss_sum"] if skip else 0.0, device=ctx.device), 0
        first_bad = torch.full((), -1, device=ctx.device)
        for i, (x, y) in enumerate(epoch_loader(train_set, sampler, epoch, skip, args, ctx), start=skip):
            step = epoch * per_epoch + i
            lr = cosine_lr(step, total, lr_max, lr_min)
            loss, gnorm = train_step(args, ctx, model, old_fwd, opt, params, x, y, lr, num_classes)
            loss_sum += loss
            n_seen += len(x)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss + gnorm), step, first_bad)
            sync = step % args.log_every == 0 or i == per_epoch - 1  # the loop's only host syncs
            if sync and first_bad.item() >= 0:
                raise RunStopped(f"non-finite loss or gradient at epoch {epoch + 1}, step {first_bad.item() + 1}; "
                                 f"last good checkpoint: {ckpt if os.path.isfile(ckpt) else 'none'} "
                                 f"(lower --lr or use --dtype fp32, then --resume)")
            if sync and ctx.rank == 0:
                print(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{total} | loss {loss.item():.4f} | "
                      f"grad norm {gnorm.item():.3f} | lr {lr:.2e} | "
                      f"{n_seen * ctx.world / max(time.time() - t_log, 1e-9):.0f} img/s", flush=True)
                t_log, n_seen = time.time(), 0
            stopping = (sync or ctx.world == 1) and agreed(stop["signal"], ctx)  # ranks stop at the same step
            if stopping and i < per_epoch - 1:
                st.update(epoch=epoch, step_in_epoch=i + 1, loss_sum=loss_sum.item())
                break
        else:  # the epoch ran to its end
            if ctx.world > 1:
                dist.all_reduce(loss_sum)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
            st["train_loss"].append(loss_sum.item() / (per_epoch * ctx.world))
            st["sec_per_epoch"].append(time.time() - t0)
            st.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0)
            stopping = agreed(stop["signal"], ctx)
        if ctx.rank == 0:
            save_checkpoint(ckpt, args, net, old, opt, st)
        if stopping:
            raise RunStopped(f"stopped by {stop['signal'] or 'a signal'} at epoch {st['epoch'] + 1}, step "
                             f"{st['step_in_epoch']}; checkpoint {ckpt}: rerun with --resume")
        if args.stop_after_epoch == epoch + 1:
            return None
    return {"train_loss": st["train_loss"], "sec_per_epoch": st["sec_per_epoch"]}


# -----------------------------------------------------------------------------
# Evaluation on frozen features: softmax regression (SR), kNN, pixel accuracy / IoU / mIoU

def all_gather_cat(t, ctx):
    """Concatenate a tensor whose first dimension differs across ranks."""
    if ctx.world == 1:
        return t
    n = torch.tensor([len(t)], device=ctx.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    m = int(max(sizes))
    pad = t.new_zeros((m, *t.shape[1:]), device=ctx.device)
    pad[:len(t)] = t.to(ctx.device)
    out = [torch.empty_like(pad) for _ in range(ctx.world)]
    dist.all_gather(out, pad)
    return torch.cat([o[:int(s)] for o, s in zip(out, sizes)]).to(t.device)


def all_reduce_sum(t, ctx):
    if ctx.world > 1:
        t = t.to(ctx.device)
        dist.all_reduce(t)
    return t.cpu()


@torch.no_grad()
def extract(net, loader, ctx, label_size=None):
    """One pass of the frozen backbone over a split (this rank's shard). Features are cached (CPU) and
    reused for every epoch of the evaluation head. Segmentation labels are resized to label_size."""
    feats, labels = [], []
    for x, y in loader:
        with ctx.amp():
            f = net.features(x.to(ctx.device, non_blocking=True))  # (B, D) or (B, n·D, h, w)
        feats.append(f.to(ctx.amp_dtype).cpu())
        labels.append(resize_labels(y, label_size).to(torch.uint8) if label_size is not None else y)
    return torch.cat(feats), torch.cat(labels)


def fit_head(head, feats, labels, n_total, args, ctx, ignore_index=-100):
    """Train a freshly initialised head on cached frozen features with Adam for --eval-epochs epochs,
    learning rate as in training (Section 4.2). Each rank holds its shard; gradients are averaged."""
    params = list(head.parameters())
    lr_max, lr_min = lr_range(args.eval_lr, args.batch_size)
    opt = torch.optim.Adam(params, lr=lr_max, weight_decay=0.0)
    local_bs, n_local = args.batch_size // ctx.world, len(feats)
    per_epoch = max(1, math.ceil(n_total / args.batch_size))
    total = args.eval_epochs * per_epoch
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(n_local, generator=gen)
        idx = order[(torch.arange(local_bs) + (step % per_epoch) * local_bs) % n_local]
        x, y = feats[idx].to(ctx.device).float(), labels[idx].to(ctx.device).long()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, lr_max, lr_min)
        with ctx.amp():
            logits = head(x)  # (b, c) or (b, c, S, S)
        loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.world > 1:
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= ctx.world
        opt.step()
    return head.eval()


def knn_predict(train_feats, train_labels, test_feats, k=5, chunk=1024):
    """kNN vote on cosine similarity (L2-normalised features). Majority of the k nearest; a tie goes to
    the tied class whose member is nearest. Open in the paper: all but k = 5."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k, c = min(k, len(train)), int(train_labels.max()) + 1
    rank_score = (k - torch.arange(k, device=train.device)).float()  # nearest neighbour scores k
    preds = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):  # (q, D)
        nn_idx = (q @ train.T).topk(k, dim=1).indices  # (q, k), nearest first
        nn_lab = train_labels[nn_idx]  # (q, k)
        votes = torch.zeros(len(q), c, device=q.device).scatter_add_(1, nn_lab, torch.ones_like(rank_score).expand(len(q), k))
        nearest = torch.zeros(len(q), c, device=q.device).scatter_reduce_(1, nn_lab, rank_score.expand(len(q), k), "amax")
        preds.append((votes * (k + 1) + nearest).argmax(1))  # votes first, then nearness
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=5):
    """Top-1 accuracy (%) of the k-NN classifier (k = 5 in the paper)."""
    return 100.0 * (knn_predict(train_feats, train_labels, test_feats, k) == test_labels).float().mean().item()


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE):
    """(c, c) counts, rows = ground truth, columns = prediction; pixels with ignore_index are skipped."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf):
    """Pixel accuracy, IoU and mIoU (%) from one confusion matrix. "iou" is the frequency-weighted IoU
    (Σ_c freq_c · IoU_c): open in the paper, whose "IoU" is always far above its mIoU (87.0 vs 66.8 on VOC),
    which fits frequency weighting. "miou" averages IoU_c over the
    classes present in the ground truth or the prediction (absent classes do not count)."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_acc": 100 * (tp.sum() / conf.sum()).item(),
            "iou": 100 * ((gt[present] / gt.sum()) * iou).sum().item(),
            "miou": 100 * iou.mean().item()}


def evaluate_cls(args, ctx, net, train_eval, test, num_classes):
    """-> ({"sr", "knn"} in %, seconds of the feature pass)."""
    t0 = time.time()
    tr_f, tr_y = extract(net, eval_loader(train_eval, args, ctx), ctx)
    te_f, te_y = extract(net, eval_loader(test, args, ctx), ctx)
    feature_seconds = time.time() - t0
    n_train = int(all_reduce_sum(torch.tensor(len(tr_f)), ctx))
    torch.manual_seed(args.seed)
    head = fit_head(nn.Linear(tr_f.shape[1], num_classes).to(ctx.device), tr_f, tr_y, n_train, args, ctx)
    with torch.no_grad(), ctx.amp():
        sr_pred = torch.cat([head(f.to(ctx.device).float()).argmax(1).cpu() for f in te_f.split(4096)])
    all_f, all_y = all_gather_cat(tr_f, ctx), all_gather_cat(tr_y, ctx)  # kNN needs every training feature
    knn_pred = knn_predict(all_f.to(ctx.device), all_y.to(ctx.device), te_f.to(ctx.device)).cpu()
    counts = all_reduce_sum(torch.stack([(sr_pred == te_y).sum(), (knn_pred == te_y).sum(), torch.tensor(len(te_y))]), ctx)
    return {"sr": 100.0 * counts[0].item() / counts[2].item(), "knn": 100.0 * counts[1].item() / counts[2].item()}, feature_seconds


@torch.no_grad()
def predict_seg(net, head, x, args, ctx):
    """Class probabilities (B, c, H, W) at the input resolution; --feature-type ms averages them over
    --ms-scales and horizontal flips, as DINOv2's multi-scale evaluation does."""
    H, W = x.shape[-2:]
    p = net.backbone.patch_size
    ms = args.feature_type == "ms"
    scales, flips = (args.ms_scales, [False, True]) if ms else ([1.0], [False])
    probs = 0
    for s in scales:
        size = (max(p, round(H * s / p) * p), max(p, round(W * s / p) * p))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if s != 1.0 else x
        for flip in flips:
            xi = xs.flip(-1) if flip else xs
            with ctx.amp():
                logits = head(net.features(xi), size=(round(args.seg_size * s),) * 2)  # (B, c, S·s, S·s)
            logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False)
            probs = probs + (logits.flip(-1) if flip else logits).softmax(1)
    return probs / (len(scales) * len(flips))


def evaluate_seg(args, ctx, net, train_eval, test, num_classes, run_dir):
    """-> ({"pixel_acc", "iou", "miou"} in %, "labelled_pixels"}, seconds of the feature passes)."""
    t0 = time.time()
    tr_f, tr_y = extract(net, eval_loader(train_eval, args, ctx), ctx, label_size=args.seg_size)
    feature_seconds = time.time() - t0
    n_train = int(all_reduce_sum(torch.tensor(len(tr_f)), ctx))
    torch.manual_seed(args.seed)
    head = SegHead(tr_f.shape[1], args.hidden, num_classes, args.seg_size).to(ctx.device)
    head = fit_head(head, tr_f, tr_y, n_train, args, ctx, ignore_index=IGNORE)
    n_local = len(range(ctx.rank, len(test), ctx.world))  # --save-vis: K images spread over rank 0's shard
    show = np.linspace(0, n_local - 1, args.save_vis).round().astype(int).tolist() if ctx.rank == 0 else []
    conf, pos, t0 = torch.zeros(num_classes, num_classes, dtype=torch.long), 0, time.time()
    for x, y in eval_loader(test, args, ctx):  # the test split's one backbone pass (one per scale for ms)
        pred = predict_seg(net, head, x.to(ctx.device), args, ctx).argmax(1).cpu()  # (B, H, W)
        conf += confusion_matrix(pred, y, num_classes, IGNORE)
        for b in range(len(x)):
            if pos + b in show:
                save_vis(x[b], y[b], pred[b], os.path.join(run_dir, "vis", f"{show.index(pos + b):03d}.png"))
        pos += len(x)
    feature_seconds += time.time() - t0  # the test pass: backbone (per scale) and head
    conf = all_reduce_sum(conf, ctx)
    return segmentation_metrics(conf) | {"labelled_pixels": int(conf.sum())}, feature_seconds


def voc_palette():
    """The Pascal VOC colour map (class bits spread over the high bits of R, G, B); 255 -> cream."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c = i
        for j in range(8):
            pal[i] |= np.array([(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1], np.uint8) << (7 - j)
            c >>= 3
    return pal


def save_vis(x, y, pred, path):
    """Figure 2: image | ground truth | prediction, side by side, in the VOC palette (255 = ignore, cream)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    img = ((x.cpu().float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    pal = voc_palette()
    Image.fromarray(np.concatenate([img, pal[y.numpy().astype(np.uint8)], pal[pred.numpy().astype(np.uint8)]], axis=1)).save(path)


# -----------------------------------------------------------------------------
# Benchmark (--bench): the cost of GRPO-RM against fine-tuning, on synthetic data of the run's shape

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for MFU


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def bench_method(args, method, num_classes, queue):
    """One method's step time, peak memory and FLOPs; runs in a child process of its own."""
    from torch.utils.flop_counter import FlopCounterMode
    args.method = method
    ctx = setup(args)
    net = build_model(args, num_classes, ctx)
    old = make_old(net) if method == "grpo" else None
    model, params, opt = prepare_training(args, ctx, net)
    old = torch.compile(old) if args.compile and old is not None else old
    B, S = args.batch_size, args.img_size
    x = torch.randn(B, 3, S, S, device=ctx.device)
    y = torch.randint(0, num_classes, (B, S, S) if args.task == "seg" else (B,), device=ctx.device)

    lr = lr_range(args.lr, B)[0]

    def step():
        train_step(args, ctx, model, old, opt, params, x, y, lr, num_classes)

    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    base = rss_gb()
    for _ in range(args.bench_warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    sync()
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.bench_steps
    queue.put({"ms_per_step": 1e3 * dt, "img_per_s": B / dt, "flops_per_step": counter.get_total_flops(),
               "peak_memory_gb": peak_memory_gb(ctx.device),
               "memory_above_start_gb": None if ctx.device.type == "cuda" else peak_memory_gb(ctx.device) - base})


def loader_speed(args, ctx, n_batches=10):
    """Images/s of the real input pipeline (decoding + resizing + normalising), or None without data."""
    if not os.path.isdir(args.data_dir):
        return None
    _, train_set, _, _ = build_data(args, ctx)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=0)
    it, n = iter(epoch_loader(train_set, sampler, 0, 0, args, ctx)), 0
    next(it)  # start the workers
    t0 = time.perf_counter()
    for _, (x, _) in zip(range(n_batches), it):
        n += len(x.to(ctx.device))
    return n / (time.perf_counter() - t0)


def bench(args):
    import multiprocessing
    mp = multiprocessing.get_context("spawn")
    num_classes = args.num_classes or DATASETS[args.dataset].num_classes or 1000
    rows = {}
    for method in ("ce", "grpo"):
        queue = mp.Queue()
        p = mp.Process(target=bench_method, args=(args, method, num_classes, queue))
        p.start()
        rows[method] = queue.get()
        p.join()
    ctx = setup(args)
    dev = torch.cuda.get_device_name() if ctx.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    peak = next((v for k, v in PEAK_BF16.items() if k in dev), None) if args.dtype != "fp32" else None
    for r in rows.values():
        r["mfu"] = r["flops_per_step"] * r["img_per_s"] / args.batch_size / peak if peak else None
    result = {"config": vars(args), "device": dev, "torch": torch.__version__, "methods": rows,
              "loader_img_per_s": loader_speed(args, ctx), "date": time.strftime("%Y-%m-%d")}
    print(f"{args.model} {args.task} {args.img_size}px batch {args.batch_size} {str(ctx.amp_dtype)[6:]} "
          f"sdpa={not args.no_sdpa} compile={args.compile} on {dev}")
    print("| method | ms/step | img/s | GFLOP/step | peak mem GB | mem above start GB | MFU |\n|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        above = f"{r['memory_above_start_gb']:.3f}" if r["memory_above_start_gb"] is not None else "—"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "—"
        print(f"| {m} | {r['ms_per_step']:.1f} | {r['img_per_s']:.0f} | {r['flops_per_step'] / 1e9:.1f} | "
              f"{r['peak_memory_gb']:.3f} | {above} | {mfu} |")
    g, c = rows["grpo"], rows["ce"]
    print(f"grpo/ce: time x{g['ms_per_step'] / c['ms_per_step']:.3f}, FLOPs x{g['flops_per_step'] / c['flops_per_step']:.3f}, "
          f"peak memory x{g['peak_memory_gb'] / c['peak_memory_gb']:.3f}")
    if result["loader_img_per_s"]:
        print(f"input pipeline: {result['loader_img_per_s']:.0f} img/s vs model {c['img_per_s']:.0f} (ce) / "
              f"{g['img_per_s']:.0f} (grpo) img/s -> the bottleneck is the "
              f"{'loader' if result['loader_img_per_s'] < g['img_per_s'] else 'model'}")
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, f"bench-{args.task}-{args.dataset}-{args.model}-{args.img_size}px-"
                                             f"b{args.batch_size}{'-compile' if args.compile else ''}"
                                             f"{'-nosdpa' if args.no_sdpa else ''}.json"), result)
    return result


# -----------------------------------------------------------------------------
# Report (--report RUNS_DIR): the paper's tables and figures from the run JSONs, mean ± std over seeds

METHODS = [("frozen", "DINOv2 (frozen)"), ("ce", "Fine-tuning"), ("grpo", "GRPO-RM")]
UNIFORMITY_NAMES = [("none", "set to 0"), ("eq5", "Eq. (5)"), ("eq4", "Eq. (4) (GRPO-RM)")]


def data_label(cfg):
    folder = cfg["dataset"] in ("imagefolder", "vocfolder")
    return f"{cfg['dataset']}:{os.path.basename(os.path.normpath(cfg['data_dir']))}" if folder else cfg["dataset"]


def cell(values, best=False):
    """'mean ± std' over seeds (sample std; a single run shows its value), bold if best, '—' if none."""
    if not values:
        return "—"
    m = float(np.mean(values))
    text = f"{m:.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{m:.2f}"
    return f"**{text}**" if best else text


def table(title, header, blocks, bold=None):
    """blocks: [(row label prefix, [(row name, [values per column])])]; in the columns marked in `bold`
    (default: all), the best (highest) mean of each block is bolded."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for prefix, rows in blocks:
        means = [[np.mean(v) if v else -np.inf for v in vals] for _, vals in rows]
        best = np.max(means, axis=0) if rows else []
        for (name, vals), ms in zip(rows, means):
            cells = [cell(v, bool(v) and m == b and sum(1 for r in means if r[k] > -np.inf) > 1
                          and (bold is None or bold[k])) for k, (v, m, b) in enumerate(zip(vals, ms, best))]
            lines.append(f"| {prefix} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def draw_curves(path, panels):
    """A small line chart with PIL (no plotting library): one panel per (title, {label: ys})."""
    from PIL import ImageDraw
    W, H, pad = 420, 260, 44
    img = Image.new("RGB", (W * len(panels), H), "white")
    d = ImageDraw.Draw(img)
    for j, (title, series) in enumerate(panels):
        ys_all = [y for ys in series.values() for y in ys]
        lo, hi = min(ys_all), max(ys_all)
        hi = hi if hi > lo else lo + 1
        x0, y0, x1, y1 = j * W + pad, pad, (j + 1) * W - 10, H - pad
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text((x0, 12), title, fill="black")
        d.text((j * W + 4, y0), f"{hi:.3g}", fill="black")
        d.text((j * W + 4, y1 - 10), f"{lo:.3g}", fill="black")
        d.text(((x0 + x1) // 2 - 15, y1 + 8), "epoch", fill="black")
        n = max(len(ys) for ys in series.values())
        d.text((x0, y1 + 8), "1", fill="black")
        d.text((x1 - 12, y1 + 8), str(n), fill="black")
        for k, (label, ys) in enumerate(series.items()):
            color = {"ce": (31, 119, 180), "grpo": (214, 39, 40)}.get(label, (44, 160, 44))
            pts = [(x0 + (x1 - x0) * i / max(1, len(ys) - 1), y1 - (y1 - y0) * (y - lo) / (hi - lo)) for i, y in enumerate(ys)]
            d.line(pts, fill=color, width=2) if len(pts) > 1 else d.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=color)
            d.text((x1 - 70, y0 + 6 + 12 * k), label, fill=color)
    img.save(path)


def load_groups(root):
    """RUNS_DIR/*/result.json grouped by configuration: (task, data, method, uniformity, feature type,
    subset) -> [result per seed]; each result also records its folder."""
    groups = {}
    for f in sorted(glob.glob(os.path.join(root, "*", "result.json"))):
        r = json.load(open(f))
        r["dir"], c = os.path.dirname(f), r["config"]
        key = (c["task"], data_label(c), c["method"], c["uniformity"] if c["method"] == "grpo" else "",
               c["feature_type"] if c["task"] == "seg" else "", c["subset"])
        groups.setdefault(key, []).append(r)
    return groups


def paper_tables(groups):
    """Tables 3, 2/4 and 6, shaped like the paper's."""
    def vals(task, data, method, metric, uni="eq4", ft="", subset=1.0, field="metrics"):
        rs = groups.get((task, data, method, uni if method == "grpo" else "", ft, subset), [])
        return [r["metrics"][metric] if field == "metrics" else float(np.mean(r[field])) for r in rs if r[field]]

    out, cls_data = [], sorted({k[1] for k in groups if k[0] == "cls"})
    if cls_data:
        out.append(table("Table 3: classification (SR, kNN top-1 %)", ["Dataset", "Method", "SR", "kNN"],
                         [(d, [(name, [vals("cls", d, m, "sr"), vals("cls", d, m, "knn")]) for m, name in METHODS])
                          for d in cls_data]))
    for d in sorted({k[1] for k in groups if k[0] == "seg"}):
        subsets = sorted({k[5] for k in groups if k[:2] == ("seg", d)})  # e.g. 0.1 (the paper's "10%") and 1
        blocks = [({"linear": "Linear", "ms": "Multi Scale"}[ft],
                   [(f"{name}{f' ({100 * sub:g}%)' if sub < 1 else ''}",
                     [vals("seg", d, m, k, ft=ft, subset=sub) for k in ("pixel_acc", "iou", "miou")])
                    for m, name in METHODS for sub in ((1.0,) if m == "frozen" else subsets)])
                  for ft in sorted({k[4] for k in groups if k[:2] == ("seg", d)}, key=["linear", "ms"].index)]
        out.append(table(f"Tables 2/4: segmentation on {d} (%, IoU = frequency-weighted IoU)",
                         ["Feature type", "Method", "Pixel Acc", "IoU", "mIoU"], blocks))
    ablation = sorted({(k[0], k[1]) for k in groups if k[2] == "grpo" and k[3] != "eq4"})
    if ablation:
        blocks = [(d, [(name, [vals(t, d, "grpo", "sr" if t == "cls" else "pixel_acc", u, ft),
                               vals(t, d, "grpo", None, u, ft, field="sec_per_epoch")]) for u, name in UNIFORMITY_NAMES])
                  for t, d in ablation for ft in ["linear" if t == "seg" else ""]]
        out.append(table("Table 6: uniformity reward (SR % for classification, pixel acc % for segmentation; s/epoch)",
                         ["Dataset", "Uniformity reward", "Accuracy", "s/epoch"], blocks, bold=[True, False]))
    return out


def bench_table(benches):
    """Table 5 from --bench results: cost per step of ce vs grpo, and the ratios."""
    out = ["### Table 5: cost per training step, ce vs grpo (--bench, synthetic data)", "",
           "| Dataset | Model | Setting | Device | Method | ms/step | GFLOP/step | Peak memory GB | grpo/ce time | grpo/ce memory |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for b in benches:
        c, ce, g = b["config"], b["methods"]["ce"], b["methods"]["grpo"]
        kw = {k: v for k, v in c.get("hub_kwargs", {}).items() if k != "pretrained"}
        model = c["model"] + (f" ({', '.join(f'{k} {v}' for k, v in kw.items())})" if kw else "")
        setting = f"{c['img_size']} px, batch {c['batch_size']}, {c['dtype'] or 'default dtype'}{', compile' if c['compile'] else ''}"
        for m, r in b["methods"].items():
            ratio = (f"x{g['ms_per_step'] / ce['ms_per_step']:.3f} | x{g['peak_memory_gb'] / ce['peak_memory_gb']:.3f}"
                     if m == "grpo" else " | ")
            out.append(f"| {data_label(c)} | {model} | {setting} | {b['device']} | {m} | "
                       f"{r['ms_per_step']:.1f} | {r['flops_per_step'] / 1e9:.1f} | {r['peak_memory_gb']:.2f} | {ratio} |")
    return out + [""]


def fig3_curves(root, groups):
    """Figure 3: training loss per epoch, ce vs grpo, mean over seeds -> CSV and PNG per dataset."""
    out = []
    for d in sorted({k[1] for k in groups if k[2] in ("ce", "grpo") and k[5] == 1.0}):
        series = {}
        for m in ("ce", "grpo"):
            hist = [r["train_loss"] for k, rs in groups.items() if k[1] == d and k[2] == m and k[3] in ("", "eq4")
                    and k[4] in ("", "linear") and k[5] == 1.0 for r in rs if r["train_loss"]]
            n = min((len(h) for h in hist), default=0)
            if n:
                series[m] = np.array([h[:n] for h in hist])  # (seeds, epochs)
        if not series:
            continue
        name = d.replace(":", "_")
        with open(os.path.join(root, f"fig3_{name}.csv"), "w") as f:
            f.write("epoch," + ",".join(f"{m}_mean,{m}_std" for m in series) + "\n")
            for e in range(max(a.shape[1] for a in series.values())):
                f.write(f"{e + 1}," + ",".join(f"{a[:, e].mean():.6f},{a[:, e].std():.6f}" if e < a.shape[1] else ","
                                                for a in series.values()) + "\n")
        draw_curves(os.path.join(root, f"fig3_{name}.png"),
                    [(f"{d}: {m} training loss", {m: a.mean(0).tolist()}) for m, a in series.items()])
        out.append(f"Figure 3 ({d}): fig3_{name}.csv, fig3_{name}.png")
    return out


def fig2_grid(root, groups):
    """Figure 2: rows of image | truth | frozen | fine-tuning | GRPO-RM from the runs' --save-vis PNGs."""
    out = []
    for d in sorted({k[1] for k in groups if k[0] == "seg"}):
        pngs = {}
        for m, _ in METHODS:  # the first seed's run of each method, linear features, full data
            runs = groups.get(("seg", d, m, "eq4" if m == "grpo" else "", "linear", 1.0), [])
            pngs[m] = sorted(glob.glob(os.path.join(runs[0]["dir"], "vis", "*.png"))) if runs else []
        n = min(len(p) for p in pngs.values())
        if not n:
            continue
        rows = []
        for i in range(n):
            ims = {m: np.array(Image.open(p[i]).convert("RGB")) for m, p in pngs.items()}
            w = ims["frozen"].shape[1] // 3  # each PNG is image | truth | prediction
            rows.append(np.concatenate([ims["frozen"]] + [ims[m][:, 2 * w:] for m in ("ce", "grpo")], axis=1))
        name = f"fig2_{d.replace(':', '_')}.png"
        Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(root, name))
        out.append(f"Figure 2 ({d}): {name} (image | truth | frozen | fine-tuning | GRPO-RM)")
    return out


def report(root):
    groups = load_groups(root)
    benches = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(root, "bench-*.json")))]
    if not groups and not benches:
        raise UserError(f"--report {root}: no */result.json or bench-*.json there")
    n = sum(len(v) for v in groups.values())
    out = [f"# Results in {root}", "", f"{n} runs; mean ± std over seeds; best per dataset in bold.", ""]
    out += paper_tables(groups) + (bench_table(benches) if benches else [])
    out += fig3_curves(root, groups) + fig2_grid(root, groups)
    text = "\n".join(out) + "\n"
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return text


# -----------------------------------------------------------------------------
# Main

def write_json_atomic(path, obj):
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB (whole process)


def main(argv=None):
    """Run one experiment. Returns (result dict, trained Net)."""
    args = get_args(argv)
    if args.report:
        return report(args.report), None
    if args.bench:
        return bench(args), None
    ctx = setup(args)
    try:
        name = run_name(args)
        run_dir = os.path.join(args.out, name)
        if ctx.rank == 0:
            try:
                os.makedirs(run_dir, exist_ok=True)
                write_json_atomic(os.path.join(run_dir, ".writable"), {})
                os.remove(os.path.join(run_dir, ".writable"))
            except OSError as e:
                raise UserError(f"--out {args.out}: not writable ({e.strerror})") from None
        num_classes, train_set, train_eval, test = build_data(args, ctx)
        net = build_model(args, num_classes, ctx)
        if ctx.rank == 0:
            print(f"{name}: {len(train_set)} train / {len(test)} test images, {num_classes} classes, "
                  f"{ctx.world} process(es) on {ctx.device.type}, {str(ctx.amp_dtype)[6:]}", flush=True)
        hist = {"train_loss": [], "sec_per_epoch": []}
        if args.method != "frozen" and args.epochs > 0:
            hist = train(args, ctx, net, train_set, num_classes, run_dir)
            if hist is None:
                if ctx.rank == 0:
                    print(f"stopped after epoch {args.stop_after_epoch}; rerun with --resume to go on", flush=True)
                return None, net
        t0 = time.time()
        net.eval()
        if args.task == "cls":
            metrics, feature_seconds = evaluate_cls(args, ctx, net, train_eval, test, num_classes)
        else:
            metrics, feature_seconds = evaluate_seg(args, ctx, net, train_eval, test, num_classes, run_dir)
        result = {"config": vars(args), "metrics": metrics, **hist, "eval_seconds": time.time() - t0,
                  "feature_seconds": feature_seconds,
                  "peak_memory_gb": peak_memory_gb(ctx.device), "world_size": ctx.world,
                  "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if ctx.rank == 0:
            if args.method != "frozen":  # the post-trained DINOv2, loadable again with --weights
                atomic_save(os.path.join(run_dir, "backbone.pt"), lambda f: torch.save(net.backbone.state_dict(), f))
            write_json_atomic(os.path.join(run_dir, "result.json"), result)  # only a finished run has one
            if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
                os.remove(os.path.join(run_dir, "ckpt.pt"))  # finished: the resume state is no longer needed
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)),
                  flush=True)
        return result, net
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        # A UserError raised in a DataLoader worker arrives wrapped, with the worker's traceback as text.
        msg = str(e).strip().splitlines()[-1]
        print(f"error: {msg.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
