"""The inspect tool: labels marks equal the training labels, shapes equal the real tensors, attention weights
equal an eager softmax(q k^T / sqrt(d)) reference, and bad input is one line and a non-zero exit."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava_min.conversation import IGNORE_INDEX, TEMPLATES, tokenize_conversation, tokenize_prompt
from llava_min.tokenizer import Tokenizer
from llava_min.tools import inspect as tool
from llava_min.tools.labels_view import parse_plain, token_texts

TURNS = [{"from": "human", "value": "<image>\nWhat is 12 × 3? Über [alles] \\ 日本\n\nanswer 🙂"},
         {"from": "gpt", "value": "36.\nIt's 3 × 12 ✓ [sure]"},
         {"from": "human", "value": "And 7+8?"}, {"from": "gpt", "value": "15\n\n(fifteen) é"}]


def run(capsys, *argv) -> str:
    tool.main([str(a) for a in argv])
    return capsys.readouterr().out


def error(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        tool.main([str(a) for a in argv])
    assert isinstance(e.value.code, str) and e.value.code and "\n" not in e.value.code
    return e.value.code


def mask_from_plain(text: str, tok, ids: list, image_token_id: int) -> list:
    """Each token's supervised flag, read back from the plain rendering alone: its characters' brackets."""
    chars, images = [], []  # (char, supervised); image run lengths in order
    for seg, flag in parse_plain(text):
        if seg == "<image>":
            images.append(flag)
        else:
            chars += [(c, flag) for c in seg]
    mask, at = [], 0
    for n, (i, piece) in enumerate(zip(ids, token_texts(tok, ids))):
        if i == image_token_id:
            images[0] -= 1
            images = images[1:] if images[0] == 0 else images
            mask.append(False)
            continue
        got = chars[at: at + len(piece)]
        assert "".join(c for c, _ in got) == piece, f"token {n} {piece!r} is not where the text has {got}"
        assert len({f for _, f in got}) <= 1, f"token {n} {piece!r} is half inside brackets"
        mask.append(got[0][1] if got else mask[-1])  # a byte inside a character goes with the character
        at += len(piece)
    assert at == len(chars) and not images, "the rendering has text the tokens do not"
    return mask


@pytest.fixture(scope="module", params=["toy", "llama"])
def tok_path(request, tiny_tokenizer):
    return request.getfixturevalue("llama_tokenizer_path") if request.param == "llama" else tiny_tokenizer


@pytest.mark.parametrize("template", sorted(set(TEMPLATES) - {"chatml_direct"}))  # ChatML's tokens: not in these
@pytest.mark.parametrize("image", [True, False])
def test_labels_plain_marks_are_the_labels(capsys, tok_path, template, image):
    tok = Tokenizer(tok_path)
    turns = TURNS[:2] if template == "plain" else TURNS
    if not image:
        turns = [dict(turns[0], value=turns[0]["value"].replace("<image>\n", ""))] + turns[1:]
    out = run(capsys, "labels", "--conversation", json.dumps(turns), "--tokenizer", tok_path, "--template", template,
              "--num-image-tokens", 7, "--plain")
    ids, labels = tokenize_conversation(turns, tok, template, num_image_tokens=7)
    rendering, summary = out.split(f"\ntemplate {template}\n")
    assert mask_from_plain(rendering, tok, ids, -200) == [label != IGNORE_INDEX for label in labels]
    assert ("<image> x 7" in rendering) == image
    supervised = sum(label != IGNORE_INDEX for label in labels)
    assert summary.splitlines()[0] == (f"tokens {len(ids)}  supervised {supervised}  masked {len(ids) - supervised}  "
                                       f"image tokens {7 if image else 0}")


def test_token_texts_spell_the_text(tok_path):
    tok = Tokenizer(tok_path)
    ids = tok.encode("Über [alles] 日本 12 ×\n3 ✓🙂 ok")
    assert "".join(token_texts(tok, ids)) == tok.sp.decode(ids) == " Über [alles] 日本 12 ×\n3 ✓🙂 ok"


def test_labels_reports_truncation(capsys, tiny_tokenizer, tmp_path):
    tok = Tokenizer(tiny_tokenizer)
    ids, labels = tokenize_conversation(TURNS, tok, "vicuna_v1", num_image_tokens=5)
    first_supervised = next(n for n, label in enumerate(labels) if label != IGNORE_INDEX)
    cut = first_supervised + 3
    common = ["labels", "--conversation", json.dumps(TURNS), "--tokenizer", tiny_tokenizer, "--num-image-tokens", 5,
              "--plain"]
    out = run(capsys, *common, "--max-length", cut)
    lost = sum(label != IGNORE_INDEX for label in labels[cut:])
    assert f"max_length {cut}: truncation cuts the last {len(ids) - cut} tokens ({lost} of them supervised)" in out
    assert f"<max_length {cut} cuts here>" in out
    assert "nothing cut" in run(capsys, *common, "--max-length", len(ids))
    image_start = ids.index(-200)
    assert "the trainer skips this record (truncation cuts the image" in run(capsys, *common, "--max-length",
                                                                              image_start + 2)
    html = tmp_path / "labels.html"
    run(capsys, *common, "--html", html)
    page = html.read_text(encoding="utf-8")
    assert len(re.findall(r'<span class="supervised[^"]*" title=', page)) == sum(l != IGNORE_INDEX for l in labels)
    assert "&lt;image&gt; x 5" in page and "</html>" in page


def test_labels_of_a_record_and_colour(capsys, tiny_tokenizer, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "image": "x.png", "conversations": TURNS[:2]},
                                {"id": "b", "conversations": [{"from": "human", "value": "Hi 1"},
                                                              {"from": "gpt", "value": "Hello 2"}]}]))
    out = run(capsys, "labels", "--data", data, "--id", "b", "--tokenizer", tiny_tokenizer, "--color")
    assert "\x1b[30;102m" in out and "image tokens 0" in out  # supervised colour; no image
    assert "image tokens 576" in run(capsys, "labels", "--data", data, "--index", 0, "--tokenizer", tiny_tokenizer)
    assert "record index 2 is out of range" in error("labels", "--data", data, "--index", 2, "--tokenizer",
                                                     tiny_tokenizer)
    assert "no record with id 'c'" in error("labels", "--data", data, "--id", "c", "--tokenizer", tiny_tokenizer)


# ---------------------------------------------------------------- models for shapes and attention

def tiny_llava(path, tok_path, image_size, patch, pinpoints=None, seed=0):
    """A random LLaVA of the given vision geometry, small widths, saved with its tokenizer; it never says EOS."""
    from llava_min import Llava, LlavaConfig, LlamaConfig, VisionConfig, save_llava
    torch.manual_seed(seed)
    vocab = Tokenizer(tok_path).vocab_size
    cfg = LlavaConfig(vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=image_size, patch_size=patch),
                      text=LlamaConfig(vocab_size=vocab + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
                      image_token_id=vocab, image_grid_pinpoints=pinpoints)
    model = Llava(cfg)
    with torch.no_grad():
        model.language_model.lm_head.weight[2] = 0  # EOS's logit 0, below the largest of the random others
    save_llava(model, path, tok_path)
    return path


@pytest.fixture(scope="module")
def model_336(tmp_path_factory, tiny_tokenizer):
    return tiny_llava(tmp_path_factory.mktemp("llava336"), tiny_tokenizer, 336, 14)


@pytest.fixture(scope="module")
def anyres_model(tmp_path_factory, tiny_tokenizer):
    return tiny_llava(tmp_path_factory.mktemp("anyres"), tiny_tokenizer, 28, 7, [(28, 56), (56, 28), (56, 56)])


def picture(path, w, h, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def table(out: str) -> dict:
    """The shapes table: stop -> its first [..] shape, as a list of ints."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S.*?)\s{2,}\[([\d, ]+)\]", line)
        if m:
            found[m.group(1).strip()] = [int(x) for x in m.group(2).split(",")]
    return found


