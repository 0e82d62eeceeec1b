"""Sec. 3 on the toy world: what the text-only teacher is shown for one image, and what it wrote back.

    python -m llava_min.tools.inspect teacher --data-dir data/toy [--scene N]

First the training records by kind (the paper's three response types, LLaVA-1.5's short-answer VQA and
the multiple-choice records), then, for each response type, the first scene from N on that has one: the
request's context (captions; boxes too for detail and complex, as in Table 1) and the record parsed
from the teacher's answer.
"""
from collections import Counter
from pathlib import Path

from ..files import InputError, read_json

KINDS = {  # record "type" -> where the toy world's records of that kind come from
    "conversation": "Sec. 3 conversation: the teacher, from the captions",
    "detail": "Sec. 3 detailed description: the teacher, from captions and boxes",
    "complex": "Sec. 3 complex reasoning: the teacher, from captions and boxes",
    "vqa": "LLaVA-1.5's short-answer VQA: templated questions + the response-format prompt",
    "choice": "multiple choice in ScienceQA's format (LLaVA Sec. 5.2)",
}


def add_parser(sub) -> None:
    p = sub.add_parser("teacher", help="Sec. 3: the teacher's context and the records it produced, by type")
    p.add_argument("--data-dir", type=Path, required=True, help="a toy world (gen_data.py / train.py's data/toy)")
    p.add_argument("--scene", type=int, default=0, help="show the first scenes from this training index on")
    p.set_defaults(show=run)


def read_world(data_dir: Path) -> tuple:
    """(training scenes by image path, instruct records, pretrain records) of a toy world."""
    files = {name: data_dir / f"{name}.json" for name in ("scenes", "instruct", "pretrain")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise InputError(f"{missing[0]} does not exist: --data-dir names a toy world (python gen_data.py --out DIR)")
    scenes = {s["image"]: s for s in read_json(files["scenes"]) if s.get("split") == "train"}
    return scenes, read_json(files["instruct"]), read_json(files["pretrain"])


def boxes(scene: dict) -> list:
    """The scene's objects as the teacher's context lists them: 'red circle', [x1, y1, x2, y2] in 0-1."""
    return [(f"{o['color']} {o['shape']}", [v / scene["size"] for v in o["box"]]) for o in scene["objects"]]


def first_of_type(records: list, rtype: str, scenes: dict, start: int):
    """The record of this type whose training scene comes first from index `start` on (ids name the scene)."""
    found = [r for r in records if r.get("type") == rtype and r.get("image") in scenes
             and scenes[r["image"]]["index"] >= start]
    return min(found, key=lambda r: scenes[r["image"]]["index"]) if found else None


def show_record(record: dict, scene: dict) -> list:
    from ..data.gpt_data import build_messages
    messages = build_messages(record["type"], scene["captions"], boxes(scene))
    shots = (len(messages) - 2) // 2
    what = "captions and boxes" if record["type"] != "conversation" else "captions only"
    lines = [f"== {record['type']}: record {record['id']} (image {record['image']}, {len(scene['objects'])} objects)",
             f"request: a system message, {shots} few-shot example{'s' * (shots != 1)}, then this context ({what}):"]
    lines += [f"  | {line}" for line in messages[-1]["content"].splitlines()]
    lines.append("the record, parsed from the teacher's answer:")
    lines += [f"  {turn['from']}: {turn['value']!r}" for turn in record["conversations"]]
    return lines


def run(args) -> None:
    scenes, instruct, pretrain = read_world(args.data_dir)
    kinds = Counter(r.get("type", "untyped") for r in instruct)
    print(f"{args.data_dir / 'instruct.json'}: {len(instruct)} records (stage 2)")
    for kind, n in kinds.most_common():
        print(f"  {kind:<13}{n:>7}  {KINDS.get(kind, '')}")
    print(f"{args.data_dir / 'pretrain.json'}: {len(pretrain)} records (stage 1: a brief instruction, then a caption)")
    for rtype in ("conversation", "detail", "complex"):
        record = first_of_type(instruct, rtype, scenes, args.scene)
        print()
        print(f"== {rtype}: no record from scene {args.scene} on" if record is None else
              "\n".join(show_record(record, scenes[record["image"]])))
