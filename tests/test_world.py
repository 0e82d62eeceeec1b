"""The synthetic world: every answer checked against scenes.json by logic written here (not the
generators), the pictures against the annotation, the splits, the formats, balance and determinism."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import gen_data
from llava_min.data.gpt_data import build_messages
from llava_min.toy.build import build_world, chat_text
from llava_min.toy.rule_teacher import RuleTeacher
from llava_min.toy.world import COLORS, sample_scene

TYPES = {"color", "shape", "count", "position", "size", "exists", "reasoning"}
SHORT = "\nAnswer the question using a single word or phrase."
REL = "to the left of|to the right of|above|below"
RELATIONS = {"to the left of": lambda a, b: a["col"] < b["col"], "to the right of": lambda a, b: a["col"] > b["col"],
             "above": lambda a, b: a["row"] < b["row"], "below": lambda a, b: a["row"] > b["row"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    build_world(out, num_images=300, num_eval=105, seed=3, workers=2, progress=False)
    return out


def load(world, name):
    return json.loads((world / name).read_text())


def find(objs, phrase):
    """"the circle", "the red circle", "the circle at the top left", "the red object on the left"."""
    assert phrase.startswith("the "), phrase
    words, at = phrase[4:], None
    m = re.fullmatch(r"(.+?) (?:at|on|in) the (.+)", words)
    if m:
        words, at = m.groups()
    hits = [o for o in objs if all(w in (o["color"], o["shape"], "object") for w in words.split())
            and (at is None or o["position"] == at)]
    assert len(hits) == 1, (phrase, objs)
    return hits[0]


def truth(scene, question):
    """The answer to any question the world asks, recomputed from the annotation."""
    objs, q = scene["objects"], question.replace("<image>\n", "").split("\n")[0]
    yes = lambda cond: "yes" if cond else "no"  # noqa: E731
    if m := re.fullmatch(rf"What (color|shape) is the object ({REL}) (.+)\?", q):
        b = find(objs, m[3])
        fits = [o for o in objs if o is not b and RELATIONS[m[2]](o, b)]
        assert len(fits) == 1, q
        return fits[0][m[1]]
    if m := re.fullmatch(rf"Is there (?:anything|an object) ({REL}) (.+)\?", q):
        b = find(objs, m[2])
        return yes(any(RELATIONS[m[1]](o, b) for o in objs if o is not b))
    if m := re.fullmatch(rf"Is (the .+?) (?:located )?({REL}) (the .+)\?", q):
        a, b = find(objs, m[1]), find(objs, m[3])
        assert (a["col"] != b["col"]) if "of" in m[2] else (a["row"] != b["row"]), q  # the grid decides it
        return yes(RELATIONS[m[2]](a, b))
    if m := re.fullmatch(r"Is there anything (\w+) in the image\?|Is there an? (\w+) object\?", q):
        return yes(any(o["color"] == (m[1] or m[2]) for o in objs))
    if m := re.fullmatch(r"(?:Is there|Can you see|Does the image contain) an? (\w+) (\w+)(?: in the image)?\?", q):
        return yes(any(o["color"] == m[1] and o["shape"] == m[2] for o in objs))
    if m := re.fullmatch(r"Is (.+) (?:small or large|large or small)\?|What size is (.+)\?", q):
        return find(objs, m[1] or m[2])["size"]
    if m := re.fullmatch(r"(?:What color is|What is the color of|Which color does) (.+?)(?: have)?\?", q):
        return find(objs, m[1])["color"]
    if m := re.fullmatch(r"(?:What shape is|What is the shape of|Which shape is) (.+)\?", q):
        return find(objs, m[1])["shape"]
    if m := re.fullmatch(r"How many (.+?)s (?:are there|are in the image|can you see)\?", q):
        noun = m[1].split()
        if noun[-1] in ("object", "shape") and len(noun) == 1:
            return str(len(objs))
        return str(sum(noun[0] in (o["color"], o["shape"], o["size"]) for o in objs))
    if m := re.fullmatch(r"(?:Where is|In which part of the image is) (.+?)(?: located)?\?", q):
        return find(objs, m[1])["position"]
    if m := re.fullmatch(r"What pattern is on (.+)\?|What pattern does (.+) have\?|How is (.+) filled\?", q):
        return find(objs, m[1] or m[2] or m[3])["pattern"]
    raise AssertionError(f"unknown question {q!r}")


def pairs(record):
    turns = record["conversations"]
    return [(q["value"], a["value"]) for q, a in zip(turns[0::2], turns[1::2])]


def test_short_answers_and_choices_agree_with_the_annotations(world):
    scenes = {s["image"]: s for s in load(world, "scenes.json")}
    checked = Counter()
    for record in load(world, "eval.json") + load(world, "instruct.json"):
        scene, kind = scenes[record["image"]], record.get("type") or record["format"]
        if kind in ("vqa", "short"):
            for q, a in pairs(record):
                assert q.endswith(SHORT) and truth(scene, q) == a, (record["id"], q, a)
                checked[kind] += 1
        elif kind == "choice":
            (q, letter), = pairs(record)
            options = dict(re.findall(r"^([A-E])\. (.+)$", q, re.M))
            assert truth(scene, q) == options[letter], (record["id"], q)
            assert record.get("choices", list(options.values())) == list(options.values())
            checked[kind] += 1
    assert checked["short"] == 210 and checked["vqa"] == 300 * 7 and checked["choice"] > 100


def test_rule_teacher_sentences_agree_with_the_annotations(world):
    """The conversation / complex / detail records, which went request -> teacher text -> parser."""
    scenes = {s["image"]: s for s in load(world, "scenes.json")}
    seen = Counter()
    for record in load(world, "instruct.json"):
        scene, objs = scenes[record["image"]], scenes[record["image"]]["objects"]
        if record["type"] == "detail":
            text = record["conversations"][1]["value"]
            named = re.findall(r"(small|large) (\w+) (circle|square|triangle)", text)
            assert sorted(named) == sorted((o["size"], o["color"], o["shape"]) for o in objs), record["id"]
        elif record["type"] == "complex":
            (q, a), = pairs(record)
            q = q.replace("<image>\n", "")
            if m := re.fullmatch(r"If every (\w+) object were taken away, how many objects would be left\? "
                                 r"Explain\.", q):
                assert a.startswith(f"{sum(m[1] not in (o['color'], o['size']) for o in objs)}. "), record["id"]
            elif m := re.fullmatch(r"Which object is the (highest|lowest) in the image, and why\?", q):
                row = (min if m[1] == "highest" else max)(o["row"] for o in objs)
                (winner,) = [o for o in objs if o["row"] == row]
                assert re.match(rf"The ({winner['color']} )?{winner['shape']} is the {m[1]}", a), record["id"]
            else:
                assert a.split(".")[0].lower() == truth(scene, q), record["id"]
        elif record["type"] == "conversation":
            for q, a in pairs(record):
                if q.replace("<image>\n", "") in ("What objects can you see in the image?", "What is in the picture?"):
                    assert len(re.findall(r"(circle|square|triangle)", a)) == len(objs)
                    continue
                t = truth(scene, q)
                ok = a.lower().startswith(t) if t in ("yes", "no") else (
                    f" {t} " in f" {a[:-1]} " or (t == "0" and "There are no" in a))
                assert ok, (record["id"], q, a, t)
        seen[record["type"]] += 1
    assert min(seen[t] for t in ("detail", "complex", "conversation")) >= 100


def test_rule_teacher_reads_the_same_request():
    scene, other = sample_scene(0, "train", 5), sample_scene(0, "train", 6)
    boxes = [(o.name, [v / 64 for v in o.box]) for o in scene.objects]
    caps = [" and ".join(o.name for o in scene.objects)]
    teacher = RuleTeacher()
    request = build_messages("detail", caps, boxes)
    assert teacher(request, scene) == teacher(request, scene)  # a pure function of the request
    assert "Question:" in teacher(build_messages("complex", caps, boxes), scene)
    with pytest.raises(ValueError, match="unknown system message"):
        teacher([{"role": "system", "content": "Be brief."}, {"role": "user", "content": caps[0]}], scene)
    if {o.name for o in other.objects} - {o.name for o in scene.objects}:
        with pytest.raises(ValueError, match="does not describe"):
            teacher(build_messages("detail", caps, boxes), other)


def test_pictures_match_the_annotation(world):
    for s in load(world, "scenes.json")[:120]:
        img = Image.open(world / "images" / s["image"]).convert("RGB")
        assert img.size == (64, 64) and 1 <= len(s["objects"]) <= 4 and len(s["captions"]) >= 3
        assert len({(o["row"], o["col"]) for o in s["objects"]}) == len(s["objects"])  # distinct cells
        assert len({(o["color"], o["shape"]) for o in s["objects"]}) == len(s["objects"])  # unique names
        for o in s["objects"]:
            x1, y1, x2, y2 = o["box"]
            cell = 64 / 3
            assert o["col"] * cell - 1 <= x1 and x2 <= (o["col"] + 1) * cell + 1  # never leaves its cell (±rounding)
            assert o["row"] * cell - 1 <= y1 and y2 <= (o["row"] + 1) * cell + 1
            assert (x2 - x1 > 14) == (o["size"] == "large")
            assert img.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLORS[o["color"]], (s["image"], o)
        corner = img.getpixel((0, 0)) if all(o["col"] or o["row"] for o in s["objects"]) else None
        assert corner in (None, tuple(s["background"]))


def test_splits_formats_and_balance(world):
    train_images = {r["image"] for r in load(world, "pretrain.json")}
    eval_records = load(world, "eval.json")
    assert len(train_images) == 300 and all(i.startswith("train/") for i in train_images)
    assert train_images.isdisjoint(r["image"] for r in eval_records)
    assert {r["image"] for r in load(world, "instruct.json")} <= train_images
    assert {r["image"] for r in eval_records} == {f"eval/{i:06d}.png" for i in range(105)}
    short = [r for r in eval_records if r["format"] == "short"]
    assert Counter(r["question_type"] for r in short) == {t: 30 for t in TYPES}  # balanced over types
    assert len({r["id"] for r in eval_records}) == len(eval_records)
    exists = [r["answer"] for r in short if r["question_type"] == "exists"]
    assert exists.count("yes") == exists.count("no")
    yes_no = [r["answer"] for r in short if r["answer"] in ("yes", "no")]
    assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    for r in eval_records:
        assert r["id"].startswith(f"eval-{r['image'][5:11]}-")
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert r["answer"] == r["conversations"][1]["value"]
        if r["format"] == "choice":
            assert set(r) == {"id", "image", "format", "question_type", "choices", "answer", "conversations"}
            assert r["id"].endswith("-choice") and r["answer"] in "ABC"[:len(r["choices"])]
            assert r["conversations"][0]["value"].endswith(
                "\nAnswer with the option's letter from the given choices directly.")
        else:
            assert set(r) == {"id", "image", "format", "question_type", "answer", "conversations"}
            assert r["id"] == f"eval-{r['image'][5:11]}-{r['question_type']}"
            assert r["conversations"][0]["value"].endswith(SHORT) and len(r["answer"].split()) <= 2
            assert r["answer"] == r["answer"].lower()
    instruct = load(world, "instruct.json")
    assert Counter(r["type"] for r in instruct) == {"vqa": 300, "conversation": 100, "detail": 100, "complex": 100,
                                                    "choice": 75}
    for r in instruct + load(world, "pretrain.json"):
        values = [t["value"] for t in r["conversations"]]
        assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * (len(values) // 2)
    assert (world / "corpus.txt").read_text().count("\n") > 300


def test_corpus_chats_use_the_training_template(world):
    from llava_min.conversation import render_prompt
    record = load(world, "instruct.json")[0]
    expected = render_prompt(record["conversations"], "vicuna_v1", has_image=False).replace("\n", " ")
    assert chat_text(record["conversations"]) == expected
    assert expected in (world / "corpus.txt").read_text().splitlines()


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 2)):
        build_world(tmp_path / name, num_images=40, num_eval=10, seed=seed, workers=workers, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert (tmp_path / "a/images/eval/000009.png").read_bytes() != (tmp_path / "c/images/eval/000009.png").read_bytes()
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temporaries


def test_corpus_cap_and_bad_config(tmp_path):
    build_world(tmp_path, num_images=30, num_eval=0, workers=1, progress=False, corpus_mb=0.01)
    assert 5000 < (tmp_path / "corpus.txt").stat().st_size <= 10_000
    with pytest.raises(ValueError, match="image_size"):
        build_world(tmp_path, num_images=3, num_eval=1, image_size=8, workers=1)


# ---------------------------------------------------------------- the detail world (AnyRes)

STRIPES = {"horizontal stripes": lambda x, y: y % 2 == 0, "vertical stripes": lambda x, y: x % 2 == 0,
           "checks": lambda x, y: (x + y) % 2 == 0}  # which pixels of an object take its colour


@pytest.fixture(scope="module")
def detail(tmp_path_factory):
    out = tmp_path_factory.mktemp("detail")
    gen_data.main(["--out", str(out), "--world", "detail", "--num-images", "120", "--num-eval", "40",
                   "--image-size", "48", "--seed", "2", "--workers", "2"])
    return out


def test_detail_world_answers_and_balance(detail):
    scenes = {s["image"]: s for s in load(detail, "scenes.json")}
    assert all(s["world"] == "detail" and 1 <= len(s["objects"]) <= 2 for s in scenes.values())
    for record in load(detail, "eval.json") + load(detail, "instruct.json"):
        scene, kind = scenes[record["image"]], record.get("type") or record["format"]
        if kind in ("vqa", "short", "choice"):
            for q, a in pairs(record):
                options = dict(re.findall(r"^([A-E])\. (.+)$", q, re.M))
                assert truth(scene, q) == options.get(a, a), (record["id"], q, a)
    short = [r for r in load(detail, "eval.json") if r["format"] == "short"]
    assert Counter(r["question_type"] for r in short) == {t: 16 for t in ("pattern", "color", "shape", "position",
                                                                          "size")}
    assert {r["answer"] for r in short if r["question_type"] == "pattern"} == set(STRIPES)
    text = (detail / "corpus.txt").read_text()
    assert all(p in text for p in STRIPES)  # the captions and the teacher talk about patterns too


def tint(color):
    return tuple((c + 255) / 2 for c in color)


def test_detail_pictures_show_patterns_only_at_full_size(detail):
    pretrain = {r["id"]: r["image"] for r in load(detail, "pretrain.json")}
    for s in load(detail, "scenes.json")[:60]:
        img = Image.open(detail / "images" / s["image"]).convert("RGB")
        assert img.size == (96, 96)
        images = [(img, 1)]
        if s["split"] == "train":  # stage 1 sees the same scene at the encoder's size, patterns still drawn
            low = pretrain[f"train-{s['index']:06d}"]
            assert low == s["image"].replace(".png", "-low.png")
            images.append((Image.open(detail / "images" / low).convert("RGB"), 2))
        half = img.resize((48, 48), Image.BICUBIC)
        for o in s["objects"]:
            color, fill = COLORS[o["color"]], STRIPES[o["pattern"]]
            for picture, shrink in images:
                cx, cy = (o["box"][0] + o["box"][2]) // 2 // shrink, (o["box"][1] + o["box"][3]) // 2 // shrink
                for x, y in ((cx, cy), (cx + 1, cy), (cx, cy + 1), (cx + 1, cy + 1)):
                    assert picture.getpixel((x, y)) == (color if fill(x, y) else (255, 255, 255)), (s["image"], o)
            if o["size"] == "large":  # halved: one flat tint, whatever the pattern (well inside the object)
                cx, cy = (o["box"][0] + o["box"][2]) // 4, round(o["box"][1] * 0.2 + o["box"][3] * 0.3)
                for x, y in ((cx, cy), (cx + 1, cy), (cx, cy + 1)):
                    assert all(abs(a - b) <= 1 for a, b in zip(half.getpixel((x, y)), tint(color))), (s["image"], o)
