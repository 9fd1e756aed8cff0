"""Tests of tools/prepare_data.py: the official layouts of Tiny-ImageNet, ADE20k and COCO-stuff,
in miniature, downloaded from a local HTTP server or given with --src, then read by grpo_rm.py."""
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import image

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
