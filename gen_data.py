"""GPT-assisted visual instruction data (LLaVA Sec. 3), and a synthetic world for offline toy runs.

    python gen_data.py --out data/toy --num-images 8000 --seed 0            # the synthetic world (rule teacher)
    OPENAI_API_KEY=... python gen_data.py --coco-captions captions_train2017.json \\
        --coco-instances instances_train2017.json --teacher openai --api-base https://api.openai.com/v1 \\
        --model gpt-4o-mini --out data/coco                                    # the paper's pipeline on COCO

Images become symbolic contexts (captions + normalized boxes); a text-only teacher writes
conversations, detailed descriptions and complex-reasoning answers; responses are parsed into LLaVA
records. Outputs (official LLaVA JSON): images/, scenes.json, pretrain.json (stage 1), instruct.json
(stage 2), eval.json (held-out images), corpus.txt (text for the toy LM).
"""
import argparse
import json
import os
import random
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from llava_min.conversation import render_prompt
from llava_min.gpt_data import (BRIEF_INSTRUCTIONS, RESPONSE_TYPES, ChatClient, MalformedResponse, build_messages,
                                parse_response, run_requests)
from llava_min.questions import (CHOICE_DOMAINS, QUESTION_TYPES, SHORT_PROMPT, ask, multiple_choice, rule_response)
from llava_min.world import Scene, captions, describe, render, sample_scene, scene_rng


VQA_QUESTIONS = 7  # short-answer questions per training image (one of each type, in random order)


def write_json(path: Path, data) -> None:
    """Atomic: a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def boxes(scene: Scene) -> list:
    return [(f"{o.color} {o.shape}", [v / scene.size for v in o.box]) for o in scene.objects]


def rule_teacher(messages: list, scene: Scene, rtype: str, rng: random.Random) -> str:
    """GPT-4's stand-in: it gets the same request, but answers from the annotation exactly."""
    return rule_response(rtype, scene, rng)


def vqa_record(rid: str, scene: Scene, rng: random.Random, num_questions: int) -> dict:
    """LLaVA-1.5 style short-answer VQA: several questions, each with the response-format prompt."""
    turns = []
    for i, qtype in enumerate(rng.sample(QUESTION_TYPES, num_questions)):
        qa = ask(scene, rng, qtype)
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question + SHORT_PROMPT},
                  {"from": "gpt", "value": qa.answer}]
    return {"id": rid, "image": scene.image, "type": "vqa", "conversations": turns}


def choice_record(rid: str, scene: Scene, rng: random.Random, split: str) -> dict:
    qa = ask(scene, rng, rng.choice(sorted(CHOICE_DOMAINS)))
    prompt, choices, letter = multiple_choice(qa, rng)
    record = {"id": rid, "image": scene.image, "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                                                                  {"from": "gpt", "value": letter}]}
    if split == "eval":
        return {**record, "format": "choice", "question_type": qa.type, "choices": choices, "answer": letter}
    return {**record, "type": "choice"}


def teacher_record(rid: str, scene: Scene, rng: random.Random, rtype: str, caps: list):
    """One of the paper's three response types, through the full request -> response -> parse path."""
    response = rule_teacher(build_messages(rtype, caps, boxes(scene)), scene, rtype, rng)
    try:
        return {"id": rid, "image": scene.image, "type": rtype, "conversations": parse_response(rtype, response, rng)}
    except MalformedResponse:
        return None


def train_scene(scene: Scene, rng: random.Random, caps: list) -> dict:
    rid = f"train-{scene.index:06d}"
    pretrain = {"id": rid, "image": scene.image, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(BRIEF_INSTRUCTIONS)}, {"from": "gpt", "value": rng.choice(caps)}]}
    rtype = RESPONSE_TYPES[scene.index % 3]
    records = [vqa_record(f"{rid}-vqa", scene, rng, VQA_QUESTIONS), teacher_record(f"{rid}-{rtype}", scene, rng, rtype, caps)]
    if scene.index % 4 == 0:
        records.append(choice_record(f"{rid}-choice", scene, rng, "train"))
    return {"pretrain": pretrain, "instruct": [r for r in records if r], "malformed": records.count(None),
            "corpus": caps + [describe(scene)] + [chat_text(r) for r in records if r]}


def chat_text(record: dict) -> str:
    """A record as the text-only chat a language model pretrains on (Vicuna saw chats; so does ours)."""
    return render_prompt(record["conversations"], "vicuna_v1", has_image=False).replace("\n", " ")


def eval_scene(scene: Scene, rng: random.Random) -> dict:
    """Two short-answer questions per held-out image (types in rotation), a choice question on every other."""
    records = []
    for j in range(2):
        qa = ask(scene, rng, QUESTION_TYPES[(scene.index * 2 + j) % len(QUESTION_TYPES)])
        records.append({"id": f"eval-{scene.index:06d}-{j}-{qa.type}", "image": scene.image, "format": "short",
                        "question_type": qa.type, "answer": qa.answer, "conversations": [
                            {"from": "human", "value": "<image>\n" + qa.question + SHORT_PROMPT},
                            {"from": "gpt", "value": qa.answer}]})
    if scene.index % 2 == 0:
        records.append(choice_record(f"eval-{scene.index:06d}-choice", scene, rng, "eval"))
    return {"eval": records}


def make_scene(job: tuple) -> dict:
    """Worker: sample, render and save one image, and write everything said about it."""
    seed, split, index, size, out = job
    scene = sample_scene(seed, split, index, size)
    render(scene).save(Path(out) / "images" / scene.image)
    rng = scene_rng(seed, split + "/text", index)
    caps = captions(scene, rng)
    result = train_scene(scene, rng, caps) if split == "train" else eval_scene(scene, rng)
    return {**result, "scene": {**scene.to_json(), "captions": caps}}


