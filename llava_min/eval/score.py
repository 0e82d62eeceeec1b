"""Scoring the way the papers score: short answers normalized as VQA does (VQAv2 / GQA style, LLaVA-1.5
Sec. 3.2's response-format prompt) and multiple choice parsed as ScienceQA does (LLaVA Sec. 5.2)."""
import re
import string
from collections import defaultdict

from .answer import answer, check_fields, check_items
from ..errors import DataError
from ..files import read_json

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
    from ..conversation import check_turns
    check_fields(r, {"id": (str, int), "format": str, "answer": str, "conversations": list})
    if r["format"] not in ("short", "choice"):
        raise DataError(f"format {r['format']!r}, expected 'short' or 'choice'")
    if r["format"] == "choice":
        check_fields(r, {"choices": list})
        if len(r["choices"]) < 2 or not all(isinstance(c, str) for c in r["choices"]):  # (letters A, B, ...)
            raise DataError("choices must be a list of at least two strings")
    if not r["conversations"] or check_turns(r["conversations"][:1])[0][0] != 0:
        raise DataError("conversations must start with the human's question")


def check_eval_records(records: list, path, image_folder=None, blind: bool = False) -> None:
    if records == []:  # an empty table and exit 0 would read as a finished evaluation
        raise DataError(f"{path}: holds no records, nothing to evaluate")
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
