"""GRPO-RM: Fine-Tuning Representation Models via GRPO-Driven Reinforcement Learning.

A single-file reference implementation of Xu, Jiao, Zhang & Li, arXiv 2511.15256. DINOv2 is
post-trained for image classification or semantic segmentation with GRPO-RM (--method grpo) or
with standard fine-tuning (--method ce), or left as it is (--method frozen); the post-trained
backbone is then frozen and evaluated with a fresh head: softmax regression (SR) and kNN for
classification, pixel accuracy / IoU / mIoU for segmentation.

    python grpo_rm.py --dataset cifar10 --data-dir data/cifar10              # one GPU, or the CPU
    torchrun --nproc_per_node=4 grpo_rm.py --task seg --dataset voc --data-dir data/voc
    bash run_all.sh table3                                    # one table of the paper, resumable
    python3 -m pytest -q                                      # the tests

The file reads top to bottom: config, data, model (torch.hub DINOv2 and both heads), the method
(rewards, advantages, the clipped objective, θ_old: one block that needs torch alone), training
(bf16, DDP), evaluation on frozen features, main; then the tooling (benchmark, report, figures).
"Eq. (n)" cites the paper; "Open in the paper:" marks a point it leaves open and says what is
done here. README.md holds the measured results, each with the command that produced it.
"""
import argparse
import copy
import datetime
import functools
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
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

# DINOv2 at the commit this file was tested with; torch.hub fetches that tree, not today's main.
HUB_REPO = "facebookresearch/dinov2:b8931f7bf91576930313be2c6d6af376033b35f0"
HUB_TIMEOUT_S = 30  # the longest torch.hub waits on one network read (a firewall may drop packets)


class UserError(Exception):
    """Bad input: printed as one line that names the flag or file, exit code 2, no traceback."""


# =============================================================================
# Config: every flag; the defaults reproduce the paper (Section 4.2)