def build_world(out_dir, num_images: int, num_eval: int, seed: int = 0, image_size: int = 64, workers=None,
                progress: bool = True) -> dict:
    """The synthetic world: train and held-out images (never shared), and every output file."""
    out = Path(out_dir)
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(seed, "train", i, image_size, str(out)) for i in range(num_images)]
    jobs += [(seed, "eval", i, image_size, str(out)) for i in range(num_eval)]
    with Pool(workers or os.cpu_count()) as pool:
        results = list(tqdm(pool.imap(make_scene, jobs, chunksize=64), total=len(jobs), desc="world", leave=False,
                            disable=not progress))
    instruct = [r for res in results for r in res.get("instruct", [])]
    random.Random(seed).shuffle(instruct)
    write_json(out / "scenes.json", [r["scene"] for r in results])
    write_json(out / "pretrain.json", [r["pretrain"] for r in results if "pretrain" in r])
    write_json(out / "instruct.json", instruct)
    write_json(out / "eval.json", [r for res in results for r in res.get("eval", [])])
    corpus = "\n".join(line for res in results for line in res.get("corpus", [])) + "\n"
    tmp = out / ".corpus.txt.tmp"
    tmp.write_text(corpus, encoding="utf-8")
    os.replace(tmp, out / "corpus.txt")
    return {"images": len(jobs), "instruct": len(instruct), "malformed": sum(r.get("malformed", 0) for r in results)}


# ---------------------------------------------------------------- COCO-style data and a real teacher

def read_coco(captions_file, instances_file, limit=None) -> list:
    """COCO annotations -> [(image file, captions, [(label, normalized box)])]; errors name file and entry."""
    caps_json, inst_json = (json.loads(Path(f).read_text()) for f in (captions_file, instances_file))
    for f, data, keys in ((captions_file, caps_json, ("images", "annotations")),
                          (instances_file, inst_json, ("images", "annotations", "categories"))):
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise ValueError(f"{f}: not a COCO annotation file (needs {', '.join(keys)})")
    images = {}
    for i, im in enumerate(caps_json["images"]):
        if not all(k in im for k in ("id", "file_name", "width", "height")):
            raise ValueError(f"{captions_file}: images[{i}] lacks id, file_name, width or height")
        images[im["id"]] = {"file": im["file_name"], "w": im["width"], "h": im["height"], "caps": [], "boxes": []}
    names = {c["id"]: c["name"] for c in inst_json["categories"]}
    for i, a in enumerate(caps_json["annotations"]):
        if a.get("image_id") not in images or not isinstance(a.get("caption"), str):
            raise ValueError(f"{captions_file}: annotations[{i}] has an unknown image_id or no caption")
        images[a["image_id"]]["caps"].append(a["caption"].strip())
    for i, a in enumerate(inst_json["annotations"]):
        im = images.get(a.get("image_id"))
        if im is None or a.get("category_id") not in names or len(a.get("bbox", [])) != 4:
            raise ValueError(f"{instances_file}: annotations[{i}] has an unknown image_id/category_id or a bad bbox")
        x, y, w, h = a["bbox"]
        im["boxes"].append((names[a["category_id"]], [x / im["w"], y / im["h"], (x + w) / im["w"], (y + h) / im["h"]]))
    return [(im["file"], im["caps"], im["boxes"]) for _, im in sorted(images.items())][:limit]


def run_coco(args) -> None:
    contexts = read_coco(args.coco_captions, args.coco_instances, args.max_images)
    if args.teacher != "openai":
        raise SystemExit("COCO data needs --teacher openai (the rule teacher knows only the synthetic world)")
    client = ChatClient(args.api_base, args.model)
    requests = [(f"{file}|{rtype}", build_messages(rtype, caps, bxs), None)
                for file, caps, bxs in contexts for rtype in RESPONSE_TYPES]
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "responses.jsonl"
    with tqdm(total=len(requests), desc="teacher") as bar:
        counts = run_requests(requests, client, results, workers=args.workers or 4, progress=bar)
    records, malformed, rng = [], 0, random.Random(args.seed)
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            file, rtype = row["key"].rsplit("|", 1)
            records.append({"id": row["key"], "image": file, "type": rtype,
                            "conversations": parse_response(rtype, row["response"], rng)})
        except (json.JSONDecodeError, KeyError, ValueError):
            malformed += 1
    write_json(args.out / "instruct.json", records)
    print(f"{len(records)} records in {args.out / 'instruct.json'}; {malformed} malformed responses skipped; "
          f"{counts['failed']} requests failed (rerun to retry them)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=8000, help="synthetic world: training images")
    p.add_argument("--num-eval", type=int, default=500, help="synthetic world: held-out images")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="processes (world) or requests in flight (teacher)")
    p.add_argument("--coco-captions", type=Path)
    p.add_argument("--coco-instances", type=Path)
    p.add_argument("--max-images", type=int)
    p.add_argument("--teacher", choices=["openai", "rule"], default="rule")
    p.add_argument("--api-base", default="https://api.openai.com/v1")
    p.add_argument("--model", default="gpt-4o-mini")
    args = p.parse_args(argv)
    if args.coco_captions or args.coco_instances:
        if not (args.coco_captions and args.coco_instances):
            p.error("--coco-captions and --coco-instances go together")
        run_coco(args)
    else:
        counts = build_world(args.out, args.num_images, args.num_eval, args.seed, args.image_size, args.workers)
        print(f"wrote {counts['images']} images and {counts['instruct']} instruction records to {args.out}")


if __name__ == "__main__":
    main()
