"""What the scorer made of each answer: the raw prediction beside its normalized (or parsed) form.

    python -m llava_min.eval --model DIR --data eval.json --image-folder IMAGES --out results.json
    python -m llava_min.tools.inspect scoring --results results.json --data eval.json

Short answers are compared after VQA's normalization (lower case, no punctuation or articles, number
words as digits); multiple choice is parsed as ScienceQA's letter (LLaVA Sec. 5.2).
"""
from pathlib import Path

from ..files import InputError, read_json


def add_parser(sub) -> None:
    p = sub.add_parser("scoring", help="evaluation: each raw prediction, what the scorer read, right or wrong")
    p.add_argument("--results", type=Path, required=True,
                   help="python -m llava_min.eval's --out, or a toy run's results.json (its sample answers)")
    p.add_argument("--data", type=Path, required=True, help="the eval.json the predictions answer")
    p.add_argument("--limit", type=int, default=12, help="at most this many rows")
    p.set_defaults(show=run)


def predictions(results_path: Path) -> list:
    if not results_path.is_file():
        raise InputError(f"results file {results_path} does not exist")
    results = read_json(results_path)
    found = results.get("predictions") or results.get("samples") if isinstance(results, dict) else None
    if not found:
        raise InputError(f"{results_path} holds no predictions (python -m llava_min.eval --out writes them)")
    return found


def scored(record: dict, prediction: str) -> tuple:
    """(what the scorer read in the prediction, the reference as it compares it, correct?)."""
    from ..eval.score import is_correct, normalize_answer, parse_choice
    if record["format"] == "choice":
        return parse_choice(prediction, len(record["choices"])), record["answer"], is_correct(record, prediction)
    return normalize_answer(prediction), normalize_answer(record["answer"]), is_correct(record, prediction)


def run(args) -> None:
    records = {str(r.get("id")): r for r in read_json(args.data)} if args.data.is_file() else None
    if records is None:
        raise InputError(f"data file {args.data} does not exist")
    rows = [("id", "format", "raw prediction", "read as", "reference", "")]
    for p in predictions(args.results)[: args.limit]:
        record = records.get(str(p["id"]))
        if record is None:
            raise InputError(f"{args.results}: prediction for {p['id']!r}, which {args.data} does not hold")
        read, reference, ok = scored(record, p["prediction"])
        rows.append((str(p["id"]), record["format"], repr(p["prediction"]), repr(read), repr(reference),
                     "right" if ok else "wrong"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
