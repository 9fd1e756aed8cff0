"""Shared fixtures of test_grpo_rm.py and tools/test_*.py: the tiny torch.hub model, tiny datasets
in the real on-disk layouts, and the DINOv2 and DINOv3 clones where they exist."""
import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared")  # where CI keeps the clones; users set the variables


def image(rng, cls, size=16):
    """A noisy image whose colour is its class (of 3)."""
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][cls % 3], np.float32)
    noise = rng.normal(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def palette_png(label, path):
    """A label map saved as VOC saves it: a palette PNG whose index is the class."""
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    im.save(path)


@pytest.fixture(scope="session")
def hub():
    """A local torch.hub repository: tools/tinyvit, entry point dinov2_vitt_test."""
    return os.path.join(HERE, "tools", "tinyvit")


@pytest.fixture(scope="session")
def dinov2():
    """A clone of facebookresearch/dinov2 (code only): $GRPO_RM_DINOV2, else ../shared/dinov2."""
    path = os.environ.get("GRPO_RM_DINOV2", os.path.join(SHARED, "dinov2"))
    if not os.path.isfile(os.path.join(path, "hubconf.py")):
        pytest.skip("no clone of facebookresearch/dinov2 ($GRPO_RM_DINOV2 or ../shared/dinov2)")
    return path


@pytest.fixture(scope="session")
def dinov3():
    """A clone of facebookresearch/dinov3 (code only): $GRPO_RM_DINOV3, else ../shared/dinov3; its
    hub code needs torchmetrics and termcolor."""
    path = os.environ.get("GRPO_RM_DINOV3", os.path.join(SHARED, "dinov3"))
    if not os.path.isfile(os.path.join(path, "hubconf.py")):
        pytest.skip("no clone of facebookresearch/dinov3 ($GRPO_RM_DINOV3 or ../shared/dinov3)")
    for package in ("torchmetrics", "termcolor"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"DINOv3's hub code needs {package}: pip install torchmetrics termcolor")
    return path


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    """{train,test}/<class>/*.png, 3 classes: 8 train and 4 test images each, 16x16."""
    d, rng = tmp_path_factory.mktemp("imagefolder"), np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c in range(3):
            os.makedirs(d / split / f"class{c}")
            for i in range(n):
                image(rng, c).save(d / split / f"class{c}" / f"{i}.png")
    return str(d)


def voc_layout(root, splits, size=16, rng=None):
    """VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} under root, from
    {split: [label maps]}; each image coloured by its labels."""
    rng = rng or np.random.default_rng(1)
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(base / sub, exist_ok=True)
    for split, labels in splits.items():
        ids = [f"{split}{i}" for i in range(len(labels))]
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for name, label in zip(ids, labels):
            img = np.array(image(rng, 0, size)).astype(np.float32)
            img[label == 1] = [40, 200, 40]
            img[label == 2] = [40, 40, 200]
            Image.fromarray(img.astype(np.uint8)).save(base / "JPEGImages" / f"{name}.jpg")
            palette_png(label, base / "SegmentationClass" / f"{name}.png")
    return str(root)


@pytest.fixture(scope="session")
def vocfolder(tmp_path_factory):
    """VOC's layout: 8 train, 4 val; labels {0, 1, 2} in blocks, the top row 255 (ignored); 1-3
    top rows in train."""
    splits = {}
    for split, n in (("train", 8), ("val", 4)):
        splits[split] = []
        for i in range(n):
            label = np.zeros((16, 16), np.uint8)
            label[:, 8:] = 1 + i % 2
            label[4:8, 2:6] = 2 - i % 2
            label[:1 + (i % 3 if split == "train" else 0), :] = 255  # unequal labelled counts
            splits[split].append(label)
    return voc_layout(tmp_path_factory.mktemp("voc"), splits)


@pytest.fixture
def server(tmp_path):
    """A local HTTP server (127.0.0.1) for the files under tmp_path/www -> (www, its base URL)."""
    import functools
    import http.server
    import threading
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