def test_shapes_are_the_real_tensors(capsys, model_336, tmp_path):
    from llava_min import load
    from llava_min.data.image import ImageSettings, image_input
    image = picture(tmp_path / "a.png", 50, 30)
    got = table(run(capsys, "shapes", "--model", model_336, "--image", image, "--question", "What is 12?"))
    model = load(model_336, dtype=torch.float32)
    tok = Tokenizer(model_336 / "tokenizer.model")
    pixels = image_input(Image.open(image).convert("RGB"), ImageSettings.of(model.cfg)).pixel_values
    ids = torch.tensor([tokenize_prompt([{"from": "human", "value": "<image>\nWhat is 12?"}], tok,
                                        image_token_id=model.cfg.image_token_id)])
    with torch.no_grad():
        z_v = model.vision_tower(pixels)
        expected = {"pixel_values": pixels, "patches": model.vision_tower.embeddings.patch_embedding(pixels),
                    "CLIP hidden state -2": model.vision_tower.hidden_states(pixels, 1), "Z_v = g(X_v)": z_v,
                    "H_v = W · Z_v": model.projector(z_v), "input_ids": ids,
                    "spliced input": model.embed(ids, pixels), "logits": model(ids, pixels)[0]}
    assert got == {k: list(v.shape) for k, v in expected.items()}
    assert got["Z_v = g(X_v)"] == [1, 576, 16] and got["patches"] == [1, 16, 24, 24]


