"""AnyRes (LLaVA-NeXT): resolution choice, tiles, token counts and logits against transformers'
LlavaNextForConditionalGeneration and its image processor on tiny random checkpoints (fp32, 1e-5)."""
import functools
import types

import numpy as np
import pytest
import torch
from PIL import Image

import llava_min
from llava_min.data.image import anyres_pixels
from llava_min.model.anyres import AnyRes, select_best_resolution
from conftest import IMAGE_TOKEN, TINY_TEXT, TINY_VISION, hf_reference

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # LLaVA-NeXT's grid, at the tiny 28-px tile
SIZES = {"wide": (30, 100), "tall": (90, 25), "square": (60, 60), "small": (12, 20), "odd": (41, 77)}


@pytest.mark.parametrize("size,expected", [
    ((336, 672), (336, 672)),  # an exact fit
    ((1000, 1000), (672, 672)),
    ((100, 1000), (336, 1008)),  # very wide: the 1x3 grid keeps the most pixels
    ((500, 400), (672, 672)),
    ((200, 300), (336, 672)),  # small: every grid keeps all 60000 pixels; 336x672 wastes the least
    ((600, 300), (672, 336)),  # tall: 672x336 and 1008x336 keep it all; the first wastes less
])
def test_best_resolution_hand_made_cases(size, expected):
    assert select_best_resolution(size, [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]) == expected


def test_resize_into_the_grid_equals_transformers():
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension
    from llava_min.model.anyres import fit_size
    sizes = [(76, 57)] + [(h, w) for h in range(1, 200, 7) for w in range(1, 200, 5)]
    for size in sizes:
        for target in [(336, 672), (672, 336), (672, 672), (1008, 336)]:
            expected = get_patch_output_size(np.zeros((*size, 3)), target, ChannelDimension.LAST)
            assert fit_size(size, target) == expected, (size, target)


def test_best_resolution_ties_go_to_the_least_waste():
    # a 100x100 image fits all of itself in both; the smaller canvas wastes less, whatever the order
    assert select_best_resolution((100, 100), [(400, 400), (200, 200)]) == (200, 200)
    assert select_best_resolution((100, 100), [(200, 200), (400, 400)]) == (200, 200)
    # equal effective area and equal waste: the first listed wins (as transformers)
    assert select_best_resolution((100, 100), [(200, 300), (300, 200)]) == (200, 300)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(3)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                          text_config=LlamaConfig(**{**TINY_TEXT, "max_position_embeddings": 512}),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS)
    path = tmp_path_factory.mktemp("llava_next")
    LlavaNextForConditionalGeneration(cfg).save_pretrained(path)
    return path


def image(size, seed=0):
    h, w = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def reference_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                      image_grid_pinpoints=PINPOINTS)


def reference_count(size):
    """transformers' LlavaNextProcessor count, with the 'default' strategy's CLS removed."""
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    fake = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=PINPOINTS), patch_size=7,
                                 num_additional_image_tokens=1)
    fake._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, fake)
    return LlavaNextProcessor._get_number_of_features(fake, *size, 28, 28) - 1


@pytest.mark.parametrize("name", SIZES)
def test_tiles_and_token_counts_equal_transformers(name):
    size = SIZES[name]
    anyres = AnyRes(tile=28, patch=7, pinpoints=[tuple(p) for p in PINPOINTS])
    ours = anyres_pixels(image(size), anyres)
    theirs = torch.as_tensor(np.asarray(reference_processor()(image(size), return_tensors="np")["pixel_values"][0]))
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert anyres.num_tokens(size) == reference_count(size)


def test_logits_equal_transformers_on_several_aspect_ratios(next_dir):
    from transformers import LlavaNextForConditionalGeneration
    ref = hf_reference(LlavaNextForConditionalGeneration, next_dir)
    ours = llava_min.load(next_dir)
    assert ours.anyres is not None
    sizes = list(SIZES.values())
    pixels = [anyres_pixels(image(s, i), ours.anyres) for i, s in enumerate(sizes)]
    counts = [ours.image_token_count(s) for s in sizes]
    rows = [torch.tensor([1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9]) for n in counts]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])
    mask = (ids != 0).long()
    max_tiles = max(len(p) for p in pixels)
    padded = torch.stack([torch.cat([p, torch.zeros(max_tiles - len(p), *p.shape[1:])]) for p in pixels])
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=padded, image_sizes=torch.tensor(sizes), attention_mask=mask).logits
        got, _ = ours(ids, pixel_values=torch.cat(pixels), image_sizes=sizes)
    for row, r in enumerate(rows):  # right padding: compare the real positions
        torch.testing.assert_close(got[row, :len(r)], expected[row, :len(r)], atol=1e-5, rtol=1e-5)


