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
eval.json (held-out images), written last, so its presence means the world is complete.
The detail world (--world detail) draws its instruction and held-out images at twice --image-size,
with patterns only full resolution shows, and its stage-1 images (train/NNNNNN-low.png) at --image-size.
COCO outputs: responses.jsonl (the teacher's answers; a rerun resumes it), instruct.json, pretrain.json.
"""
import argparse
import contextlib
import json
import os
import random
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from llava_min.gpt_data import (BRIEF_INSTRUCTIONS, RESPONSE_TYPES, MalformedResponse, build_messages, parse_response,
                                read_coco)
from llava_min.questions import SHORT_PROMPT, WORLD_TYPES, ask, choice_types, multiple_choice
from llava_min.rule_teacher import RuleTeacher
from llava_min.teacher_api import ChatClient, TeacherError, run_requests
from llava_min.world import WORLDS, Scene, captions, render, sample_scene, scene_rng

# The vicuna_v1 template (SPEC 2, llava_min/conversation.py), repeated so gen_data needs no torch;
# tests/test_world.py checks the two agree.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")


@dataclass(frozen=True)
class WorldConfig:
    num_images: int = 8000  # training images
    num_eval: int = 500  # held-out images, never in any training file
    seed: int = 0
    image_size: int = 64
    vqa_questions: int = 7  # short-answer turns in each training image's VQA record (one per type)
    eval_questions: int = 2  # short-answer questions per held-out image, types in rotation
    train_choice_every: int = 4  # a multiple-choice record for every 4th training image
    eval_choice_every: int = 2
    corpus_mb: float = 6.0  # corpus.txt stops growing here: a tiny LM learns the language from a few MB
    world: str = "shapes"  # or "detail": patterned objects on images twice image_size (AnyRes)

    @property
    def types(self) -> tuple:
        return WORLD_TYPES[self.world]

    @property
    def max_objects(self) -> int:
        return 4 if self.world == "shapes" else 2  # detail: fewer, so a question rarely needs binding across tiles

    @property
    def scene_size(self) -> int:
        """Pixels per side of instruction and held-out images; stage 1's are image_size in either world."""
        return self.image_size * (2 if self.world == "detail" else 1)

    def check(self) -> None:
        if self.world not in WORLDS:
            raise ValueError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        if self.num_images < 1 or self.num_eval < 0:
            raise ValueError(f"need at least one training image and no negative eval count, got {self.num_images}, "
                             f"{self.num_eval}")
        if self.image_size < 24:
            raise ValueError(f"image_size {self.image_size} is too small to draw shapes (use at least 24)")
        if not 1 <= self.eval_questions <= len(self.types) or self.vqa_questions < 1:
            raise ValueError(f"eval_questions must be 1-{len(self.types)} and vqa_questions at least 1")


# ---------------------------------------------------------------- records

def human(text: str, image: bool = False) -> dict:
    return {"from": "human", "value": ("<image>\n" if image else "") + text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def object_boxes(scene: Scene) -> list:
    """The scene's boxes as the teacher's context lists them: `red circle: [x1, y1, x2, y2]`, 0-1."""
    return [(o.name, [v / scene.size for v in o.box]) for o in scene.objects]


def vqa_record(rid: str, scene: Scene, rng: random.Random, num_questions: int, world_types: tuple) -> dict:
    """LLaVA-1.5 style: several short-answer questions about one image in one record, each with the
    response-format prompt (LLaVA-1.5 Sec. 3.2)."""
    types = rng.sample(world_types, min(num_questions, len(world_types)))
    types += [rng.choice(world_types) for _ in range(num_questions - len(types))]
    turns = []
    for i, qtype in enumerate(types):
        qa = ask(scene, rng, qtype)
        turns += [human(qa.question + SHORT_PROMPT, image=i == 0), gpt(qa.answer)]
    return {"id": rid, "image": scene.image, "type": "vqa", "conversations": turns}


def choice_record(rid: str, scene: Scene, rng: random.Random, qtype: str, held_out: bool) -> dict:
    """ScienceQA's multiple-choice format; held-out records carry the choices and the answer letter."""
    qa = ask(scene, rng, qtype)
    prompt, choices, letter = multiple_choice(qa, rng)
    record = {"id": rid, "image": scene.image, "conversations": [human(prompt, image=True), gpt(letter)]}
    if held_out:
        return {**record, "format": "choice", "question_type": qa.type, "choices": choices, "answer": letter}
    return {**record, "type": "choice"}


TEACHER = RuleTeacher()


def teacher_record(rid: str, scene: Scene, caps: list, rtype: str, rng: random.Random):
    """One of the paper's three response types, through the whole path: request -> teacher text -> parser."""
    response = TEACHER(build_messages(rtype, caps, object_boxes(scene)), scene)
    try:
        return {"id": rid, "image": scene.image, "type": rtype, "conversations": parse_response(rtype, response, rng)}
    except MalformedResponse:
        return None


def chat_text(conversations: list) -> str:
    """A record as a text-only vicuna_v1 chat on one line: what the toy LM pretrains on."""
    parts = [VICUNA_SYSTEM + " "]
    for i, turn in enumerate(conversations):
        text = turn["value"].replace("<image>", "").strip()
        parts.append(f"USER: {text} ASSISTANT:" if i % 2 == 0 else f" {text}</s>")
    return "".join(parts).replace("\n", " ")


def train_records(scene: Scene, caps: list, rng: random.Random, cfg: WorldConfig, pretrain_image: str) -> dict:
    rid = f"train-{scene.index:06d}"
    pretrain = {"id": rid, "image": pretrain_image,  # stage 1: brief instruction -> caption
                "conversations": [human(rng.choice(BRIEF_INSTRUCTIONS), image=True), gpt(rng.choice(caps))]}
    rtype = RESPONSE_TYPES[scene.index % len(RESPONSE_TYPES)]
    records = [vqa_record(f"{rid}-vqa", scene, rng, cfg.vqa_questions, cfg.types),
               teacher_record(f"{rid}-{rtype}", scene, caps, rtype, rng)]
    if scene.index % cfg.train_choice_every == 0:
        records.append(choice_record(f"{rid}-choice", scene, rng, rng.choice(choice_types(cfg.world)), False))
    instruct = [r for r in records if r]
    corpus = [rng.choice(caps)] + [chat_text(r["conversations"]) for r in [pretrain] + instruct]
    return {"pretrain": pretrain, "instruct": instruct, "malformed": records.count(None), "corpus": corpus}


def eval_records(scene: Scene, rng: random.Random, cfg: WorldConfig) -> dict:
    """Short-answer questions with types in rotation (balanced), wanted yes/no answers in rotation, and
    a multiple-choice question on every `eval_choice_every`-th image. A lone object has nothing beside it
    (its relation questions can only be "no"), so relation questions aim at "yes" twice as often."""
    records = []
    for j in range(cfg.eval_questions):
        turn = scene.index * cfg.eval_questions + j
        qtype, cycle = cfg.types[turn % len(cfg.types)], turn // len(cfg.types)
        want = {"exists": ("yes", "no")[cycle % 2],
                "reasoning": ("yes", "no", "attribute", "yes")[cycle % 4]}.get(qtype)
        qa = ask(scene, rng, qtype, want)
        records.append({"id": f"eval-{scene.index:06d}-{qtype}", "image": scene.image, "format": "short",
                        "question_type": qtype, "answer": qa.answer,
                        "conversations": [human(qa.question + SHORT_PROMPT, image=True), gpt(qa.answer)]})
    if scene.index % cfg.eval_choice_every == 0:
        kinds = choice_types(cfg.world)
        qtype = kinds[scene.index // cfg.eval_choice_every % len(kinds)]
        records.append(choice_record(f"eval-{scene.index:06d}-choice", scene, rng, qtype, True))
    return {"eval": records}


# ---------------------------------------------------------------- the world

def make_image(job: tuple) -> dict:
    """Worker: sample, render and save one image, and write everything said about it. In the detail world
    a training scene is drawn twice: large for stage 2, at the encoder's size for stage 1 ("-low")."""
    cfg, split, index, out = job
    scene = sample_scene(cfg.seed, split, index, cfg.scene_size, cfg.max_objects, cfg.world)
    render(scene).save(Path(out) / "images" / scene.image)
    low = scene
    if split == "train" and cfg.scene_size != cfg.image_size:
        low = sample_scene(cfg.seed, split, index, cfg.image_size, cfg.max_objects, cfg.world)
        low.suffix = "-low"
        render(low).save(Path(out) / "images" / low.image)
    rng = scene_rng(cfg.seed, split, index, "text")
    caps = captions(scene, rng)
    result = train_records(scene, caps, rng, cfg, low.image) if split == "train" else eval_records(scene, rng, cfg)
    return {**result, "scene": {**scene.to_json(), "captions": caps}}


def write_text(path: Path, text: str) -> None:
    """Atomic: a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False))


def capped(docs, max_bytes: float) -> str:
    out, size = [], 0
    for doc in docs:
        size += len(doc.encode("utf-8")) + 1
        if size > max_bytes:
            break
        out.append(doc)
    return "\n".join(out) + "\n"


def build_world(out_dir, num_images: int, num_eval: int, seed: int = 0, image_size: int = 64, workers=None,
                progress: bool = True, **options) -> dict:
    """The synthetic world: training and held-out images (never shared) and every output file.
    Deterministic for a seed, whatever `workers` is; `options` are further WorldConfig fields."""
    cfg = WorldConfig(num_images, num_eval, seed, image_size, **options)
    cfg.check()
    out = Path(out_dir)
    with only_run(out):
        return write_world(cfg, out, workers, progress)


def write_world(cfg: WorldConfig, out: Path, workers, progress: bool) -> dict:
    seed, num_images, num_eval = cfg.seed, cfg.num_images, cfg.num_eval
    (out / "eval.json").unlink(missing_ok=True)  # the completion marker goes first and comes back last
    for split in ("train", "eval"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, split, i, str(out)) for split, n in (("train", num_images), ("eval", num_eval)) for i in range(n)]
    workers = workers or min(8, os.cpu_count() or 1)
    bar = dict(total=len(jobs), desc="world", unit="img", disable=not progress, leave=False)
    if workers == 1:
        results = [make_image(job) for job in tqdm(jobs, **bar)]
    else:
        with Pool(workers) as pool:
            results = list(tqdm(pool.imap(make_image, jobs, chunksize=64), **bar))
    instruct = [r for res in results for r in res.get("instruct", [])]
    random.Random(seed).shuffle(instruct)
    write_json(out / "scenes.json", [r["scene"] for r in results])
    write_json(out / "pretrain.json", [r["pretrain"] for r in results if "pretrain" in r])
    write_json(out / "instruct.json", instruct)
    write_text(out / "corpus.txt", capped((d for res in results for d in res.get("corpus", [])), cfg.corpus_mb * 1e6))
    write_json(out / "eval.json", [r for res in results for r in res.get("eval", [])])  # last: marks completion
    return {"images": len(jobs), "instruct": len(instruct), "malformed": sum(r.get("malformed", 0) for r in results)}


# ---------------------------------------------------------------- COCO-style data and a real teacher

@contextlib.contextmanager
def only_run(out: Path):
    """One gen_data run per output directory: a second would ask (and pay) the teacher twice and write the
    same files. A lock file holds the owner's pid; one left by a killed run is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".gen_data.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = lock.read_text().strip()
            if not pid.isdigit() or (int(pid) != os.getpid() and alive(int(pid))):  # (ours: a container restart)
                raise SystemExit(f"gen_data: another run (pid {pid or '?'}) is writing {out}; wait for it to end, "
                                 f"or remove {lock} if it is gone")
            lock.unlink(missing_ok=True)  # left by a run that was killed
    else:
        raise SystemExit(f"gen_data: cannot take {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


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
    if args.teacher != "openai":
        raise SystemExit("COCO data needs --teacher openai: the rule teacher knows only the synthetic world")
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


def positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def positive_float(text: str) -> float:
    x = float(text)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return x


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive_int,
                   help="processes (world; default: the CPU count, at most 8) or requests in flight "
                        "(teacher; default 4)")
    w = p.add_argument_group("synthetic world")
    w.add_argument("--num-images", type=int, default=WorldConfig.num_images, help="training images")
    w.add_argument("--num-eval", type=int, default=WorldConfig.num_eval, help="held-out images")
    w.add_argument("--image-size", type=int, default=WorldConfig.image_size,
                   help="pixels per side (the detail world's stage-2 and held-out images are twice this)")
    w.add_argument("--world", choices=WORLDS, default="shapes", help="detail: patterns only full resolution shows")
    w.add_argument("--vqa-questions", type=int, default=WorldConfig.vqa_questions, help="short-answer turns per record")
    w.add_argument("--corpus-mb", type=positive_float, default=WorldConfig.corpus_mb, help="size cap of corpus.txt")
    c = p.add_argument_group("the paper's pipeline on COCO-style annotations")
    c.add_argument("--coco-captions", type=Path, help="captions_*.json")
    c.add_argument("--coco-instances", type=Path, help="instances_*.json")
    c.add_argument("--max-images", type=positive_int, help="use only the first N images (by id)")
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
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.coco_captions:
        try:
            counts = run_coco(args)
        except (ValueError, TeacherError) as e:  # a malformed annotation file, a refused key: say so, no traceback
            raise SystemExit(f"gen_data: {e}") from e
        except KeyboardInterrupt:
            raise SystemExit("gen_data: interrupted; what was answered is kept, rerun to continue") from None
        if counts["failed"] or not counts["records"]:  # (a script must not go on to train on nothing)
            raise SystemExit(1)
        return counts
    try:
        counts = build_world(args.out, args.num_images, args.num_eval, args.seed, args.image_size, args.workers,
                             vqa_questions=args.vqa_questions, corpus_mb=args.corpus_mb, world=args.world)
    except ValueError as e:  # a world that cannot be drawn: say why, no traceback
        raise SystemExit(f"gen_data: {e}") from e
    print(f"wrote {counts['images']} images and {counts['instruct']} instruction records to {args.out}"
          + (f" ({counts['malformed']} malformed teacher responses skipped)" if counts["malformed"] else ""))
    return counts


if __name__ == "__main__":
    main()
