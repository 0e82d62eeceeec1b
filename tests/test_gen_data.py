"""gen_data's GPT-assisted path (paper Sec. 3): the OpenAI-compatible teacher against a fake server on
127.0.0.1, resuming, the key's secrecy, parsing good and bad responses, and COCO-style inputs."""
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import gen_data
from llava_min.cli import run
from llava_min.errors import DataError, InputError, OptionError, TeacherError
from llava_min.data.gpt_data import (SYSTEM, MalformedResponse, build_messages, context_text, parse_response, read_coco,
                                response_type)
from llava_min.data.teacher import ChatClient, FatalTeacherError, Unreachable, run_requests
from llava_min.toy.build import build_world

KEY = "sk-test-SECRET-4711"


def qa_text(context: str) -> str:
    return f"Question:\nWhat is in {context.splitlines()[0]}?\n===\nAnswer:\nSomething."


class FakeOpenAI:
    """/v1/chat/completions on 127.0.0.1. Each new context is answered 429 (Retry-After: 0), then 500, then
    `respond(body)`; after `die_after` successes every request gets 400 (a crash mid-run)."""

    def __init__(self, respond=None, die_after=None, fail_first=True, status=None):
        self.bodies, self.attempts, self.successes, self.auth = [], {}, {}, set()
        self.respond, self.die_after, self.fail_first, self.status = respond, die_after, fail_first, status
        self.lock, fake = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload, headers = fake.answer(body, self.headers.get("Authorization"))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def answer(self, body, auth):
        context = body["messages"][-1]["content"]
        with self.lock:
            self.auth.add(auth)
            n = self.attempts[context] = self.attempts.get(context, 0) + 1
            if self.status:
                return self.status, {"error": {"message": f"Incorrect API key provided: {auth}"}}, {}
            if self.die_after is not None and sum(self.successes.values()) >= self.die_after:
                return 400, {"error": "gone"}, {}
            if self.fail_first and n == 1:
                return 429, {"error": "slow down"}, {"Retry-After": "0"}
            if self.fail_first and n == 2:
                return 500, {"error": "oops"}, {}
            self.successes[context] = self.successes.get(context, 0) + 1
            self.bodies.append(body)
        text = (self.respond or (lambda b: qa_text(b["messages"][-1]["content"])))(body)
        if isinstance(text, bytes):
            return 200, text, {}
        return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}, {}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    servers = []

    def start(**kw):
        servers.append(FakeOpenAI(**kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


@pytest.fixture
def requests():
    return [(f"img{i}|conversation", build_messages("conversation", [f"caption {i}", "another"]), None)
            for i in range(6)]


def test_request_holds_prompt_retries_and_key(monkeypatch, tmp_path, requests, capsys, fake):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = fake()
    client = ChatClient(server.url, "teacher-model", backoff=0.01)
    counts = run_requests(requests, client, tmp_path / "responses.jsonl", workers=3)
    assert counts == {"skipped": 0, "answered": 6, "failed": 0}
    assert all(n == 3 for n in server.attempts.values())  # 429, then 500, then success
    body = server.bodies[0]
    roles = [m["role"] for m in body["messages"]]
    assert body["model"] == "teacher-model" and roles[0] == "system" and body["messages"][0]["content"] == SYSTEM[
        "conversation"]
    assert roles[1:-1] == ["user", "assistant"] * ((len(roles) - 2) // 2) and roles[-1] == "user"  # few-shot pairs
    assert "Question:" in body["messages"][2]["content"]  # a few-shot response
    assert body["messages"][-1]["content"].startswith("caption")
    assert server.auth == {f"Bearer {KEY}"}
    assert KEY not in (tmp_path / "responses.jsonl").read_text() and KEY not in repr(client) + str(vars(client))
    assert KEY not in "".join(capsys.readouterr())


def test_backoff_respects_retry_after():
    client = ChatClient("http://127.0.0.1:9/v1", "m", backoff=1.0, max_backoff=30.0)
    assert client.delay(3, "2") == 2.0 and client.delay(0, "999") == 30.0  # the server's wish, capped
    for attempt, retry_after in ((0, None), (3, None), (2, "Wed, 21 Oct 2015 07:28:00 GMT")):
        assert 0.5 * 2 ** attempt <= client.delay(attempt, retry_after) <= 2 ** attempt  # exponential, jittered
    assert len({client.delay(4, None) for _ in range(20)}) > 1


def test_killed_run_resumes_without_redoing_or_losing(tmp_path, requests, fake):
    out = tmp_path / "responses.jsonl"
    first = fake(die_after=2)
    counts = run_requests(requests, ChatClient(first.url, "m", backoff=0.01, max_retries=2), out, workers=1)
    assert counts["answered"] == 2 and counts["failed"] == 4
    with open(out, "a") as f:
        f.write('{"key": "torn')  # a line cut short by the crash
    second = fake()
    client, lines_seen = ChatClient(second.url, "m", backoff=0.01), []

    def teacher(messages, meta):
        lines_seen.append(len(out.read_text().splitlines()))
        return client(messages)
    counts = run_requests(requests, teacher, out, workers=1)
    assert counts == {"skipped": 2, "answered": 4, "failed": 0}
    assert lines_seen[-1] >= 4  # answers are on disk (flushed) as they arrive, not at the end
    assert len(second.successes) == 4  # the two finished contexts were not asked again
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]  # the torn line is gone
    assert sorted(keys) == sorted(k for k, _, _ in requests)


def test_stop_flag_then_rerun_asks_each_context_once(tmp_path, requests, fake):
    server, out, stop, lock = fake(fail_first=False), tmp_path / "responses.jsonl", threading.Event(), threading.Lock()
    client, answered = ChatClient(server.url, "m"), []

    def teacher(messages, meta):
        text = client(messages)
        with lock:
            answered.append(1)
            if len(answered) == 2:
                stop.set()  # e.g. Ctrl-C: nothing new is sent, what is in flight is still written
        return text
    first = run_requests(requests, teacher, out, workers=2, stop=stop)
    assert 2 <= first["answered"] < len(requests)
    second = run_requests(requests, client, out, workers=2)
    assert second["skipped"] == first["answered"] and second["answered"] == len(requests) - first["answered"]
    assert sorted(server.successes.values()) == [1] * len(requests)
    assert len(out.read_text().splitlines()) == len(requests)


def test_malformed_reply_body_is_counted_not_fatal(tmp_path, requests, fake, capsys):
    bad = requests[2][1][-1]["content"]
    server = fake(fail_first=False, respond=lambda b: b"not json" if b["messages"][-1]["content"] == bad else qa_text(
        b["messages"][-1]["content"]))
    counts = run_requests(requests, ChatClient(server.url, "m"), tmp_path / "r.jsonl", workers=2)
    assert counts == {"skipped": 0, "answered": 5, "failed": 1}
    assert "malformed reply" in capsys.readouterr().out


def test_requests_with_one_key_twice_are_refused(tmp_path, requests):
    with pytest.raises(ValueError, match="requests repeat a key: 'img1|conversation'"):
        run_requests(requests + [requests[1]], lambda messages, meta: "unused", tmp_path / "r.jsonl")


def test_refused_key_stops_the_run_and_is_not_echoed(monkeypatch, tmp_path, requests, fake, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = fake(status=401)  # the error body repeats the key, as some servers do
    with pytest.raises(FatalTeacherError) as err:
        run_requests(requests, ChatClient(server.url, "m"), tmp_path / "r.jsonl", workers=2)
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value) and "[redacted]" in str(err.value)
    assert len(server.attempts) <= 4  # stopped early: no request after the refusal is sent
    assert KEY not in "".join(capsys.readouterr())


def test_an_error_body_cut_in_the_middle_of_the_key_shows_none_of_it(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    client = ChatClient("http://127.0.0.1:9/v1", "m")
    assert client.redact(f"bad key {KEY}, retry", cut=True) == "bad key [redacted], retry"
    assert client.redact("bad key " + KEY[:9], cut=True) == "bad key [redacted]"  # the read stopped inside it


def test_key_with_a_line_end_is_trimmed_and_one_with_a_control_character_refused_unshown(monkeypatch, tmp_path,
                                                                                        requests, fake, capsys):
    server = fake(fail_first=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\r\n")  # a line of a CRLF .env file
    assert run_requests(requests[:2], ChatClient(server.url, "m"), tmp_path / "a.jsonl", workers=1)["answered"] == 2
    assert server.auth == {f"Bearer {KEY}"}
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\rX")  # http.client's error would quote the header
    with pytest.raises(FatalTeacherError) as err:
        run_requests(requests, ChatClient(server.url, "m"), tmp_path / "b.jsonl", workers=1)
    assert "OPENAI_API_KEY" in str(err.value) and KEY not in str(err.value)
    assert KEY not in "".join(capsys.readouterr())


# ---------------------------------------------------------------- prompts and parsing

def test_context_and_messages():
    assert context_text(["a cat"], [("cat", [0.1, 0.2, 0.30001, 0.4])]) == "a cat\n\ncat: [0.100, 0.200, 0.300, 0.400]"
    for rtype in ("conversation", "detail", "complex"):
        messages = build_messages(rtype, ["a cat on a mat"], [("cat", [0, 0, 1, 1])])
        assert response_type(messages) == rtype and messages[-1]["content"].startswith("a cat on a mat")
        assert ("cat: [0.000, 0.000, 1.000, 1.000]" in messages[-1]["content"]) == (rtype != "conversation")
        assert len(messages) >= 4 and [m["role"] for m in messages[1:3]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="unknown system message"):
        response_type([{"role": "system", "content": "hi"}])


def test_parsing_good_responses():
    rng = random.Random(0)
    text = "Question:\nA?\n===\nAnswer:\nB.\n===\nQuestion:\nC?\n===\nAnswer:\nD.\n"
    turns = parse_response("conversation", text, rng)
    assert [(t["from"], t["value"]) for t in turns] == [("human", "<image>\nA?"), ("gpt", "B."), ("human", "C?"),
                                                         ("gpt", "D.")]
    turns = parse_response("complex", "Question:\nWhy?\n===\nAnswer:\nBecause\nof this.", rng)
    assert [t["value"] for t in turns] == ["<image>\nWhy?", "Because\nof this."]
    turns = parse_response("detail", "  One  paragraph\nhere.  ", rng)
    assert turns[0]["value"].startswith("<image>\n") and turns[1]["value"] == "One paragraph here."


@pytest.mark.parametrize("rtype,bad", [
    ("conversation", "Question:\nA?"), ("conversation", "no format at all"), ("conversation", ""),
    ("conversation", "Answer:\nB\n===\nQuestion:\nA?"), ("conversation", "Question:\n\n===\nAnswer:\nB"),
    ("detail", ""), ("detail", "Question:\nA\n===\nAnswer:\nB"), ("detail", "A cat at [0.120, 0.400, 0.5, 0.9]."),
    ("complex", "Question:\nA\n===\nAnswer:\nB\n===\nQuestion:\nC\n===\nAnswer:\nD"), ("complex", None),
    # separators dropped after the first exchange: the rest would hide inside the first answer
    ("conversation", "Question:\nA?\n===\nAnswer:\nB.\nQuestion:\nC?\nAnswer:\nD."),
    ("complex", "Question:\nWhy?\n===\nAnswer:\nBecause.\n\nQuestion:\nAnother?\n\nAnswer:\nMore."),
    ("complex", "Question:\nWhy wait?\n===\nAnswer:\nThe light at [0.862, 0.080, 0.911, 0.297] is red.")])
def test_parsing_malformed_responses(rtype, bad):
    with pytest.raises(MalformedResponse):
        parse_response(rtype, bad, random.Random(0))


# ---------------------------------------------------------------- COCO-style annotations

def coco_files(tmp_path, caps=None, inst=None):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 100, "height": 50} for i in (1, 2, 3)]
    caps = caps or {"images": images, "annotations": [{"image_id": i, "caption": f"Picture {i} with a  cat."}
                                                      for i in (1, 2, 3) for _ in range(2)]}
    inst = inst or {"images": images, "categories": [{"id": 7, "name": "cat"}],
                    "annotations": [{"image_id": i, "category_id": 7, "bbox": [10, 5, 30, 20]} for i in (1, 2, 3)]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    return tmp_path / "captions.json", tmp_path / "instances.json"


def test_read_coco(tmp_path):
    contexts = read_coco(*coco_files(tmp_path))
    assert [c.image for c in contexts] == ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]
    assert contexts[0].captions == ["Picture 1 with a cat."] * 2
    assert contexts[0].boxes == [("cat", [0.1, 0.1, 0.4, 0.5])]


@pytest.mark.parametrize("which,break_it,message", [
    ("caps", lambda c: c["annotations"].append({"image_id": 9, "caption": "lost"}), r"captions.json: annotations\[6\]"),
    ("caps", lambda c: c["images"][1].pop("width"), r"captions.json: images\[1\]"),
    ("inst", lambda i: i["annotations"][2].update(bbox=[1, 2, 3]), r"instances.json: annotations\[2\]"),
    ("inst", lambda i: i["annotations"][0].update(category_id=99), r"instances.json: annotations\[0\]"),
    ("inst", lambda i: i["categories"][0].pop("name"), r"instances.json: categories\[0\]"),
    ("inst", lambda i: i.pop("categories"), "instances.json: top level is not a COCO annotation file"),
    ("caps", lambda c: c["images"][2].update(file_name="../../etc/passwd"), r"images\[2\] file_name .* leaves"),
    ("caps", lambda c: c["images"][0].update(file_name="/abs/x.jpg"), r"images\[0\] file_name .* leaves"),
    ("caps", lambda c: c["images"][2].update(file_name="000000000001.jpg"), r"images\[2\] repeats .* images\[0\]"),
    ("caps", lambda c: c["images"][2].update(file_name="000000000001.png"), r"images\[2\] .* gives the record id"),
    ("caps", lambda c: c["images"][2].update(id=1), r"images\[2\] repeats the id 1"),
    ("caps", lambda c: c["images"][2].update(file_name="."), r"images\[2\] file_name '.' names no file"),
    ("caps", lambda c: c["images"][2].update(file_name="train2017/"), r"images\[2\] file_name .* names no file"),
    ("caps", lambda c: c["annotations"][0].update(image_id=[1]), r"captions.json: annotations\[0\]"),
    ("caps", lambda c: c["annotations"][0].update(caption="<image> a cat"), r"annotations\[0\] holds the <image>"),
    ("inst", lambda i: i["categories"].append({"id": 7, "name": "dog"}), r"categories\[1\] repeats the id 7"),
    ("inst", lambda i: i["annotations"][1].update(bbox=[float("nan"), 2, 3, 4]), r"annotations\[1\] .* finite bbox"),
])
def test_malformed_coco_names_file_and_entry(tmp_path, which, break_it, message):
    caps_file, inst_file = coco_files(tmp_path)
    data = json.loads((caps_file if which == "caps" else inst_file).read_text())
    break_it(data)
    (caps_file if which == "caps" else inst_file).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        read_coco(caps_file, inst_file)


def test_coco_boxes_wholly_outside_and_empty_captions_are_left_out(tmp_path):
    caps_file, inst_file = coco_files(tmp_path)
    caps, inst = json.loads(caps_file.read_text()), json.loads(inst_file.read_text())
    caps["annotations"][0]["caption"] = "   "
    inst["annotations"].append({"image_id": 1, "category_id": 7, "bbox": [150, 60, 10, 10]})  # past the corner
    caps_file.write_text(json.dumps(caps))
    inst_file.write_text(json.dumps(inst))
    first = read_coco(caps_file, inst_file)[0]
    assert first.captions == ["Picture 1 with a cat."] and first.boxes == [("cat", [0.1, 0.1, 0.4, 0.5])]


def test_unreadable_coco_names_file(tmp_path):
    caps_file, inst_file = coco_files(tmp_path)
    caps_file.write_text("{not json")
    with pytest.raises(ValueError, match="captions.json: cannot read it as JSON"):
        read_coco(caps_file, inst_file)


def teacher_text(body) -> str:
    rtype, context = response_type(body["messages"]), body["messages"][-1]["content"]
    if "Picture 2" in context and rtype == "conversation":
        return "I would rather not follow the format."  # malformed: counted and skipped
    if rtype == "detail":
        return f"A cat sits in the picture. {context.splitlines()[0]}"
    return qa_text(context)


def test_coco_pipeline_end_to_end_and_rerun(monkeypatch, tmp_path, fake, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = fake(respond=teacher_text, fail_first=False)  # retries are tested above
    caps_file, inst_file = coco_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--coco-captions", str(caps_file), "--coco-instances", str(inst_file), "--teacher", "openai",
            "--api-base", server.url, "--model", "m", "--out", str(out), "--workers", "2"]
    counts = gen_data.main(argv)
    assert counts["records"] == 8 and counts["malformed"] == 1 and counts["answered"] == 9
    records = json.loads((out / "instruct.json").read_text())
    assert sorted(r["type"] for r in records) == ["complex"] * 3 + ["conversation"] * 2 + ["detail"] * 3
    assert all(r["conversations"][0]["value"].startswith("<image>\n") and r["image"].endswith(".jpg") for r in records)
    detail = next(r for r in records if r["type"] == "detail")
    assert detail["conversations"][1]["value"].startswith("A cat sits")
    boxes = [b for b in server.bodies if response_type(b["messages"]) == "complex"][0]["messages"][-1]["content"]
    assert "cat: [0.100, 0.100, 0.400, 0.500]" in boxes
    first = (out / "instruct.json").read_bytes()
    attempts = dict(server.attempts)
    again = gen_data.main(argv)  # a rerun: everything is done, nothing is asked again
    assert again["skipped"] == 9 and again["answered"] == 0 and server.attempts == attempts
    assert (out / "instruct.json").read_bytes() == first
    assert len(json.loads((out / "pretrain.json").read_text())) == 3
    for f in out.rglob("*"):
        assert KEY not in f.read_text()
    assert KEY not in "".join(capsys.readouterr())


def test_cli_reports_bad_annotations_without_traceback(tmp_path):
    caps_file, inst_file = coco_files(tmp_path)
    inst_file.write_text(json.dumps({"images": [], "annotations": [{"image_id": 5}], "categories": []}))
    argv = ["--out", str(tmp_path / "o"), "--coco-captions", str(caps_file), "--coco-instances", str(inst_file),
            "--teacher", "openai", "--api-base", "http://127.0.0.1:9/v1"]
    with pytest.raises(DataError, match=r"instances.json: annotations\[0\]"):
        gen_data.main(argv)  # raised where it is found, before any request
    with pytest.raises(SystemExit, match=r"error: .*instances.json: annotations\[0\]"):
        run(lambda: gen_data.main(argv))  # and made one line by the command line's top


def test_cli_refuses_mismatched_teacher(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gen_data.main(["--out", str(tmp_path), "--teacher", "openai"])  # the world uses the rule teacher
    caps_file, inst_file = coco_files(tmp_path)
    with pytest.raises(SystemExit) as stop:  # an argparse error, before anything is read
        gen_data.main(["--out", str(tmp_path), "--coco-captions", str(caps_file), "--coco-instances", str(inst_file)])
    assert stop.value.code == 2 and "rule teacher knows only the synthetic world" in capsys.readouterr().err


def raw_reply(content, finish_reason="stop") -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}, "finish_reason": finish_reason}]}).encode()


