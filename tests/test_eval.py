"""Answer checking and scoring on hand-made cases; the LLaVA-Bench judge against a fake local server;
batched left-padded answers equal one-by-one answers."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llava_min.eval import score as ev
from llava_min.eval import llava_bench as lb
from llava_min.eval.answer import answer
from llava_min.data.teacher import ChatClient


@pytest.mark.parametrize("pred,answer,ok", [
    ("Red", "red", True), ("red.", "red", True), ("The red one", "red one", True), ("two", "2", True),
    ("Two.", "2", True), ("none", "0", True), ("3.5", "3.5", True), ("top left", "top left", True),
    ("top-left", "top left", True), ("blue", "red", False), ("2 circles", "2", False), ("yes", "no", False),
    ("1,000", "1000", True), ("red, blue", "red blue", True), ("eleven", "11", False),  # VQA's map stops at ten
])
def test_short_answer_normalization(pred, answer, ok):
    assert ev.is_correct({"format": "short", "answer": answer}, pred) is ok


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("B.", None), ("A.B", None), ("B. blue", "B"), ("The answer is C.", "C"), (" A ", "A"),
    ("D", None), ("b", None), ("I think it is B", None), ("The answer is A. The answer is B.", None), ("", None),
])
def test_scienceqa_choice_parsing(text, letter):
    assert ev.parse_choice(text, 3) == letter


GOOD = {"id": "eval-1", "format": "short", "answer": "red", "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color?"}]}


@pytest.mark.parametrize("change,named", [
    ({"format": "choice"}, "missing choices"), ({"answer": 3}, "answer is a int"), ({"format": "shortt"}, "format"),
    ({"format": "choice", "choices": 3}, "choices is a int"),
    ({"format": "choice", "choices": ["x"]}, "choices must be a list of at least two"), ({"conversations": []}, "must start with"),
    ({"conversations": "What?"}, "conversations is a str"), ({"image": None}, "bad image field None"),
    ({"image": "gone.png"}, "gone.png does not exist"), ({"image": "../a.png"}, "outside")])
def test_a_bad_record_is_named_before_any_answer(tmp_path, change, named):
    import json
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "eval.json").write_text(json.dumps([GOOD, {**GOOD, "id": "eval-2", **change}]))
    with pytest.raises(ValueError, match=f"eval.json: record eval-2: .*{named}"):
        ev.evaluate(None, None, tmp_path / "eval.json", tmp_path)  # no model needed: it stops first


def test_score_per_type():
    records = [{"format": "short", "question_type": "color", "answer": "red"},
               {"format": "short", "question_type": "color", "answer": "blue"},
               {"format": "short", "question_type": "count", "answer": "2"},
               {"format": "choice", "question_type": "shape", "answer": "A", "choices": ["x", "y"]}]
    scores = ev.score(records, ["red", "green", "two", "The answer is A."])
    assert scores["short"]["overall"] == {"accuracy": 66.67, "n": 3}
    assert scores["short"]["color"] == {"accuracy": 50.0, "n": 2} and scores["short"]["count"]["accuracy"] == 100.0
    assert scores["choice"]["overall"] == {"accuracy": 100.0, "n": 1}


def test_judge_request_and_relative_scores():
    messages = lb.judge_messages("A cat on a mat.", "Where is the cat?", "On the mat.", "On a mat.")
    user = messages[-1]["content"]
    for part in ("[Context]\nA cat on a mat.", "[Question]\nWhere is the cat?", "[Assistant 1]\nOn the mat.",
                 "[Assistant 2]\nOn a mat.", "[System]"):
        assert part in user
    assert user.index("[Assistant 1]") < user.index("[Assistant 2]")
    assert lb.parse_scores("8 6\nbecause") == [8.0, 6.0] and lb.parse_scores("8, 7.5") == [8.0, 7.5]
    assert lb.parse_scores("Assistant 1 is better") is None and lb.parse_scores("") is None
    rel = lb.relative_scores([("conv", [8, 6]), ("conv", [10, 9]), ("detail", [5, 5])])
    assert rel["conv"]["relative"] == round(100 * 15 / 18, 1) and rel["detail"]["relative"] == 100.0
    assert rel["all"]["n"] == 3


class FakeJudge:
    def __init__(self, replies):
        self.replies, self.seen = list(replies), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.seen.append(body["messages"][-1]["content"])
                reply = judge.replies.pop(0)  # a text, or an HTTP error code
                data = json.dumps({"choices": [{"message": {"content": reply}}]} if isinstance(reply, str)
                                  else {"error": "bad request"}).encode()
                self.send_response(200 if isinstance(reply, str) else reply)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"


def test_llava_bench_with_a_fake_judge(chat_model, tmp_path):
    import numpy as np
    from PIL import Image
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    bench = [{"id": f"q{i}", "image": "x.png", "category": cat, "context": "A black square.", "question": "What is it?",
              "reference": "A black square."} for i, cat in enumerate(["conv", "conv", "detail", "detail", "detail"])]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    # unparseable, out of the 1-10 scale, and a failed request: counted, not scored, and the run goes on
    judge = FakeJudge(["8 4\nok", "10 6\nok", "no scores here", "nan 5", 400])
    model, tok = ev_model(chat_model)
    out = lb.llava_bench(model, tok, tmp_path / "bench.json", tmp_path, ChatClient(judge.url, "judge", backoff=0),
                         max_new_tokens=5)
    assert out["llava_bench"]["conv"]["relative"] == 55.6
    assert out["unparsed_verdicts"] == 2 and out["failed_judgements"] == 1  # a failed request is no verdict
    assert "detail" not in out["llava_bench"]
    assert all("[Assistant 2]\n" + a["answer"] in seen for a, seen in zip(out["answers"], judge.seen))
    del bench[1]["reference"]  # a bad item: named before any answer is generated or any judge paid
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    asked = len(judge.seen)
    with pytest.raises(ValueError, match="bench.json: record q1: missing reference"):
        lb.llava_bench(model, tok, tmp_path / "bench.json", tmp_path, ChatClient(judge.url, "judge", backoff=0))
    assert len(judge.seen) == asked
    judge.server.shutdown()


def test_a_judge_that_answers_nothing_gives_no_scores_and_one_that_does_not_answer_stops_before_any(
        chat_model, tmp_path, monkeypatch):
    import numpy as np
    import socket
    from PIL import Image
    import llava_min.data.teacher as teacher
    from llava_min.cli import run
    from llava_min.errors import TeacherError
    from llava_min.eval.__main__ import main
    monkeypatch.setattr(teacher.time, "sleep", lambda s: None)
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    bench = [{"id": f"q{i}", "image": "x.png", "category": "conv", "context": "A black square.", "question": "What?",
              "reference": "A black square."} for i in range(2)]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    judge = FakeJudge([400, 400])  # every judgement fails: no score of 0 items, an error
    model, tok = ev_model(chat_model)
    with pytest.raises(TeacherError, match="bench.json: no item was scored \\(2 judge requests failed"):
        lb.llava_bench(model, tok, tmp_path / "bench.json", tmp_path, ChatClient(judge.url, "j", backoff=0),
                       max_new_tokens=2)
    judge.server.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed when the block ends: refused
    loaded = []
    monkeypatch.setattr("llava_min.eval.__main__.load_model", lambda *a, **k: loaded.append(a))
    argv = ["--model", str(chat_model), "--bench", str(tmp_path / "bench.json"), "--image-folder", str(tmp_path),
            "--api-base", closed, "--device", "cpu", "--out", str(tmp_path / "results.json")]
    with pytest.raises(SystemExit, match=f"error: {closed}/chat/completions did not answer: connection refused"):
        run(lambda: main(argv))
    assert not loaded and not (tmp_path / "results.json").exists()  # named before the model is loaded


def test_answers_stay_inside_the_context_and_a_prompt_past_it_is_named(chat_model, tmp_path, monkeypatch):
    model, tok = ev_model(chat_model)
    context = model.cfg.text.max_position_embeddings
    long = {"id": "long", "conversations": [{"from": "human", "value": "red " * context}]}
    with pytest.raises(ValueError, match=f"record long: its prompt is .* tokens, the model's context is {context}"):
        answer(model, tok, [long], tmp_path, max_new_tokens=5)
    budgets = []
    monkeypatch.setattr(model, "generate", lambda ids, **kw: budgets.append((ids.shape[1], kw["max_new_tokens"]))
                        or ids[:, :1])
    near = {"id": "near", "conversations": [{"from": "human", "value": "red " * 10}]}
    answer(model, tok, [near], tmp_path, max_new_tokens=512)  # LLaVA-Bench's budget on a small model
    assert budgets and sum(budgets[0]) == context


def ev_model(chat_model):
    import llava_min
    from llava_min.tokenizer import Tokenizer
    return llava_min.load(chat_model), Tokenizer(chat_model / "tokenizer.model")


def test_batched_answers_equal_single_answers(chat_model, tmp_path):
    import numpy as np
    from PIL import Image
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\n" + q}]}
               for i, q in enumerate(["red", "a red circle", "red red red red red red"])]
    model, tok = ev_model(chat_model)
    model.cfg.text.eos_token_id = -1  # random weights: compare whole continuations
    batched = answer(model, tok, records, tmp_path, batch_size=3, max_new_tokens=6)
    single = [answer(model, tok, [r], tmp_path, batch_size=1, max_new_tokens=6)[0] for r in records]
    assert batched == single
    blind = answer(model, tok, records, tmp_path, blind=True, batch_size=3, max_new_tokens=6)
    assert blind != batched  # without the image the model is given other inputs
