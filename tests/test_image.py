"""Image loading and CLIP preprocessing.

Reference: transformers' Pillow CLIP processor (`CLIPImageProcessorPil`). In transformers 5,
`CLIPImageProcessor` means the torchvision backend when torchvision is installed (tensor bicubic
resize, which differs from Pillow's by a few levels) and falls back to this Pillow one without it;
LLaVA was trained with the Pillow path of transformers 4. Tolerance: exact (0.0): same resize (Pillow
bicubic on uint8), same crop offsets, same float arithmetic, same compositing of transparency on white.
"""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llava_min.data.image import CLIP_MEAN, CLIP_STD, PAD_COLOR, ImageError, load_image, preprocess


@pytest.fixture(scope="module")
def clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def reference(processor, img) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))


def random_image(w, h, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def official_expand2square(img, color):
    """The official LLaVA `expand2square`, written out here."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


SIZES = [(336, 336), (640, 480), (480, 640), (1001, 333), (100, 37), (37, 100), (335, 337), (50, 50), (7, 3),
         (337, 336)]


@pytest.mark.parametrize("w,h", SIZES)
def test_crop_equals_clip_processor(clip_processor, w, h):
    img = random_image(w, h, seed=w * h)
    got = preprocess(img, size=336)
    assert got.shape == (3, 336, 336) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference(clip_processor, img), atol=0, rtol=0)


@pytest.mark.parametrize("w,h", [(640, 480), (333, 1001), (7, 3), (336, 336)])
def test_pad_equals_expand2square_then_clip_processor(clip_processor, w, h):
    img = random_image(w, h, seed=w + h)
    expected = reference(clip_processor, official_expand2square(img, PAD_COLOR))
    torch.testing.assert_close(preprocess(img, size=336, aspect="pad"), expected, atol=0, rtol=0)


def test_pad_mode_puts_mean_colour_bands_around_the_image():
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    wide = preprocess(Image.new("RGB", (200, 100), (255, 0, 0)), size=64, aspect="pad") * std + mean
    assert PAD_COLOR == (122, 116, 104)
    pad = torch.tensor(PAD_COLOR, dtype=torch.float32)
    for row in (0, 8, 55, 63):  # bands top and bottom, a quarter of the side each
        torch.testing.assert_close(wide[:, row, 32] * 255, pad, atol=0.01, rtol=0)
    torch.testing.assert_close(wide[:, 32, 2] * 255, torch.tensor([255.0, 0.0, 0.0]), atol=0.01, rtol=0)
    tall = preprocess(Image.new("RGB", (100, 200), (255, 0, 0)), size=64, aspect="pad") * std + mean
    torch.testing.assert_close(tall[:, 32, 0] * 255, pad, atol=0.01, rtol=0)
    crop = preprocess(Image.new("RGB", (200, 100), (255, 0, 0)), size=64, aspect="crop") * std + mean
    torch.testing.assert_close(crop[:, 0, 32] * 255, torch.tensor([255.0, 0.0, 0.0]), atol=0.01, rtol=0)  # no band


def test_small_sizes_and_bad_aspect(clip_processor):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    small = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    img = random_image(300, 200, seed=3)
    torch.testing.assert_close(preprocess(img, size=224), reference(small, img), atol=0, rtol=0)
    with pytest.raises(ValueError, match="aspect must be 'crop' or 'pad', got 'square'"):
        preprocess(img, aspect="square")


def test_extreme_aspect_ratio_is_refused_before_allocating():
    sliver = Image.new("RGB", (30000, 1))  # a tiny file; its pad canvas would be 900 megapixels
    with pytest.raises(ImageError, match="30000x1 image would need a 900000000-pixel intermediate image in 'pad'"):
        preprocess(sliver, aspect="pad")
    with pytest.raises(ImageError, match="aspect ratio is too extreme"):
        preprocess(Image.new("RGB", (1, 3000)), aspect="crop")  # 336 x 1008000 after resizing


# ---------------------------------------------------------------- loading

def save(img, path):
    img.save(path)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "RGB"])
def test_modes_convert_like_transformers(tmp_path, clip_processor, mode):
    """Our RGB conversion (transparency on white) gives the processor's own result on the raw file."""
    base = random_image(40, 30, seed=1, mode="RGBA" if mode in ("RGBA", "LA") else "RGB")
    img = base.convert(mode) if mode != "LA" else base.convert("LA")
    if mode == "P":
        img.info["transparency"] = 0  # palette entry 0 is transparent
    path = save(img, tmp_path / ("x.tiff" if mode == "CMYK" else "x.png"))
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    with Image.open(path) as raw:
        torch.testing.assert_close(preprocess(out), reference(clip_processor, raw), atol=0, rtol=0)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    out = np.asarray(load_image(save(img, tmp_path / "t.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]


def test_an_rgb_colour_key_is_not_alpha(tmp_path, clip_processor):
    """An RGB PNG with a `transparency` colour key (Pillow keeps one after P -> RGB too) keeps its pixels, as the
    official loader's `.convert("RGB")` and the transformers 4 processor LLaVA trained with (its convert_to_rgb
    returns RGB as it is; transformers 5's would composite the key): only real alpha is composited."""
    img = random_image(40, 30, seed=3)
    key = img.getpixel((5, 5))
    img.save(tmp_path / "key.png", transparency=key)
    with Image.open(tmp_path / "key.png") as raw:
        assert raw.mode == "RGB" and raw.info.get("transparency") == key
        official = np.asarray(raw.convert("RGB"))  # the pixels, without the key
    ours = load_image(tmp_path / "key.png")
    assert ours.getpixel((5, 5)) == key  # not white
    torch.testing.assert_close(preprocess(ours), reference(clip_processor, official), atol=0, rtol=0)
    torch.testing.assert_close(preprocess(Image.open(tmp_path / "key.png")), reference(clip_processor, official),
                               atol=0, rtol=0)


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    deep = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    out = np.asarray(load_image(save(deep, tmp_path / "deep.png")))
    assert out.shape == (30, 40, 3) and abs(int(out[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1
    flt = Image.fromarray(np.full((30, 40), 0.5, dtype=np.float32))
    assert abs(int(np.asarray(load_image(save(flt, tmp_path / "f.tiff")))[0, 0, 0]) - 128) <= 1


def png_header_only(path, w, h):
    """A PNG whose header claims w x h pixels, with no pixel data: cheap to write, a bomb if decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_missing_unreadable_and_huge_images(tmp_path):
    with pytest.raises(ImageError, match="nope.png does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="does not exist \\(it is not a file\\)"):
        load_image(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="bad.png cannot be read"):
        load_image(tmp_path / "bad.png")
    good = save(random_image(300, 200), tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match="cut.png cannot be read"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="good.png is 300x200 pixels, more than the limit of 1000"):
        load_image(tmp_path / "good.png", max_pixels=1000)
    with pytest.raises(ImageError, match="claims.png is 9000x9000 pixels, more than the limit of 67108864"):
        load_image(png_header_only(tmp_path / "claims.png", 9000, 9000))
    with pytest.raises(ImageError, match="bomb.png is too large"):  # Pillow's own guard fires first here
        load_image(png_header_only(tmp_path / "bomb.png", 100_000, 100_000))


def test_paths_must_stay_inside_the_image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    save(random_image(8, 8), tmp_path / "secret.png")
    save(random_image(8, 8), folder / "sub" / "ok.png")
    (folder / "out_link.png").symlink_to(tmp_path / "secret.png")
    (folder / "in_link.png").symlink_to(folder / "sub" / "ok.png")
    for name in ("sub/ok.png", "sub/../sub/ok.png", "in_link.png"):
        assert load_image(name, image_folder=folder).size == (8, 8)
    for name in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "out_link.png"):
        with pytest.raises(ImageError, match=f"image path '{name}' leads outside the image folder"):
            load_image(name, image_folder=folder)
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    with pytest.raises(ImageError, match="image path 'loop_a.png' cannot be resolved in the image folder"):
        load_image("loop_a.png", image_folder=folder)


# ---------------------------------------------------------------- the one path from an image to the model

def tiny_llava(select_feature="patch", aspect="crop", pinpoints=None):
    from llava_min import LlamaConfig, Llava, LlavaConfig, VisionConfig
    torch.manual_seed(0)
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=28, patch_size=7),
                      text=LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2),
                      select_feature=select_feature, image_aspect_ratio=aspect, image_grid_pinpoints=pinpoints)
    return Llava(cfg).eval()


@pytest.mark.parametrize("setting", ["plain", "crop", "pad", "cls_patch", "anyres"])
def test_image_input_is_what_the_models_embedding_splices(setting):
    """Every setting a model takes images in: the pixels the one path gives are the preprocessing's (itself
    held to transformers above and in test_anyres.py), and their visual tokens fill exactly the image
    positions of a prompt expanded by its count, image by image in a batch of different sizes."""
    from llava_min.data.image import ImageSettings, anyres_pixels, image_input
    grids = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
    model = tiny_llava("cls_patch" if setting == "cls_patch" else "patch", "pad" if setting == "pad" else "crop",
                       grids if setting == "anyres" else None)
    sizes = [(40, 40)] if setting == "plain" else [(30, 100), (90, 25), (41, 77)]  # (width, height)
    images = [random_image(w, h, seed=k) for k, (w, h) in enumerate(sizes)]
    views = [image_input(img, ImageSettings.of(model.cfg)) for img in images]
    for img, view in zip(images, views):
        assert view.size == (img.height, img.width)
        expected = anyres_pixels(img, model.anyres) if setting == "anyres" else \
            preprocess(img, 28, model.cfg.image_aspect_ratio)[None]
        assert torch.equal(view.pixel_values, expected)
        assert view.num_tokens == model.image_token_count(view.size)
    if setting == "anyres":  # the count follows the image's size
        assert len({v.num_tokens for v in views}) == len(views)
    else:  # one view: 4 x 4 patches (and CLS)
        assert [v.num_tokens for v in views] == [16 + (setting == "cls_patch")] * len(views)
    pixels, image_sizes = torch.cat([v.pixel_values for v in views]), [v.size for v in views]
    with torch.no_grad():
        features = model.image_features(pixels, image_sizes)
        assert [len(f) for f in features] == [v.num_tokens for v in views]
        ids = torch.tensor([[1, 5] + [model.cfg.image_token_id] * sum(v.num_tokens for v in views) + [7]])
        embeds = model.embed(ids, pixels, image_sizes)
        torch.testing.assert_close(embeds[0, 2:-1], torch.cat(features), atol=0, rtol=0)
        with pytest.raises(ValueError, match="image tokens"):
            model.embed(ids[:, 1:-2], pixels, image_sizes)  # one image token short
