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

import torch

from .answer import answer, check_fields, check_items
from .files import read_json

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
    """Accuracy (%) overall and per question type (overall first, then by name), separately for each format."""
    hits = defaultdict(lambda: defaultdict(list))
    for record, prediction in zip(records, predictions):
        ok = is_correct(record, prediction)
        hits[record["format"]]["overall"].append(ok)
        hits[record["format"]][record.get("question_type", "other")].append(ok)
    first = lambda kv: (kv[0] != "overall", kv[0])  # noqa: E731
    return {fmt: {kind: {"accuracy": round(100 * sum(v) / len(v), 2), "n": len(v)}
                  for kind, v in sorted(kinds.items(), key=first)} for fmt, kinds in hits.items()}


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
    records = read_json(data_path)
    records = records[:limit] if isinstance(records, list) else records
    check_eval_records(records, data_path, image_folder, blind)
    predictions = answer(model, tok, records, image_folder, blind=blind, batch_size=batch_size, progress=progress)
    return {"scores": score(records, predictions),
            "predictions": [{"id": r["id"], "prediction": p, "answer": r["answer"]} for r, p in zip(records, predictions)]}


def print_table(scores: dict, blind=None) -> None:
    print(f"{'format':<8}{'type':<12}{'accuracy':>10}" + (f"{'blind':>8}" if blind else "") + f"{'n':>7}")
    for fmt, kinds in scores.items():
        for kind, s in kinds.items():
            b = f"{blind.get(fmt, {}).get(kind, {}).get('accuracy', float('nan')):>8.1f}" if blind else ""
            print(f"{fmt:<8}{kind:<12}{s['accuracy']:>10.1f}{b}{s['n']:>7}")


def main(argv=None):
    from .adapters import load_model, tokenizer_file
    from .conversation import check_template
    from .llava_bench import llava_bench
    from .teacher_api import ChatClient
    from .tokenizer import Tokenizer
    from .cli import existing, positive, writable
    from .files import atomic_write
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=existing("dir"), required=True)
    p.add_argument("--model-base", type=existing("dir"), help="MODEL is a LoRA adapter: the model it goes on")
    p.add_argument("--data", type=existing(), help="eval.json: short-answer and multiple-choice records")
    p.add_argument("--bench", type=existing(), help="LLaVA-Bench style bench.json, scored by a judge")
    p.add_argument("--image-folder", type=existing("dir"))
    p.add_argument("--blind", action="store_true", help="also answer without the image, to see how much it looks")
    p.add_argument("--batch-size", type=positive(), default=32)
    p.add_argument("--limit", type=positive())
    p.add_argument("--api-base", default="https://api.openai.com/v1")
    p.add_argument("--judge-model", default="gpt-4o-mini")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=writable(), help="write the results as JSON here")
    args = p.parse_args(argv)
    if not args.data and not args.bench:
        p.error("give --data and/or --bench")
    model = load_model(args.model, args.model_base, device=args.device)
    try:
        check_template(model.cfg.template)
    except ValueError as e:
        raise SystemExit(f"{args.model}: {e}")
    tok = Tokenizer(tokenizer_file(args.model, args.model_base))
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
    from .cli import run
    run(main)