def test_replies_cut_short_or_not_unicode_are_failures_the_run_survives(tmp_path, requests, fake, capsys):
    cut, lone = requests[1][1][-1]["content"], requests[2][1][-1]["content"]

    def respond(body):
        context = body["messages"][-1]["content"]
        if context == cut:
            return raw_reply("The cat is sitting on the", finish_reason="length")
        if context == lone:
            return b'{"choices": [{"message": {"content": "bad \\ud800 text"}}]}'  # valid JSON, no valid UTF-8
        return raw_reply(qa_text(context))
    server = fake(respond=respond, fail_first=False)
    counts = run_requests(requests, ChatClient(server.url, "m"), tmp_path / "r.jsonl", workers=2)
    assert counts["answered"] == len(requests) - 2 and counts["failed"] == 2
    said = capsys.readouterr().out
    assert "cut off at the token limit" in said and "not valid Unicode" in said


def test_a_redirect_is_not_followed_with_the_key(monkeypatch, tmp_path, requests):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    seen = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
        do_POST = do_GET
    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    threading.Thread(target=other.serve_forever, daemon=True).start()

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with pytest.raises(FatalTeacherError, match="HTTP 302 redirected to .*/steal, not followed"):
        ChatClient(f"http://127.0.0.1:{server.server_port}/v1", "m")(requests[0][1])
    server.shutdown(), other.shutdown()
    assert seen == []


