"""Evaluation the way the papers score: short answers (VQAv2 / GQA style, LLaVA-1.5 Sec. 3.2's
response-format prompt), multiple choice (ScienceQA, LLaVA Sec. 5.2) and LLaVA-Bench's judged
relative score (LLaVA Sec. 5.1). Greedy decoding, batched with left padding.

    python -m llava_min.eval --model DIR --data eval.json --image-folder IMAGES [--blind] [--out results.json]
    python -m llava_min.eval --model DIR --bench bench.json --image-folder IMAGES --api-base URL --judge-model M
"""
import argparse
import json
import re
import string
from collections import defaultdict
from pathlib import Path

import torch

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}


# ---------------------------------------------------------------- answer checking

def normalize_answer(text: str) -> str:
    """Case, punctuation, articles and number words removed, as VQA scoring normalizes."""
    text = text.strip().lower().translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points, drop full stops
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def parse_choice(text: str, num_choices: int):
    """ScienceQA's parsing: an exact letter, a "B. ..." prefix, or a single "The answer is B." Else None."""
    letters = string.ascii_uppercase[:num_choices]
    text = text.strip()
    if text in letters:
        return text
    if len(text) >= 2 and text[0] in letters and text[1] == ".":
        return text[0]
    found = re.findall(r"The answer is ([A-Z])\.", text)
    return found[0] if len(found) == 1 and found[0] in letters else None


def is_correct(record: dict, prediction: str) -> bool:
    if record["format"] == "choice":
        return parse_choice(prediction, len(record["choices"])) == record["answer"]
    return normalize_answer(prediction) == normalize_answer(record["answer"])


def score(records: list, predictions: list) -> dict:
    """Accuracy (%) overall and per question type, separately for each format."""
    hits = defaultdict(lambda: defaultdict(list))
    for record, prediction in zip(records, predictions):
        ok = is_correct(record, prediction)
        hits[record["format"]]["overall"].append(ok)
        hits[record["format"]][record.get("question_type", "other")].append(ok)
    return {fmt: {kind: {"accuracy": round(100 * sum(v) / len(v), 2), "n": len(v)} for kind, v in sorted(kinds.items())}
            for fmt, kinds in hits.items()}


# ---------------------------------------------------------------- batched greedy answers

def question_turn(record: dict, blind: bool) -> list:
    """The record's first human turn; `blind` removes the image placeholder (the model sees no image)."""
    turn = dict(record["conversations"][0])
    if blind:
        turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "").strip()
    return [turn]


def left_pad(rows: list, pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.no_grad()
def answer(model, tok, records: list, image_folder=None, blind=False, batch_size=32, max_new_tokens=32,
           template=None, progress=False) -> list:
    """Greedy answers to each record's first question, batched with left padding."""
    from tqdm import tqdm

    from .conversation import tokenize_prompt
    from .image import load_image, preprocess
    cfg, device = model.cfg, next(model.parameters()).device
    template = template or cfg.template
    answers = []
    for start in tqdm(range(0, len(records), batch_size), disable=not progress, desc="eval"):
        chunk = records[start: start + batch_size]
        rows, images = [], []
        for record in chunk:
            has_image = "image" in record and not blind
            rows.append(tokenize_prompt(question_turn(record, blind), tok, template,
                                        num_image_tokens=model.num_image_tokens, image_token_id=cfg.image_token_id,
                                        has_image=has_image))
            if has_image:
                image = load_image(record["image"], image_folder=image_folder)
                images.append(preprocess(image, size=cfg.vision.image_size, aspect=cfg.image_aspect_ratio))
        ids, mask = left_pad(rows, tok.pad_id)
        pixels = torch.stack(images).to(device, next(model.vision_tower.parameters()).dtype) if images else None
        out = model.generate(ids.to(device), pixel_values=pixels, attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens)
        answers += [decode_until_eos(tok, row) for row in out.tolist()]
    return answers


def decode_until_eos(tok, ids: list) -> str:
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids).strip()


def evaluate(model, tok, data_path, image_folder, blind=False, batch_size=32, limit=None, progress=False) -> dict:
    records = json.loads(Path(data_path).read_text())[:limit]
    predictions = answer(model, tok, records, image_folder, blind=blind, batch_size=batch_size, progress=progress)
    return {"scores": score(records, predictions),
            "predictions": [{"id": r["id"], "prediction": p, "answer": r["answer"]} for r, p in zip(records, predictions)]}
