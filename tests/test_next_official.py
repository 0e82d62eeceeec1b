"""The official LLaVA-1.6 (LLaVA-NeXT) release layout: a tiny random llava-hf LlavaNext checkpoint, written by
transformers, is converted here into the official layout (Vicuna keys + model.mm_projector.{0,2},
model.image_newline, the tuned tower, AnyRes's mm_* config with (width, height) pinpoints, CLIP named by
mm_vision_tower); llava-min's logits on it equal transformers' LlavaNext on the same weights (fp32, 1e-5)."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import llava_min
from llava_min import CheckpointError
from llava_min.data.image import anyres_pixels
from conftest import IMAGE_TOKEN, NEXT_PINPOINTS as PINPOINTS, hf_reference
from test_anyres import image
from test_checkpoints import official_dir, save_clip

# (height, width); "tie" sizes fit whole into both the 1x2 and the 2x1 grid: the first listed wins
SIZES = {"wide": (30, 100), "tall": (90, 25), "odd": (41, 77), "tie-square": (20, 20), "tie-wide": (20, 25)}


@pytest.fixture(scope="module")
def next_dir(hf_next_dir):
    return hf_next_dir


@pytest.fixture(scope="module")
def tensors(next_dir):
    return load_file(next_dir / "model.safetensors")


ANYRES = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
              image_grid_pinpoints=[[w, h] for h, w in PINPOINTS], unfreeze_mm_vision_tower=True)


@pytest.fixture(scope="module")
def untuned_clip(next_dir, tensors, tmp_path_factory):
    """CLIP before 1.6 tuned it: other weights than the checkpoint's tower."""
    other = {k: v + 0.1 * torch.randn_like(v) if k.startswith("vision_tower.") else v for k, v in tensors.items()}
    return save_clip(next_dir, other, tmp_path_factory.mktemp("untuned_clip"))


@pytest.fixture(scope="module")
def official16(next_dir, tensors, untuned_clip, tmp_path_factory):
    return official_dir(next_dir, tensors, tmp_path_factory.mktemp("llava-v1.6"), untuned_clip, tuned_tower=True,
                        **ANYRES)


def prompts(model, sizes, image_token):
    rows = [torch.tensor([1, 5, 6] + [image_token] * model.image_token_count(s) + [7, 8, 9]) for s in sizes]
    width = max(len(r) for r in rows)
    return rows, torch.stack([torch.cat([r, torch.zeros(width - len(r), dtype=torch.long)]) for r in rows])


def assert_logits_equal_transformers(ours, next_dir, sizes):
    from transformers import LlavaNextForConditionalGeneration
    ref = hf_reference(LlavaNextForConditionalGeneration, next_dir)
    pixels = [anyres_pixels(image(s, i), ours.anyres) for i, s in enumerate(sizes)]
    rows, ids = prompts(ours, sizes, ours.cfg.image_token_id)
    _, hf_ids = prompts(ours, sizes, IMAGE_TOKEN)
    max_tiles = max(len(p) for p in pixels)
    padded = torch.stack([torch.cat([p, torch.zeros(max_tiles - len(p), *p.shape[1:])]) for p in pixels])
    with torch.no_grad():
        expected = ref(input_ids=hf_ids, pixel_values=padded, image_sizes=torch.tensor(sizes),
                       attention_mask=(hf_ids != 0).long()).logits
        got, _ = ours(ids, pixel_values=torch.cat(pixels), image_sizes=sizes)
    for row, r in enumerate(rows):  # right padding: compare the real positions
        torch.testing.assert_close(got[row, :len(r)], expected[row, :len(r)], atol=1e-5, rtol=1e-5)


def test_official_16_logits_equal_llava_next_on_several_aspect_ratios(official16, next_dir):
    ours = llava_min.load(official16)
    assert ours.cfg.image_token_id == -200 and ours.cfg.template == "vicuna_v1"
    assert ours.cfg.image_grid_pinpoints == PINPOINTS  # back to (height, width), in the order given
    grids = {name: ours.anyres.grid(size) for name, size in SIZES.items()}
    assert grids["wide"] != grids["tall"] and grids["tie-square"] == grids["tie-wide"] == (1, 2)
    assert_logits_equal_transformers(ours, next_dir, list(SIZES.values()))


def test_without_a_tuned_tower_clip_comes_from_the_directory_named(next_dir, tensors, tmp_path):
    clip = save_clip(next_dir, tensors, tmp_path / "clip")
    path = official_dir(next_dir, tensors, tmp_path / "official", clip, **ANYRES)
    assert_logits_equal_transformers(llava_min.load(path), next_dir, [SIZES["odd"], SIZES["tie-wide"]])


