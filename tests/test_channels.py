"""Any channel count: greyscale/RGB conversion, corruptions on greyscale images, greyscale arrays,
and 16-bit PNGs next to 8-bit ones in an image folder."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_fixtures import cifar_config
from tta.data import build_stream, load_data_config
from tta.data.channels import channel_conversion, convert_channels
from tta.data.corruptions import ALL_CORRUPTIONS, RGB_CORRUPTIONS, corrupt, supports_channels
from tta.data.folders import fit_preprocess_to_model
from tta.data.sources import ArraySource

SAME_DRAWS = [n for n in ALL_CORRUPTIONS if n not in RGB_CORRUPTIONS and n not in ("gaussian_noise", "speckle_noise")]


def _grey(n: int = 3, size: int = 32) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = 0.5 + 0.4 * torch.sin(6 * x) * torch.cos(4 * y)
    return (base + 0.05 * torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(1))).clamp(0, 1)


# ------------------------------------------------------------------------------------- conversion
def test_rgb_to_grey_is_pils_luma_and_grey_round_trips():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    rgb = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    grey = convert_channels(rgb, 1)
    pil = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels])
    assert grey.shape == (2, 1, 8, 8)
    assert (grey[:, 0] * 255 - torch.from_numpy(pil).float()).abs().max() <= 0.5 + 1e-4  # PIL rounds to uint8
    g = _grey(2, 8)
    assert convert_channels(g, 1) is g
    torch.testing.assert_close(convert_channels(convert_channels(g, 3), 1), g)
    assert torch.equal(convert_channels(g, 3), g.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="cannot convert 2-channel"):
        convert_channels(torch.rand(1, 2, 4, 4), 3)
    assert channel_conversion(3, 3) is None
    record = channel_conversion(3, 1)
    assert (record["from"], record["to"]) == (3, 1) and "0.299" in record["method"]
    assert channel_conversion(1, 3) == {"from": 1, "to": 3, "method": "greyscale repeated over 3 channels"}
    with pytest.raises(ValueError, match="only greyscale <-> RGB"):
        channel_conversion(4, 3)


# ------------------------------------------------------------------------------------ corruptions
@pytest.mark.parametrize("name", SAME_DRAWS)
def test_greyscale_corruption_equals_the_rgb_corruption_of_the_same_grey_image(name):
    """Per-channel corruptions draw the same random numbers for the first channel, so a greyscale image
    gets what each channel of its RGB copy gets (the RGB path is checked against the reference)."""
    g = _grey()
    out = corrupt(g, name, 3, seed=2)
    assert out.shape == g.shape and not torch.equal(out, g)
    torch.testing.assert_close(out, corrupt(g.repeat(1, 3, 1, 1), name, 3, seed=2)[:, :1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise"])
def test_greyscale_noise_has_the_reference_strength(name):
    g = torch.full((8, 1, 32, 32), 0.5)
    noise = corrupt(g, name, 1, seed=0) - g
    rgb_noise = corrupt(g.repeat(1, 3, 1, 1), name, 1, seed=0) - 0.5
    assert noise.shape == g.shape
    assert abs(noise.std().item() - rgb_noise.std().item()) < 0.1 * rgb_noise.std().item()
    assert abs(noise.mean().item()) < 0.01


def test_any_channel_count_where_channels_are_treated_alike():
    a, b = _grey(2), _grey(2).flip(-1)
    for name in ("defocus_blur", "pixelate", "shot_noise"):
        two = corrupt(torch.cat([a, b], 1), name, 4, seed=1)
        torch.testing.assert_close(two[:, :1], corrupt(a, name, 4, seed=1), atol=1e-6, rtol=0)
    assert corrupt(torch.rand(2, 5, 16, 16), "elastic_transform", 2).shape == (2, 5, 16, 16)


@pytest.mark.parametrize("name", RGB_CORRUPTIONS)
def test_rgb_only_corruptions_say_so(name):
    with pytest.raises(ValueError, match="needs RGB") as error:
        corrupt(_grey(), name, 3)
    assert all(n in str(error.value) for n in ("snow", "frost", "brightness", "saturate", "spatter"))
    assert not supports_channels(name, 1) and supports_channels(name, 3)


def test_jpeg_takes_one_or_three_channels():
    assert supports_channels("jpeg_compression", 1) and not supports_channels("jpeg_compression", 2)
    with pytest.raises(ValueError, match="needs 1 or 3 channels"):
        corrupt(torch.rand(1, 2, 16, 16), "jpeg_compression", 1)


# ------------------------------------------------------------------------------- greyscale arrays
@pytest.mark.parametrize("layout", ["nhw", "nhw1", "n1hw"])
def test_greyscale_arrays(layout):
    pixels = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5) * 3
    array = {"nhw": pixels, "nhw1": pixels[..., None], "n1hw": pixels[:, None]}[layout]
    source = ArraySource(array, [0, 1])
    assert source.channels == 1 and source.image_size == (4, 5) and source.describe()["channels"] == 1
    images, _, _ = source.finish(source.read(np.array([1, 0])), torch.device("cpu"))
    torch.testing.assert_close(images, torch.from_numpy(pixels[[1, 0]]).float()[:, None] / 255)
    with pytest.raises(ValueError, match="greyscale"):
        ArraySource(np.zeros((2, 4, 5, 2), dtype=np.uint8), [0, 1])


def test_corrupting_a_greyscale_test_set_on_the_fly(tmp_path):
    """cifar10_c_onthefly over a greyscale test_images.npy: the recipe for corrupting your own test set."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "test_images.npy", rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8))
    np.save(tmp_path / "test_labels.npy", np.arange(6) % 3)
    config = cifar_config(tmp_path, "cifar10_c_onthefly", corruptions=["gaussian_noise", "defocus_blur"],
                          classes=["a", "b", "c"])
    stream, _ = build_stream(config, seed=0, batch_size=4)
    batches = list(stream)
    assert {b.images.shape[1:] for b in batches} == {(1, 28, 28)}
    assert sum(b.images.shape[0] for b in batches) == 12