@pytest.mark.parametrize("size", [(60, 20), (20, 50), (40, 40)])
def test_shapes_anyres_counts(capsys, anyres_model, tmp_path, size):
    from llava_min import load
    out = run(capsys, "shapes", "--model", anyres_model, "--image", picture(tmp_path / "b.png", *size))
    count = load(anyres_model, dtype=torch.float32).image_token_count((size[1], size[0]))
    assert table(out)["visual tokens"][0] == count
    assert f"image_token_count {count}" in out and f"{count} image positions" in out


def test_labels_take_the_model_settings(capsys, model_336, anyres_model, tmp_path):
    from llava_min import load
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "w", "image": "wide.png", "conversations": TURNS[:2]}]))
    picture(tmp_path / "wide.png", 60, 20)
    assert "image tokens 576" in run(capsys, "labels", "--model", model_336, "--data", data, "--index", 0)
    count = load(anyres_model, dtype=torch.float32).image_token_count((20, 60))
    out = run(capsys, "labels", "--model", anyres_model, "--data", data, "--index", 0, "--image-folder", tmp_path)
    assert f"image tokens {count}" in out and count != 16


# ---------------------------------------------------------------- attention

def test_recorded_attention_equals_eager_reference(hf_llava_dir):
    from transformers import LlavaForConditionalGeneration

    from conftest import IMAGE_TOKEN, hf_reference
    from llava_min import load
    from llava_min.tools.attention_map import record_attention
    torch.manual_seed(0)
    ids = torch.cat([torch.tensor([[1, 5, 9]]), torch.full((1, 16), IMAGE_TOKEN), torch.randint(3, 100, (1, 12))], 1)
    pixels = torch.randn(1, 3, 28, 28)
    queries = [0, 4, 18, 19, 25, 30]
    ours = record_attention(load(hf_llava_dir, dtype=torch.float32), ids, queries, pixel_values=pixels)
    with torch.no_grad():
        ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)(input_ids=ids, pixel_values=pixels,
                                                                        output_attentions=True).attentions
    torch.testing.assert_close(ours, torch.stack(ref)[:, :, :, queries], atol=1e-6, rtol=1e-5)


def test_attention_map_and_png(capsys, model_336, tmp_path):
    from llava_min import load
    from llava_min.tools import attention_map, heatmap
    image_path = picture(tmp_path / "c.png", 40, 40, seed=3)
    model, tok = load(model_336, dtype=torch.float32), Tokenizer(model_336 / "tokenizer.model")
    prompt = tokenize_prompt([{"from": "human", "value": "<image>\nWhat is it?\nSay it."}], tok,
                             image_token_id=model.cfg.image_token_id)
    image = Image.open(image_path).convert("RGB")
    from llava_min.data.image import ImageSettings, image_input
    answer, amap = attention_map.answer_attention(model, tok, prompt,
                                                  image_input(image, ImageSettings.of(model.cfg)).pixel_values,
                                                  max_new_tokens=3)
    w = amap.weights  # [layers, heads, answer tokens, T]
    assert w.shape == (2, 4, len(answer), len(prompt) + len(answer) - 1) and len(answer) == 3
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))  # each answer token's row, over all keys
    for j in range(len(answer)):  # no weight on the future: the query of answer token j sits at len(prompt) - 1 + j
        assert (w[:, :, j, len(prompt) + j:] == 0).all()
    cells = amap.cells()
    assert cells.shape == (576,) and len(amap.visual) == 576 and (cells >= 0).all()
    torch.testing.assert_close(cells.sum(), w[..., amap.visual].sum(-1).mean())  # the image's share
    torch.testing.assert_close(amap.cells(1), w[1][..., amap.visual].mean(dim=(0, 1)))
    views, _ = heatmap.panels(model, image, cells.numpy())
    assert [g.shape for _, g in views] == [(24, 24)]
    out_png = tmp_path / "map.png"
    out = run(capsys, "attention", "--model", model_336, "--image", image_path, "--question", "What is it?\nSay it.",
              "--max-new-tokens", 3, "--out", out_png, "--layer", -1)
    assert f"A: {tok.decode(answer).strip()}\n" in out and "layer 1, mean of 4 heads and 3 answer tokens" in out
    with Image.open(out_png) as png:
        png.load()
        assert png.width >= 336 and png.height > 336


