"""gen_data.py: the teacher client against a local fake server, the rule teacher against the
annotations, determinism, and parsing of good and bad teacher output."""
import hashlib
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import gen_data
from llava_min.gpt_data import (ChatClient, MalformedResponse, build_messages, context_text, parse_response,
                                run_requests)

KEY = "sk-test-SECRET-4711"


class FakeOpenAI:
    """/v1/chat/completions on 127.0.0.1: answers 429 then 500 for each new context, then succeeds;
    `die_after` makes it refuse everything once that many answers were given (a crash mid-run)."""

    def __init__(self, die_after=None):
        self.bodies, self.answered, self.attempts, self.die_after = [], 0, {}, die_after
        self.auth = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.auth.add(self.headers.get("Authorization"))
                context = body["messages"][-1]["content"]
                n = fake.attempts[context] = fake.attempts.get(context, 0) + 1
                if fake.die_after is not None and fake.answered >= fake.die_after:
                    return self.reply(400, {"error": "gone"})
                if n == 1:
                    return self.reply(429, {"error": "slow down"}, {"Retry-After": "0"})
                if n == 2:
                    return self.reply(500, {"error": "oops"})
                fake.bodies.append(body)
                fake.answered += 1
                text = f"Question:\nWhat is in {context.splitlines()[0]}?\n===\nAnswer:\nSomething."
                self.reply(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def reply(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self):
        self.server.shutdown()


@pytest.fixture
def requests():
    return [(f"img{i}|conversation", build_messages("conversation", [f"caption {i}", "another"]), None) for i in range(6)]


def test_teacher_request_retries_and_key(monkeypatch, tmp_path, requests, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake = FakeOpenAI()
    client = ChatClient(fake.url, "teacher-model", backoff=0.01)
    counts = run_requests(requests, client, tmp_path / "responses.jsonl", workers=3)
    fake.close()
    assert counts == {"skipped": 0, "answered": 6, "failed": 0}
    assert all(n == 3 for n in fake.attempts.values())  # 429, then 500, then success
    body = fake.bodies[0]
    roles = [m["role"] for m in body["messages"]]
    assert body["model"] == "teacher-model" and roles[0] == "system" and roles[1:3] == ["user", "assistant"]
    assert "Question:" in body["messages"][2]["content"]  # the few-shot response
    assert body["messages"][-1]["content"].startswith("caption")
    assert fake.auth == {f"Bearer {KEY}"}
    assert KEY not in (tmp_path / "responses.jsonl").read_text() and KEY not in repr(client)
    assert KEY not in "".join(capsys.readouterr())


def test_interrupted_run_resumes_without_redoing_or_losing(tmp_path, requests):
    out = tmp_path / "responses.jsonl"
    first = FakeOpenAI(die_after=2)
    counts = run_requests(requests, ChatClient(first.url, "m", backoff=0.01, max_retries=2), out, workers=1)
    first.close()
    assert counts["answered"] == 2 and counts["failed"] == 4
    with open(out, "a") as f:
        f.write('{"key": "torn')  # a line cut short by the crash
    second = FakeOpenAI()
    counts = run_requests(requests, ChatClient(second.url, "m", backoff=0.01), out, workers=2)
    second.close()
    assert counts == {"skipped": 2, "answered": 4, "failed": 0}
    assert len(second.attempts) == 4  # the two finished contexts were not asked again
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]  # the torn line is gone
    assert sorted(keys) == sorted(k for k, _, _ in requests)


def test_context_format_and_parsing():
    assert context_text(["a cat"], [("cat", [0.1, 0.2, 0.30001, 0.4])]) == "a cat\n\ncat: [0.100, 0.200, 0.300, 0.400]"
    assert "cat: [" not in build_messages("conversation", ["a cat"], [("cat", [0, 0, 1, 1])])[-1]["content"]
    rng = random.Random(0)
    turns = parse_response("conversation", "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.", rng)
    assert [t["value"] for t in turns] == ["<image>\nA?", "B.", "C?", "D."]
    assert parse_response("detail", "One  paragraph\nhere.", rng)[1]["value"] == "One paragraph here."
    for rtype, bad in [("conversation", "Question:\nA?"), ("conversation", "no format at all"),
                       ("detail", ""), ("complex", "Question:\nA\n===\nAnswer:\nB\n===\nQuestion:\nC\n===\nAnswer:\nD")]:
        with pytest.raises(MalformedResponse):
            parse_response(rtype, bad, rng)


# ---------------------------------------------------------------- the synthetic world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    gen_data.build_world(out, num_images=300, num_eval=60, seed=3, workers=2)
    return out


def load(world, name):
    return json.loads((world / name).read_text())


def truth(scene, question):
    """Answers recomputed from the annotation, independently of the question generators."""
    objs = scene["objects"]
    q = question.split("\n")[0]

    def find(phrase):  # "the circle", "the red circle", "the circle at the top left", "the red object"
        words = phrase.replace("the ", "", 1)
        at = None
        for sep in (" at the ", " in the "):
            if sep in words:
                words, at = words.split(sep)
        words = words.split()
        hits = [o for o in objs if all(w in (o["color"], o["shape"], "object") for w in words)
                and (at is None or o["position"] == at)]
        assert len(hits) == 1, (phrase, objs)
        return hits[0]
    if q.startswith("What color is "):
        return find(q[len("What color is "):-1])["color"]
    if q.startswith("What shape is "):
        return find(q[len("What shape is "):-1])["shape"]
    if q == "How many objects are there?":
        return str(len(objs))
    if q.startswith("How many "):
        word = q.split()[2]
        return str(sum(word in (o["color"], o["shape"] + "s") for o in objs))
    if q.startswith("Where is "):
        return find(q[len("Where is "):-1])["position"]
    if q.endswith(" small or large?"):
        return find(q[len("Is "):-len(" small or large?")])["size"]
    if q.startswith("Is there a "):
        color, shape = q[len("Is there a "):-1].split()
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in objs) else "no"
    for word, test in (("to the left of", lambda a, b: a["col"] < b["col"]), ("to the right of", lambda a, b: a["col"] > b["col"]),
                       ("above", lambda a, b: a["row"] < b["row"]), ("below", lambda a, b: a["row"] > b["row"])):
        if f" {word} " in q:
            a, b = q[len("Is "):-1].split(f" {word} ")
            return "yes" if test(find(a), find(b)) else "no"
    raise AssertionError(f"unknown question {q!r}")


