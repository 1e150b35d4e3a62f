"""The teacher augmentation of CoTTA (``tta/augment/cotta.py``) against the torchvision composition
the reference code runs (``get_tta_transforms`` of qinenergy/cotta, written in ``test_cotta.py``,
and ROID's variant without blur and noise), on random inputs with the same draws.

The fast implementation computes the affine and the blur only where the centre crop needs them, the
blur as two 1-D passes and the hue with a gather; it must make the same random draws (the generator
state after a call is the same) and the same image up to floating-point rounding.
"""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms as transforms
import torchvision.transforms.functional as F

from tta.augment.cotta import TeacherAugmentation, adjust_hue, gaussian_kernel1d

from test_cotta import Clip, ColorJitterPro, GaussianNoise


def composition(height, width, padding_mode="edge", blur=True, noise_std=0.005):
    """The reference's ``Compose`` for an image of ``height`` x ``width`` (CoTTA: edge padding, blur,
    noise; ROID: reflect padding, no blur, no noise)."""
    steps = [Clip(),
             ColorJitterPro(brightness=[0.6, 1.4], contrast=[0.7, 1.3], saturation=[0.5, 1.5], hue=[-0.06, 0.06],
                            gamma=[0.7, 1.3]),
             transforms.Pad(padding=[int(width / 2), int(height / 2)], padding_mode=padding_mode),
             transforms.RandomAffine(degrees=[-15, 15], translate=(1 / 16, 1 / 16), scale=(0.9, 1.1), shear=None,
                                     interpolation=transforms.InterpolationMode.BILINEAR, fill=0)]
    if blur:
        steps.append(transforms.GaussianBlur(kernel_size=5, sigma=[0.001, 0.5]))
    steps += [transforms.CenterCrop(size=[height, width]), transforms.RandomHorizontalFlip(p=0.5)]
    if noise_std:
        steps.append(GaussianNoise(0, noise_std))
    return transforms.Compose(steps + [Clip()])


CASES = [("edge", True, 0.005), ("reflect", False, 0.0)]  # CoTTA and RoTTA; ROID


@pytest.mark.parametrize("padding_mode,blur,noise_std", CASES)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_the_augmentation_equals_the_torchvision_composition(padding_mode, blur, noise_std, dtype, atol):
    g = torch.Generator().manual_seed(0)
    ours = TeacherAugmentation(padding_mode=padding_mode, blur=blur, noise_std=noise_std)
    for seed, (height, width) in enumerate([(32, 32)] * 6 + [(17, 23), (3, 3)]):
        x = torch.rand(6, 3, height, width, generator=g, dtype=dtype) * 1.2 - 0.1  # some values to clip
        x[0, :, :2] = 0.5  # grey pixels (hue undefined)
        reference = composition(height, width, padding_mode, blur, noise_std)
        torch.manual_seed(seed)
        expected = reference(x)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        got = ours(x)
        assert torch.equal(torch.get_rng_state(), state), (seed, height, width)  # the same draws
        assert got.shape == expected.shape and got.dtype == dtype
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=f"seed {seed}, {height}x{width}")


def test_the_hue_is_torchvisions_to_the_bit():
    """The gather picks the same numbers as torchvision's one-hot einsum (float32 and float64 input,
    grey pixels, the six hue sectors, both signs of the shift)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(4, 3, 16, 16, generator=g, dtype=dtype)
        x[:, :, 0] = x[:, :1, 0]  # grey rows
        x[:, 0, 1], x[:, 1, 1] = x[:, 2, 1], x[:, 2, 1]  # ties between channels
        for factor in (-0.06, -0.5, 0.0, 0.013, 0.5):
            assert torch.equal(adjust_hue(x, factor), F.adjust_hue(x, factor)), (dtype, factor)


def test_the_1d_kernel_is_torchvisions():
    for sigma in (0.001, 0.2, 0.5):
        k = torch.tensor(gaussian_kernel1d(sigma, 5), dtype=torch.float64)
        x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
        x[..., 4, 4] = 1.0  # the blur of an impulse (far from the borders) is the 2-D kernel
        kernel2d = F.gaussian_blur(x, [5, 5], [sigma, sigma])[0, 0, 2:7, 2:7]
        torch.testing.assert_close(torch.outer(k, k), kernel2d, atol=1e-15, rtol=0)