def test_no_quota_stops_at_once_and_a_key_echoed_in_a_reply_is_not_written(monkeypatch, tmp_path, requests, fake):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = fake(status=429)
    server.answer = lambda body, auth: (429, {"error": {"code": "insufficient_quota"}}, {"Retry-After": "0"})
    with pytest.raises(FatalTeacherError, match="insufficient_quota"):
        ChatClient(server.url, "m", backoff=0)(requests[0][1])
    echo = fake(respond=lambda body: f"Question:\nWho?\n===\nAnswer:\nBearer {KEY}", fail_first=False)
    run_requests(requests[:1], ChatClient(echo.url, "m"), tmp_path / "r.jsonl")
    assert KEY not in (tmp_path / "r.jsonl").read_text() and "[redacted]" in (tmp_path / "r.jsonl").read_text()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-pasted\u2026")
    with pytest.raises(FatalTeacherError, match="non-ASCII characters \\(not shown\\)"):
        ChatClient(echo.url, "m")(requests[0][1])


def test_answers_to_another_question_or_of_another_teacher_are_not_mixed_in(tmp_path, requests, fake):
    server = fake(fail_first=False)
    out = tmp_path / "r.jsonl"
    run_requests(requests[:3], ChatClient(server.url, "model-a"), out)
    with pytest.raises(ValueError, match="3 answer\\(s\\) were asked .* of another teacher .*model-a at"):
        run_requests(requests, ChatClient(server.url, "model-b"), out)
    changed = [(k, build_messages("conversation", ["other captions"]), m) for k, _, m in requests]
    with pytest.raises(ValueError, match="another question"):
        run_requests(changed, ChatClient(server.url, "model-a"), out)
    assert run_requests(requests, ChatClient(server.url, "model-a"), out)["skipped"] == 3
    out.write_bytes(out.read_bytes() + b'{"key": "x", "response": "\xff"}\n')
    with pytest.raises(ValueError, match="r.jsonl, line 7: not UTF-8"):
        run_requests(requests, ChatClient(server.url, "model-a"), out)


