"""Image loading and CLIP preprocessing.

Reference: transformers' PIL-backed CLIP processor (`CLIPImageProcessorPil`; the default CLIPImageProcessor
of transformers 5 needs torchvision), the processor LLaVA was trained with. Tolerance: exact (0.0) —
same resize kernel (Pillow bicubic on uint8), same crop offsets, same float32 arithmetic.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from llava_min.image import PAD_COLOR, ImageError, load_image, preprocess


@pytest.fixture(scope="module")
def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h", [(336, 336), (640, 480), (480, 640), (1001, 333), (100, 37), (335, 337), (50, 50)])
def test_preprocess_equals_clip_processor(clip_processor, w, h):
    img = random_image(w, h, seed=w * h)
    expected = torch.as_tensor(np.asarray(clip_processor(img, return_tensors="np")["pixel_values"][0]))
    got = preprocess(img, size=336)
    assert got.shape == (3, 336, 336) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_pad_mode_keeps_the_whole_image_on_mean_colour():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    x = preprocess(img, size=64, aspect="pad")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None]
    pixels = x * std[..., None] + mean[..., None]  # back to [0, 1]
    top, middle = pixels[:, 2, 32] * 255, pixels[:, 32, 32] * 255
    torch.testing.assert_close(top, torch.tensor(PAD_COLOR, dtype=torch.float32), atol=1.0, rtol=0)
    torch.testing.assert_close(middle, torch.tensor([255.0, 0.0, 0.0]), atol=1.0, rtol=0)
    assert preprocess(img, size=64, aspect="crop")[:, 2, 32].tolist() == x[:, 32, 32].tolist()  # crop: all red


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "1", "F"])
def test_image_modes_convert(tmp_path, mode):
    img = random_image(40, 30).convert(mode) if mode not in ("I;16", "F") else \
        Image.fromarray(np.full((30, 40), 40000 if mode == "I;16" else 0.5, dtype=np.uint16 if mode == "I;16" else np.float32))
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16", "F") else "x.png")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit is scaled, not clipped to white
        assert abs(np.asarray(out)[0, 0, 0] - round(40000 / 65535 * 255)) <= 1


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_missing_unreadable_and_huge_images(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png cannot be read"):
        load_image(tmp_path / "bad.png")
    random_image(300, 200).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="300x200 pixels, more than the limit of 1000"):
        load_image(tmp_path / "big.png", max_pixels=1000)


def test_paths_must_stay_inside_the_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    random_image(8, 8).save(tmp_path / "secret.png")
    random_image(8, 8).save(folder / "ok.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    assert load_image("ok.png", image_folder=folder).size == (8, 8)
    for name in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        with pytest.raises(ImageError, match="outside the image folder"):
            load_image(name, image_folder=folder)
