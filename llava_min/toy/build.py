"""The synthetic world on disk: images, and every LLaVA-format file the toy pipeline trains and scores on.

World outputs (official LLaVA JSON, records' "image" relative to DIR/images): images/, scenes.json,
pretrain.json (stage 1), instruct.json (stage 2), corpus.txt (text for the toy LM) and eval.json
(held-out images), written last, so its presence means the world is complete. world_config.json records the
settings it was drawn with: a world is never redrawn over one made with other settings.
"""
import os
import random
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

from tqdm import tqdm

from ..conversation import render_prompt
from ..errors import OptionError
from ..files import only_run, room_for, same_settings, write_json, write_text
from ..data.gpt_data import (BRIEF_INSTRUCTIONS, RESPONSE_TYPES, MalformedResponse, build_messages, gpt, human,
                        parse_response)
from .questions import SHORT_PROMPT, WORLD_TYPES, ask, choice_types, multiple_choice
from .rule_teacher import RuleTeacher
from .world import WORLDS, Scene, captions, render, sample_scene, scene_rng


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
            raise OptionError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        if self.num_images < 1 or self.num_eval < 0:
            raise OptionError(f"need at least one training image and no negative eval count, got {self.num_images}, "
                              f"{self.num_eval}")
        if self.image_size < 24:
            raise OptionError(f"image_size {self.image_size} is too small to draw shapes (use at least 24)")
        if not 1 <= self.eval_questions <= len(self.types) or self.vqa_questions < 1:
            raise OptionError(f"eval_questions must be 1-{len(self.types)} and vqa_questions at least 1")


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
    return render_prompt(conversations, "vicuna_v1", has_image=False).replace("\n", " ")


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
    with only_run(out), room_for(out / "images", 0):  # (a full disk while drawing: one line naming the folder)
        same_settings(out / "world_config.json", asdict(cfg), f"the world in {out} was")
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
