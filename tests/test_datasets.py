"""Dataset loaders: released and on-the-fly ImageNet-C / CIFAR-C, class lists, errors, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import (CORRUPTIONS, WNIDS, cifar_config, imagenet_config, make_cifar_c, make_cifar_npy,
                           make_cifar_pickle, make_imagenet_c, make_imagenet_val, write_jpeg)
from tta.data import BadImageError, build_stream, class_list, load_benchmark, load_data_config, num_classes_of


def _all(stream):
    batches = list(stream)
    return (torch.cat([b.images.cpu() for b in batches]), torch.cat([b.labels for b in batches]),
            torch.cat([b.ids for b in batches]), [b.domain for b in batches])


@pytest.fixture(scope="module")
def imagenet_c_root(tmp_path_factory) -> Path:
    return make_imagenet_c(tmp_path_factory.mktemp("inc"), severities=(5,))


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    return make_imagenet_val(tmp_path_factory.mktemp("val"))


def test_shipped_imagenet_class_list():
    names = class_list({"classes": "imagenet"})
    assert len(names) == 1000 and names == sorted(names) and names[:3] == WNIDS
    assert num_classes_of(load_data_config("imagenet_c")) == 1000
    assert num_classes_of({"classes": WNIDS}) == 3
    assert len(class_list(load_data_config("cifar100_c"))) == 100
    assert num_classes_of(load_data_config("cifar10_c")) == 10


def test_imagenet_c_released(imagenet_c_root):
    bench = load_benchmark(imagenet_config(imagenet_c_root), severity=5)
    assert [d.name for d in bench.domains] == [f"{c}/5" for c in CORRUPTIONS]
    source = bench.domains[0].source
    # ImageFolder order: classes in class-list order, files sorted; labels = class-list positions
    assert source.files[:3] == [f"{WNIDS[0]}/ILSVRC2012_val_00000000.JPEG", f"{WNIDS[0]}/ILSVRC2012_val_00000001.JPEG",
                                f"{WNIDS[1]}/ILSVRC2012_val_00000000.JPEG"]
    assert source.labels.tolist() == [0, 0, 1, 1, 2, 2]
    stream, _ = build_stream(imagenet_config(imagenet_c_root), seed=0)
    images, labels, ids, domains = _all(stream)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert len(set(ids.tolist())) == 12  # unique per domain + sample
    # released images are used as they are (no corruption on top): pixels equal the decoded file
    from torchvision.io import ImageReadMode, decode_image, read_file

    batch = next(iter(build_stream(imagenet_config(imagenet_c_root, prefetch=0), seed=0)[0]))
    first = batch.keys[0]
    decoded = decode_image(read_file(str(imagenet_c_root / batch.domain / first)), mode=ImageReadMode.RGB)
    assert torch.equal((batch.images[0] * 255).round().to(torch.uint8), decoded)


def test_imagenet_c_errors(tmp_path, imagenet_c_root):
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_benchmark(imagenet_config(None) | {"root": None})
    with pytest.raises(FileNotFoundError, match=r"<corruption>/<severity>/<wnid>"):
        load_benchmark(imagenet_config(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"fog/5"):
        load_benchmark(imagenet_config(imagenet_c_root, corruptions=["fog"]))
    # a class folder that is not in the class list
    with pytest.raises(ValueError, match="n01484850.*not in the class list"):
        load_benchmark(imagenet_config(imagenet_c_root, classes=WNIDS[:2]))
    with pytest.raises(FileNotFoundError, match="no such shipped list"):
        load_benchmark(imagenet_config(imagenet_c_root, classes="no_such_list"))


def test_imagenet_c_class_list_file(tmp_path, imagenet_c_root):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(reversed(WNIDS)) + "\n")
    bench = load_benchmark(imagenet_config(imagenet_c_root, classes=str(path)))
    assert bench.domains[0].source.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert bench.domains[0].source.files[0].startswith(WNIDS[2])


@pytest.mark.parametrize("nested", [True, False])
def test_imagenet_c_onthefly_layouts(tmp_path, nested):
    root = make_imagenet_val(tmp_path, nested=nested)
    stream, _ = build_stream(imagenet_config(root, "imagenet_c_onthefly"), seed=0)
    images, labels, ids, domains = _all(stream)
    assert images.shape == (12, 3, 64, 64)
    assert sorted(set(domains)) == sorted(f"{c}/5" for c in CORRUPTIONS)


def test_onthefly_preprocessing_matches_pil(val_root):
    """Resize(shorter side) -> CenterCrop on the decoded uint8 tensor = torchvision's PIL pipeline (±2/255)."""
    from PIL import Image
    from torchvision import transforms

    config = imagenet_config(val_root, "imagenet_c_onthefly", resize=40, crop=32)
    bench = load_benchmark(config)
    source = bench.clean.source
    raw = source.read(np.arange(len(source)))
    ours, ok, bad = source.finish(raw, torch.device("cpu"))
    reference = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor()])
    for i in range(len(source)):
        with Image.open(source.path(i)) as image:
            expected = reference(image.convert("RGB"))
        assert (ours[i] - expected).abs().max() <= 2.5 / 255