# --------------------------------------------------------------------------------- 16-bit PNGs
def _png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT, IEND."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[i].astype(">u2").tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_16_bit_pngs_decode_like_their_8_bit_twins(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, size=(12, 12), dtype=np.uint8)
    rgb8 = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    for name in ("grey", "rgb"):
        (tmp_path / name).mkdir()
    Image.fromarray(grey8).save(tmp_path / "grey" / "a_8bit.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "grey" / "b_16bit.png")  # mode I;16
    assert Image.open(tmp_path / "grey" / "b_16bit.png").mode == "I;16"
    Image.fromarray(rgb8).save(tmp_path / "rgb" / "a_8bit.png")
    _png16_rgb(tmp_path / "rgb" / "b_16bit.png", rgb8.astype(np.uint16) * 257)
    config = {**load_data_config("image_folder"), "root": str(tmp_path), "resize": 12, "crop": 12}
    stream, _ = build_stream(config, seed=0, shuffle=False, decode="cpu", num_workers=0, on_bad_image="fail")
    images = torch.cat([b.images for b in stream])
    assert images.shape == (4, 3, 12, 12) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images[1], images[0], atol=0, rtol=0)  # grey: 16-bit == 8-bit
    torch.testing.assert_close(images[3], images[2], atol=0, rtol=0)  # rgb: 16-bit == 8-bit
    torch.testing.assert_close(images[0][0], torch.from_numpy(grey8).float() / 255)


# ------------------------------------------------------------------------------ folders fit model
def test_image_folder_sizes_come_from_the_model(tmp_path):
    from tiny_clip import write_image_folder

    base = {**load_data_config("image_folder"), "root": str(write_image_folder(tmp_path / "data", ["a", "b"], 1))}
    assert base["resize"] is None and base["crop"] is None  # the shipped config leaves them to the model
    fitted, choice = fit_preprocess_to_model(base, (32, 32))
    assert (fitted["resize"], fitted["crop"]) == (32, 32) and choice["source"] == "model input size 32x32"
    stream, _ = build_stream(fitted, seed=0, decode="cpu", num_workers=0)
    assert next(iter(stream)).images.shape[-2:] == (32, 32)
    assert stream.describe()["preprocess"] == choice
    timm_like, choice = fit_preprocess_to_model(base, (224, 224), crop_pct=0.875)
    assert (timm_like["resize"], timm_like["crop"]) == (256, 224) and "crop_pct 0.875" in choice["source"]
    stated, choice = fit_preprocess_to_model({**base, "resize": 40}, (32, 32))
    assert (stated["resize"], stated["crop"]) == (40, 32) and "resize from the data config" in choice["source"]
    kept, choice = fit_preprocess_to_model({**base, "resize": 64, "crop": 48}, (32, 32))
    assert (kept["resize"], kept["crop"], choice["source"]) == (64, 48, "data config")
    digits = load_data_config("digits_c")
    assert fit_preprocess_to_model(digits, (32, 32)) == (digits, {})
    unknown, _ = fit_preprocess_to_model(base, None)  # nothing known: the loader's recorded default
    stream, _ = build_stream(unknown, seed=0, decode="cpu", num_workers=0)
    assert next(iter(stream)).images.shape[-2:] == (224, 224)
    assert "model input size unknown" in stream.describe()["preprocess"]["source"]