def test_anyres_checkpoint_round_trip(next_dir, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    ours = llava_min.load(next_dir)
    llava_min.save_llava(ours, tmp_path / "out")
    again = llava_min.load(tmp_path / "out")
    torch.testing.assert_close(again.image_newline, ours.image_newline, atol=0, rtol=0)
    theirs = hf_reference(LlavaNextForConditionalGeneration, tmp_path / "out")
    torch.testing.assert_close(theirs.model.image_newline, ours.image_newline, atol=0, rtol=0)


def test_wrong_tile_count_is_a_clear_error(next_dir):
    ours = llava_min.load(next_dir)
    with pytest.raises(ValueError, match="tiles in pixel_values"):
        ours.image_features(torch.randn(2, 3, 28, 28), image_sizes=[(30, 100)])


@pytest.fixture(scope="module")
def next_chat_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny LLaVA-NeXT whose vocabulary fits the tiny tokenizer, with tokenizer.model and two images."""
    import shutil
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(4)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TINY_VISION),
                          text_config=LlamaConfig(**{**TINY_TEXT, "vocab_size": 448, "max_position_embeddings": 512}),
                          image_token_index=440, image_grid_pinpoints=PINPOINTS)
    path = tmp_path_factory.mktemp("next_chat")
    LlavaNextForConditionalGeneration(cfg).save_pretrained(path)
    shutil.copy(tiny_tokenizer, path / "tokenizer.model")
    image(SIZES["wide"], 1).save(path / "wide.png")
    image(SIZES["tall"], 2).save(path / "tall.png")
    return path


def test_chat_and_eval_use_anyres(next_chat_dir):
    import chat
    from transformers import LlavaNextForConditionalGeneration
    from llava_min.eval.answer import answer
    from llava_min.conversation import tokenize_prompt
    model, tok = llava_min.load(next_chat_dir), llava_min.Tokenizer(next_chat_dir / "tokenizer.model")
    model.cfg.text.eos_token_id = -1
    records = [{"image": name, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
               for name in ("wide.png", "tall.png")]
    batched = answer(model, tok, records, next_chat_dir, batch_size=2, max_new_tokens=6)
    assert batched == [answer(model, tok, [r], next_chat_dir, batch_size=1, max_new_tokens=6)[0] for r in records]

    ref = hf_reference(LlavaNextForConditionalGeneration, next_chat_dir)
    img = Image.open(next_chat_dir / "wide.png").convert("RGB")
    ids = torch.tensor([tokenize_prompt(records[0]["conversations"], tok, "vicuna_v1", model.image_token_count(SIZES["wide"]),
                                        440)])
    expected = ref.generate(input_ids=ids, pixel_values=anyres_pixels(img, model.anyres)[None], image_sizes=torch.tensor([SIZES["wide"]]),
                            max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    session = chat.open_chat(chat.parse_args(["--model", str(next_chat_dir), "--temperature", "0", "--device", "cpu"]))
    session.model.cfg.text.eos_token_id = -1
    session.max_new_tokens = 12
    session.set_image(next_chat_dir / "wide.png")
    session.ask("What is it?")
    assert session.cached_ids[ids.shape[1]:] == expected[:-1]  # the last token is generated, not yet cached


def test_dataset_gives_tiles_sizes_and_counts(tiny_tokenizer, tmp_path):
    NAMES = ("wide", "tall", "square")
    import json
    from llava_min.data.dataset import LlavaDataset, collate
    for name in NAMES:
        image(SIZES[name]).save(tmp_path / f"{name}.png")
    records = [{"id": n, "image": f"{n}.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                                {"from": "gpt", "value": "A red circle."}]}
               for n in NAMES]
    (tmp_path / "d.json").write_text(json.dumps(records))
    anyres = AnyRes(tile=28, patch=7, pinpoints=[tuple(p) for p in PINPOINTS])
    ds = LlavaDataset(tmp_path / "d.json", llava_min.Tokenizer(tiny_tokenizer), tmp_path, image_token_id=399,
                      anyres=anyres)
    assert len({anyres.grid(SIZES[n]) for n in NAMES}) > 1  # images with different numbers of tiles
    batch = collate([ds[i] for i in range(len(NAMES))])
    assert batch["image_sizes"].tolist() == [list(SIZES[n]) for n in NAMES]
    assert len(batch["pixel_values"]) == sum(1 + r * c for r, c in (anyres.grid(SIZES[n]) for n in NAMES))
    for row, name in enumerate(NAMES):
        assert int((batch["input_ids"][row] == 399).sum()) == anyres.num_tokens(SIZES[name]) == reference_count(SIZES[name])
