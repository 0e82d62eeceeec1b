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

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}


# ---------------------------------------------------------------- answer checking

def normalize_answer(text: str) -> str:
    """VQA-style: lower case; punctuation, articles dropped; "1,000" -> "1000"; number words zero to ten
    (and "none") as digits, as VQA's map. VQA's list of contractions ("dont" -> "don't") is left out."""
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = text.strip().lower().translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points, drop full stops
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def parse_choice(text: str, num_choices: int):
    """ScienceQA's parsing: an exact letter, a "B. ..." prefix, or a single "The answer is B." Else None."""
    letters = string.ascii_uppercase[:num_choices]
    text = text.strip()
    if len(text) == 1 and text in letters:
        return text
    if len(text) >= 3 and text[0] in letters and text[1:3] == ". ":  # "B. blue" (not "B." or "A.B")
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)  # the official pattern: "." is any character
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

    from .conversation import stop_text, tokenize_prompt
    from .conversation import cut_at, stop_at
    from .image import load_image
    cfg, device = model.cfg, next(model.parameters()).device
    template = template or cfg.template
    end = stop_text(template)
    answers = []
    for start in tqdm(range(0, len(records), batch_size), disable=not progress, desc="eval"):
        chunk = records[start: start + batch_size]
        rows, images, sizes = [], [], []
        for record in chunk:
            has_image = "image" in record and not blind
            image = load_image(record["image"], image_folder=image_folder) if has_image else None
            count = model.image_token_count((image.height, image.width)) if image else 0
            rows.append(tokenize_prompt(question_turn(record, blind), tok, template, num_image_tokens=count,
                                        image_token_id=cfg.image_token_id, has_image=has_image))
            if image is not None:
                images.append(model_pixels(model, image))
                sizes.append((image.height, image.width))
        context = cfg.text.max_position_embeddings
        for record, row in zip(chunk, rows):
            if len(row) >= context:
                raise ValueError(f"record {record.get('id')}: its prompt is {len(row)} tokens, the model's context "
                                 f"is {context}")
        budget = min(max_new_tokens, context - max(len(r) for r in rows))  # the answers stay inside the context
        ids, mask = left_pad(rows, tok.pad_id)
        dtype = next(model.vision_tower.parameters()).dtype
        pixels = (torch.cat if model.anyres else torch.stack)(images).to(device, dtype) if images else None
        out = model.generate(ids.to(device), pixel_values=pixels, attention_mask=mask.to(device),
                             max_new_tokens=budget, image_sizes=sizes if model.anyres else None,
                             stop=stop_at(tok, end))
        answers += [cut_at(decode_until_eos(tok, row), end).strip() for row in out.tolist()]
    return answers


def model_pixels(model, image):
    """The pixel_values an image becomes for this model: AnyRes tiles, or one (padded or cropped) view."""
    from .image import anyres_pixels, preprocess
    if model.anyres is not None:
        return anyres_pixels(image, model.anyres)
    return preprocess(image, size=model.cfg.vision.image_size, aspect=model.cfg.image_aspect_ratio)


def decode_until_eos(tok, ids: list) -> str:
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids).strip()


def check_items(items, path, image_folder, check, images: bool = True) -> None:
    """Before any answer is generated (or any judge paid): `check(item)` on each, and (`images`) its
    image exists. The error names the file and the item."""
    from .image import ImageError, resolve_in_folder
    if not isinstance(items, list):
        raise ValueError(f"{path}: not a JSON list")
    for n, item in enumerate(items):
        rid = item.get("id", f"#{n}") if isinstance(item, dict) else f"#{n}"
        try:
            if not isinstance(item, dict):
                raise ValueError(f"a {type(item).__name__}, expected a JSON object")
            check(item)
            if "image" in item and images:
                image = item["image"]
                if not isinstance(image, str) or not image:
                    raise ValueError(f"bad image field {image!r}")
                file = resolve_in_folder(image, image_folder) if image_folder is not None else Path(image)
                if not file.is_file():
                    raise ValueError(f"image {file} does not exist")
        except (ValueError, ImageError) as e:
            raise ValueError(f"{path}: record {rid}: {e}") from e


def check_fields(item: dict, types: dict) -> None:
    missing = [k for k in types if k not in item]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    wrong = [f"{k} is a {type(item[k]).__name__}" for k, t in types.items() if not isinstance(item[k], t)]
    if wrong:
        raise ValueError(", ".join(wrong))


def check_eval_record(r: dict) -> None:
    """What scoring and answering read: a short or multiple-choice record whose first turn is the question."""
    from .conversation import check_turns
    check_fields(r, {"id": (str, int), "format": str, "answer": str, "conversations": list})
    if r["format"] not in ("short", "choice"):
        raise ValueError(f"format {r['format']!r}, expected 'short' or 'choice'")
    if r["format"] == "choice":
        check_fields(r, {"choices": list})
        if len(r["choices"]) < 2 or not all(isinstance(c, str) for c in r["choices"]):  # (letters A, B, ...)
            raise ValueError("choices must be a list of at least two strings")
    if not r["conversations"] or check_turns(r["conversations"][:1])[0][0] != 0:
        raise ValueError("conversations must start with the human's question")


def check_eval_records(records: list, path, image_folder=None, blind: bool = False) -> None:
    check_items(records, path, image_folder, check_eval_record, images=not blind)  # (blind: no image is read)


def evaluate(model, tok, data_path, image_folder, blind=False, batch_size=32, limit=None, progress=False) -> dict:
    records = json.loads(Path(data_path).read_text())
    records = records[:limit] if isinstance(records, list) else records
    check_eval_records(records, data_path, image_folder, blind)
    predictions = answer(model, tok, records, image_folder, blind=blind, batch_size=batch_size, progress=progress)
    return {"scores": score(records, predictions),
            "predictions": [{"id": r["id"], "prediction": p, "answer": r["answer"]} for r, p in zip(records, predictions)]}