def test_onthefly_workers_match_thread(val_root):
    config = imagenet_config(val_root, "imagenet_c_onthefly")
    a = _all(build_stream(config | {"num_workers": 0, "prefetch": 0}, seed=3)[0])
    b = _all(build_stream(config | {"num_workers": 1, "prefetch": 2}, seed=3)[0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_bad_images_skipped_counted_listed(tmp_path):
    root = make_imagenet_val(tmp_path)
    bad = root / "val" / WNIDS[1] / "ILSVRC2012_val_99999999.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    truncated = root / "val" / WNIDS[2] / "ILSVRC2012_val_99999998.JPEG"
    good = (root / "val" / WNIDS[2] / "ILSVRC2012_val_00000004.JPEG").read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    config = imagenet_config(root, "imagenet_c_onthefly")
    stream, _ = build_stream(config, seed=0)
    images, labels, ids, _ = _all(stream)
    assert images.shape[0] == 12  # 8 files per domain, 2 unreadable, 2 domains
    record = stream.describe()["bad_images"]
    assert record["count"] == 2 and record["skipped_samples"] == 4
    assert sorted(Path(f["path"]).name for f in record["files"]) == [truncated.name, bad.name]
    with pytest.raises(BadImageError, match="ILSVRC2012_val_9999999"):
        list(build_stream(config | {"on_bad_image": "fail"}, seed=0)[0])
    with pytest.raises(BadImageError):
        list(build_stream(config, seed=0, on_bad_image="fail", num_workers=1)[0])


def test_cifar_c_released(tmp_path):
    root = make_cifar_c(tmp_path / "c10c", n=8)
    stream, _ = build_stream(cifar_config(root), severity=[2, 5], seed=0, batch_size=5)
    images, labels, ids, domains = _all(stream)
    assert images.shape == (32, 3, 32, 32)
    assert sorted(set(domains)) == sorted(f"{c}/{s}" for c in CORRUPTIONS for s in (2, 5))
    # severity s holds rows (s-1) n .. s n of the stacked file, in [0, 1], channels first
    array = np.load(root / "gaussian_noise.npy")
    bench = load_benchmark(cifar_config(root), severity=2)
    domain = bench.domains[0]
    x, _, _ = domain.source.finish(domain.source.read(np.array([3, 0])), torch.device("cpu"))
    expected = torch.from_numpy(array[[8 + 3, 8]]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, expected)
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        (root / "labels.npy").unlink()
        load_benchmark(cifar_config(root))


def test_cifar_c_errors(tmp_path):
    root = make_cifar_c(tmp_path / "c", n=4)
    with pytest.raises(FileNotFoundError, match=r"fog\.npy"):
        load_benchmark(cifar_config(root, corruptions=["fog"]))
    np.save(root / "bad.npy", np.zeros((7, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="5 severities"):
        load_benchmark(cifar_config(root, corruptions=["bad"]))


@pytest.mark.parametrize("layout", ["pickle", "pickle_flat", "npy", "cifar100"])
def test_cifar_onthefly_layouts(tmp_path, layout):
    if layout == "npy":
        root = make_cifar_npy(tmp_path)
        config = cifar_config(root, "cifar10_c_onthefly")
    elif layout == "cifar100":
        root = make_cifar_pickle(tmp_path, dataset="cifar100")
        config = cifar_config(root, "cifar100_c_onthefly")
    else:
        root = make_cifar_pickle(tmp_path)
        if layout == "pickle_flat":
            root = root / "cifar-10-batches-py"
        config = cifar_config(root, "cifar10_c_onthefly")
    stream, _ = build_stream(config, seed=0, batch_size=3)
    images, labels, ids, domains = _all(stream)
    assert images.shape == (16, 3, 32, 32) and len(set(domains)) == 2
    assert sorted(labels.tolist()) == sorted(list(range(8)) * 2)


def test_cifar_onthefly_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/test_batch"):
        load_benchmark(cifar_config(tmp_path, "cifar10_c_onthefly"))


def test_digits_clean_and_domains():
    config = dict(load_data_config("digits_c"), corruptions=["brightness"])
    bench = load_benchmark(config)
    assert [d.name for d in bench.domains] == ["brightness/5"] and bench.clean.name == "clean"


def test_pngs_and_grey_jpegs_decode(tmp_path):
    """Non-JPEG files and greyscale JPEGs in a class folder decode to RGB."""
    from torchvision.io import encode_png

    root = make_imagenet_val(tmp_path, per_class=1)
    folder = root / "val" / WNIDS[0]
    (folder / "extra.png").write_bytes(bytes(encode_png(torch.full((3, 70, 80), 128, dtype=torch.uint8)).numpy()))
    write_jpeg(folder / "grey.JPEG", torch.full((1, 70, 80), 200, dtype=torch.uint8))
    stream, _ = build_stream(imagenet_config(root, "imagenet_c_onthefly", corruptions=["brightness"]), seed=0)
    images, labels, _, _ = _all(stream)
    assert images.shape == (5, 3, 64, 64) and stream.describe()["bad_images"]["count"] == 0
