"""TwoViewAugmentation and to_model_input (docs/method.md section 6): shapes, per-sample / per-view randomness,
determinism, normalization against closed forms, Barlow Twins' solarization asymmetry."""

import pytest
import torch

from hf_ibproj.augmentation import TwoViewAugmentation, default_blur_kernel_size, to_model_input

MEAN3, STD3 = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)


def _augmentation(preset="simclr", image_size=16, channels=3, num_views=2):
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.3,), (0.2,))
    return TwoViewAugmentation(preset, image_size, channels, mean, std, num_views=num_views)


def _noise_batch(batch, channels, size, dtype=torch.uint8):
    """`batch` copies of ONE random image, so any difference between samples comes from the augmentation."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, channels, size, size), generator=generator, dtype=torch.uint8)
    images = image.expand(batch, -1, -1, -1).contiguous()
    return images if dtype == torch.uint8 else images.to(dtype) / 255


@pytest.mark.parametrize("preset", ["simclr", "barlow_twins"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_output_shape_dtype_and_range(preset, channels, dtype):
    aug = _augmentation(preset, image_size=12, channels=channels, num_views=3)
    out = aug(_noise_batch(5, channels, 20, dtype))  # input larger than image_size: the crop resizes
    assert out.shape == (5, 3, channels, 12, 12)
    assert out.dtype == torch.float32
    # Pixels stay in [0, 1] before normalization.
    low = (0 - aug.mean) / aug.std
    high = (1 - aug.mean) / aug.std
    assert torch.all(out >= low - 1e-5) and torch.all(out <= high + 1e-5)


@pytest.mark.parametrize("preset", ["simclr", "barlow_twins"])
def test_every_sample_and_every_view_draws_its_own_parameters(preset):
    torch.manual_seed(0)
    out = _augmentation(preset)(_noise_batch(12, 3, 16))
    first_view = out[:, 0].flatten(1)
    # A batch-wide parameter draw (torchvision v2 on a batched tensor) would make identical inputs give identical
    # outputs; here every pair of samples differs.
    distances = torch.cdist(first_view, first_view)
    off_diagonal = distances[~torch.eye(12, dtype=torch.bool)]
    assert torch.all(off_diagonal > 1e-3)
    # And the two views of each sample differ.
    assert torch.all((out[:, 0] - out[:, 1]).flatten(1).abs().amax(1) > 1e-3)


def test_grayscale_images_get_brightness_and_contrast_jitter_only():
    aug = _augmentation("simclr", channels=1)
    jitter = next(m for m in aug.shared if type(m).__name__ == "ColorJitter")
    assert not any(type(m).__name__ == "RandomGrayscale" for m in aug.shared)
    assert jitter.saturation == 0.0 and jitter.hue == 0.0
    assert jitter.brightness == 0.8 and jitter.contrast == 0.8
    colour = _augmentation("simclr", channels=3)
    assert any(type(m).__name__ == "RandomGrayscale" for m in colour.shared)


def test_same_seed_same_views_other_seed_other_views():
    aug = _augmentation("simclr")
    images = _noise_batch(6, 3, 16)
    torch.manual_seed(123)
    first = aug(images)
    torch.manual_seed(123)
    again = aug(images)
    torch.manual_seed(124)
    other = aug(images)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("preset", ["simclr", "barlow_twins"])
def test_black_image_normalizes_to_minus_mean_over_std(preset):
    # Every op of both recipes maps a black image to black (crop, flip, brightness/contrast/saturation/hue
    # jitter, grayscale, blur, solarize below the threshold), so each output pixel is (0 - mean) / std per channel.
    out = _augmentation(preset, image_size=8)(torch.zeros(4, 3, 10, 10, dtype=torch.uint8))
    expected = torch.tensor([-m / s for m, s in zip(MEAN3, STD3)])  # -0.4, -1.6, -6.0
    assert torch.allclose(out, expected.view(1, 1, 3, 1, 1).expand_as(out), atol=1e-5)


def test_to_model_input_matches_closed_form():
    images = torch.randint(0, 256, (3, 3, 5, 4), dtype=torch.uint8)
    out = to_model_input(images, MEAN3, STD3)
    assert out.dtype == torch.float32 and out.shape == (3, 3, 5, 4)
    for c in range(3):
        for value_in, value_out in zip(images[:, c].flatten().tolist(), out[:, c].flatten().tolist()):
            assert value_out == pytest.approx((value_in / 255 - MEAN3[c]) / STD3[c], abs=1e-5)


def _solarized_fraction(out, view, mean, std):
    """Share of samples whose (white, hence >= 0.6 after brightness jitter) image was inverted below 0.5."""
    pixels = out[:, view] * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    return (pixels.flatten(1).mean(1) < 0.5).float().mean().item()


def test_barlow_twins_solarizes_later_views_only_with_p_0_2():
    # A white image stays in [0.6, 1] under crop, flip, jitter (brightness 0.6-1.4, then clipped) and
    # grayscale; solarization at 128/255 turns it into [0, 0.4], so each sample shows whether it was solarized.
    torch.manual_seed(0)
    aug = _augmentation("barlow_twins", image_size=4, num_views=3)
    out = aug(torch.full((4000, 3, 4, 4), 255, dtype=torch.uint8))
    mean, std = torch.tensor(MEAN3), torch.tensor(STD3)
    assert _solarized_fraction(out, 0, mean, std) == 0.0
    for view in (1, 2):  # binomial(4000, 0.2): standard deviation 0.0063
        assert abs(_solarized_fraction(out, view, mean, std) - 0.2) < 0.03


@pytest.mark.parametrize(("image_size", "kernel"), [(8, 3), (28, 3), (32, 3), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_is_odd_and_about_a_tenth_of_the_image(image_size, kernel):
    assert default_blur_kernel_size(image_size) == kernel


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown augmentation preset 'byol'"):
        TwoViewAugmentation("byol", 32, 3, MEAN3, STD3)
    with pytest.raises(ValueError, match="mean has 3 values for 1-channel"):
        TwoViewAugmentation("simclr", 32, 1, MEAN3, (0.5,))
    with pytest.raises(ValueError, match=r"expected a batch of shape \(B, 3, H, W\)"):
        _augmentation("simclr")(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("crop_min_scale", [0.08, 0.5])
def test_crops_cover_at_least_crop_min_scale_of_the_image(crop_min_scale):
    torch.manual_seed(0)
    aug = TwoViewAugmentation("simclr", 16, 1, (0.3,), (0.2,), crop_min_scale=crop_min_scale)
    aug(_noise_batch(500, 1, 40))
    corners = aug.shared[0]._params["src"]  # kornia's crop boxes (x, y corners, inclusive) of all 1000 views
    width = corners[:, 1, 0] - corners[:, 0, 0] + 1
    height = corners[:, 2, 1] - corners[:, 1, 1] + 1
    area = width * height / 40**2
    assert area.min() >= crop_min_scale - 0.02  # integer box edges round the drawn area by < 2 px per side
    assert area.max() <= 1.0 and area.quantile(0.1) < crop_min_scale + 0.15  # the small end of the range is drawn


def test_crop_min_scale_out_of_range_is_named():
    with pytest.raises(ValueError, match="crop_min_scale"):
        TwoViewAugmentation("simclr", 16, 1, (0.3,), (0.2,), crop_min_scale=0.0)


@pytest.mark.parametrize("kernel", [3, 13])
def test_blur_spreads_a_point_over_blur_kernel_size_pixels(kernel):
    torch.manual_seed(0)
    blur = TwoViewAugmentation("simclr", 31, 1, (0.3,), (0.2,), blur_kernel_size=kernel).shared[-1]
    blur.p = 1.0  # every sample blurred (the recipe blurs half of them)
    point = torch.zeros(64, 1, 31, 31)
    point[:, :, 15, 15] = 1.0
    reached = (blur(point) > 1e-6).any(dim=0)[0]
    rows, cols = reached.nonzero().unbind(1)
    radius = (kernel - 1) // 2  # a separable kernel of that size reaches exactly this far, and no further
    assert rows.min() == cols.min() == 15 - radius and rows.max() == cols.max() == 15 + radius


@pytest.mark.parametrize("kernel", [4, 1, 33])
def test_blur_kernel_size_must_be_odd_and_fit_the_image(kernel):
    with pytest.raises(ValueError, match="blur_kernel_size"):
        TwoViewAugmentation("simclr", 16, 1, (0.3,), (0.2,), blur_kernel_size=kernel)