def test_an_answer_recorded_without_its_request_digest_is_refused_naming_the_line(tmp_path, requests, fake):
    server = fake(fail_first=False)
    out = tmp_path / "r.jsonl"
    run_requests(requests[:2], ChatClient(server.url, "model-a"), out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    del rows[1]["request"]  # as responses files were written before digests were kept
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = dict(server.attempts)
    with pytest.raises(InputError, match="r.jsonl, line 2: an answer without the digest of its request"):
        run_requests(requests, ChatClient(server.url, "model-a"), out)
    assert server.attempts == asked  # refused before anything is asked


def test_a_bug_in_the_teacher_is_not_counted_as_a_failed_request(tmp_path, requests):
    def teacher(messages, meta):
        raise TypeError("a bug, not a failed request")
    with pytest.raises(TypeError, match="a bug, not a failed request"):
        run_requests(requests, teacher, tmp_path / "r.jsonl", workers=2)


def test_an_api_base_urllib_cannot_send_to_is_an_option_error():
    for url in ("api.openai.com/v1", "http://a host/v1", "http://localhost:port/v1"):
        with pytest.raises(OptionError, match=f"--api-base '{url}' is not an http:// or https:// URL"):
            ChatClient(url, "m")
    assert ChatClient("http://[::1]:8080/v1", "m").url == "http://[::1]:8080/v1/chat/completions"


def test_one_run_per_output_directory(tmp_path, monkeypatch):
    import os
    lock = tmp_path.with_name(f".{tmp_path.name}.lock")  # beside the directory it guards
    lock.write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(InputError, match="another run \\(pid \\d+\\) is writing"):
        build_world(tmp_path, num_images=4, num_eval=2, image_size=32, workers=1, progress=False)
    lock.write_text(str(os.getpid()))  # our own pid: a restarted container's killed run
    build_world(tmp_path, num_images=4, num_eval=2, image_size=32, workers=1, progress=False)
    assert (tmp_path / "eval.json").is_file() and not lock.exists()


def test_bad_world_flags_and_a_run_with_nothing_to_train_on_exit_nonzero(tmp_path, monkeypatch, fake):
    with pytest.raises(OptionError, match="need at least one training image"):
        gen_data.main(["--out", str(tmp_path / "w"), "--num-images", "0"])
    server = fake(status=400)  # every request fails: no record to train on
    caps_file, inst_file = coco_files(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "instruct.json").write_text("[]")  # an earlier run's: not the answers to this run's requests
    with pytest.raises(TeacherError, match="9 of 9 requests to .* failed .* rerun to retry them"):
        gen_data.main(["--coco-captions", str(caps_file), "--coco-instances", str(inst_file), "--teacher", "openai",
                       "--api-base", server.url, "--model", "m", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "instruct.json").exists()  # its presence would mean done


def test_ctrl_c_sends_nothing_more_than_what_is_in_flight(tmp_path, requests, monkeypatch):
    import llava_min.data.teacher as gd
    sent, real_wait, calls, cancelled = [], gd.wait, [], threading.Event()

    def teacher(messages, meta):
        sent.append(messages[-1]["content"])
        cancelled.wait(10)  # in flight until the queued request has been cancelled (however slow the machine)
        return "Question:\nQ?\n===\nAnswer:\nA."

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        cancelled.set()  # (the loop waits again only after cancelling what had not started)
        return real_wait(*args, **kwargs)
    monkeypatch.setattr(gd, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        run_requests(requests, teacher, tmp_path / "r.jsonl", workers=1)  # 2 submitted: 1 running, 1 queued
    assert len(sent) == 1 and len((tmp_path / "r.jsonl").read_text().splitlines()) == 1  # the one in flight is kept


def closed_port() -> int:
    """A local port nothing listens on (bound, then closed): a refused connection, offline."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_endpoint_that_does_not_answer_is_named_at_once_and_nothing_looks_finished(monkeypatch, tmp_path):
    import llava_min.data.teacher as teacher
    naps = []
    monkeypatch.setattr(teacher.time, "sleep", naps.append)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    caps_file, inst_file = coco_files(tmp_path)
    out = tmp_path / "out"
    argv = ["--coco-captions", caps_file, "--coco-instances", inst_file, "--teacher", "openai", "--api-base", url,
            "--out", out]
    with pytest.raises(SystemExit, match=f"error: {url}/chat/completions did not answer: connection refused "
                                         r"\(3 attempts\); check --api-base") as stop:
        run(lambda: gen_data.main([str(a) for a in argv]))
    assert KEY not in str(stop.value) and len(naps) == 2 and sum(naps) <= 3  # a few short waits, not minutes
    assert not (out / "instruct.json").exists() and not (out / "responses.jsonl").exists()
    with pytest.raises(Unreachable, match="connection refused"):  # a request, not only the first check
        ChatClient(url, "m")([{"role": "user", "content": "hi"}])


def test_a_server_that_takes_the_connection_but_never_replies_times_out(monkeypatch):
    import socket
    import llava_min.data.teacher as teacher
    monkeypatch.setattr(teacher.time, "sleep", lambda s: None)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections queue in the backlog; nothing is ever read or answered
        client = ChatClient(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m", timeout=0.2)
        with pytest.raises(Unreachable, match="did not answer: timed out"):
            client([{"role": "user", "content": "hi"}])


def test_why_a_request_got_no_reply_is_said_in_words():
    import socket
    import urllib.error
    from llava_min.data.teacher import why_unanswered
    assert why_unanswered(urllib.error.URLError(ConnectionRefusedError(111, "refused"))) == "connection refused"
    dns = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    assert why_unanswered(dns) == "the host name did not resolve (Name or service not known)"
    assert why_unanswered(TimeoutError("timed out")) == "timed out"


def test_an_endpoint_that_fails_every_few_requests_is_retried_not_stopped(tmp_path, requests, fake):
    server = fake()  # 429 then 500 for each request: a reply, so the run goes on
    client = ChatClient(server.url, "m", backoff=0)
    client.check_reachable()  # its GET is answered 501: an answer all the same
    assert run_requests(requests[:2], client, tmp_path / "r.jsonl", workers=1)["answered"] == 2