# ---------------------------------------------------------------- LLaVA-Bench: a text-only judge

JUDGE_RULE = ("Two AI assistants answered the user's question about an image. You cannot see the image; the "
              "context above describes it. Rate how helpful, relevant, accurate and detailed each answer is, on a "
              "scale of 1 to 10 (higher is better). On the first line, write only the two scores, for Assistant 1 "
              "and Assistant 2, separated by a space. Then explain your rating, without letting the order of the "
              "answers sway you.")


def judge_messages(context: str, question: str, reference: str, answer: str) -> list:
    """LLaVA-Bench's request: [Context], [Question], [Assistant 1] = the reference, [Assistant 2] = the model."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n[End of Assistant 1]"
               f"\n\n[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_RULE}\n\n")
    return [{"role": "system", "content": "You are a helpful and precise assistant for checking the quality of "
                                          "answers."}, {"role": "user", "content": content}]


def parse_scores(text: str):
    """The two scores on the judge's first line, or None when it did not follow the format."""
    try:
        first = text.strip().splitlines()[0].replace(",", " ").split()
        scores = [float(first[0]), float(first[1])]
    except (IndexError, ValueError):
        return None
    return scores if len(first) == 2 and all(1 <= s <= 10 for s in scores) else None  # (the rule's scale; no NaN)


def relative_scores(judged: list) -> dict:
    """[(category, (reference score, model score))] -> per category mean(model) / mean(reference) x 100."""
    by_cat = defaultdict(list)
    for category, scores in judged:
        by_cat[category].append(scores)
        by_cat["all"].append(scores)
    return {c: {"relative": round(100 * sum(s[1] for s in v) / max(1e-9, sum(s[0] for s in v)), 1),
                "reference": round(sum(s[0] for s in v) / len(v), 2), "model": round(sum(s[1] for s in v) / len(v), 2),
                "n": len(v)} for c, v in sorted(by_cat.items())}


BENCH_FIELDS = ("image", "category", "context", "question", "reference")


def llava_bench(model, tok, bench_path, image_folder, judge, batch_size=8, max_new_tokens=512) -> dict:
    """bench.json: [{"id", "image", "category", "context", "question", "reference"}]; `judge(messages)`
    returns the judge's text (a ChatClient). Unparseable verdicts are counted, not scored."""
    from .teacher_api import FatalTeacherError, TeacherError
    items = json.loads(Path(bench_path).read_text())
    check_items(items, bench_path, image_folder,
                lambda it: check_fields(it, {"id": (str, int), **dict.fromkeys(BENCH_FIELDS, str)}))
    records = [{**it, "conversations": [{"from": "human", "value": "<image>\n" + it["question"]}]} for it in items]
    answers = answer(model, tok, records, image_folder, batch_size=batch_size, max_new_tokens=max_new_tokens)
    judged, failed = [], 0
    for it, ans in zip(items, answers):
        try:
            scores = parse_scores(judge(judge_messages(it["context"], it["question"], it["reference"], ans)))
        except FatalTeacherError:
            raise  # a refused key or a wrong model: every other item would fail the same way
        except TeacherError as e:  # this item's judgement failed: counted, the others go on
            print(f"LLaVA-Bench item {it['id']}: the judge failed ({e})")
            scores = None
        if scores is None:
            failed += 1
        else:
            judged.append((it["category"], scores))
    return {"llava_bench": relative_scores(judged), "unparsed_verdicts": failed,
            "answers": [{"id": it["id"], "answer": a} for it, a in zip(items, answers)]}


def print_table(scores: dict, blind=None) -> None:
    print(f"{'format':<8}{'type':<12}{'accuracy':>10}" + (f"{'blind':>8}" if blind else "") + f"{'n':>7}")
    for fmt, kinds in scores.items():
        for kind, s in kinds.items():
            b = f"{blind.get(fmt, {}).get(kind, {}).get('accuracy', float('nan')):>8.1f}" if blind else ""
            print(f"{fmt:<8}{kind:<12}{s['accuracy']:>10.1f}{b}{s['n']:>7}")


def main(argv=None):
    from .checkpoints import load
    from .teacher_api import ChatClient
    from .tokenizer import Tokenizer
    from .files import atomic_write
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, help="eval.json: short-answer and multiple-choice records")
    p.add_argument("--bench", type=Path, help="LLaVA-Bench style bench.json, scored by a judge")
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--blind", action="store_true", help="also answer without the image, to see how much it looks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int)
    p.add_argument("--api-base", default="https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not args.data and not args.bench:
        p.error("give --data and/or --bench")
    model = load(args.model, device=args.device)
    tok = Tokenizer(args.model / "tokenizer.model")
    results = {}
    if args.data:
        results.update(evaluate(model, tok, args.data, args.image_folder, batch_size=args.batch_size, limit=args.limit,
                                progress=True))
        if args.blind:
            results["blind_scores"] = evaluate(model, tok, args.data, args.image_folder, blind=True,
                                               batch_size=args.batch_size, limit=args.limit)["scores"]
        print_table(results["scores"], results.get("blind_scores"))
    if args.bench:
        judge = ChatClient(args.api_base, args.judge_model, temperature=0.2)  # as the official eval_gpt_review
        results.update(llava_bench(model, tok, args.bench, args.image_folder, judge))
        for category, s in results["llava_bench"].items():
            print(f"LLaVA-Bench {category:<14} relative {s['relative']:>6.1f}  (model {s['model']}, reference "
                  f"{s['reference']}, n {s['n']})")
    if args.out:
        atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(results, indent=2)))


if __name__ == "__main__":
    main()
