"""GPT-assisted visual instruction data (LLaVA Sec. 3), and a synthetic world for offline toy runs.

    python gen_data.py --out data/toy --num-images 8000 --seed 0 --image-size 96  # the synthetic world (rule teacher)
    python gen_data.py --out data/toy-detail --world detail --image-size 96  # its variant for AnyRes
    OPENAI_API_KEY=... python gen_data.py --coco-captions captions_train2017.json \\
        --coco-instances instances_train2017.json --teacher openai --api-base https://api.openai.com/v1 \\
        --model gpt-4o-mini --out data/coco                                    # the paper's pipeline on COCO

Images become symbolic contexts (captions + normalized boxes); a text-only teacher writes
conversations, detailed descriptions and complex-reasoning answers; responses are parsed into LLaVA
records. World outputs (official LLaVA JSON, records' "image" relative to DIR/images): images/,
scenes.json, pretrain.json (stage 1), instruct.json (stage 2), corpus.txt (text for the toy LM) and
eval.json (held-out images), written last, so its presence means the world is complete; world_config.json
records the settings, and a run with other settings into the same --out is refused.
The detail world (--world detail) draws its instruction and held-out images at twice --image-size,
with patterns only full resolution shows, and its stage-1 images (train/NNNNNN-low.png) at --image-size.
COCO outputs: responses.jsonl (the teacher's answers; a rerun resumes it), instruct.json, pretrain.json.
"""
import argparse
import json
import os
import random
from pathlib import Path

from tqdm import tqdm

from llava_min.cli import existing, positive, run, writable
from llava_min.files import only_run, write_json
from llava_min.data.gpt_data import (BRIEF_INSTRUCTIONS, RESPONSE_TYPES, MalformedResponse, build_messages, gpt, human, parse_response,
                                read_coco)
from llava_min.data.teacher import ChatClient, run_requests
from llava_min.toy.build import WorldConfig, build_world
from llava_min.toy.world import WORLDS


# ---------------------------------------------------------------- records


# ---------------------------------------------------------------- the world


# ---------------------------------------------------------------- COCO-style data and a real teacher

def coco_records(contexts: list, responses_path: Path, types: list, seed: int) -> tuple:
    """The teacher's answers in responses.jsonl -> LLaVA records; malformed answers are counted and skipped."""
    wanted = {f"{c.image}|{t}": (c, t) for c in contexts for t in types}
    records, malformed, seen = [], 0, set()
    for line in responses_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            context, rtype = wanted[row["key"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn line, or an answer to a request no longer asked for
        if row["key"] in seen:
            continue  # answered twice: the first answer is the record
        seen.add(row["key"])
        rng = random.Random(f"{seed}/{row['key']}")
        try:
            turns = parse_response(rtype, row["response"], rng)
        except MalformedResponse:
            malformed += 1
            continue
        name = Path(context.image).with_suffix("").as_posix()  # the path: two folders may hold one stem
        records.append({"id": f"{name}-{rtype}", "image": context.image, "type": rtype, "conversations": turns})
    records.sort(key=lambda r: r["id"])
    random.Random(seed).shuffle(records)
    return records, malformed


def run_coco(args) -> dict:
    """Sec. 3 on COCO-style annotations: contexts -> requests -> teacher -> records."""
    contexts = read_coco(args.coco_captions, args.coco_instances, args.max_images)
    if not os.environ.get("OPENAI_API_KEY"):
        print("note: OPENAI_API_KEY is not set; requests go without an Authorization header")
    client = ChatClient(args.api_base, args.model)
    args.types = list(dict.fromkeys(args.types))  # "--types detail detail" asks once
    requests = [(f"{c.image}|{t}", build_messages(t, c.captions, c.boxes), None) for c in contexts for t in args.types]
    responses = args.out / "responses.jsonl"
    with only_run(args.out), tqdm(total=len(requests), desc="teacher", unit="req") as bar:
        counts = run_requests(requests, client, responses, workers=args.workers or 4, progress=bar)
    records, malformed = coco_records(contexts, responses, args.types, args.seed)
    write_json(args.out / "instruct.json", records)
    rng = random.Random(args.seed)
    write_json(args.out / "pretrain.json", [
        {"id": Path(c.image).with_suffix("").as_posix(), "image": c.image,
         "conversations": [human(rng.choice(BRIEF_INSTRUCTIONS), image=True), gpt(rng.choice(c.captions))]}
        for c in contexts])
    print(f"{len(records)} records in {args.out / 'instruct.json'}; {malformed} malformed responses skipped "
          f"(for good: they stay in responses.jsonl as answered); "
          f"{counts['failed']} requests failed (rerun to retry them)")
    return {**counts, "records": len(records), "malformed": malformed}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=writable("dir"), required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive(),
                   help="processes (world; default: the CPU count, at most 8) or requests in flight "
                        "(teacher; default 4)")
    w = p.add_argument_group("synthetic world")
    w.add_argument("--num-images", type=int, default=WorldConfig.num_images, help="training images")
    w.add_argument("--num-eval", type=int, default=WorldConfig.num_eval, help="held-out images")
    w.add_argument("--image-size", type=int, default=WorldConfig.image_size,
                   help="pixels per side (the detail world's stage-2 and held-out images are twice this)")
    w.add_argument("--world", choices=WORLDS, default="shapes", help="detail: patterns only full resolution shows")
    w.add_argument("--vqa-questions", type=int, default=WorldConfig.vqa_questions, help="short-answer turns per record")
    w.add_argument("--corpus-mb", type=positive(float), default=WorldConfig.corpus_mb, help="size cap of corpus.txt")
    c = p.add_argument_group("the paper's pipeline on COCO-style annotations")
    c.add_argument("--coco-captions", type=existing(), help="captions_*.json")
    c.add_argument("--coco-instances", type=existing(), help="instances_*.json")
    c.add_argument("--max-images", type=positive(), help="use only the first N images (by id)")
    c.add_argument("--types", nargs="+", choices=RESPONSE_TYPES, default=list(RESPONSE_TYPES))
    c.add_argument("--teacher", choices=["openai", "rule"], default="rule",
                   help="openai: any OpenAI-compatible endpoint (key from $OPENAI_API_KEY); rule: the world's own")
    c.add_argument("--api-base", default="https://api.openai.com/v1")
    c.add_argument("--model", default="gpt-4o-mini")
    args = p.parse_args(argv)
    if bool(args.coco_captions) != bool(args.coco_instances):
        p.error("--coco-captions and --coco-instances go together")
    if not args.coco_captions and args.teacher == "openai":
        p.error("--teacher openai needs --coco-captions and --coco-instances (the world uses the rule teacher)")
    if args.coco_captions and args.teacher != "openai":
        p.error("COCO data needs --teacher openai: the rule teacher knows only the synthetic world")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.coco_captions:
        try:
            counts = run_coco(args)
        except KeyboardInterrupt:
            raise SystemExit("interrupted; what was answered is kept, rerun to continue") from None
        if counts["failed"] or not counts["records"]:  # (a script must not go on to train on nothing)
            raise SystemExit(1)
        return counts
    counts = build_world(args.out, args.num_images, args.num_eval, args.seed, args.image_size, args.workers,
                         vqa_questions=args.vqa_questions, corpus_mb=args.corpus_mb, world=args.world)
    print(f"wrote {counts['images']} images and {counts['instruct']} instruction records to {args.out}"
          + (f" ({counts['malformed']} malformed teacher responses skipped)" if counts["malformed"] else ""))
    return counts


if __name__ == "__main__":
    run(main)
