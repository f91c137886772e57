"""Training crops of streamed images come from the whole image (FullImageCrops), and the decoded cache
(DecodedImageCache) holds the bytes decoding gives: checked against PIL directly and against arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_ibproj.augmentation import TwoViewAugmentation
from hf_ibproj.data import CorruptImageError, DecodedImageCache, FullImageCrops, StreamingImageDataset
from hf_ibproj.train_config import TrainConfig

RED, BLUE, GRAY = (255, 0, 0), (0, 0, 255), (128, 128, 128)
STRIP = 30  # px of pure colour at the left (red) and right (blue) border of a 400 x 250 image


def image_folder(root, sizes, broken=()):
    """An imagefolder of PNGs (lossless: exact colours) of the given (width, height) sizes, two classes; the rows
    in `broken` are files that are not images."""
    rng = np.random.default_rng(0)
    for row, (width, height) in enumerate(sizes):
        folder = root / "train" / f"class{row % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{row:03d}.png"
        if row in broken:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return root


def bordered_image(root):
    """One 400 x 250 image: gray, with a red strip at its left border and a blue one at its right."""
    pixels = np.full((250, 400, 3), GRAY, dtype=np.uint8)
    pixels[:, :STRIP], pixels[:, -STRIP:] = RED, BLUE
    (root / "train" / "a").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "train" / "a" / "wide.png")
    return StreamingImageDataset.from_source(str(root), channels=3, image_size=32)


def has_colour(views: torch.Tensor, colour) -> torch.Tensor:
    """Per view (V, 3, S, S): whether some pixel is within 40 of `colour` in every channel."""
    target = torch.tensor(colour).view(1, 3, 1, 1)
    return ((views.int() - target).abs() <= 40).all(1).flatten(1).any(1)


def test_crops_reach_the_borders_that_the_center_fitted_square_cuts_off(tmp_path):
    stream = bordered_image(tmp_path)
    fitted = stream[0][0].unsqueeze(0)  # what evaluation reads, and what the device-side crop used to start from
    assert not has_colour(fitted, RED).any() and not has_colour(fitted, BLUE).any()
    crops = FullImageCrops(stream, 32, num_views=2, crop_min_scale=0.08, seed=0)
    views = []
    for epoch in range(200):
        crops.epoch = epoch
        views.append(crops[0][0])
    views = torch.cat(views)  # 400 crops
    assert views.shape == (400, 3, 32, 32) and views.dtype == torch.uint8
    # A crop of area fraction a and aspect ratio r spans sqrt(a r) of the shorter side; it holds the left strip when
    # its left edge, uniform over the room left, falls in the strip's 30 px: about 10-20% of the crops.
    left, right = has_colour(views, RED).float().mean(), has_colour(views, BLUE).float().mean()
    assert 0.08 < left < 0.4 and 0.08 < right < 0.4


def test_crops_are_seeded_by_seed_epoch_and_row_not_by_the_workers(tmp_path):
    stream = StreamingImageDataset.from_source(str(image_folder(tmp_path, [(60, 40), (35, 50)] * 3)),
                                               channels=3, image_size=16)
    crops = FullImageCrops(stream, 16, num_views=3, crop_min_scale=0.08, seed=5)

    def epoch_views(workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(crops, batch_size=2, num_workers=workers)
        return torch.cat([views for views, _, _ in loader])

    serial = epoch_views(0)
    assert serial.shape == (6, 3, 3, 16, 16) and torch.equal(epoch_views(2), serial)
    assert not torch.equal(serial[:, 0], serial[:, 1])  # every view draws its own crop
    crops.epoch = 1
    assert not torch.equal(epoch_views(0), serial)


def test_the_augmentation_does_not_crop_views_cropped_already():
    augment = TwoViewAugmentation("simclr", 8, 1, [0.5], [0.25], num_views=2)
    augment.shared[0].forward = lambda *args, **kwargs: pytest.fail("cropped again")
    for op in augment.shared[1:]:
        op.p = 0.0  # flip, jitter, blur off: what comes out is the normalized input
    values = torch.arange(6, dtype=torch.uint8).view(3, 2, 1, 1, 1) * 40  # sample b, view v: constant 40 (2b + v)
    out = augment(values.expand(3, 2, 1, 8, 8))
    expected = (values.float() / 255 - 0.5) / 0.25
    assert out.shape == (3, 2, 1, 8, 8) and torch.allclose(out, expected.expand(3, 2, 1, 8, 8), atol=1e-6)
    with pytest.raises(ValueError, match=r"cropped views of shape \(B, 2, 1, 8, 8\)"):
        augment(torch.zeros(3, 2, 1, 16, 16, dtype=torch.uint8))


def pil_reference(path, side: int) -> np.ndarray:
    """The file decoded by PIL alone, its shorter side scaled down (bicubic) to `side` when longer: (C, H, W)."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    if min(width, height) > side:
        scale = side / min(width, height)
        image = image.resize((side if width <= height else int(width * scale),
                              side if height < width else int(height * scale)), Image.Resampling.BICUBIC)
    return np.asarray(image).transpose(2, 0, 1)