def make_parser():
    p = argparse.ArgumentParser(description="GRPO-RM, fine-tuning or frozen DINOv2, evaluated "
                                "on frozen features",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a, on_off = p.add_argument, argparse.BooleanOptionalAction
    a("--task", choices=["cls", "seg"], help="default: the dataset's")
    a("--dataset", choices=sorted(DATASETS))
    a("--data-dir", default="data", help="dataset root (layouts in README.md)")
    a("--num-classes", type=int, help="needed for vocfolder; default: the dataset's")
    a("--method", choices=["grpo", "ce", "frozen"], default="grpo")
    a("--model", default="dinov2_vits14", help="hub entry point: dinov2_vit{s,b,l,g}14[_reg]")
    a("--hub-repo", default=HUB_REPO, help="GitHub owner/name[:ref], or a local clone")
    a("--hub-kwargs", default="{}", help='JSON arguments of the entry point: {"pretrained": false}')
    a("--weights", help="local state dict of the backbone (offline use); strict load")
    a("--uniformity", choices=sorted(UNIFORMITY), default="eq4", help="Table 6 ablation")
    a("--clip-eps", type=float, default=0.2, help="ε of Eq. (1)")
    a("--background-penalty", action=on_off, help="seg: r_0 -= c/2 after Eq. (6); default: voc")
    a("--epochs", type=int, default=100)
    a("--batch-size", type=int, help="global batch m; default 1024 (cls), 256 (seg)")
    a("--lr", type=float, help="lr per 256 images, cosine to lr/100; default 1e-3 cls, 1e-5 seg")
    a("--subset", type=float, default=1.0, help="fraction of the training set post-trained on")
    a("--augment", action=on_off, default=True, help="random crop and flip in training")
    a("--seed", type=int, default=0)
    a("--img-size", type=int, help="default: native size rounded up to the patch; 224 / 448")
    a("--seg-size", type=int, default=128, help="seg: patch tokens are upsampled to this size")
    a("--hidden", type=int, help="hidden width of the heads; default 256, 64 for voc")
    a("--eval-epochs", type=int, default=50, help="epochs of the head on frozen features")
    a("--eval-lr", type=float, help="the same rule for the evaluation head; default --lr")
    a("--feature-type", default="linear", help="seg evaluation: linear, ms or linear,ms")
    a("--ms-scales", default="1.0,1.32,1.73,2.28,3.0", help="test scales of ms (DINOv2's)")
    a("--eval-memory-gb", type=float, default=8.0, help="cached features above this go to disk")
    a("--save-vis", type=int, default=0, metavar="K", help="seg: K image|truth|prediction PNGs")
    a("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU is visible")
    a("--dtype", choices=["bf16", "fp32"], help="autocast dtype; default bf16 on GPU, else fp32")
    a("--dist-backend", choices=["nccl", "gloo"], help="torchrun; default nccl on GPU, else gloo")
    a("--compile", action="store_true", help="torch.compile the model and θ_old")
    a("--no-sdpa", action="store_true", help="keep a hand-written attention as it is")
    a("--preload", action=on_off, help="cls: decode once, resize on the device; default: small")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loaders per process")
    a("--out", default="runs", help="each run writes OUT/NAME/result.json")
    a("--name", help="run name; default: derived from the flags")
    a("--resume", action="store_true", help="continue from OUT/NAME/ckpt.pt if there is one")
    a("--stop-after-epoch", type=int, metavar="K", help="checkpoint after epoch K and stop")
    a("--log-every", type=int, default=10, help="progress line every N steps")
    a("--bench", action="store_true", help="time ce vs grpo on synthetic batches, then exit")
    a("--bench-steps", type=int, default=10)
    a("--bench-warmup", type=int, default=3)
    a("--report", metavar="RUNS_DIR", help="tables and figures from RUNS_DIR, then exit")
    return p


def get_args(argv=None):
    """Parse the flags and fill the defaults that depend on the task (Section 4.2)."""
    args = make_parser().parse_args(argv)
    if args.report:
        return args
    if args.dataset is None:
        raise UserError(f"--dataset is required (one of: {', '.join(sorted(DATASETS))})")
    spec = DATASETS[args.dataset]
    if args.task not in (None, spec.task):
        raise UserError(f"--task {args.task}: --dataset {args.dataset} is a {spec.task} dataset")
    args.task, seg = spec.task, spec.task == "seg"
    args.batch_size = args.batch_size or (256 if seg else 1024)
    args.lr = args.lr if args.lr is not None else (1e-5 if seg else 1e-3)
    args.eval_lr = args.eval_lr if args.eval_lr is not None else args.lr
    args.hidden = args.hidden or (64 if args.dataset == "voc" else 256)
    if args.background_penalty is None:
        args.background_penalty = "background" in spec.flags
    if args.preload is None:
        args.preload = "small" in spec.flags
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    check_args(args)
    return args


def check_args(args):
    """Everything that can be checked before any work; parses the list-valued flags."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no GPU is visible")
    if args.preload and args.task == "seg":
        raise UserError("--preload is for classification datasets")
    try:
        args.ms_scales = [float(v) for v in str(args.ms_scales).split(",")]
        args.hub_kwargs = json.loads(args.hub_kwargs)
    except ValueError as e:
        flag = "--hub-kwargs" if isinstance(e, json.JSONDecodeError) else "--ms-scales"
        raise UserError(f"{flag}: cannot parse ({e})") from None
    if not isinstance(args.hub_kwargs, dict):
        raise UserError("--hub-kwargs: not a JSON object")
    args.feature_type = str(args.feature_type).split(",")
    if not set(args.feature_type) <= {"linear", "ms"}:
        raise UserError(f"--feature-type {','.join(args.feature_type)}: linear, ms or linear,ms")
    if not 0.0 < args.subset <= 1.0:
        raise UserError(f"--subset must be in (0, 1], got {args.subset}")
    for flag in ("epochs", "eval_epochs", "batch_size", "img_size", "seg_size", "hidden"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "epochs" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def run_name(args):
    parts = [args.task, args.dataset, args.method]
    parts += [args.uniformity] if args.method == "grpo" else []
    parts += [f"sub{args.subset:g}"] if args.subset < 1 else []
    return args.name or "-".join(parts + [f"s{args.seed}"])


# =============================================================================
# Data: the real torchvision datasets and the real on-disk layouts of the paper's datasets

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as DINOv2
IGNORE = 255  # segmentation "no label" (VOC's 255; ADE20k's 0 and unused COCO ids map to it)
BICUBIC = v2.InterpolationMode.BICUBIC


def load_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:  # missing, truncated or not an image
        raise UserError(f"{path}: cannot read image ({e})") from None


def cls_transform(img_size, augment):
    # Open in the paper: augmentation. Here the lightest standard one: resize the shorter side,
    # crop (random when augmenting, else the centre; a no-op for square images), random flip.
    crop = ([v2.RandomCrop(img_size), v2.RandomHorizontalFlip()] if augment
            else [v2.CenterCrop(img_size)])
    return v2.Compose([v2.ToImage(), v2.Resize(img_size, interpolation=BICUBIC), *crop,
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def seg_transform(img_size, augment):
    # Open in the paper: augmentation. One random resized crop (scale 0.5-1) and flip, applied to
    # image and mask alike (torchvision resizes a Mask with nearest neighbour).
    size = (img_size, img_size)
    geo = ([v2.RandomResizedCrop(size, scale=(0.5, 1.0)), v2.RandomHorizontalFlip()] if augment
           else [v2.Resize(size)])
    dtypes = {tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}
    return v2.Compose([*geo, v2.ToDtype(dtypes, scale=True), v2.Normalize(MEAN, STD)])


def torchvision_set(cls, **splits):
    """CIFAR-10/100, STL-10: torchvision's loaders; a download when missing, one clear line
    offline."""
    def build(root, split, transform):
        kw = dict(splits[split], transform=transform)
        try:
            return cls(root, download=False, **kw)
        except RuntimeError:
            pass  # not on disk yet
        try:
            return cls(root, download=True, **kw)
        except Exception as e:
            raise UserError(f"--data-dir {root}: {cls.__name__} is not there and could not be "
                            f"downloaded ({type(e).__name__}); offline, copy its files there"
                            ) from None
    return build


def image_folder(root, split, transform):
    """ImageNet (train/, val/) and any image folder (train/ and test/ or val/, a folder a class)."""
    for sub in (["train"] if split == "train" else ["test", "val"]):
        if os.path.isdir(os.path.join(root, sub)):
            try:
                return torchvision.datasets.ImageFolder(os.path.join(root, sub), transform,
                                                        loader=load_rgb)
            except (FileNotFoundError, RuntimeError) as e:
                raise UserError(f"--data-dir {root}: {e}") from None
    raise UserError(f"--data-dir {root}: no {'train/' if split == 'train' else 'test/ or val/'}")


class TinyImageNet(Dataset):
    """The official tiny-imagenet-200 layout: wnids.txt, train/<wnid>/images/*.JPEG, and
    val/images/*.JPEG labelled by val/val_annotations.txt (file, wnid, box)."""

    def __init__(self, root, split, transform):
        try:
            self.classes = open(os.path.join(root, "wnids.txt")).read().split()
            index = {w: i for i, w in enumerate(self.classes)}
            if split == "train":
                self.samples = [(f, index[w]) for w in self.classes for f in sorted(
                    glob.glob(os.path.join(root, "train", w, "images", "*.JPEG")))]
            else:
                rows = open(os.path.join(root, "val", "val_annotations.txt")).read().splitlines()
                self.samples = [(os.path.join(root, "val", "images", f), index[w])
                                for f, w in (r.split("\t")[:2] for r in rows if r.strip())]
        except (OSError, KeyError) as e:
            raise UserError(f"--data-dir {root}: not a tiny-imagenet-200 folder ({e})") from None
        self.targets, self.transform = [y for _, y in self.samples], transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        return self.transform(load_rgb(path)), y


class Preloaded:
    """--preload, for small datasets of one image size (CIFAR, STL-10, Tiny-ImageNet): decode every
    image once into a uint8 tensor on the device, then resize, flip and normalise each batch there
    (the ops of cls_transform, batched) instead of decoding on the CPU every epoch."""

    def __init__(self, images, targets, classes):
        self.images, self.targets, self.classes = images, targets, classes  # (N, 3, h, w) uint8
        self.labels = torch.tensor(targets, device=images.device)  # (N,)

    @classmethod
    def decode(cls, ds, device, workers):
        loader = DataLoader(ds, batch_size=256, num_workers=workers)  # ds yields v2.ToImage()
        try:
            images = torch.cat([x.to(device) for x, _ in loader])
        except RuntimeError as e:
            raise UserError(f"--preload: the images differ in size ({str(e).splitlines()[0]}); "
                            "use --no-preload") from None
        return cls(images, list(labels_of(ds)), getattr(ds, "classes", None))

    def select(self, keep):
        return Preloaded(self.images[keep], [self.targets[i] for i in keep], self.classes)

    def __len__(self):
        return len(self.images)

    def batches(self, indices, batch_size, augment, img_size):
        for idx in torch.as_tensor(indices, dtype=torch.long).split(batch_size):
            idx = idx.to(self.images.device)
            x = v2.functional.resize(self.images[idx], img_size, interpolation=BICUBIC,
                                     antialias=True)  # (b, 3, S, S) uint8
            x = v2.functional.center_crop(x, img_size)  # square images: a no-op, as RandomCrop
            if augment:
                flip = torch.rand(len(x), device=x.device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            x = v2.functional.to_dtype(x, torch.float32, scale=True)
            yield v2.functional.normalize(x, MEAN, STD), self.labels[idx]  # (b, 3, S, S), (b,)


def resize_labels(y, size):
    """(B, H, W) label maps -> (B, size, size) by nearest neighbour: never blends two class ids."""
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(y.dtype)


def lut(pairs, unlisted=-1):
    """A 256-entry table from the stored mask value to the class (IGNORE, or -1 = invalid)."""
    t = np.full(256, unlisted, np.int16)
    for raw, cls in pairs:
        t[raw] = cls
    return t


def identity_table(c):  # VOC: the stored values are the classes, 255 = ignore
    return lut([(i, i) for i in range(c)] + [(IGNORE, IGNORE)])


def ade_table(c):  # ADE20k: 0 = "other" (ignored), 1..150 -> 0..149
    return lut([(0, IGNORE)] + [(i + 1, i) for i in range(150)])


# COCO-stuff-164k stuffthingmaps store the 182 COCO ids minus one; 11 thing ids are unused.
COCO_IDS = [i for i in range(182) if i not in {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}]


def coco_table(c):  # COCO-stuff: the 182 stored ids -> 171 classes; unused ids are ignored
    return lut([(r, i) for i, r in enumerate(COCO_IDS)] + [(IGNORE, IGNORE)], unlisted=IGNORE)


def voc_pairs(root, split):
    bases = [os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"), root]
    base = next((b for b in bases if os.path.isdir(os.path.join(b, "ImageSets", "Segmentation"))),
                None)
    if base is None:
        raise UserError(f"--data-dir {root}: no VOCdevkit/VOC2012/ImageSets/Segmentation folder")
    name = "train.txt" if split == "train" else "val.txt"
    lst = os.path.join(base, "ImageSets", "Segmentation", name)
    ids = open(lst).read().split() if os.path.isfile(lst) else []
    return [(os.path.join(base, "JPEGImages", i + ".jpg"),
             os.path.join(base, "SegmentationClass", i + ".png")) for i in ids], lst


def folder_pairs(image_dirs, mask_dir):
    """*.jpg in the first image dir that exists, each with its mask <stem>.png in mask_dir."""
    for im_dir in image_dirs:
        if os.path.isdir(im_dir):
            ims = sorted(glob.glob(os.path.join(im_dir, "*.jpg")))
            masks = [os.path.join(mask_dir, os.path.basename(f)[:-4] + ".png") for f in ims]
            return list(zip(ims, masks)), im_dir
    return [], image_dirs[0]


def ade_pairs(root, split):
    nested = os.path.join(root, "ADEChallengeData2016")
    base = nested if os.path.isdir(nested) else root
    d = "training" if split == "train" else "validation"
    return folder_pairs([os.path.join(base, "images", d)], os.path.join(base, "annotations", d))


def coco_pairs(root, split):
    d = "train2017" if split == "train" else "val2017"
    return folder_pairs([os.path.join(root, "images", d), os.path.join(root, d)],
                        os.path.join(root, "stuffthingmaps", d))


class SegFolder(Dataset):
    """(image, mask) file pairs; masks are palette or grey PNGs mapped through a lookup table."""

    def __init__(self, pairs, table, num_classes, transform):
        self.pairs, self.table, self.transform = pairs, table, transform
        self.num_classes = num_classes

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
        bad = (label < 0) | ((label >= self.num_classes) & (label != IGNORE))
        if bad.any():
            raise UserError(f"{mask_path}: label value {raw[bad][0]} is not a class in [0, "
                            f"{self.num_classes}) nor {IGNORE} (check --num-classes)")
        mask = tv_tensors.Mask(torch.from_numpy(label.astype(np.uint8))[None])
        img, mask = self.transform(img, mask)  # one draw of crop and flip for both
        return img, mask[0]


def seg_set(find_pairs, table):
    def build(root, split, transform, num_classes):
        pairs, where = find_pairs(root, split)
        if not pairs:
            raise UserError(f"--data-dir {root}: no images found ({where})")
        missing = next((f for pair in pairs for f in pair if not os.path.isfile(f)), None)
        if missing:
            raise UserError(f"{missing}: file missing")
        return SegFolder(pairs, table(num_classes), num_classes, transform)
    return build


@dataclass(frozen=True)
class Spec:
    task: str            # "cls" or "seg"
    build: Callable      # (root, split, transform[, num_classes]) -> dataset
    classes: int = 0     # the paper's class count (0: read from the data, or --num-classes)
    native: int = 0      # image side in pixels (0: unknown, then 224 for cls and 448 for seg)
    images: int = 0      # the paper's training-set size (its Table 1), for Table 5's s/epoch
    flags: str = ""      # "download": torchvision fetches it; "small": --preload by default;
    #                      "background": class 0 is background, the segmentation penalty is on


CIFAR = dict(train={"train": True}, test={"train": False})
DL_SMALL = "download small"
STL = dict(train={"split": "train"}, test={"split": "test"})
TV = torchvision.datasets
DATASETS = {  # name: Spec(task, build, classes, native px, training images, flags)
    "cifar10": Spec("cls", torchvision_set(TV.CIFAR10, **CIFAR), 10, 32, 50_000, DL_SMALL),
    "cifar100": Spec("cls", torchvision_set(TV.CIFAR100, **CIFAR), 100, 32, 50_000, DL_SMALL),
    "stl10": Spec("cls", torchvision_set(TV.STL10, **STL), 10, 96, 5_000, DL_SMALL),
    "tinyimagenet": Spec("cls", TinyImageNet, 200, 64, 100_000, "small"),
    "imagenet": Spec("cls", image_folder, 1000, 0, 1_281_167),
    "imagefolder": Spec("cls", image_folder),  # any image folder; classes from its folders
    "voc": Spec("seg", seg_set(voc_pairs, identity_table), 21, 0, 1_464, "background"),
    "ade20k": Spec("seg", seg_set(ade_pairs, ade_table), 150, 0, 20_210),
    "cocostuff": Spec("seg", seg_set(coco_pairs, coco_table), 171, 0, 118_287),
    "vocfolder": Spec("seg", seg_set(voc_pairs, identity_table)),  # any VOC layout, --num-classes
}


def labels_of(ds):
    return ds.targets if hasattr(ds, "targets") else ds.labels  # STL10 calls them labels


def default_img_size(spec, patch):
    """The paper's input sizes, read from its Table 5 (README): a classification image at its
    native size rounded up to a multiple of the patch (CIFAR 42, STL-10 98, Tiny-ImageNet 70 for
    patch 14); ImageNet and unknown folders 224; segmentation 448."""
    if spec.native:
        return math.ceil(spec.native / patch) * patch
    return 448 if spec.task == "seg" else 224


def build_data(args, ctx):
    """-> (num_classes, the post-training set, the train and test sets of the evaluation)."""
    spec, root = DATASETS[args.dataset], args.data_dir
    if not os.path.isdir(root) and "download" not in spec.flags:
        raise UserError(f"--data-dir {root}: no such directory")
    if "download" in spec.flags:  # rank 0 downloads, the others then find its files
        rank0_first(ctx, lambda: [spec.build(root, s, None) for s in ("train", "test")])
    if args.task == "cls":
        num_classes, train, train_eval, test = cls_sets(args, spec, ctx.device)
    else:
        num_classes = args.num_classes or spec.classes
        if not num_classes:
            raise UserError(f"--dataset {args.dataset} needs --num-classes")
        if num_classes > IGNORE:
            raise UserError(f"--num-classes {num_classes}: at most {IGNORE} segmentation classes")
        train = spec.build(root, "train", seg_transform(args.img_size, args.augment), num_classes)
        train_eval = spec.build(root, "train", seg_transform(args.img_size, False), num_classes)
        test = spec.build(root, "test", seg_transform(args.img_size, False), num_classes)
    if args.subset < 1.0:  # the paper's "10%" rows: a fixed random subset, for post-training only
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[:max(1, round(args.subset * len(train)))].tolist()
        train = train.select(keep) if isinstance(train, Preloaded) else Subset(train, keep)
    return num_classes, train, train_eval, test


def cls_sets(args, spec, device):
    root = args.data_dir
    if args.preload:  # decoded once; each batch is resized on the device
        train = train_eval = Preloaded.decode(spec.build(root, "train", v2.ToImage()), device,
                                              args.workers)
        test = Preloaded.decode(spec.build(root, "test", v2.ToImage()), device, args.workers)
    else:
        train = spec.build(root, "train", cls_transform(args.img_size, args.augment))
        train_eval = spec.build(root, "train", cls_transform(args.img_size, False))
        test = spec.build(root, "test", cls_transform(args.img_size, False))
    classes = getattr(train, "classes", None)
    if classes is not None and getattr(test, "classes", classes) != classes:
        raise UserError(f"--data-dir {root}: the test/val class folders differ from train/")
    num_classes = args.num_classes or (len(classes) if classes else max(labels_of(train)) + 1)
    for ds in (train, test):
        if len(ds) == 0:
            raise UserError(f"--data-dir {root}: a split has no images")
        if max(labels_of(ds)) >= num_classes:
            raise UserError(f"--num-classes {num_classes}: --data-dir {root} has label "
                            f"{max(labels_of(ds))}")
    return num_classes, train, train_eval, test


def epoch_batches(ds, sampler, epoch, skip, local_bs, args, ctx):
    """This rank's batches of one epoch: the same shuffle on every rank (seed, epoch), each rank its
    share, so the global batch is m. A run resumed inside an epoch skips the batches it did."""
    sampler.set_epoch(epoch)
    order = list(sampler)[skip * local_bs:]
    if isinstance(ds, Preloaded):
        return ds.batches(order, local_bs, args.augment, args.img_size)
    return DataLoader(ds, batch_size=local_bs, sampler=order, num_workers=args.workers,
                      pin_memory=ctx.device.type == "cuda")


def eval_batches(ds, local_bs, args, ctx):
    """This rank's shard of an evaluation split (samples rank, rank + world, ...; no padding, so
    every image counts once) -> (batches, shard size)."""
    shard = range(ctx.rank, len(ds), ctx.world)
    if isinstance(ds, Preloaded):
        return ds.batches(shard, local_bs, False, args.img_size), len(shard)
    loader = DataLoader(Subset(ds, shard), batch_size=local_bs, num_workers=args.workers,
                        pin_memory=ctx.device.type == "cuda")
    return loader, len(shard)


# =============================================================================
# Model: DINOv2 from torch.hub, the classification head and the segmentation head

def load_backbone(hub_repo, name, weights=None, hub_kwargs=None):
    """torch.hub.load of DINOv2 from GitHub (owner/name[:ref]) or a local clone (source="local").
    With --weights the hub's download is skipped and the file is loaded strictly."""
    local = os.path.isdir(hub_repo)
    if local and not os.path.isfile(os.path.join(hub_repo, "hubconf.py")):
        raise UserError(f"--hub-repo {hub_repo}: no hubconf.py in that directory")
    if not local and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w./-]+)?", hub_repo):
        raise UserError(f"--hub-repo {hub_repo}: no such directory, and not a GitHub owner/name")
    kwargs = {**(hub_kwargs or {}), **({"pretrained": False} if weights else {})}
    # torch.hub accepts a commit only if it heads a branch or tag unless validation is skipped;
    # the pin names the official repository, so there is no fork to guard against.
    pinned = re.search(r":[0-9a-f]{40}$", hub_repo) is not None
    hint = ("offline: git clone https://github.com/facebookresearch/dinov2, then --hub-repo DIR "
            "--weights dinov2_vits14_pretrain.pth")
    default_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(HUB_TIMEOUT_S)  # urllib's reads would otherwise wait without end
    try:
        model = torch.hub.load(hub_repo, name, source="local" if local else "github",
                               trust_repo=True, skip_validation=pinned, **kwargs)
    except Exception as e:
        if "Cannot find callable" in str(e):
            raise UserError(f"--model {name}: no such entry point in --hub-repo {hub_repo} "
                            "(DINOv2 has dinov2_vit{s,b,l,g}14 and their _reg variants)") from None
        raise UserError(f"--hub-repo {hub_repo} --model {name}: loading failed "
                        f"({type(e).__name__}: {e}); {hint}") from None
    finally:
        socket.setdefaulttimeout(default_timeout)
    if weights:
        load_weights(model, weights, name)
    # A local hubconf.py is executed as a module that is not registered; torch.compile looks the
    # module of the classes it defines up by name (torch 2.11: "hubconf.py"), so register it.
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__ not in sys.modules and hasattr(cls.forward, "__globals__"):
            sys.modules[cls.__module__] = types.ModuleType(cls.__module__)
            sys.modules[cls.__module__].__dict__.update(cls.forward.__globals__)
    return model


def load_weights(model, path, name):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--weights {path}: cannot read ({type(e).__name__})") from None
    own = model.state_dict()
    bad = sorted(set(own) ^ set(state)) + [k for k in own if k in state
                                           and own[k].shape != state[k].shape]
    if bad:
        raise UserError(f"--weights {path} does not fit --model {name}: {len(bad)} mismatching "
                        f"keys, e.g. {', '.join(bad[:4])}")
    model.load_state_dict(state, strict=True)


def sdpa_attention(self, x, attn_bias=None):
    """DINOv2's Attention.forward before 2025 (softmax(q kᵀ · scale) v written out, attn_drop an
    nn.Dropout), with the product computed by F.scaled_dot_product_attention (flash kernels)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, heads, N, C / heads)
    p = self.attn_drop.p if self.training else 0.0
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=p, scale=self.scale)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


def use_sdpa(backbone):
    """Give attention written out by hand (nn.Dropout attn_drop: DINOv2 before 2025, timm) the SDPA
    forward above. Today's DINOv2 calls SDPA itself (attn_drop a float) and is left alone: its own
    forward trained faster than this one (README, Performance). Returns the number patched."""
    n = 0
    for m in backbone.modules():
        if isinstance(getattr(m, "attn_drop", None), nn.Dropout) and hasattr(m, "qkv"):
            m.forward, n = types.MethodType(sdpa_attention, m), n + 1
    return n


def mlp_head(in_dim, hidden, num_classes):
    """The classification head: two fully connected layers on the class token.
    Open in the paper: the activation (ReLU here)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


class SegHead(nn.Module):
    """Patch tokens (B, D, h, w) -> bilinear upsampling to size × size (32×32 -> 128×128, Section
    4.2) -> a two-layer per-pixel projection -> logits (B, c, size, size), stored channels-last."""

    def __init__(self, in_dim, hidden, num_classes, size):
        super().__init__()
        self.size = size
        self.proj, self.out = nn.Linear(in_dim, hidden), nn.Linear(hidden, num_classes)

    def forward(self, tokens, size=None):
        # The first layer is linear and bilinear upsampling is linear with weights summing to 1,
        # so the two commute: projecting at token resolution first is the same function as the
        # paper's upsample-then-project, at 1/16 of the cost. The ReLU comes after the upsampling.
        x = self.proj(tokens.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, hidden, h, w)
        x = F.interpolate(x, size=size or (self.size, self.size), mode="bilinear",
                          align_corners=False)  # (B, hidden, S, S), channels-last in memory
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


def prepare_backbone(backbone, sdpa):
    if sdpa:
        use_sdpa(backbone)
    if hasattr(backbone, "mask_token"):  # used by DINOv2's masked pre-training only, never here
        backbone.mask_token.requires_grad_(False)
    return backbone


def build_net(backbone, args, num_classes, device):
    torch.manual_seed(args.seed)  # the same head on every rank
    D = backbone.embed_dim
    head = (mlp_head(D, args.hidden, num_classes) if args.task == "cls"
            else SegHead(D, args.hidden, num_classes, args.seg_size))
    return Net(backbone, head, args.task).to(device)


# =============================================================================
# The method: rewards (Eqs. 3-6), advantages (Eq. 2), the clipped objective (Eq. 1, β = 0), θ_old.
# This block needs torch alone (import copy, torch, torch.nn.functional as F) and can be copied.

def uniformity_eq4(p_old, labels):
    return -p_old  # Eq. (4): r_uni_i = -p_i, the GRPO-RM default


def uniformity_eq5(p_old, labels):
    c, k = p_old.shape[1], labels[:, None]
    p_k = p_old.gather(1, k)  # (N, 1): the old probability of the true class
    return ((1 - p_k) / (c - 1) - p_old).scatter(1, k, p_k)  # Eq. (5): i ≠ k; p_k for i = k


def uniformity_none(p_old, labels):
    return torch.zeros_like(p_old)  # Table 6, "set to 0": the accuracy reward alone


UNIFORMITY = {"eq4": uniformity_eq4, "eq5": uniformity_eq5, "none": uniformity_none}


def rewards(old_probs, labels, uniformity="eq4", background_penalty=False):
    """The reward of each of the c outputs of each sample, from the OLD policy's probabilities
    (Algorithm 1, line 6). old_probs (N, c), labels (N,) -> (N, c)."""
    if uniformity not in UNIFORMITY:
        raise ValueError(f"uniformity must be one of {sorted(UNIFORMITY)}, got {uniformity!r}")
    c = old_probs.shape[1]
    r = UNIFORMITY[uniformity](old_probs, labels)  # (N, c) r_uni
    r = r.scatter_add(1, labels[:, None], torch.full_like(r[:, :1], c))  # Eqs. (3), (6): +c at k
    if background_penalty:  # Section 3.3, segmentation: r_1 -= c/2 ("class 1" = index 0)
        r[:, 0] -= c / 2
    return r


def advantages(r, eps=1e-4):
    """Eq. (2): the z-score of the rewards over the group (the c classes of one sample).
    Open in the paper: which std. Here the unbiased one, plus eps, as TRL's GRPO."""
    d = r - r.mean(-1, keepdim=True)  # (N, c)
    std = torch.linalg.vector_norm(d, dim=-1, keepdim=True) / (r.shape[-1] - 1) ** 0.5  # r.std(-1)
    return d / (std + eps)


GRPO_DIAGNOSTICS = ("clip_frac", "approx_kl", "ratio_dev_mean", "ratio_dev_max")


def grpo_rm_terms(z, z_old, y, keep, clip_eps, uniformity, background_penalty):
    """Eq. (1) for a chunk of samples, in float32 (float64 stays float64). z, z_old (n, c) logits,
    y (n,) labels, keep (n,) labelled. -> Σ_n J_n, c·∂J/∂z (n, c), the diagnostics' sums."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    logp = F.log_softmax(z, -1, dtype=dtype)  # (n, c) log π_θ(o_i|q)
    logp_old = F.log_softmax(z_old, -1, dtype=dtype)  # (n, c) log π_θold(o_i|q)
    p_old = logp_old.exp()
    A = advantages(rewards(p_old, y, uniformity, background_penalty))  # Alg. 1, lines 6-7
    log_ratio = logp - logp_old  # ρ in log space: p_old may underflow to 0 (bf16 above all)
    ratio = log_ratio.exp()  # (n, c) ρ_i = π_θ / π_θold
    rA, cA = ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps).mul_(A)
    J = torch.minimum(rA, cA).mean(-1)  # (n,) 1/G Σ_i min(ρ_i A_i, clip(ρ_i) A_i), G = c
    # ∂J/∂z_j = 1/c Σ_i g_i A_i ∂ρ_i/∂z_j with ∂ρ_i/∂z_j = ρ_i (δ_ij - p_j) and g_i = 1 where
    # the min takes ρ_i A_i: c ∂J/∂z = w - p Σ_i w_i, w = g ⊙ ρ ⊙ A. At ρ = 1 (θ = θ_old): A.
    unclipped = rA <= cA
    w = rA.mul_(unclipped)
    dJ = torch.addcmul(w, logp.exp_(), w.sum(-1, keepdim=True), value=-1)  # (n, c)
    dev = ratio.sub_(1).abs_()  # |ρ - 1|
    kl = -(p_old * log_ratio).sum(-1)  # Σ_i p_old [(ρ_i - 1) - log ρ_i] = -Σ_i p_old log ρ_i
    stats = torch.stack([(~unclipped & keep[:, None]).sum().to(dtype), (kl * keep).sum(),
                         (dev.sum(-1) * keep).sum(), (dev.amax(-1) * keep).max()])
    return (J * keep).sum(), dJ, stats


class GRPORMLoss(torch.autograd.Function):
    """-J(θ) of Eq. (1) with β = 0, averaged over the labelled samples, and its gradient in closed
    form. The forward works through float32 chunks of rows (bounded transients) and saves one
    tensor for the backward, the gradient itself, in the dtype of the logits."""

    @staticmethod
    def forward(ctx, logits, old_logits, labels, clip_eps, uniformity, penalty, ignore, chunk):
        N, c = logits.shape
        keep = labels != ignore  # (N,)
        y = labels.masked_fill(~keep, 0)
        n = keep.sum().clamp(min=1)
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        J_sum, stats = 0.0, []
        for s in range(0, N, max(1, chunk // c)):
            sl = slice(s, s + max(1, chunk // c))
            J, dJ, st = grpo_rm_terms(logits[sl], old_logits[sl], y[sl], keep[sl], clip_eps,
                                      uniformity, penalty)
            J_sum, stats = J_sum + J, stats + [st]
            if grad is not None:  # ∂(-Σ_n J_n / n)/∂z; 0 for unlabelled samples
                torch.mul(dJ, keep[sl, None].to(dJ.dtype) / (-n * c), out=grad[sl])
        st = torch.stack(stats)  # (chunks, 4)
        diag = torch.stack([st[:, 0].sum() / (n * c), st[:, 1].sum() / n,
                            st[:, 2].sum() / (n * c), st[:, 3].max()])
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(diag)
        return -J_sum / n, diag

    @staticmethod
    def backward(ctx, grad_loss, grad_diag):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def grpo_rm_loss(logits, old_logits, labels, clip_eps=0.2, uniformity="eq4",
                 background_penalty=False, ignore_index=-100, chunk=None, diagnostics=False):
    """-J(θ) of Eq. (1), β = 0: the group is the c classes, π_θ(o_i|q) = softmax(logits)_i.
    logits, old_logits (N, c); labels (N,). The mean over samples whose label != ignore_index.
    With diagnostics=True also returns (clip_frac, approx_kl, mean |ρ-1|, max |ρ-1|) as one
    tensor: the fraction of (sample, class) terms the clip cuts off, and KL(π_θold || π_θ)
    estimated by the usual (ρ - 1) - log ρ averaged over o ~ π_θold (exact here: the group is
    the whole class set). chunk: float32 elements per working chunk (default by device)."""
    chunk = chunk or (2**24 if logits.is_cuda else 2**16)
    loss, diag = GRPORMLoss.apply(logits, old_logits.detach(), labels, clip_eps, uniformity,
                                  background_penalty, ignore_index, chunk)
    return (loss, diag) if diagnostics else loss


def make_old(model):
    """θ_old: a frozen copy of the WHOLE model (backbone + head): no gradients, no optimizer."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def refresh_old(old, model):
    """Algorithm 1, line 3: π_θold <- π_θ, once at the start of every epoch."""
    old.load_state_dict(model.state_dict())


# =============================================================================
# Training: Adam, cosine learning rate, bf16 autocast, DDP; checkpoints and signals

@dataclass
class Ctx:
    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype  # bfloat16 or float32
    wait_group: object = None  # a gloo group for long waits (downloads, the hub cache)

    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.amp_dtype == torch.bfloat16)


def setup(args):
    """The device and dtype, and under torchrun the process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    device, backend = torch.device("cpu"), args.dist_backend or ("nccl" if args.device == "cuda"
                                                                 else "gloo")
    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if backend == "nccl" and local >= gpus:
            raise UserError(f"--nproc_per_node: more processes than the {gpus} GPUs; NCCL needs "
                            "one GPU each (--dist-backend gloo shares them)")
        device = torch.device("cuda", local % gpus)
        torch.cuda.set_device(device)
        # Open in the paper: TF32. Matrix products under --dtype fp32 use TF32 on GPUs that have it.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    wait_group = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend)  # env:// from torchrun
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
    return Ctx(rank, world, device, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
               wait_group)


def rank0_first(ctx, fn):
    """fn() on rank 0, then on the others, which find its files (a download, the hub cache).
    They wait on a gloo barrier with a long timeout: NCCL's watchdog never sees the wait."""
    out = fn() if ctx.rank == 0 else None
    if ctx.world > 1:
        dist.barrier(group=ctx.wait_group)
    return out if ctx.rank == 0 else fn()


def cosine_lr(step, total, lr_max, lr_min):
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * step / max(1, total)))


def lr_range(base, batch_size):
    """Section 4.2: from base·m/256 down to (base/100)·m/256 (1e-3 -> 1e-5 cls, 1e-5 -> 1e-7
    seg)."""
    return base * batch_size / 256, base / 100 * batch_size / 256


def make_loss(args):
    """The loss of a batch of logits (N, c): -J of Eq. (1) (GRPO-RM) or cross-entropy, and for
    GRPO-RM its diagnostics. Returns fn(logits, old_logits, labels, ignore) -> (loss, diag)."""
    if args.method == "ce":
        def ce(z, z_old, y, ignore):
            return F.cross_entropy(z.float(), y, ignore_index=ignore), None
        return ce
    loss = torch.compile(grpo_rm_loss) if args.compile else grpo_rm_loss  # fuses its passes

    def grpo(z, z_old, y, ignore):
        return loss(z, z_old, y, args.clip_eps, args.uniformity, args.background_penalty, ignore,
                    diagnostics=True)
    return grpo


def step_loss(model, old, x, y, loss_fn, seg):
    """One batch through θ (and θ_old for GRPO-RM) to the loss; for segmentation every labelled
    pixel of the (S × S) logit map is a sample."""
    def flat(z):  # (B, c, S, S) -> (B·S·S, c), pixel-major like the labels (a view: the head's
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if seg else z  # logits are NHWC)

    old_logits = None
    if old is not None:
        with torch.no_grad():  # π_θold(·|x), Algorithm 1 line 5; first, so that its transient
            old_logits = flat(old(x))  # activations are freed before the graph's pile up
    logits = model(x)  # (B, c) or (B, c, S, S)
    ignore = -100
    if seg:
        y, ignore = resize_labels(y, logits.shape[-1]).reshape(-1), IGNORE  # (B·S·S,)
    return loss_fn(flat(logits), old_logits, y, ignore)


def train_step(model, old, opt, params, loss_fn, seg, ctx, x, y, lr):
    """One optimisation step. Returns [loss, grad norm, *diagnostics] as one device tensor (the
    loop syncs with the host only at log steps)."""
    for g in opt.param_groups:
        g["lr"] = lr
    x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
    with ctx.amp():
        loss, diag = step_loss(model, old, x, y, loss_fn, seg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, never clips
    opt.step()
    row = [loss.detach().float(), gnorm.float()]
    return torch.stack(row + ([] if diag is None else list(diag.float())))


def prepare_training(net, compile_, lr, ctx):
    """DDP (gradients averaged over ranks), optional torch.compile, Adam (fused on GPU)."""
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    model = DDP(net, device_ids=ids) if ctx.world > 1 else net
    model = torch.compile(model) if compile_ else model
    params = [p for p in net.parameters() if p.requires_grad]  # θ_old is not among them
    fused = ctx.device.type == "cuda"
    return model, params, torch.optim.Adam(params, lr=lr, weight_decay=0.0, fused=fused)


class RunStopped(UserError):
    """The run stopped before its end (a signal, a non-finite loss); the message says how to go
    on."""


def atomic_save(path, write):
    """Write a temp file in the same folder, fsync, rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    atomic_save(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


# Flags that may change on --resume: they do not change what training computes.
RESUMABLE = {"epochs", "out", "resume", "stop_after_epoch", "log_every", "workers", "save_vis",
             "eval_epochs", "eval_lr", "feature_type", "ms_scales", "eval_memory_gb"}


def save_checkpoint(path, args, net, old, opt, st):
    ckpt = {"model": net.state_dict(), "old": old.state_dict() if old is not None else None,
            "opt": opt.state_dict(), "state": st, "config": vars(args),
            "rng": torch.get_rng_state()}
    atomic_save(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, args, net, old, opt):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = vars(args)
    diff = sorted(k for k in set(ckpt["config"]) | set(cfg)
                  if k not in RESUMABLE and ckpt["config"].get(k) != cfg.get(k))
    if diff:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in diff)
        raise UserError(f"--resume: {path} was written with other settings ({flags})")
    net.load_state_dict(ckpt["model"])
    if old is not None:
        old.load_state_dict(ckpt["old"])  # θ_old of the epoch under way, not a fresh copy
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    return ckpt["state"]


def on_signals(handler):
    """Install handler for SIGTERM and SIGINT; returns a function that restores the previous
    ones."""
    before = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in before.items()]


def agreed(value, ctx):
    """True on every rank if it is true on any (ranks must stop at the same step)."""
    if ctx.world == 1:
        return bool(value)
    t = torch.tensor([float(bool(value))], device=ctx.device)
    dist.all_reduce(t)
    return t.item() > 0


def flush(rows, st, ctx, ckpt):
    """Move the buffered steps into st["series"]: the training loop's only host sync. Under DDP a
    value is the mean over ranks (ratio_dev_max: the max). Stops at a non-finite loss or
    gradient."""
    if not rows:
        return
    steps, lrs, t = [r[0] for r in rows], [r[1] for r in rows], torch.stack([r[2] for r in rows])
    keys = [k for k in st["series"] if k not in ("step", "lr")]
    if ctx.world > 1:
        top = t.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(t)
        t = torch.where(torch.tensor([k == "ratio_dev_max" for k in keys], device=t.device),
                        top, t / ctx.world)
    rows.clear()
    values = dict(zip(keys, t.T.tolist()))
    bad = [s for s, a, b in zip(steps, values["loss"], values["grad_norm"])
           if not math.isfinite(a + b)]
    if bad:
        last = ckpt if os.path.isfile(ckpt) else "none"
        raise RunStopped(f"non-finite loss or gradient at epoch {st['epoch'] + 1}, step "
                         f"{bad[0] + 1}; last good checkpoint: {last} (lower --lr or use "
                         "--dtype fp32, then --resume)")
    for k, v in [("step", steps), ("lr", lrs), *values.items()]:
        st["series"][k] += v


def progress(st, epochs, total, img_s):
    s = st["series"]
    parts = [f"epoch {st['epoch'] + 1}/{epochs} step {s['step'][-1] + 1}/{total}",
             f"loss {s['loss'][-1]:.4f}"]
    if "clip_frac" in s:
        parts += [f"clip {s['clip_frac'][-1]:.3f}", f"kl {s['approx_kl'][-1]:.2e}",
                  f"|ρ-1| {s['ratio_dev_mean'][-1]:.3f} (max {s['ratio_dev_max'][-1]:.2f})"]
    parts += [f"grad norm {s['grad_norm'][-1]:.3f}", f"lr {s['lr'][-1]:.2e}", f"{img_s:.0f} img/s"]
    print(" | ".join(parts), flush=True)


def train(args, ctx, net, train_set, run_dir):
    """Algorithm 1; with --method ce, standard fine-tuning with the same network and schedule.
    Returns the history, or None when --stop-after-epoch ended the run early."""
    old = make_old(net) if args.method == "grpo" else None
    lr_max, lr_min = lr_range(args.lr, args.batch_size)
    model, params, opt = prepare_training(net, args.compile, lr_max, ctx)
    old_fwd = torch.compile(old) if args.compile and old is not None else old
    local_bs = args.batch_size // ctx.world
    sampler = DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=args.seed)
    per_epoch, ckpt = math.ceil(len(sampler) / local_bs), os.path.join(run_dir, "ckpt.pt")
    keys = ["step", "lr", "loss", "grad_norm"]
    keys += list(GRPO_DIAGNOSTICS) if old is not None else []
    st = {"epoch": 0, "step_in_epoch": 0, "series": {k: [] for k in keys}, "train_loss": [],
          "sec_per_epoch": []}
    if args.resume and os.path.isfile(ckpt):
        st = load_checkpoint(ckpt, args, net, old, opt)
        if ctx.rank == 0:
            print(f"resumed from {ckpt}: epoch {st['epoch'] + 1}, step {st['step_in_epoch']}",
                  flush=True)
    step = functools.partial(train_step, model, old_fwd, opt, params, make_loss(args),
                             args.task == "seg", ctx)
    lr_at = functools.partial(cosine_lr, total=args.epochs * per_epoch, lr_max=lr_max,
                              lr_min=lr_min)
    flag = {"signal": None}
    restore = on_signals(lambda s, _: flag.update(signal=signal.Signals(s).name))
    try:
        for epoch in range(st["epoch"], args.epochs):
            if old is not None and st["step_in_epoch"] == 0:
                refresh_old(old, net)  # Algorithm 1, line 3
            torch.manual_seed(args.seed * 100_003 + ctx.rank * 1009 + epoch)  # augmentation
            batches = epoch_batches(train_set, sampler, epoch, st["step_in_epoch"], local_bs,
                                    args, ctx)
            stopping = run_epoch(batches, step, lr_at, st, per_epoch, flag, ckpt, args, ctx)
            if ctx.rank == 0:
                save_checkpoint(ckpt, args, net, old, opt, st)
            if stopping:
                raise RunStopped(f"stopped by {flag['signal'] or 'a signal'} at epoch "
                                 f"{st['epoch'] + 1}, step {st['step_in_epoch']}; checkpoint "
                                 f"{ckpt}: rerun with --resume")
            if args.stop_after_epoch == epoch + 1:
                return None
    finally:
        restore()
    return {k: st[k] for k in ("train_loss", "sec_per_epoch", "series")}


def run_epoch(batches, step, lr_at, st, per_epoch, flag, ckpt, args, ctx):
    """The steps of one epoch (from st["step_in_epoch"] on). Returns True if a signal stops the
    run; st then says where to resume."""
    epoch, rows, t0 = st["epoch"], [], time.time()
    t_log, n_seen = t0, 0
    for i, (x, y) in enumerate(batches, start=st["step_in_epoch"]):
        s = epoch * per_epoch + i
        lr = lr_at(s)
        rows.append((s, lr, step(x, y, lr)))
        n_seen += len(x)
        sync = s % args.log_every == 0 or i == per_epoch - 1  # the loop's only host syncs
        if sync:
            flush(rows, st, ctx, ckpt)
            if ctx.rank == 0:
                progress(st, args.epochs, args.epochs * per_epoch,
                         n_seen * ctx.world / max(time.time() - t_log, 1e-9))
            t_log, n_seen = time.time(), 0
        if (sync or ctx.world == 1) and agreed(flag["signal"], ctx) and i < per_epoch - 1:
            flush(rows, st, ctx, ckpt)  # ranks stop at the same step
            st["step_in_epoch"] = i + 1
            return True
    st["train_loss"].append(float(np.mean(st["series"]["loss"][-per_epoch:])))
    st["sec_per_epoch"].append(time.time() - t0)
    st.update(epoch=epoch + 1, step_in_epoch=0)
    return agreed(flag["signal"], ctx)


# =============================================================================
# Evaluation on frozen features: softmax regression (SR), kNN, pixel accuracy / IoU / mIoU

def all_gather_cat(t, ctx):
    """Concatenate over ranks a tensor whose first dimension differs between them."""
    if ctx.world == 1:
        return t
    n = torch.tensor([len(t)], device=ctx.device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    pad = t.new_zeros((int(max(sizes)), *t.shape[1:]), device=ctx.device)
    pad[:len(t)] = t.to(ctx.device)
    out = [torch.empty_like(pad) for _ in range(ctx.world)]
    dist.all_gather(out, pad)
    return torch.cat([o[:int(k)] for o, k in zip(out, sizes)]).to(t.device)


def all_reduce_sum(t, ctx):
    if ctx.world > 1:
        t = t.to(ctx.device)
        dist.all_reduce(t)
    return t.cpu()


def host_tensor(shape, dtype, path):
    """A tensor in RAM, or (path given) backed by a file and memory-mapped: its pages are then the
    kernel's page cache, reclaimable, and the process holds only what it copies out."""
    if path is None:
        return torch.empty(shape, dtype=dtype)
    if os.path.exists(path):
        os.remove(path)
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)


@torch.no_grad()
def extract(net, batches, n, ctx, n_layers=1, label_size=None, spill=None, budget_gb=math.inf):
    """One pass of the frozen backbone over this rank's shard of a split (n images). Features (in
    the autocast dtype) and labels are cached on the host, in RAM up to budget_gb, else in files
    under the folder spill, and reused by every epoch of the evaluation head."""
    feats = labels = None
    i = 0
    for x, y in batches:
        with ctx.amp():
            f = net.features(x.to(ctx.device, non_blocking=True), n_layers).to(ctx.amp_dtype)
        y = y.cpu() if label_size is None else resize_labels(y.cpu(), label_size).to(torch.uint8)
        if feats is None:  # the shapes are known now
            per_image = f[0].numel() * f.element_size() + y[0].numel() * y.element_size()
            disk = n * per_image > budget_gb * 2**30 and spill is not None
            if disk:
                os.makedirs(spill, exist_ok=True)
            path = (lambda name: os.path.join(spill, name)) if disk else (lambda name: None)
            feats = host_tensor((n, *f.shape[1:]), f.dtype, path(f"feats-{ctx.rank}.bin"))
            labels = host_tensor((n, *y.shape[1:]), y.dtype, path(f"labels-{ctx.rank}.bin"))
        feats[i:i + len(f)], labels[i:i + len(f)] = f.cpu(), y
        i += len(f)
    return feats, labels


def fit_head(head, feats, labels, n_total, args, ctx, cols=slice(None), ignore_index=-100):
    """Train a fresh head on cached frozen features: Adam, --eval-epochs epochs, the training lr
    rule (Section 4.2). The batches are the ones a single process would draw (one permutation of
    all n_total samples per epoch): rank r holds samples r, r + world, ..., so it takes the members
    of each batch with index = r (mod world). Losses are summed and divided by the batch's global
    count of labelled samples, gradients summed over ranks: any world size gives the same head."""
    params = list(head.parameters())
    lr_max, lr_min = lr_range(args.eval_lr, args.batch_size)
    opt = torch.optim.Adam(params, lr=lr_max, weight_decay=0.0)
    per_epoch = math.ceil(n_total / args.batch_size)
    total, gen = args.eval_epochs * per_epoch, torch.Generator().manual_seed(args.seed)
    for step in range(total):
        if step % per_epoch == 0:
            batches = torch.randperm(n_total, generator=gen).split(args.batch_size)
        idx = batches[step % per_epoch].sort().values
        mine = idx[idx % ctx.world == ctx.rank] // ctx.world  # positions in this rank's shard
        x = feats[mine][:, cols].to(ctx.device).float()  # (b, D) or (b, D, h, w)
        y = labels[mine].to(ctx.device).long()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, lr_max, lr_min)
        with ctx.amp():
            logits = head(x)  # (b, c) or (b, c, S, S)
        loss = F.cross_entropy(logits.float(), y, ignore_index=ignore_index, reduction="sum")
        count = (y != ignore_index).sum().float()
        if ctx.world > 1:
            dist.all_reduce(count)
        opt.zero_grad(set_to_none=True)
        (loss / count.clamp(min=1)).backward()
        if ctx.world > 1:
            for p in params:
                dist.all_reduce(p.grad)
        opt.step()
    return head.eval()


def knn_predict(train_feats, train_labels, test_feats, k=5, chunk=1024):
    """kNN vote on cosine similarity (L2-normalised features): the majority of the k nearest; a
    tie goes to the tied class whose member is nearest. Open in the paper: all but k = 5."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k, c = min(k, len(train)), int(train_labels.max()) + 1
    score = (k - torch.arange(k, device=train.device)).float()  # the nearest neighbour scores k
    preds = []
    for q in F.normalize(test_feats.float(), dim=1).split(chunk):  # (q, D)
        nn_lab = train_labels[(q @ train.T).topk(k, dim=1).indices]  # (q, k), nearest first
        votes = torch.zeros(len(q), c, device=q.device).scatter_add_(
            1, nn_lab, torch.ones_like(score).expand(len(q), k))
        nearest = torch.zeros(len(q), c, device=q.device).scatter_reduce_(
            1, nn_lab, score.expand(len(q), k), "amax")
        preds.append((votes * (k + 1) + nearest).argmax(1))  # votes first, then nearness
    return torch.cat(preds)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=5):
    """Top-1 accuracy (%) of the k-NN classifier (k = 5 in the paper)."""
    pred = knn_predict(train_feats, train_labels, test_feats, k)
    return 100.0 * (pred == test_labels).float().mean().item()


def knn_sharded(train_feats, train_labels, test_feats, ctx):
    """kNN predictions for this rank's test shard against the training features of every rank."""
    all_f, all_y = all_gather_cat(train_feats, ctx), all_gather_cat(train_labels, ctx)
    return knn_predict(all_f.to(ctx.device), all_y.to(ctx.device), test_feats.to(ctx.device)).cpu()


def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE):
    """(c, c) counts, rows = ground truth, columns = prediction; ignore_index pixels skipped."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(conf):
    """Pixel accuracy, IoU and mIoU (%) from one confusion matrix. Open in the paper: "IoU". Here
    the frequency-weighted IoU, Σ_c freq_c IoU_c (freq from the ground truth): the paper's IoU is
    always far above its mIoU (87.0 vs 66.8 on VOC), which fits it. mIoU averages IoU_c over the
    classes present in the ground truth or the prediction."""
    conf = conf.double()
    tp, gt, pr = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    iou = tp[present] / union[present]
    return {"pixel_acc": 100 * (tp.sum() / conf.sum()).item(),
            "iou": 100 * ((gt[present] / gt.sum()) * iou).sum().item(),
            "miou": 100 * iou.mean().item()}


def evaluate_cls(args, ctx, net, train_eval, test, num_classes, spill):
    """-> ({"sr", "knn"} in %, seconds of the feature passes)."""
    t0, bs = time.time(), args.batch_size // ctx.world
    tr_f, tr_y = extract(net, *eval_batches(train_eval, bs, args, ctx), ctx, spill=spill,
                         budget_gb=args.eval_memory_gb)
    te_f, te_y = extract(net, *eval_batches(test, bs, args, ctx), ctx)
    feature_seconds = time.time() - t0
    torch.manual_seed(args.seed)
    head = nn.Linear(tr_f.shape[1], num_classes).to(ctx.device)  # SR: softmax regression
    head = fit_head(head, tr_f, tr_y, len(train_eval), args, ctx)
    with torch.no_grad(), ctx.amp():
        sr_pred = torch.cat([head(f.to(ctx.device).float()).argmax(1).cpu()
                             for f in te_f.split(4096)])
    knn_pred = knn_sharded(tr_f, tr_y, te_f, ctx)
    hits = torch.stack([(sr_pred == te_y).sum(), (knn_pred == te_y).sum(), torch.tensor(len(te_y))])
    hits = all_reduce_sum(hits, ctx)
    return {"sr": 100.0 * hits[0].item() / hits[2].item(),
            "knn": 100.0 * hits[1].item() / hits[2].item()}, feature_seconds


@torch.no_grad()
def predict_seg(net, heads, x, scales, seg_size, ctx):
    """Class probabilities (B, c, H, W) at the input resolution, per feature type: "linear" is the
    last layer at scale 1; "ms" averages the 4-layer head over --ms-scales and horizontal flips,
    as DINOv2's multi-scale evaluation does. Each (scale, flip) is one backbone pass."""
    H, W = x.shape[-2:]
    p, D = net.backbone.patch_size, net.backbone.embed_dim
    plan = {(1.0, False): ["linear"]} if "linear" in heads else {}
    for s in scales if "ms" in heads else []:
        for flip in (False, True):
            plan.setdefault((s, flip), []).append("ms")
    probs = {ft: 0 for ft in heads}
    for (s, flip), types_ in plan.items():
        size = (max(p, round(H * s / p) * p), max(p, round(W * s / p) * p))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False) if s != 1 else x
        with ctx.amp():
            f = net.features(xs.flip(-1) if flip else xs, 4 if "ms" in heads else 1)
        for ft in types_:
            with ctx.amp():  # linear: the last layer's D channels of f (B, n·D, h, w)
                z = heads[ft](f if ft == "ms" else f[:, -D:], size=(round(seg_size * s),) * 2)
            z = F.interpolate(z.float(), size=(H, W), mode="bilinear", align_corners=False)
            probs[ft] = probs[ft] + (z.flip(-1) if flip else z).softmax(1)  # the flip undone
    n = {ft: sum(ft in t for t in plan.values()) for ft in heads}
    return {ft: pr / n[ft] for ft, pr in probs.items()}


def evaluate_seg(args, ctx, net, train_eval, test, num_classes, run_dir, spill):
    """-> ({feature type: {"pixel_acc", "iou", "miou", "labelled_pixels"}}, seconds of the
    feature passes). One post-trained backbone, evaluated in each --feature-type."""
    t0, bs, D = time.time(), args.batch_size // ctx.world, net.backbone.embed_dim
    n_layers = 4 if "ms" in args.feature_type else 1
    tr_f, tr_y = extract(net, *eval_batches(train_eval, bs, args, ctx), ctx, n_layers,
                         args.seg_size, spill, args.eval_memory_gb)
    feature_seconds, heads = time.time() - t0, {}
    for ft in args.feature_type:
        torch.manual_seed(args.seed)
        head = SegHead(D * (4 if ft == "ms" else 1), args.hidden, num_classes, args.seg_size)
        cols = slice(None) if ft == "ms" else slice(-D, None)  # linear: the last layer
        heads[ft] = fit_head(head.to(ctx.device), tr_f, tr_y, len(train_eval), args, ctx, cols,
                             IGNORE)
    del tr_f, tr_y
    conf = {ft: torch.zeros(num_classes, num_classes, dtype=torch.long) for ft in heads}
    batches, n_local = eval_batches(test, bs, args, ctx)
    show = np.linspace(0, n_local - 1, args.save_vis).round().astype(int).tolist()
    t0, pos = time.time(), 0
    for x, y in batches:  # the test split: one backbone pass per scale and flip
        probs = predict_seg(net, heads, x.to(ctx.device), args.ms_scales, args.seg_size, ctx)
        for ft, pr in probs.items():
            conf[ft] += confusion_matrix(pr.argmax(1).cpu(), y, num_classes, IGNORE)
        pred = probs[args.feature_type[0]].argmax(1).cpu()
        for b in (b for b in range(len(x)) if ctx.rank == 0 and pos + b in show):
            path = os.path.join(run_dir, "vis", f"{show.index(pos + b):03d}.png")
            save_vis(x[b], y[b], pred[b], path)
        pos += len(x)
    feature_seconds += time.time() - t0
    out = {}
    for ft, cm in conf.items():
        cm = all_reduce_sum(cm, ctx)
        out[ft] = segmentation_metrics(cm) | {"labelled_pixels": int(cm.sum())}
    return out, feature_seconds


def voc_palette():
    """The Pascal VOC colour map (class bits spread over the high bits of R, G, B)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c = i
        for j in range(8):
            pal[i] |= np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1], np.uint8) << (7 - j)
            c >>= 3
    return pal


def save_vis(x, y, pred, path):
    """Figure 2's material: image | ground truth | prediction, in the VOC palette (255: cream)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    img = ((x.cpu().float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    pal = voc_palette()
    panels = [img, pal[y.numpy().astype(np.uint8)], pal[pred.numpy().astype(np.uint8)]]
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


# =============================================================================
# Main: one run = data, model, post-training, evaluation, result.json

def run(args, ctx):
    """One experiment. Returns (result dict, the trained Net)."""
    def load():  # rank 0 first: the hub's download and cache
        torch.manual_seed(args.seed)  # a randomly initialised backbone: the same on every rank
        return load_backbone(args.hub_repo, args.model, args.weights, args.hub_kwargs)

    backbone = rank0_first(ctx, load)
    patch = backbone.patch_size
    args.img_size = args.img_size or default_img_size(DATASETS[args.dataset], patch)
    if args.img_size % patch:
        raise UserError(f"--img-size {args.img_size} is not a multiple of the patch size {patch}")
    name = run_name(args)
    run_dir = os.path.join(args.out, name)
    if ctx.rank == 0:
        check_writable(run_dir)
    num_classes, train_set, train_eval, test = build_data(args, ctx)
    net = build_net(prepare_backbone(backbone, not args.no_sdpa), args, num_classes, ctx.device)
    if ctx.rank == 0:
        print(f"{name}: {len(train_set)} train / {len(test)} test images, {num_classes} classes, "
              f"{args.img_size} px, {ctx.world} process(es) on {ctx.device.type}, "
              f"{str(ctx.amp_dtype)[6:]}", flush=True)
    hist = {"train_loss": [], "sec_per_epoch": [], "series": {}}
    if args.method != "frozen" and args.epochs > 0:
        hist = train(args, ctx, net, train_set, run_dir)
        if hist is None:
            if ctx.rank == 0:
                print(f"stopped after epoch {args.stop_after_epoch}; rerun with --resume to go on")
            return None, net
    metrics, eval_seconds, feature_seconds = evaluate(args, ctx, net, train_eval, test,
                                                      num_classes, run_dir)
    result = {"config": vars(args), "metrics": metrics, **hist, "eval_seconds": eval_seconds,
              "feature_seconds": feature_seconds, "peak_memory_gb": peak_memory_gb(ctx.device),
              "world_size": ctx.world, "device": device_name(ctx.device),
              "torch": torch.__version__, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if ctx.rank == 0:
        finish(run_dir, net, result, args.method != "frozen")
    return result, net


def evaluate(args, ctx, net, train_eval, test, num_classes, run_dir):
    """The frozen post-trained backbone under a fresh head. A signal here ends the run at once
    (the last checkpoint holds the trained model: --resume evaluates again)."""
    def stop(signum, _):
        raise RunStopped(f"stopped by {signal.Signals(signum).name} during evaluation; the "
                         "trained model is in the checkpoint: rerun with --resume to evaluate")

    restore, t0 = on_signals(stop), time.time()
    spill = os.path.join(run_dir, f"cache-{ctx.rank}")  # features over --eval-memory-gb go here
    if ctx.rank == 0:
        print(f"evaluating: {args.eval_epochs} epochs of a fresh head on frozen features",
              flush=True)
    try:
        net.eval()
        if args.task == "cls":
            metrics, seconds = evaluate_cls(args, ctx, net, train_eval, test, num_classes, spill)
        else:
            metrics, seconds = evaluate_seg(args, ctx, net, train_eval, test, num_classes,
                                            run_dir, spill)
    finally:
        restore()
        shutil.rmtree(spill, ignore_errors=True)
    return metrics, time.time() - t0, seconds


def check_writable(run_dir):
    try:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(os.path.join(run_dir, ".writable"), {})
        os.remove(os.path.join(run_dir, ".writable"))
    except OSError as e:
        raise UserError(f"--out {os.path.dirname(run_dir)}: not writable ({e.strerror})") from None


def finish(run_dir, net, result, trained):
    """A finished run: the post-trained backbone (loadable with --weights), then result.json,
    written last, so that a result on disk always means a finished run; the resume state goes."""
    if trained:
        atomic_save(os.path.join(run_dir, "backbone.pt"),
                    lambda f: torch.save(net.backbone.state_dict(), f))
    write_json_atomic(os.path.join(run_dir, "result.json"), result)
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        os.remove(os.path.join(run_dir, "ckpt.pt"))
    print(f"{os.path.basename(run_dir)}: {describe(result['metrics'])}", flush=True)


def describe(metrics, prefix=""):
    """{"sr": 61.234} -> "sr 61.23"; {"linear": {"miou": 24.0}} -> "linear miou 24.00"."""
    return ", ".join(describe(v, f"{prefix}{k} ") if isinstance(v, dict) else f"{prefix}{k} {v:.2f}"
                     for k, v in metrics.items() if isinstance(v, (dict, float)))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_memory_gb(device):
    """CUDA max-allocated on GPU; on CPU the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 2**20


def main(argv=None):
    """Returns (result, trained Net) of a run; (report text or bench result, None) for tooling."""
    args = get_args(argv)
    if args.report:
        return report(args.report), None
    ctx = setup(args)
    try:
        return (bench(args, ctx), None) if args.bench else run(args, ctx)
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# =============================================================================
# Tooling: --bench. What GRPO-RM costs over fine-tuning, on synthetic batches of a run's shape

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for MFU


def linear_macs(model, x):
    """Multiply-accumulates of the nn.Linear and nn.Conv2d layers in one forward of x: the unit of
    the paper's Table 5 "FLOPs" (21.23 M per ViT-S/14 token; attention's q kᵀ and a v excluded)."""
    total = 0

    def count(m, inputs, out):
        nonlocal total
        per_output = (m.in_features if isinstance(m, nn.Linear)
                      else m.in_channels // m.groups * math.prod(m.kernel_size))
        total += out.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return total


def bench_build(args, ctx, method, num_classes):
    """One method's model, optimizer and a synthetic batch of this process's share of the batch.
    -> (one training step, the no-grad forward of θ_old, the net)."""
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.hub_repo, args.model, args.weights, args.hub_kwargs)
    net = build_net(prepare_backbone(backbone, not args.no_sdpa), args, num_classes, ctx.device)
    old = make_old(net) if method == "grpo" else None
    model, params, opt = prepare_training(net, args.compile, 1e-6, ctx)
    old = torch.compile(old) if args.compile and old is not None else old
    b, S = args.batch_size // ctx.world, args.img_size
    x = torch.randn(b, 3, S, S, device=ctx.device)
    y = torch.randint(0, num_classes, (b, S, S) if args.task == "seg" else (b,), device=ctx.device)
    loss_fn = make_loss(argparse.Namespace(**{**vars(args), "method": method}))
    step = functools.partial(train_step, model, old, opt, params, loss_fn, args.task == "seg",
                             ctx, x, y, 1e-6)

    def forward():
        with torch.no_grad(), ctx.amp():
            (old if old is not None else net)(x)
    return step, forward, net


def time_rounds(fns, steps, ctx, rounds=5):
    """Seconds per call of each function, in rounds that alternate between them:
    {name: [seconds, one per round]}."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if ctx.world > 1:
                dist.barrier()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def bench_methods(args, ctx, num_classes):
    """ce and grpo: the FLOPs and (GPU) peak memory of each alone, then step times in alternating
    rounds; the time ratio is the median of the rounds' ratios, so that a machine whose speed
    drifts affects both methods alike."""
    from torch.utils.flop_counter import FlopCounterMode
    cuda, built, rows = ctx.device.type == "cuda", {}, {}
    one = torch.zeros(1, 3, args.img_size, args.img_size, device=ctx.device)
    for m in ("ce", "grpo"):
        before = torch.cuda.memory_allocated() / 2**30 if cuda else 0  # what ce keeps, for grpo
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step, forward, net = built[m] = bench_build(args, ctx, m, num_classes)
        for _ in range(args.bench_warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        # Peak memory per method: CUDA's allocator knows it; a CPU process's resident set cannot
        # be split between two methods (the C allocator keeps what the first one freed).
        peak = peak_memory_gb(ctx.device) - before if cuda else None
        total = all_reduce_sum(torch.tensor([peak or 0.0], dtype=torch.float64), ctx).item()
        rows[m] = {"flops_per_step": counter.get_total_flops() * ctx.world,
                   "fwd_macs_per_image": linear_macs(net, one) * (2 if m == "grpo" else 1),
                   "peak_memory_gb": peak, "memory_sum_gb": total if cuda else None}
    times = time_rounds({"ce": built["ce"][0], "grpo": built["grpo"][0],
                         "old": built["grpo"][1]}, args.bench_steps, ctx)
    for m, r in rows.items():
        dt = float(np.median(times[m]))
        r.update(ms_per_step=1e3 * dt, img_per_s=args.batch_size / dt)
    rows["grpo"].update(old_forward_ms=1e3 * float(np.median(times["old"])),
                        time_ratio=float(np.median(np.array(times["grpo"]) / times["ce"])))
    return rows


def bench_loss(n, c, dtype, device, steps=10):
    """The loss alone at a segmentation shape (n pixels, c classes), forward + backward: ms, bytes
    saved for the backward, and (GPU) the peak allocated above the logits."""
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, c, device=device, generator=g).to(dtype).requires_grad_()
    z_old = (z.detach().float() + 0.1 * torch.randn(n, c, device=device, generator=g)).to(dtype)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    fns = {"ce": lambda: F.cross_entropy(z.float(), y), "grpo": lambda: grpo_rm_loss(z, z_old, y)}
    cuda, out = device.type == "cuda", {}
    for name, fn in fns.items():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            fn().backward()
        fn().backward()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base, t0 = torch.cuda.memory_allocated() if cuda else 0, time.perf_counter()
        for _ in range(steps):
            z.grad = None
            fn().backward()
        if cuda:
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        out[name] = {"ms": 1e3 * (time.perf_counter() - t0) / steps, "saved_bytes": sum(saved),
                     "peak_gb": peak}
    return {"n": n, "c": c, "dtype": str(dtype)[6:], "logit_bytes": z.numel() * z.element_size(),
            **out}


def paper_units(rows, args, spec, ctx):
    """Add Table 5's units: forward MACs per batch, seconds per epoch of the paper's training set
    (from the measured step time), and MFU against the GPU's dense bf16 peak."""
    dev = device_name(ctx.device)
    peak = next((v for k, v in PEAK_BF16.items() if k in dev), None)
    peak = peak if args.dtype == "bf16" else None
    steps = math.ceil(spec.images / args.batch_size) if spec.images else None
    for r in rows.values():
        r["fwd_macs_per_batch"] = r["fwd_macs_per_image"] * args.batch_size
        r["sec_per_epoch_paper"] = r["ms_per_step"] * steps / 1e3 if steps else None
        flop_per_s = r["flops_per_step"] / (r["ms_per_step"] / 1e3)
        r["mfu"] = flop_per_s / (peak * ctx.world) if peak else None


def bench(args, ctx):
    """ce and grpo in this process (under torchrun one per GPU, the batch split as in training),
    then the loss alone at the run's shape, and the input pipeline when --data-dir holds the
    data. Prints the figures; writes OUT/bench-*.json."""
    spec = DATASETS[args.dataset]
    backbone = rank0_first(ctx, lambda: load_backbone(args.hub_repo, args.model, args.weights,
                                                      args.hub_kwargs))
    args.img_size = args.img_size or default_img_size(spec, backbone.patch_size)
    data = build_data(args, ctx) if os.path.isdir(args.data_dir) else None
    num_classes = args.num_classes or spec.classes or (data[0] if data else 0)
    if not num_classes:
        raise UserError(f"--bench --dataset {args.dataset} needs --num-classes or --data-dir")
    try:
        rows = bench_methods(args, ctx, num_classes)
    except torch.OutOfMemoryError:
        raise UserError(f"--bench: out of GPU memory at {args.batch_size // ctx.world} images "
                        "per process; lower --batch-size") from None
    b = args.batch_size // ctx.world
    n = b * args.seg_size**2 if args.task == "seg" else b  # samples of the loss: pixels or images
    loss = bench_loss(n, num_classes, ctx.amp_dtype, ctx.device, args.bench_steps)
    paper_units(rows, args, spec, ctx)
    result = {"config": vars(args), "device": device_name(ctx.device), "world_size": ctx.world,
              "torch": torch.__version__, "methods": rows, "loss": loss,
              "loader_img_per_s": loader_speed(data[1], args, ctx) if data else None,
              "date": time.strftime("%Y-%m-%d")}
    if ctx.rank == 0:
        print("\n".join(bench_lines(result)))
        tag = f"{'-compile' if args.compile else ''}{'-nosdpa' if args.no_sdpa else ''}"
        name = (f"bench-{args.task}-{args.dataset}-{args.model}-{args.img_size}px-"
                f"b{args.batch_size}-w{ctx.world}{tag}.json")
        os.makedirs(args.out, exist_ok=True)
        write_json_atomic(os.path.join(args.out, name), result)
    return result


def loader_speed(train_set, args, ctx, n_batches=10):
    """Images/s of the real input pipeline: decode, resize, normalise (or the preloaded path)."""
    sampler = DistributedSampler(train_set, 1, 0, shuffle=True, seed=0)
    batches = iter(epoch_batches(train_set, sampler, 0, 0, args.batch_size // ctx.world, args,
                                 ctx))
    next(batches)  # the workers start
    n, t0 = 0, time.perf_counter()
    for _, (x, _) in zip(range(n_batches), batches):
        n += len(x.to(ctx.device))
    return n / (time.perf_counter() - t0)


def fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def bench_lines(res):
    """A bench result as printed: one row per method, the grpo/ce ratios, the loss alone."""
    c, rows, L = res["config"], res["methods"], res["loss"]
    ce, g = rows["ce"], rows["grpo"]
    out = [f"{c['model']} {c['task']} {c['img_size']} px, batch {c['batch_size']} over "
           f"{res['world_size']} process(es), {c['dtype']}, compile {c['compile']}, "
           f"on {res['device']}",
           "| method | ms/step | img/s | GFLOP/step | fwd GMAC/batch | s/epoch (paper's set) | "
           "peak GB/process | GB all processes | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        cells = [f"{r['ms_per_step']:.1f}", f"{r['img_per_s']:.0f}",
                 f"{r['flops_per_step'] / 1e9:.1f}", f"{r['fwd_macs_per_batch'] / 1e9:.1f}",
                 fmt(r["sec_per_epoch_paper"], ".1f"), fmt(r["peak_memory_gb"], ".3f"),
                 fmt(r["memory_sum_gb"], ".3f"), f"{100 * r['mfu']:.1f}%" if r["mfu"] else "—"]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    mem = (f"x{g['peak_memory_gb'] / ce['peak_memory_gb']:.3f}" if ce["peak_memory_gb"]
           else "— (GPU only)")
    out.append(f"grpo/ce: time x{g['time_ratio']:.3f}, FLOPs "
               f"x{g['flops_per_step'] / ce['flops_per_step']:.3f}, peak memory {mem}; "
               f"θ_old's forward alone {g['old_forward_ms']:.1f} ms = "
               f"{g['old_forward_ms'] / ce['ms_per_step']:.3f} of a ce step")
    parts = [f"{m} {L[m]['ms']:.2f} ms, saved {L[m]['saved_bytes'] / L['logit_bytes']:.2f}x "
             f"the logits" + (f", peak {L[m]['peak_gb']:.3f} GB" if L[m]["peak_gb"] else "")
             for m in ("ce", "grpo")]
    out.append(f"loss alone, N = {L['n']} x c = {L['c']} ({L['dtype']} logits, "
               f"{L['logit_bytes'] / 2**20:.1f} MiB): " + " | ".join(parts) +
               f" | grpo/ce saved bytes x{L['grpo']['saved_bytes'] / L['ce']['saved_bytes']:.2f}")
    if res["loader_img_per_s"]:
        slower = "loader" if res["loader_img_per_s"] < g["img_per_s"] else "model"
        out.append(f"input pipeline: {res['loader_img_per_s']:.0f} img/s against the model's "
                   f"{ce['img_per_s']:.0f} (ce) and {g['img_per_s']:.0f} (grpo): the {slower} is "
                   "the bottleneck")
    return out


# =============================================================================
# Tooling: --report RUNS_DIR. The paper's tables and figures from the runs' result.json files

METHODS = {"frozen": "DINOv2 (frozen)", "ce": "Fine-tuning", "grpo": "GRPO-RM"}
UNIFORMITY_NAMES = {"none": "set to 0", "eq5": "Eq. (5)", "eq4": "Eq. (4) (GRPO-RM)"}
SEG_METRICS, CLS_METRICS = ("pixel_acc", "iou", "miou"), ("sr", "knn")
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # Student's t 0.975, df 1..20


@dataclass(frozen=True, order=True)
class Key:
    """What makes runs one group: they differ by their seed only."""
    task: str
    data: str
    method: str
    uniformity: str  # "" unless grpo
    subset: float    # 1.0 for frozen runs: they post-train nothing
    lr: float        # 0.0 for frozen runs
    eval_lr: float


def data_label(cfg):
    if cfg["dataset"] not in ("imagefolder", "vocfolder"):
        return cfg["dataset"]
    return f"{cfg['dataset']}:{os.path.basename(os.path.normpath(cfg['data_dir']))}"


def load_groups(root):
    """RUNS_DIR/*/result.json -> {Key: {seed: result}}; each result also records its folder."""
    groups = {}
    for f in sorted(glob.glob(os.path.join(root, "*", "result.json"))):
        r = json.load(open(f))
        c, r["dir"] = r["config"], os.path.dirname(f)
        frozen = c["method"] == "frozen"
        key = Key(c["task"], data_label(c), c["method"],
                  c["uniformity"] if c["method"] == "grpo" else "",
                  1.0 if frozen else c["subset"], 0.0 if frozen else c["lr"], c["eval_lr"])
        groups.setdefault(key, {})[c["seed"]] = r
    return groups


def values(runs, metric, ft=None):
    """{seed: value} of a metric (ft: the segmentation feature type)."""
    return {s: (r["metrics"][ft] if ft else r["metrics"])[metric] for s, r in runs.items()
            if ft is None or ft in r["metrics"]}


def main_key(groups, task, data, method, uniformity="eq4", subset=None):
    """The group a paper-shaped table shows for this method: of its settings (any subset if None),
    the one with the most seeds; ties go to the larger subset, then the larger lr."""
    keys = [k for k in groups if (k.task, k.data, k.method) == (task, data, method)
            and k.uniformity == (uniformity if method == "grpo" else "")
            and (subset is None or k.subset == subset or method == "frozen")]
    if method == "frozen":  # evaluated as the fine-tuned backbones were: with their eval lr
        ce = main_key(groups, task, data, "ce")
        keys = [k for k in keys if ce is None or k.eval_lr == ce.eval_lr] or keys
    return max(keys, key=lambda k: (len(groups[k]), k.subset, k.lr, k.eval_lr), default=None)


def cell(vals, best=False):
    """'mean ± std' over seeds (sample std; one run: its value), bold when best, '—' when none."""
    if not vals:
        return "—"
    v = list(vals.values())
    text = f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
    return f"**{text}**" if best else text


def table(title, header, rows, plain=0):
    """rows: [(first cells, [{seed: value} per metric column])]. Within each block of rows that
    share the first cell, the best mean of each column is bold (not in the last `plain` ones)."""
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    blocks = list(dict.fromkeys(first[0] for first, _ in rows))
    for block in blocks:
        mine = [(first, vals) for first, vals in rows if first[0] == block]
        means = np.array([[np.mean(list(v.values())) if v else -np.inf for v in vals]
                          for _, vals in mine])  # (rows, columns)
        for (first, vals), m in zip(mine, means):
            best = [len(mine) > 1 and np.isfinite(x) and x == means[:, j].max()
                    and (means[:, j] > -np.inf).sum() > 1 and j < len(m) - plain
                    for j, x in enumerate(m)]
            cells = [*first, *(cell(v, b) for v, b in zip(vals, best))]
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def main_runs(groups, *key, **kw):
    k = main_key(groups, *key, **kw)
    return groups[k] if k else {}


def table3(groups):
    rows = [((d, name), [values(main_runs(groups, "cls", d, m), x) for x in CLS_METRICS])
            for d in sorted({k.data for k in groups if k.task == "cls"})
            for m, name in METHODS.items()]
    return table("Table 3: classification, top-1 % (SR = softmax regression)",
                 ["Dataset", "Method", "SR", "kNN"], rows) if rows else []


def tables2and4(groups):
    out = []
    for d in sorted({k.data for k in groups if k.task == "seg"}):
        subsets = sorted({k.subset for k in groups if k.data == d and k.method != "frozen"})
        results = [r for k, g in groups.items() if k.data == d for r in g.values()]
        fts = [ft for ft in ("linear", "ms") if any(ft in r["metrics"] for r in results)]
        rows = []
        for ft in fts:
            for m, name in METHODS.items():
                for s in [1.0] if m == "frozen" else subsets:
                    runs = main_runs(groups, "seg", d, m, subset=s)
                    rows.append(((ft, name + (f" ({100 * s:g}%)" if s < 1 else "")),
                                 [values(runs, x, ft) for x in SEG_METRICS]))
        out += table(f"Tables 2/4: segmentation on {d}, % (IoU: frequency-weighted)",
                     ["Feature type", "Method", "Pixel Acc", "IoU", "mIoU"], rows)
    return out


def table6(groups):
    rows = []
    for t, d in sorted({(k.task, k.data) for k in groups if k.uniformity in ("eq5", "none")}):
        for u, name in UNIFORMITY_NAMES.items():
            runs = main_runs(groups, t, d, "grpo", u)
            accuracy = values(runs, "sr") if t == "cls" else values(runs, "pixel_acc", "linear")
            seconds = {s: float(np.mean(r["sec_per_epoch"])) for s, r in runs.items()
                       if r["sec_per_epoch"]}
            rows.append(((d, name), [accuracy, seconds]))
    title = "Table 6: uniformity reward (SR % for cls, linear pixel acc % for seg; s/epoch)"
    return table(title, ["Dataset", "Uniformity reward", "Accuracy", "s/epoch"], rows,
                 plain=1) if rows else []


def paired_ci(a, b):
    """Mean of the differences a[s] - b[s] over the seeds s of both, with its 95% confidence
    interval (Student's t, n - 1 degrees of freedom). -> (mean, low, high, n) or None."""
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
    if len(d) < 2:
        return None
    half = (T975[len(d) - 2] if len(d) <= 21 else 1.96) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half, len(d)


def comparisons(groups, t, d, lead):
    """The (name, grpo key, ce key) pairs to compare on one dataset: every (subset, lr) both ran,
    and, where an lr sweep exists, each method at its own best lr (by the metric `lead`)."""
    ce = {(k.subset, k.lr): k for k in groups if (k.task, k.data, k.method) == (t, d, "ce")}
    gr = {(k.subset, k.lr): k for k in groups
          if (k.task, k.data, k.method, k.uniformity) == (t, d, "grpo", "eq4")}
    pairs = [(f"lr {lr:g}" + (f", {100 * s:g}% of the data" if s < 1 else ""), gr[s, lr], ce[s, lr])
             for s, lr in sorted(set(ce) & set(gr), reverse=True)]
    for s in {s for s, _ in ce} & {s for s, _ in gr}:
        if sum(k.subset == s for k in (*ce.values(), *gr.values())) <= 2:
            continue  # one lr each: nothing to choose

        def mean_lead(k):
            return np.mean(list(values(groups[k], *lead).values()) or [-1])
        best = [max((k for k in ks.values() if k.subset == s), key=mean_lead) for ks in (gr, ce)]
        pairs.append((f"best lr: {best[0].lr:g} vs {best[1].lr:g}", *best))
    return pairs


def paired_table(groups):
    """GRPO-RM minus fine-tuning per dataset, paired by seed (same seed: same subset, same head
    initialisation), with 95% confidence intervals."""
    out = ["### GRPO-RM − fine-tuning, paired by seed: mean [95% CI] (n seeds)", "",
           "| Dataset | Setting | Metric | GRPO-RM − FT |", "|---|---|---|---|"]
    for t, d in sorted({(k.task, k.data) for k in groups}):
        if t == "cls":
            metrics, lead = [(x, None) for x in CLS_METRICS], ("sr", None)
        else:
            metrics = [(x, ft) for ft in ("linear", "ms") for x in SEG_METRICS]
            lead = ("miou", "linear")
        for name, kg, kc in comparisons(groups, t, d, lead):
            for x, ft in metrics:
                ci = paired_ci(values(groups[kg], x, ft), values(groups[kc], x, ft))
                if ci:
                    out.append(f"| {d} | {name} | {(ft + ' ') if ft else ''}{x} | {ci[0]:+.2f} "
                               f"[{ci[1]:+.2f}, {ci[2]:+.2f}] ({ci[3]}) |")
    return out + [""] if len(out) > 4 else []


def settings_table(groups):
    """Every setting of each dataset that has more than one (an lr sweep, other eval lrs)."""
    out = []
    for t, d in sorted({(k.task, k.data) for k in groups}):
        keys = sorted((k for k in groups if (k.task, k.data) == (t, d)), key=lambda k: (
            list(METHODS).index(k.method), k.uniformity, k.subset, -k.lr, -k.eval_lr))
        if len(keys) <= len({(k.method, k.uniformity, k.subset) for k in keys}):
            continue
        if t == "cls":
            ms = [(x, None) for x in CLS_METRICS]
        else:  # the linear features' metrics
            ms = [(x, "linear") for x in SEG_METRICS]
        rows = []
        for k in keys:
            name = METHODS[k.method]
            name += f" {k.uniformity}" if k.uniformity not in ("", "eq4") else ""
            name += f" ({100 * k.subset:g}%)" if k.subset < 1 else ""
            lr = "—" if k.method == "frozen" else f"{k.lr:g}"
            rows.append(((name, lr, f"{k.eval_lr:g}"), [values(groups[k], x, ft) for x, ft in ms]))
        out += table(f"Every setting on {d}" + (" (linear features)" if t == "seg" else ""),
                     ["Method", "lr", "eval lr", *(x for x, _ in ms)], rows)
    return out


def bench_table(benches):
    """Table 5 from --bench results, in the paper's units (forward MACs of the linear layers per
    batch; seconds per epoch of its training set; memory summed over GPUs) and in ours."""
    out = ["### Table 5: cost of a training step, fine-tuning vs GRPO-RM (--bench, synthetic data)",
           "", "| Dataset | Model | Setting | Device | Method | fwd GMAC/batch | s/epoch | "
           "GB summed | ms/step | GFLOP/step | GB/process | grpo/ce time | grpo/ce memory |",
           "|" + "---|" * 13]
    for b in benches:
        c, ce, g = b["config"], b["methods"]["ce"], b["methods"]["grpo"]
        kw = {k: v for k, v in c.get("hub_kwargs", {}).items() if k != "pretrained"}
        model = c["model"] + (f" ({', '.join(f'{k} {v}' for k, v in kw.items())})" if kw else "")
        setting = (f"{c['img_size']} px, batch {c['batch_size']}, {c['dtype']}"
                   f"{', compile' if c['compile'] else ''}{', no-sdpa' if c['no_sdpa'] else ''}")
        mem = ce["peak_memory_gb"] and f"x{g['peak_memory_gb'] / ce['peak_memory_gb']:.3f}"
        for m, r in b["methods"].items():
            ratio = f"x{g['time_ratio']:.3f} | {fmt(mem, 's')}" if m == "grpo" else " | "
            cells = [c["dataset"], model, setting, f"{b['device']} × {b['world_size']}", m,
                     f"{r['fwd_macs_per_batch'] / 1e9:.1f}", fmt(r["sec_per_epoch_paper"], ".1f"),
                     fmt(r["memory_sum_gb"]), f"{r['ms_per_step']:.1f}",
                     f"{r['flops_per_step'] / 1e9:.1f}", fmt(r["peak_memory_gb"]), ratio]
            out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def put_text(d, xy, s, f, anchor="lt", fill="black"):
    """Text anchored l/m/r horizontally and t/m/b vertically (works with any PIL font)."""
    l, t, r, b = d.textbbox((0, 0), s, font=f)
    x = xy[0] - {"l": 0, "m": (r - l) / 2, "r": r - l}[anchor[0]] - l
    y = xy[1] - {"t": 0, "m": (b - t) / 2, "b": b - t}[anchor[1]] - t
    d.text((x, y), s, font=f, fill=fill)


def nice_ticks(lo, hi, n=5):
    """About n round values (multiples of 1, 2 or 5 × 10^k) within [lo, hi]."""
    raw = (hi - lo) / n if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    ks = range(math.ceil(lo / step), math.floor(hi / step) + 1)
    return [float(f"{k * step:.12g}") for k in ks]  # k·step, without accumulated rounding


def chart(d, box, title, xlabel, ylabel, lines, xgrid=()):
    """A line chart in box (the plot area) of the ImageDraw d: axes with tick values, vertical grid
    lines at xgrid, one line per {label: (xs, ys, colour)}, and a legend."""
    f, (x0, y0, x1, y1) = font(13), box
    xs = np.concatenate([v[0] for v in lines.values()])
    ys = np.concatenate([v[1] for v in lines.values()])
    xlo, xhi, ylo, yhi = xs.min(), xs.max(), ys.min(), ys.max()
    pad = (yhi - ylo) * 0.05 or 0.5
    ylo, yhi, xhi = ylo - pad, yhi + pad, xhi if xhi > xlo else xlo + 1

    def X(v):
        return x0 + (x1 - x0) * (v - xlo) / (xhi - xlo)

    def Y(v):
        return y1 - (y1 - y0) * (v - ylo) / (yhi - ylo)

    for g in xgrid:
        d.line([(X(g), y0), (X(g), y1)], fill=(228, 228, 228))
    for t in nice_ticks(ylo, yhi):
        d.line([(x0 - 4, Y(t)), (x0, Y(t))], fill="black")
        put_text(d, (x0 - 7, Y(t)), f"{t:.4g}", f, "rm")
    for t in nice_ticks(xlo, xhi, 8):
        d.line([(X(t), y1), (X(t), y1 + 4)], fill="black")
        put_text(d, (X(t), y1 + 7), f"{t:g}", f, "mt")
    for label, (x, y, colour) in lines.items():
        d.line([(X(a), Y(b)) for a, b in zip(x, y)], fill=colour, width=1)
    d.rectangle(box, outline="black")
    put_text(d, ((x0 + x1) / 2, y0 - 22), title, font(15), "mb")
    put_text(d, ((x0 + x1) / 2, y1 + 26), xlabel, f, "mt")
    put_text(d, (x0 - 7, y0 - 6), ylabel, f, "rb")
    for i, (label, (_, _, colour)) in enumerate(lines.items()):
        put_text(d, (x1 - 8, y0 + 8 + 16 * i), label, f, "rt", colour)


def mean_series(runs, key):
    """The per-step series `key` of every seed -> (seeds, steps), cut to the shortest."""
    ss = [r["series"][key] for r in runs.values() if r.get("series", {}).get(key)]
    n = min(map(len, ss), default=0)
    return np.array([s[:n] for s in ss]) if n else None


def cut_spikes(y):
    """y for drawing, where a few steps (a ratio blow-up) would flatten the rest to a line: when
    the max is beyond p90 + 10·(p90 − p10), values above p90 + (p90 − p10) are drawn there.
    Returns the drawn values and how many steps were cut."""
    lo, hi = np.percentile(y, [10, 90])
    top = hi + (hi - lo)
    if y.max() <= hi + 10 * (hi - lo):
        return y, 0
    return np.minimum(y, top), int((y > top).sum())


def figure3(root, groups):
    """Figure 3 from the per-step series: both methods' training loss and GRPO-RM's clip fraction
    over the epochs (an epoch grid; GRPO-RM's loss restarts at 0 with every θ_old), CSV beside."""
    from PIL import ImageDraw
    out, blue, red = [], (31, 119, 180), (214, 39, 40)
    for t, d in sorted({(k.task, k.data) for k in groups}):
        kc, kg = main_key(groups, t, d, "ce"), main_key(groups, t, d, "grpo")
        ce = mean_series(groups[kc], "loss") if kc else None
        gr = mean_series(groups[kg], "loss") if kg else None
        clip = mean_series(groups[kg], "clip_frac") if kg else None
        if ce is None or gr is None or clip is None:
            continue
        per_epoch = len(gr[0]) / len(next(iter(groups[kg].values()))["train_loss"])

        def ep(a):  # (seeds, steps) -> the epoch at the end of each step
            return (np.arange(a.shape[1]) + 1) / per_epoch
        zoom = gr[:, :int(3 * per_epoch)]
        grid = np.arange(0, ep(gr)[-1] + 1, max(1, round(ep(gr)[-1] / 25)))
        drawn, cut = cut_spikes(gr.mean(0))  # the CSV keeps the values
        panels = [("Fine-tuning: cross-entropy per step", "loss",
                   {"ce": (ep(ce), ce.mean(0), blue)}),
                  ("GRPO-RM: -J per step" + (f" ({cut} steps cut at the top)" if cut else ""),
                   "loss", {"grpo": (ep(gr), drawn, red)}),
                  ("GRPO-RM: -J per step, epochs 1-3", "loss",
                   {"grpo": (ep(zoom), zoom.mean(0), red)}),
                  ("GRPO-RM: clipped (sample, class) terms per step", "fraction",
                   {"grpo": (ep(clip), clip.mean(0), red)})]
        img = Image.new("RGB", (1700, 760), "white")
        draw = ImageDraw.Draw(img)
        for i, (title, ylabel, lines) in enumerate(panels):
            x0, y0 = 90 + 850 * (i % 2), 60 + 380 * (i // 2)
            chart(draw, (x0, y0, x0 + 730, y0 + 260), title, "epoch", ylabel, lines,
                  np.arange(0, 4) if i == 2 else grid)
        name = d.replace(":", "_")
        img.save(os.path.join(root, f"fig3_{name}.png"))
        write_curve_csv(os.path.join(root, f"fig3_{name}.csv"), ep(gr), ce, gr, clip)
        out.append(f"Figure 3 ({d}): fig3_{name}.png, fig3_{name}.csv "
                   f"({len(groups[kc])} + {len(groups[kg])} seeds)")
    return out


def write_curve_csv(path, epoch, ce, gr, clip):
    """Figure 3's numbers: per step, the mean and std over seeds."""
    with open(path, "w") as f:
        f.write("step,epoch,ce_loss_mean,ce_loss_std,grpo_loss_mean,grpo_loss_std,"
                "grpo_clip_frac_mean\n")
        for s in range(min(len(ce[0]), len(gr[0]))):
            f.write(f"{s + 1},{epoch[s]:.4f},{ce[:, s].mean():.6f},{ce[:, s].std():.6f},"
                    f"{gr[:, s].mean():.6f},{gr[:, s].std():.6f},{clip[:, s].mean():.6f}\n")


def figure2(root, groups, tile=160):
    """Figure 2: image | truth | frozen | fine-tuning | GRPO-RM, from the --save-vis PNGs of each
    method's first seed, tiles upsampled (nearest) to tile px, under column titles."""
    from PIL import ImageDraw
    out = []
    for d in sorted({k.data for k in groups if k.task == "seg"}):
        pngs = {}
        for m in METHODS:
            k = main_key(groups, "seg", d, m)
            first = groups[k][min(groups[k])]["dir"] if k else None
            pngs[m] = sorted(glob.glob(os.path.join(first, "vis", "*.png"))) if first else []
        n = min(len(p) for p in pngs.values())
        if not n:
            continue
        img = Image.new("RGB", (tile * 5, 28 + tile * n), "white")
        draw = ImageDraw.Draw(img)
        for j, t in enumerate(["image", "truth", "frozen", "fine-tuning", "GRPO-RM"]):
            put_text(draw, (tile * j + tile / 2, 14), t, font(15), "mm")
        for i in range(n):  # each PNG is image | truth | prediction
            ims = {m: Image.open(p[i]).convert("RGB") for m, p in pngs.items()}
            w, h = ims["frozen"].size[0] // 3, ims["frozen"].size[1]
            crops = [ims["frozen"].crop((0, 0, w, h)), ims["frozen"].crop((w, 0, 2 * w, h))]
            crops += [ims[m].crop((2 * w, 0, 3 * w, h)) for m in METHODS]
            for j, c in enumerate(crops):
                img.paste(c.resize((tile, tile), Image.NEAREST), (tile * j, 28 + tile * i))
        name = f"fig2_{d.replace(':', '_')}.png"
        img.save(os.path.join(root, name))
        out.append(f"Figure 2 ({d}): {name} (image | truth | frozen | fine-tuning | GRPO-RM)")
    return out


def report(root):
    groups = load_groups(root)
    benches = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(root, "bench-*.json")))]
    if not groups and not benches:
        raise UserError(f"--report {root}: no */result.json or bench-*.json there")
    n = sum(len(g) for g in groups.values())
    out = [f"# Results in {root}", "", f"{n} runs; mean ± sample std over seeds; best in bold.", ""]
    out += table3(groups) + tables2and4(groups) + table6(groups) + paired_table(groups)
    out += settings_table(groups) + (bench_table(benches) if benches else [])
    out += figure3(root, groups) + figure2(root, groups)
    text = "\n".join(out) + "\n"
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        # A UserError raised in a DataLoader worker arrives wrapped, its traceback as text.
        msg = str(e).strip().splitlines()[-1]
        print(f"error: {msg.split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