def test_attention_anyres_cells_cover_every_visual_token(capsys, anyres_model, tmp_path):
    from llava_min import load
    from llava_min.tools import heatmap
    model = load(anyres_model, dtype=torch.float32)
    image = Image.open(picture(tmp_path / "d.png", 60, 25)).convert("RGB")
    count = model.image_token_count((image.height, image.width))
    cells = np.arange(count, dtype=np.float64)  # each token's own value, to see where it lands
    views, notes = heatmap.panels(model, image, cells)
    drawn = np.concatenate([g[~np.isnan(g)] for _, g in views])
    rows = len(views[1][1][~np.isnan(views[1][1]).all(1)])
    assert len(drawn) + rows == count and len(set(drawn)) == len(drawn)  # every token once; the rest are row ends
    assert views[0][1].shape == (4, 4) and views[1][1].shape == (4, 8) and views[1][0].size == (56, 28)
    out_png = tmp_path / "anyres.png"
    run(capsys, "attention", "--model", anyres_model, "--image", tmp_path / "d.png", "--max-new-tokens", 2,
        "--out", out_png)
    assert Image.open(out_png).width > 2 * 336


# ---------------------------------------------------------------- bad input

def test_bad_input_is_one_line(model_336, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "t", "conversations": TURNS[:2]}]))
    image = picture(tmp_path / "e.png", 30, 30)
    assert "record 't' has no image" in error("shapes", "--model", model_336, "--data", data, "--index", 0)
    assert "record index 5 is out of range: " in error("attention", "--model", model_336, "--data", data, "--index", 5)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    assert f"image {broken} cannot be read" in error("shapes", "--model", model_336, "--image", broken)
    assert f"model directory {tmp_path / 'nope'} does not exist" in error("attention", "--model", tmp_path / "nope",
                                                                          "--image", image)
    assert "--layer 7 is outside" in error("attention", "--model", model_336, "--image", image, "--layer", 7)
    result = subprocess.run([sys.executable, "-m", "llava_min.tools.inspect", "shapes", "--model", str(tmp_path / "no"),
                             "--image", str(image)], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"inspect.py: error: model directory {tmp_path / 'no'} does not exist"


# ---------------------------------------------------------------- the reading guide's views

def test_loss_is_the_mean_negative_log_likelihood(capsys, model_336, tmp_path):
    import torch.nn.functional as F

    from llava_min import load
    from llava_min.data.image import preprocess
    picture(tmp_path / "f.png", 40, 30, seed=4)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "r", "image": "f.png", "conversations": TURNS}]))
    out = run(capsys, "loss", "--model", model_336, "--data", data, "--id", "r", "--image-folder", tmp_path)
    model, tok = load(model_336, dtype=torch.float32), Tokenizer(model_336 / "tokenizer.model")
    ids, labels = tokenize_conversation(TURNS, tok, num_image_tokens=576, image_token_id=model.cfg.image_token_id)
    pixels = preprocess(Image.open(tmp_path / "f.png").convert("RGB"), 336, model.cfg.image_aspect_ratio)[None]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), pixels)[0][0]
    nll = F.cross_entropy(logits[:-1], torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="none")
    supervised = torch.tensor(labels[1:]) != IGNORE_INDEX
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+['\"]", line)]
    assert len(rows) == int(supervised.sum()) and f"{len(ids)} tokens, 576 of them the image's" in out
    assert [int(r.split()[0]) for r in rows] == [i + 1 for i in supervised.nonzero().squeeze(1).tolist()]
    torch.testing.assert_close(torch.tensor([float(r.split()[-1]) for r in rows]), nll[supervised], atol=1e-4, rtol=0)
    by_hand = float(re.search(r"by hand here: ([\d.]+)", out).group(1))
    returned = float(re.search(r"the model returns \(causal_lm_loss\): +([\d.]+)", out).group(1))
    assert abs(by_hand - nll[supervised].mean().item()) < 1e-5 and abs(returned - by_hand) < 1e-5
    assert "give one of --index N or --id ID" in error("loss", "--model", model_336, "--data", data)


def test_chat_prefills_only_what_the_cache_lacks(model_336, tmp_path):
    """Each turn's answer with the cache equals greedy decoding of the whole conversation from scratch."""
    from llava_min import load
    from llava_min.data.image import preprocess
    from llava_min.tools.chat_view import turns
    model, tok = load(model_336, dtype=torch.float32), Tokenizer(model_336 / "tokenizer.model")
    image = Image.open(picture(tmp_path / "g.png", 30, 30, seed=5)).convert("RGB")
    pixels = preprocess(image, 336, model.cfg.image_aspect_ratio)[None]
    questions = ["What is 12?", "And 3?", "Why?"]
    conversation, previous = [], 0
    for n, (question, reply, total, cached, images, generated) in enumerate(
            turns(model, tok, pixels, (30, 30), questions, max_new_tokens=3)):
        conversation.append({"from": "human", "value": ("<image>\n" if n == 0 else "") + question})
        ids = tokenize_prompt(conversation, tok, image_token_id=model.cfg.image_token_id)
        fresh = model.generate(torch.tensor([ids]), pixels, max_new_tokens=3)[0].tolist()
        assert reply == tok.decode(fresh).strip() and generated == 3 and total == len(ids)
        assert images == (576 if n == 0 else 0)  # the image is prefilled once, then read from the cache
        assert cached == 0 if n == 0 else previous <= cached < total  # at least the whole previous prompt is reused
        conversation.append({"from": "gpt", "value": reply})
        previous = total


def test_teacher_shows_each_response_type_with_its_context(capsys, parts):
    from collections import Counter
    data = parts / "data"
    out = run(capsys, "teacher", "--data-dir", data, "--scene", 3)
    instruct, scenes = json.loads((data / "instruct.json").read_text()), json.loads((data / "scenes.json").read_text())
    for kind, n in Counter(r["type"] for r in instruct).items():
        assert re.search(rf"^  {kind} +{n} ", out, flags=re.M), kind
    for rtype in ("conversation", "detail", "complex"):
        section = out.split(f"== {rtype}: record ")[1].split("\n== ")[0]
        rid = section.split()[0]
        index = int(rid.split("-")[1])
        assert rid.endswith(f"-{rtype}") and index >= 3  # picked by type, from --scene on
        assert not any(r["type"] == rtype and 3 <= int(r["id"].split("-")[1]) < index for r in instruct)
        scene = next(s for s in scenes if s["split"] == "train" and s["index"] == index)
        assert all(f"  | {c}" in section for c in scene["captions"])
        assert ("[0." in section) == (rtype != "conversation")  # boxes for detail and complex only (Table 1)
        record = next(r for r in instruct if r["id"] == rid)
        assert f"  gpt: {record['conversations'][1]['value']!r}" in section


def test_stages_and_stage1_labels(capsys, parts, tmp_path):
    from llava_min import build_llava, save_llava
    from llava_min.checkpoint.save import save_stage1
    model = build_llava(parts / "clip", parts / "lm", image_aspect_ratio="crop")
    run_dir = tmp_path / "run"
    save_stage1(model, run_dir / "stage1", parts / "clip", parts / "lm", parts / "tokenizer.model")
    model.cfg.image_aspect_ratio = "pad"
    save_llava(model, run_dir / "stage2", parts / "tokenizer.model")
    for stage, lrs in (("1", [1e-4, 2e-3, 1e-3]), ("2", [5e-5, 1e-5])):
        (run_dir / f"stage{stage}" / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss": 3.0 - i, "lr": lr}) + "\n" for i, lr in enumerate(lrs)))
    out = run(capsys, "stages", "--run", run_dir)
    rows = {line[:21].strip(): line[21:].split() for line in out.splitlines()}
    projector = sum(p.numel() for p in model.projector.parameters())
    llm = sum(p.numel() for p in model.language_model.parameters())
    assert rows["trained parameters"] == [f"{projector:,}", f"{projector + llm:,}"]
    assert rows["peak lr"] == ["0.002", "5e-05"] and rows["optimizer steps"] == ["3", "2"]
    assert rows["template"] == ["plain", "vicuna_v1"] and rows["image"] == ["crop", "pad"]
    out = run(capsys, "labels", "--model", run_dir / "stage1", "--data", parts / "data/pretrain.json", "--index", 0)
    side = model.cfg.vision.image_size // model.cfg.vision.patch_size
    assert "template plain" in out and f"image tokens {side * side}" in out
    instruction = json.loads((parts / "data/pretrain.json").read_text())[0]["conversations"][0]["value"]
    assert instruction.replace("<image>", "").strip() not in out  # plain drops the instruction X_q


def test_scoring_shows_what_the_scorer_read(capsys, tmp_path):
    data, results = tmp_path / "eval.json", tmp_path / "results.json"
    turn = [{"from": "human", "value": "<image>\nQ"}]
    data.write_text(json.dumps([
        {"id": "a", "format": "short", "answer": "2", "conversations": turn},
        {"id": "b", "format": "choice", "answer": "B", "choices": ["x", "y", "z"], "conversations": turn},
        {"id": "c", "format": "choice", "answer": "A", "choices": ["x", "y"], "conversations": turn}]))
    results.write_text(json.dumps({"predictions": [{"id": "a", "prediction": "Two.", "answer": "2"},
                                                   {"id": "b", "prediction": "The answer is B.", "answer": "B"},
                                                   {"id": "c", "prediction": "maybe", "answer": "A"}]}))
    lines = run(capsys, "scoring", "--results", results, "--data", data).splitlines()
    assert re.fullmatch(r"a +short +'Two\.' +'2' +'2' +right", lines[1])
    assert re.fullmatch(r"b +choice +'The answer is B\.' +'B' +'B' +right", lines[2])
    assert re.fullmatch(r"c +choice +'maybe' +None +'A' +wrong", lines[3])
    results.write_text(json.dumps({"predictions": [{"id": "zz", "prediction": "1", "answer": "1"}]}))
    assert "prediction for 'zz'" in error("scoring", "--results", results, "--data", data)


def test_square_pad_and_crop_in_numbers(capsys, tmp_path):
    out = run(capsys, "square", "--image", picture(tmp_path / "w.png", 60, 20), "--out", tmp_path / "sq.png")
    # crop: 20 px high -> 336, so 60 -> 1008, and the center 336 keeps a third: 20 of the 60 px cut on each side
    assert "(1008x336)" in out and "about 20 px of the image cut off at the left and right each, 33%" in out
    assert "60x60 square of (122, 116, 104) (20 px bands at the top and bottom)" in out and "33% of the square" in out
    with Image.open(tmp_path / "sq.png") as png:
        assert png.width > 3 * png.height // 2


@pytest.mark.parametrize("size, lines", [
    ("640x480", ["672x672 = 2 rows x 2 columns", "672x504, padded black to 672x672 (0 px left, 84 px top)",
                 "48 rows x 48 columns", "36 x 48 = 1728", "+ 36 = 1764", "576 + 1764 = 2340 visual tokens"]),
    ("300x900", ["336x1008 = 3 rows x 1 column", "336x1008, padded black to 336x1008 (0 px left, 0 px top)",
                 "72 x 24 = 1728", "576 + 1800 = 2376 visual tokens"])])
def test_anyres_steps(capsys, size, lines):
    out = run(capsys, "anyres", "--size", size)
    assert all(line in out for line in lines), out


def test_anyres_of_a_model_and_bad_sizes(capsys, anyres_model, model_336):
    from llava_min import load
    out = run(capsys, "anyres", "--size", "60x20", "--model", anyres_model)
    count = load(anyres_model, dtype=torch.float32).image_token_count((20, 60))
    assert out.rstrip().endswith(f"= {count} visual tokens")
    assert "give WIDTHxHEIGHT" in error("anyres", "--size", "640")
    assert "is not an AnyRes model" in error("anyres", "--size", "64x64", "--model", model_336)
