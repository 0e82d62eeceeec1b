"""Can the toy LM answer the world's questions from the scene written out in words? (docs/research/toy-research.md)

LLaVA leans on Vicuna to look things up in its context; this asks whether the toy LM can, with no image at
all. Two commands:

    # a corpus.txt whose chats start with the scene in words where the image goes (same size as corpus.txt);
    # --one-question: a document per short-answer question instead (all 56,000 of instruct.json)
    PYTHONPATH=. python docs/research/scene_in_words.py corpus data/toy /tmp/scene.txt
    python train.py --stage lm --data /tmp/scene.txt --tokenizer runs/toy/tokenizer.model --out /tmp/scene-lm \
        --epochs 20 --max-steps 1000
    # held-out short questions, scene in words + question, teacher-forced exact answers per type
    PYTHONPATH=. python docs/research/scene_in_words.py score data/toy /tmp/scene-lm --tokenizer runs/toy/tokenizer.model
"""
import argparse
import json
import random
from pathlib import Path

import torch

import llava_min
from llava_min.toy.build import chat_text


def in_words(scene: dict) -> str:
    """'The image shows a small green circle (top right), a large red square (center).'"""
    return "The image shows " + ", ".join(f"a {o['size']} {o['color']} {o['shape']} ({o['position']})"
                                          for o in scene["objects"]) + "."


def with_scene(conversations: list, scene: dict) -> list:
    """The record's chat with the image placeholder replaced by the scene in words."""
    turns = [dict(t) for t in conversations]
    turns[0]["value"] = in_words(scene) + "\n" + turns[0]["value"].replace("<image>", "").strip()
    return turns


def one_question_docs(data: Path, scenes: dict) -> list:
    """Each short-answer question of instruct.json as its own chat, the scene in words before it."""
    return [chat_text(with_scene([q, a], scenes[r["image"]]))
            for r in json.loads((data / "instruct.json").read_text()) if r["id"].endswith("-vqa")
            for q, a in zip(r["conversations"][0::2], r["conversations"][1::2])]


def write_corpus(data: Path, out: Path, one_question: bool, seed: int = 0) -> None:
    scenes = {s["image"]: s for s in json.loads((data / "scenes.json").read_text())}
    if one_question:
        docs = one_question_docs(data, scenes)
        random.Random(seed).shuffle(docs)
        out.write_text("\n".join(docs) + "\n", encoding="utf-8")
        print(f"{out}: {len(docs)} chats")
        return
    records = json.loads((data / "pretrain.json").read_text()) + json.loads((data / "instruct.json").read_text())
    docs = [chat_text(with_scene(r["conversations"], scenes[r["image"]])) for r in records]
    random.Random(seed).shuffle(docs)
    budget, kept = len((data / "corpus.txt").read_text(encoding="utf-8")), []
    for doc in docs:  # as many characters as the pipeline's corpus.txt
        if budget <= 0:
            break
        kept.append(doc)
        budget -= len(doc) + 1
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    print(f"{out}: {len(kept)} chats")


@torch.no_grad()
def score(data: Path, lm_dir: Path, tokenizer: Path, blind: bool) -> None:
    tok = llava_min.Tokenizer(tokenizer)
    lm = llava_min.load_llama(lm_dir, dtype=torch.float32).eval()
    scenes = {s["image"]: s for s in json.loads((data / "scenes.json").read_text())}
    hits, counts = {}, {}
    for r in json.loads((data / "eval.json").read_text()):
        if r["format"] != "short":
            continue
        scene, question = scenes[r["image"]], r["conversations"][0]["value"].replace("<image>", "").strip()
        human = question if blind else in_words(scene) + "\n" + question
        prompt = chat_text([{"from": "human", "value": human}, {"from": "gpt", "value": ""}]).removesuffix("</s>")
        ids, answer = tok.encode(prompt.rstrip(), bos=True), tok.encode(" " + r["answer"], prefix=False)
        logits, _ = lm(torch.tensor([ids + answer]))
        ok = logits[0, len(ids) - 1: -1].argmax(-1).tolist() == answer
        for key in {r["question_type"], r["question_type"] + (" 2+" if len(scene["objects"]) > 1 else " 1")}:
            hits[key], counts[key] = hits.get(key, 0) + ok, counts.get(key, 0) + 1
    print("  ".join(f"{k} {100 * hits[k] / counts[k]:.1f}" for k in sorted(counts)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="write the corpus with each scene in words")
    c.add_argument("data", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--one-question", action="store_true", help="a document per short-answer question")
    s = sub.add_parser("score", help="score an LM on the held-out questions with the scene in words")
    s.add_argument("data", type=Path)
    s.add_argument("lm", type=Path)
    s.add_argument("--tokenizer", type=Path, required=True)
    s.add_argument("--blind", action="store_true", help="the question alone, no scene")
    args = p.parse_args()
    if args.command == "corpus":
        write_corpus(args.data, args.out, args.one_question)
    else:
        score(args.data, args.lm, args.tokenizer, args.blind)


if __name__ == "__main__":
    main()
