"""LLaVA-Bench (paper Sec. 5.1): a text-only judge compares the model's answer with a reference answer,
given the image's captions; the score is mean(model) / mean(reference) x 100 per category, as the
official eval_gpt_review_bench.py and summarize_gpt_review.py compute it."""
from collections import defaultdict

from .answer import answer, check_fields, check_items
from ..files import read_json
from ..data.teacher import FatalTeacherError, TeacherError


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
    returns the judge's text (a ChatClient). A verdict the judge did not give (its request failed) and one
    that does not follow the format are counted apart, not scored; with no verdict scored at all there is
    no score, and an error says why."""
    items = read_json(bench_path)
    check_items(items, bench_path, image_folder,
                lambda it: check_fields(it, {"id": (str, int), **dict.fromkeys(BENCH_FIELDS, str)}))
    records = [{**it, "conversations": [{"from": "human", "value": "<image>\n" + it["question"]}]} for it in items]
    answers = answer(model, tok, records, image_folder, batch_size=batch_size, max_new_tokens=max_new_tokens)
    judged, unparsed, failed = [], 0, 0
    for it, ans in zip(items, answers):
        try:
            scores = parse_scores(judge(judge_messages(it["context"], it["question"], it["reference"], ans)))
        except FatalTeacherError:
            raise  # a refused key, a wrong model, no answer at all: every other item would fail the same way
        except TeacherError as e:  # this item's judgement failed: counted, the others go on
            print(f"LLaVA-Bench item {it['id']}: the judge failed ({e})")
            failed += 1
            continue
        if scores is None:
            unparsed += 1
        else:
            judged.append((it["category"], scores))
    if not judged:
        raise TeacherError(
            f"{bench_path}: no item was scored ({failed} judge requests failed, {unparsed} verdicts without the two "
            "scores on their first line)")
    return {"llava_bench": relative_scores(judged), "unparsed_verdicts": unparsed, "failed_judgements": failed,
            "answers": [{"id": it["id"], "answer": a} for it, a in zip(items, answers)]}