def test_mistral_build_loads_and_chats(official16, next_dir, tiny_tokenizer, tmp_path, monkeypatch):
    path = shutil.copytree(official16, tmp_path / "llava-v1.6-mistral")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "llava_mistral",
                                                  "architectures": ["LlavaMistralForCausalLM"],
                                                  "sliding_window": None}))
    model = llava_min.load(path)
    assert model.cfg.template == "mistral_instruct"
    assert_logits_equal_transformers(model, next_dir, [SIZES["wide"]])
    with_vocab(path, 448)  # room for the tiny tokenizer's ids
    shutil.copy(tiny_tokenizer, path / "tokenizer.model")
    answers_through_chat_and_eval(path, "[INST] <image>\nWhat is it? [/INST]", "</s>", monkeypatch)


def test_34b_build_chats_and_stops_at_im_end(official16, tmp_path, monkeypatch):
    from test_templates import train_chatml_tokenizer
    path = with_vocab(shutil.copytree(official16, tmp_path / "llava-v1.6-34b"), 64000)  # Yi's vocabulary
    assert llava_min.load(path).cfg.template == "chatml_direct"
    train_chatml_tokenizer(path)
    answers_through_chat_and_eval(path, "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n"
                                  "<image>\nWhat is it?<|im_end|><|im_start|>assistant\n", "<|im_end|>", monkeypatch)


def with_vocab(path, size):
    """An official directory whose vocabulary is `size` tokens (random rows appended)."""
    tensors = torch.load(path / "pytorch_model.bin", weights_only=True)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[key] = torch.cat([tensors[key], torch.randn(size - len(tensors[key]), tensors[key].shape[1])])
    torch.save(tensors, path / "pytorch_model.bin")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": size}))
    return path


def answers_through_chat_and_eval(path, prompt, end, monkeypatch):
    """chat.py and `python -m llava_min.eval` on the checkpoint's own template: the prompt is the official one, and
    a scripted reply ends at the template's end marker (what follows it is never generated)."""
    import chat
    import llava_min.model.generate as g
    from llava_min.conversation import render_prompt
    from llava_min.eval.__main__ import main as evaluate
    image(SIZES["wide"], 0).save(path / "x.png")
    session = chat.open_chat(chat.parse_args(["--model", str(path), "--device", "cpu"]))
    assert render_prompt([{"from": "human", "value": "What is it?"}], session.template, has_image=True) == prompt
    tok = session.tok
    scripted = tok.encode("The red circle.", prefix=False) + tok.encode(end + "The blue", prefix=False)
    monkeypatch.setattr(g, "sample", lambda logits, *a, **k: torch.full(logits.shape[:1], next(feed)))
    feed = iter(scripted + [5] * 64)
    session.set_image(path / "x.png")
    assert session.ask("What is it?") == "The red circle."
    assert "blue" not in tok.decode(session.cached_ids)  # generation ended at the marker
    feed = iter(scripted + [5] * 64)
    record = {"id": "q", "image": "x.png", "format": "short", "answer": "the red circle",
              "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}]}
    (path / "eval.json").write_text(json.dumps([record]))
    evaluate(["--model", str(path), "--data", str(path / "eval.json"), "--image-folder", str(path), "--device", "cpu",
              "--out", str(path / "results.json")])
    assert json.loads((path / "results.json").read_text())["scores"]["short"]["overall"]["accuracy"] == 100.0


@pytest.mark.parametrize("key,value,message", [
    ("mm_patch_merge_type", "flat", "mm_patch_merge_type 'flat'"),
    ("image_grid_pinpoints", "(1x1),...,(3x3)", "image_grid_pinpoints"),
    ("image_aspect_ratio", "anyres_max_9", "image_aspect_ratio 'anyres_max_9'"),
])
def test_an_anyres_setting_the_model_lacks_is_named(official16, tmp_path, key, value, message):
    path = shutil.copytree(official16, tmp_path / "edited")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        llava_min.load(path)


def test_a_llava_hf_next_mistral_gets_its_template_too(next_dir, tmp_path):
    path = shutil.copytree(next_dir, tmp_path / "llava-v1.6-mistral-7b-hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"
    (path / "config.json").write_text(json.dumps(cfg))
    assert llava_min.load(next_dir).cfg.template == "vicuna_v1"
    assert llava_min.load(path).cfg.template == "mistral_instruct"
