"""Put the datasets that grpo_rm.py does not read in their official layout into one it reads, as
nanoGPT's data/*/prepare.py and mmsegmentation's dataset_converters do.

    python3 tools/prepare_data.py tinyimagenet --data-dir data/tinyimagenet
    python3 tools/prepare_data.py ade20k --data-dir data/ade20k
    python3 tools/prepare_data.py cocostuff --data-dir data/cocostuff

The official archives are downloaded and extracted into DATA/download/ (or --src names a copy
already extracted), then DATA receives:
- tinyimagenet: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, an image folder (val sorted into
  classes by val/val_annotations.txt);
- ade20k, cocostuff: Pascal VOC 2012's layout, VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,
  ImageSets/Segmentation/{train,val}.txt}, each mask holding the classes and 255 where unlabelled.
  ADE20k's 0 ("other") is unlabelled and 1-150 become 0-149; COCO-stuff's stuffthingmaps store
  COCO's 182 ids minus one, of which 171 are used (0-170), the rest unlabelled.
Images are hard-linked where the file system allows, else copied; masks are written anew. A run
that stopped can be run again: what is there already is kept.
"""
import argparse
import os
import shutil
import sys
from multiprocessing import Pool

import numpy as np
from PIL import Image
from torchvision.datasets.utils import download_and_extract_archive

COCO = "http://images.cocodataset.org/zips/"
URLS = {  # (archive, the folder of DATA/download it is extracted into)
    "tinyimagenet": [("http://cs231n.stanford.edu/tiny-imagenet-200.zip", "")],
    "ade20k": [("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", "")],
    "cocostuff": [(COCO + "train2017.zip", "images"), (COCO + "val2017.zip", "images"),
                  ("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                   "stuffthingmaps_trainval2017.zip", "stuffthingmaps")],
}
TOP = {"tinyimagenet": "tiny-imagenet-200", "ade20k": "ADEChallengeData2016", "cocostuff": ""}

# COCO-stuff-164k: the stored ids (COCO's minus one) of the 11 thing classes COCO never used.
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
TABLES = {  # stored mask value -> class (255: unlabelled)
    "ade20k": np.array([255] + list(range(150)) + [255] * 105, np.uint8),
    "cocostuff": np.full(256, 255, np.uint8),
}
TABLES["cocostuff"][[i for i in range(182) if i not in COCO_UNUSED]] = np.arange(171)


def fetch(name, data_dir):
    """The official archives, downloaded (once) and extracted into DATA/download -> the source."""
    down = os.path.join(data_dir, "download")
    for url, sub in URLS[name]:
        done = os.path.join(down, os.path.basename(url) + ".extracted")
        if not os.path.exists(done):
            download_and_extract_archive(url, down, os.path.join(down, sub))
            open(done, "w").close()
    return os.path.join(down, TOP[name])


def link(src, dst):
    """dst, hard-linked to src where the file system allows, else a copy; kept if it is there."""
    if os.path.exists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(src, dst)


def tinyimagenet(src, out):
    """train/<wnid>/images/*.JPEG -> train/<wnid>/; val/images/ -> val/<wnid>/ by the annotations."""
    for wnid in sorted(os.listdir(os.path.join(src, "train"))):
        images = os.path.join(src, "train", wnid, "images")
        for f in sorted(os.listdir(images)):
            link(os.path.join(images, f), os.path.join(out, "train", wnid, f))
    with open(os.path.join(src, "val", "val_annotations.txt")) as f:
        rows = [r.split("\t") for r in f.read().splitlines() if r.strip()]
    for file, wnid, *_ in rows:  # file, wnid, box
        link(os.path.join(src, "val", "images", file), os.path.join(out, "val", wnid, file))
    return len(rows)


def convert_mask(job):
    """(stored mask, the converted one's path, table): the classes, written as a grey PNG."""
    src, dst, table = job
    if not os.path.exists(dst):
        with Image.open(src) as m:
            Image.fromarray(table[np.array(m)]).save(dst)


def voc_layout(pairs, out, split, table, workers):
    """[(image, mask)] -> out/VOCdevkit/VOC2012: the images linked, the masks mapped by table."""
    base = os.path.join(out, "VOCdevkit", "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    stems = [os.path.splitext(os.path.basename(img))[0] for img, _ in pairs]
    for (img, _), stem in zip(pairs, stems):
        link(img, os.path.join(base, "JPEGImages", stem + ".jpg"))
    jobs = [(m, os.path.join(base, "SegmentationClass", s + ".png"), table)
            for (_, m), s in zip(pairs, stems)]
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(convert_mask, jobs, chunksize=64):
            pass
    with open(os.path.join(base, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
        f.write("".join(s + "\n" for s in stems))
    return len(stems)


def segmentation(name, src, out, workers):
    """ADE20k's images/ and annotations/, or COCO-stuff's images/ and stuffthingmaps/ -> VOC's."""
    splits = {"ade20k": [("training", "train"), ("validation", "val")],
              "cocostuff": [("train2017", "train"), ("val2017", "val")]}[name]
    masks = "annotations" if name == "ade20k" else "stuffthingmaps"
    n = 0
    for theirs, ours in splits:
        images = os.path.join(src, "images", theirs)
        files = sorted(f for f in os.listdir(images) if f.endswith(".jpg"))
        pairs = [(os.path.join(images, f), os.path.join(src, masks, theirs, f[:-4] + ".png"))
                 for f in files]
        n += voc_layout(pairs, out, ours, TABLES[name], workers)
    return n


def prepare(name, data_dir, src=None, workers=4):
    """The dataset name in the layout grpo_rm.py reads, in data_dir -> the count of images (0 when
    data_dir was prepared already: it says so in DATA/.prepared)."""
    done = os.path.join(data_dir, ".prepared")
    if os.path.exists(done) and not src:
        return 0
    src = src or fetch(name, data_dir)
    if name == "tinyimagenet":
        n = tinyimagenet(src, data_dir)
    else:
        n = segmentation(name, src, data_dir, workers)
    with open(done, "w") as f:
        f.write(f"{name} {n}\n")
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", choices=sorted(URLS))
    p.add_argument("--data-dir", required=True, help="where grpo_rm.py's --data-dir will point")
    p.add_argument("--src", help="the official layout, extracted already (default: download it)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes writing masks")
    args = p.parse_args(argv)
    try:
        n = prepare(args.dataset, args.data_dir, args.src, args.workers)
    except (OSError, ValueError) as e:  # a missing folder or annotation file, a download error
        sys.exit(f"error: {args.dataset}: {e}")
    print(f"{args.dataset}: {n} images in {args.data_dir}" if n else
          f"{args.data_dir}: prepared already ({args.dataset})")


if __name__ == "__main__":
    main()