def test_the_cache_holds_the_bytes_pil_decodes_and_is_built_once(tmp_path):
    sizes = [(60, 40), (35, 50), (20, 30), (48, 48), (90, 33)] * 3  # larger and smaller than the side of 32
    stream = StreamingImageDataset.from_source(str(image_folder(tmp_path / "data", sizes, broken={7})),
                                               channels=3, image_size=16)
    cache = DecodedImageCache.open_or_build(stream, 32, num_workers=2, root=tmp_path / "cache")
    assert len(cache) == len(sizes) and int(cache.meta["rows_per_chunk"]) < len(sizes)  # several chunks
    for row in range(len(sizes)):
        path = stream.dataset[row]["image"]["path"]
        if path.endswith("007.png"):
            with pytest.raises(CorruptImageError):
                cache.image(row)
        else:
            assert np.array_equal(cache.image(row), pil_reference(path, 32)), path
    again = DecodedImageCache.open_or_build(stream, 32, root=tmp_path / "cache")
    assert again.folder == cache.folder and len(list((tmp_path / "cache").iterdir())) == 1  # reused, not rebuilt
    other = DecodedImageCache.open_or_build(stream, 40, root=tmp_path / "cache")
    assert other.folder != cache.folder  # another side is another cache


def test_crops_from_the_cache_equal_crops_decoded_per_sample(tmp_path):
    sizes = [(60, 40), (35, 50), (20, 30), (90, 33)] * 2
    stream = StreamingImageDataset.from_source(str(image_folder(tmp_path / "data", sizes, broken={2})),
                                               channels=3, image_size=16)
    cache = DecodedImageCache.open_or_build(stream, 32, root=tmp_path / "cache")
    decoded = FullImageCrops(stream, 16, 2, 0.08, seed=1, max_side=32)
    cached = FullImageCrops(stream, 16, 2, 0.08, seed=1, cache=cache)
    for index in range(len(sizes)):
        (a, label_a, skipped_a), (b, label_b, skipped_b) = decoded[index], cached[index]
        assert torch.equal(a, b) and (label_a, skipped_a) == (label_b, skipped_b), index
    broken = [i for i in range(len(sizes)) if stream.dataset[i]["image"]["path"].endswith("002.png")]
    assert cached[broken[0]][2] == 1  # replaced by the next row, and named once in the skip log
    assert [record["row"] for record in stream.skipped_files] == broken


def test_the_cache_setting_needs_streaming_and_a_side_of_at_least_the_image_size():
    assert TrainConfig(streaming=True, image_size=32, decoded_cache_side=32).decoded_cache_side == 32
    for settings in (dict(streaming=False, decoded_cache_side=64), dict(streaming=True, decoded_cache_side=16)):
        with pytest.raises(ValueError, match="--decoded-cache-side"):
            TrainConfig(image_size=32, **settings)


def test_a_streamed_run_trains_on_crops_from_the_cache(tiny_dataset, tmp_path, monkeypatch):
    import datasets

    from hf_ibproj import pretrain
    from tiny import TINY_SETTINGS

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    config = TrainConfig(**{**TINY_SETTINGS, "dataset": str(tiny_dataset), "streaming": True,
                            "decoded_cache_side": 16, "max_steps": 2, "final_eval": False, "tracker": "none",
                            "export_backbone": False, "output_dir": str(tmp_path / "run")})
    pretrain(config)
    assert len(list((tmp_path / "hf" / "hf_ibproj-decoded").iterdir())) == 1