def test_rule_teacher_answers_agree_with_the_annotations(world):
    scenes = {s["image"]: s for s in load(world, "scenes.json")}
    checked = 0
    for record in load(world, "eval.json") + load(world, "instruct.json"):
        if record.get("format") == "choice" or record.get("type") not in (None, "vqa"):
            continue
        turns = record["conversations"]
        for q, a in zip(turns[0::2], turns[1::2]):
            assert truth(scenes[record["image"]], q["value"].replace("<image>\n", "")) == a["value"], record["id"]
            checked += 1
    assert checked > 500


def test_box_and_counts_in_scenes(world):
    for s in load(world, "scenes.json"):
        assert 1 <= len(s["objects"]) <= 4 and len(s["captions"]) >= 3
        cells = {(o["row"], o["col"]) for o in s["objects"]}
        assert len(cells) == len(s["objects"])  # distinct cells: positions are unambiguous
        for o in s["objects"]:
            x1, y1, x2, y2 = o["box"]
            cell = s["size"] / 3
            assert o["col"] * cell <= (x1 + x2) / 2 < (o["col"] + 1) * cell and o["row"] * cell <= (y1 + y2) / 2 < (o["row"] + 1) * cell


def test_splits_formats_and_balance(world):
    train_images = {r["image"] for r in load(world, "pretrain.json")}
    eval_records = load(world, "eval.json")
    assert train_images.isdisjoint(r["image"] for r in eval_records)
    assert all(r["image"].startswith("train/") for r in load(world, "instruct.json"))
    short = [r for r in eval_records if r["format"] == "short"]
    assert {r["question_type"] for r in short} == {"color", "shape", "count", "position", "size", "exists", "reasoning"}
    yes_no = [r["answer"] for r in short if r["answer"] in ("yes", "no")]
    assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    for r in eval_records:
        if r["format"] == "choice":
            assert r["answer"] in "ABC" and "Answer with the option's letter" in r["conversations"][0]["value"]
        else:
            assert r["conversations"][0]["value"].endswith("Answer the question using a single word or phrase.")
    assert {r["type"] for r in load(world, "instruct.json")} == {"vqa", "conversation", "detail", "complex", "choice"}
    assert (world / "corpus.txt").read_text().count("\n") > 300


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 2)):
        gen_data.build_world(tmp_path / name, num_images=40, num_eval=10, seed=seed, workers=workers)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_malformed_coco_files_name_file_and_entry(tmp_path):
    caps = {"images": [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}],
            "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 9, "caption": "lost"}]}
    inst = {"images": caps["images"], "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}]}
    (tmp_path / "c.json").write_text(json.dumps(caps))
    (tmp_path / "i.json").write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=r"c.json: annotations\[1\]"):
        gen_data.read_coco(tmp_path / "c.json", tmp_path / "i.json")
    caps["annotations"].pop()
    (tmp_path / "c.json").write_text(json.dumps(caps))
    assert gen_data.read_coco(tmp_path / "c.json", tmp_path / "i.json") == [
        ("1.jpg", ["a cat"], [("cat", [0.1, 0.2, 0.4, 0.6])])]
    (tmp_path / "i.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="i.json: not a COCO annotation file"):
        gen_data.read_coco(tmp_path / "c.json", tmp_path / "i.json")
