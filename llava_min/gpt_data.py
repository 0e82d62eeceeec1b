"""GPT-assisted visual instruction data (LLaVA Sec. 3).

An image becomes a symbolic context: its captions and, for detailed description and complex
reasoning, its object boxes as `label: [x1, y1, x2, y2]` normalized to 0-1. A text-only teacher, given
a system message and a few hand-written (context -> response) examples, writes a conversation, a
detailed description or a complex-reasoning answer; the response is parsed into an LLaVA record.
`ChatClient` speaks to any OpenAI-compatible `/v1/chat/completions` endpoint with the standard library;
`run_requests` keeps a few requests in flight and appends each answer to a JSONL file as it arrives, so
an interrupted run resumes without losing or redoing work. Standard library only.
"""
import hashlib
import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

RESPONSE_TYPES = ("conversation", "detail", "complex")  # Sec. 3: the three types of instruction data

BRIEF_INSTRUCTIONS = (  # stage 1 (Sec. 4.2): a brief-description instruction, then a caption
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Give a short and clear explanation of the picture.", "Summarize the visual content of the image.",
    "Offer a succinct account of the picture shown.", "Write a terse but informative summary of the image.",
    "Share a concise interpretation of the image provided.", "Present a compact description of the photo.",
    "Describe the picture in a few words.", "Relay a brief, clear account of what the image shows.",
    "Create a short caption for the image.",
)
DETAIL_INSTRUCTIONS = (  # the question placed before a detailed description
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.", "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.",
    "Characterize the image using a well-detailed description.", "Break down the elements of the image in detail.",
    "Walk through the important details of the image.", "Portray the image with a rich, descriptive narrative.",
    "Narrate the contents of the image with precision.", "Analyze the image in a comprehensive and detailed manner.",
    "Illustrate the image through a descriptive explanation.", "Examine the image closely and share its details.",
    "Write an exhaustive depiction of the given image.",
)

_BOXES = ("Each object also comes with a box, 'label: [x1, y1, x2, y2]': corners as fractions of the image's "
          "width and height, from 0 to 1, measured from the top left. ")
SYSTEM = {
    "conversation": "You are an AI visual assistant looking at one image. You do not actually see it: you are "
                    "given several sentences that describe it. Write a conversation between a person who asks "
                    "about the image and you, answering as if you were looking at it. Ask about what can be seen: "
                    "the kinds of objects, their colors, how many there are, where they are and what is going on. "
                    "Only ask questions the descriptions answer with certainty. Write each exchange as 'Question:' "
                    "and the question on the next line, then '===', then 'Answer:' and the answer on the next "
                    "line; put '===' between exchanges as well.",
    "detail": "You are an AI visual assistant looking at one image. You do not actually see it: you are given "
              "several sentences that describe it. " + _BOXES + "Describe the image in one detailed paragraph, as "
              "if you were looking at it: what is there, where it is and how large. Never mention the sentences, "
              "the boxes or the coordinates.",
    "complex": "You are an AI visual assistant looking at one image. You do not actually see it: you are given "
               "several sentences that describe it. " + _BOXES + "Ask one question about the image whose answer "
               "takes reasoning beyond reading off what is visible (relations between objects, counting under a "
               "condition, what would follow), then answer it step by step, as if you were looking at the image. "
               "Never mention the sentences, the boxes or the coordinates. Write 'Question:' and the question on "
               "the next line, then '===', then 'Answer:' and the answer on the next line.",
}

_KITCHEN = (["A man in a blue apron cuts a loaf of bread on a kitchen counter.",
             "Someone slicing bread next to a stove.", "A cook preparing food in a small home kitchen."],
            [("person", (0.312, 0.104, 0.640, 0.987)), ("knife", (0.508, 0.553, 0.617, 0.641)),
             ("oven", (0.000, 0.402, 0.268, 1.000)), ("bowl", (0.702, 0.615, 0.874, 0.716))])
_STREET = (["A red double-decker bus drives down a busy city street.", "A bus passing cars at a traffic light.",
            "People wait on the sidewalk as a bus goes by."],
           [("bus", (0.198, 0.220, 0.713, 0.874)), ("car", (0.744, 0.611, 0.998, 0.902)),
            ("person", (0.021, 0.503, 0.093, 0.891)), ("traffic light", (0.862, 0.080, 0.911, 0.297))])
FEW_SHOT = {  # Sec. 3: a few hand-written examples of the context -> response mapping, per type
    "conversation": [(_KITCHEN, "Question:\nWhat is the man doing?\n===\nAnswer:\nHe is cutting a loaf of bread on "
                                "the kitchen counter.\n===\nQuestion:\nWhat is he wearing?\n===\nAnswer:\nHe wears a "
                                "blue apron.\n===\nQuestion:\nWhat is next to him?\n===\nAnswer:\nA stove: he is "
                                "slicing the bread right next to it."),
                     (_STREET, "Question:\nWhat color is the bus?\n===\nAnswer:\nThe bus is red.\n===\nQuestion:\n"
                               "What kind of bus is it?\n===\nAnswer:\nIt is a double-decker bus, with two floors "
                               "of seats.")],
    "detail": [(_KITCHEN, "A man wearing a blue apron stands in the middle of a small kitchen, cutting a loaf of "
                          "bread on the counter with a knife held near the center of the picture. A stove takes up "
                          "the lower left side of the scene, and a bowl rests on the counter to the right of his "
                          "hands, waiting for the slices.")],
    "complex": [(_STREET, "Question:\nWhy might the people on the sidewalk be standing still?\n===\nAnswer:\nThey "
                          "are probably waiting to cross the street. A traffic light hangs above the road on the "
                          "right, and a bus and a car are still moving past them, so the pedestrians have to wait "
                          "until the light changes and the traffic stops before they can cross safely.")],
}


class MalformedResponse(ValueError):
    """A teacher response that does not follow the requested format."""


# ---------------------------------------------------------------- requests and responses

def context_text(captions: list, boxes=None) -> str:
    """The symbolic context: captions, then `label: [x1, y1, x2, y2]` boxes normalized to 0-1."""
    text = "\n".join(captions)
    if boxes:
        text += "\n\n" + "\n".join(f"{label}: [{', '.join(f'{v:.3f}' for v in box)}]" for label, box in boxes)
    return text


def build_messages(rtype: str, captions: list, boxes=None) -> list:
    """System message, the few-shot (context -> response) pairs, then this image's context."""
    with_boxes = rtype != "conversation"  # Sec. 3: conversations are written from the captions alone
    messages = [{"role": "system", "content": SYSTEM[rtype]}]
    for (example_captions, example_boxes), response in FEW_SHOT[rtype]:
        example = context_text(example_captions, example_boxes if with_boxes else None)
        messages.append({"role": "user", "content": example})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": context_text(captions, boxes if with_boxes else None)})
    return messages


def response_type(messages: list) -> str:
    """Which of the three requests this is, read from its system message."""
    for rtype, system in SYSTEM.items():
        if messages and messages[0].get("role") == "system" and messages[0].get("content") == system:
            return rtype
    raise ValueError("not a request built by build_messages: unknown system message")


def parse_pairs(text: str) -> list:
    """'Question:' / '===' / 'Answer:' blocks -> [(question, answer), ...]."""
    blocks = [b.strip() for b in text.split("===") if b.strip()]
    if not blocks or len(blocks) % 2:
        raise MalformedResponse(f"{len(blocks)} blocks do not form Question / Answer pairs")
    pairs = []
    for q, a in zip(blocks[0::2], blocks[1::2]):
        if not q.startswith("Question:") or not a.startswith("Answer:"):
            raise MalformedResponse(f"expected a Question: / Answer: pair, got {q[:40]!r} / {a[:40]!r}")
        q, a = q[len("Question:"):].strip(), a[len("Answer:"):].strip()
        if not q or not a:
            raise MalformedResponse("an empty question or answer")
        if any(line.lstrip().startswith(("Question:", "Answer:")) for line in (q + "\n" + a).splitlines()):
            raise MalformedResponse("a Question: or Answer: inside a block: a '===' separator is missing")
        pairs.append((q, a))
    return pairs


LEAKED_BOX = re.compile(r"\[\s*[01]?\.\d+\s*,")  # "[0.312, ..." : the teacher quoted the context's boxes


def parse_description(text: str) -> str:
    if not text or "===" in text or "Question:" in text or LEAKED_BOX.search(text):
        raise MalformedResponse("a detailed description is prose, without Question:/=== blocks or box numbers")
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def parse_response(rtype: str, text: str, rng: random.Random) -> list:
    """A teacher's response -> conversation turns; `<image>\\n` opens the first human turn."""
    text = (text or "").strip()
    if "<image>" in text:  # the placeholder belongs to the image alone: train.py would refuse the record
        raise MalformedResponse("the response holds the <image> placeholder")
    if rtype == "detail":
        pairs = [(rng.choice(DETAIL_INSTRUCTIONS), parse_description(text))]
    else:
        pairs = parse_pairs(text)
        if rtype == "complex" and len(pairs) != 1:
            raise MalformedResponse(f"complex reasoning takes one question, got {len(pairs)}")
        if rtype == "complex" and LEAKED_BOX.search(text):  # its context had boxes, which it must not quote
            raise MalformedResponse("complex reasoning quotes the context's box coordinates")
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


# ---------------------------------------------------------------- COCO-style annotations -> contexts

@dataclass
class Context:
    image: str  # file name, relative to the image folder
    captions: list
    boxes: list  # [(label, [x1, y1, x2, y2] normalized to 0-1)]


def load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from e


def need(ok: bool, path, entry: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{path}: {entry} {what}")


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def read_coco(captions_file, instances_file, limit=None) -> list:
    """`captions_*.json` + `instances_*.json` -> [Context], by image id; errors name the file and entry."""
    caps, inst = load_json(captions_file), load_json(instances_file)
    for path, data, keys in ((captions_file, caps, ("images", "annotations")),
                             (instances_file, inst, ("images", "annotations", "categories"))):
        need(isinstance(data, dict) and all(isinstance(data.get(k), list) for k in keys), path, "top level",
             f"is not a COCO annotation file (needs the lists {', '.join(keys)})")
    images, files, stems = {}, {}, {}
    for i, im in enumerate(caps["images"]):
        need(isinstance(im, dict) and is_id(im.get("id")) and isinstance(im.get("file_name"), str)
             and all(is_number(im.get(k)) and im[k] > 0 for k in ("width", "height")),
             captions_file, f"images[{i}]", "needs an id (number or text), file_name and positive width and height")
        name = Path(im["file_name"])
        need(not name.is_absolute() and ".." not in name.parts, captions_file, f"images[{i}]",
             f"file_name {im['file_name']!r} leaves the image folder")
        need(name.name not in ("", ".") and not im["file_name"].endswith("/"), captions_file, f"images[{i}]",
             f"file_name {im['file_name']!r} names no file")
        need(im["file_name"] not in files, captions_file, f"images[{i}]",
             f"repeats the file_name {im['file_name']!r} of images[{files.get(im['file_name'])}]")
        stem = name.with_suffix("").as_posix()  # the records' ids
        need(stem not in stems, captions_file, f"images[{i}]",
             f"file_name {im['file_name']!r} gives the record id {stem!r} of images[{stems.get(stem)}] too")
        need(im["id"] not in images, captions_file, f"images[{i}]", f"repeats the id {im['id']!r}")
        files[im["file_name"]], stems[stem], images[im["id"]] = i, i, (im, [], [])
    names = {}
    for i, c in enumerate(inst["categories"]):
        need(isinstance(c, dict) and is_id(c.get("id")) and isinstance(c.get("name"), str), instances_file,
             f"categories[{i}]", "needs id and name")
        need(c["id"] not in names, instances_file, f"categories[{i}]", f"repeats the id {c['id']!r}")
        names[c["id"]] = c["name"]
    for i, a in enumerate(caps["annotations"]):
        need(isinstance(a, dict) and is_id(a.get("image_id")) and a["image_id"] in images
             and isinstance(a.get("caption"), str), captions_file, f"annotations[{i}]",
             "has an image_id not in images, or no caption text")
        need("<image>" not in a["caption"], captions_file, f"annotations[{i}]",
             "holds the <image> placeholder, which belongs to the image alone")
        if a["caption"].strip():  # (an empty caption is no context)
            images[a["image_id"]][1].append(" ".join(a["caption"].split()))
    for i, a in enumerate(inst["annotations"]):
        ok = isinstance(a, dict) and is_id(a.get("image_id")) and a["image_id"] in images \
            and is_id(a.get("category_id")) and a["category_id"] in names
        box = a.get("bbox") if ok else None
        need(ok and isinstance(box, list) and len(box) == 4 and all(is_number(v) and math.isfinite(v) for v in box)
             and min(box[2:]) >= 0, instances_file, f"annotations[{i}]",
             "needs a known image_id and category_id and a finite bbox [x, y, w, h]")
        im = images[a["image_id"]][0]
        x, y, w, h = box
        corners = [min(1.0, max(0.0, v)) for v in
                   (x / im["width"], y / im["height"], (x + w) / im["width"], (y + h) / im["height"])]
        if corners[2] > corners[0] and corners[3] > corners[1]:  # (none of it in the image: not an object of it)
            images[a["image_id"]][2].append((names[a["category_id"]], corners))
    by_id = sorted(images.items(), key=lambda kv: (type(kv[0]).__name__, kv[0]))
    contexts = [Context(im["file_name"], c, b) for _, (im, c, b) in by_id if c]  # images without captions: none
    return contexts[:limit]


# ---------------------------------------------------------------- the OpenAI-compatible teacher

class TeacherError(RuntimeError):
    """A request that failed for good (its message never holds the API key)."""


class FatalTeacherError(TeacherError):
    """The endpoint refuses every request (bad key, no such model or URL): the run stops."""


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header (the key) to wherever it points: not followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, not followed: pass the final URL "
                                     "as --api-base", headers, fp)


NO_REDIRECTS = urllib.request.build_opener(RefuseRedirects)


class ChatClient:
    """POST {api_base}/chat/completions. Retries 429, 5xx, timeouts and connection errors with exponential
    backoff and jitter (Retry-After respected). The key is read from the environment at each request and
    never stored, shown, logged or written."""

    def __init__(self, api_base: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 6, backoff: float = 1.0, max_backoff: float = 60.0, temperature: float = 0.7):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key_env, self.timeout, self.temperature = model, key_env, timeout, temperature
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff

    def __repr__(self):
        return f"ChatClient({self.url!r}, model={self.model!r}, key from ${self.key_env})"

    @property
    def identity(self) -> str:
        """Who answers (recorded with each answer: a rerun with another --model or --api-base is refused)."""
        return f"{self.model} at {self.url}"

    def redact(self, text: str, cut: bool = False) -> str:
        """The text without the key; `cut`: the text was cut short, so a key's beginning at its end goes too."""
        key = self.api_key(check=False)
        if not key:
            return text
        text = text.replace(key, "[redacted]")
        if cut:
            for n in range(len(key) - 1, 3, -1):  # (three characters tell nothing)
                if text.endswith(key[:n]):
                    return text[:-n] + "[redacted]"
        return text

    def api_key(self, check: bool = True) -> str:
        """The key without the whitespace around it (a .env file's line end); one with whitespace or control
        characters inside is refused before it reaches a header, whose error would quote it."""
        key = os.environ.get(self.key_env, "").strip()
        if check and any(c.isspace() or not c.isprintable() or not c.isascii() for c in key):
            raise FatalTeacherError(f"${self.key_env} holds whitespace, control or non-ASCII characters (not shown)")
        return key

    def post(self, messages: list) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        key = self.api_key()
        if key:
            headers["Authorization"] = "Bearer " + key
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with NO_REDIRECTS.open(request, timeout=self.timeout) as response:
            raw = response.read()
        try:
            choice = json.loads(raw)["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TeacherError(f"{self.url}: malformed reply, no choices[0].message.content ({type(e).__name__})")
        if not isinstance(content, str):
            raise TeacherError(f"{self.url}: malformed reply, content is {type(content).__name__}")
        if choice.get("finish_reason") == "length":
            raise TeacherError(f"{self.url}: the reply was cut off at the token limit (finish_reason length)")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON: no file could hold it
            raise TeacherError(f"{self.url}: malformed reply, not valid Unicode ({e.reason})") from e
        return self.redact(content)  # (a proxy that echoes the request's headers must not put the key in a file)

    def delay(self, attempt: int, retry_after) -> float:
        try:
            return min(self.max_backoff, max(0.0, float(retry_after)))
        except (TypeError, ValueError):  # absent, or an HTTP date: plain backoff
            return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)

    def __call__(self, messages: list, meta=None) -> str:
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                return self.post(messages)
            except urllib.error.HTTPError as e:
                detail = self.redact(e.read(4096).decode("utf-8", "replace"), cut=True) if e.fp else ""
                if 300 <= e.code < 400:
                    detail = str(e.reason)  # where it pointed
                reason = f"HTTP {e.code} {' '.join(detail.split())[:200]}".strip()
                if e.code in (401, 403, 404) or 300 <= e.code < 400 or "insufficient_quota" in detail:
                    raise FatalTeacherError(f"{self.url}: {reason} (check --api-base, --model, ${self.key_env} and "
                                            "the account's quota)")
                if e.code not in (408, 429) and e.code < 500:
                    raise TeacherError(f"{self.url}: {reason}")
                retry_after = e.headers.get("Retry-After")
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = f"{type(e).__name__}: {self.redact(str(e))[:200]}"
            if attempt == self.max_retries:
                raise TeacherError(f"{self.url}: {reason}; gave up after {attempt + 1} attempts")
            time.sleep(self.delay(attempt, retry_after))
        raise AssertionError("unreachable")


def request_digest(messages: list) -> str:
    """What was asked, in 16 hex digits: an answer is reused only for the same question."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def done_keys(path) -> dict:
    """Keys already answered in a results JSONL -> (request digest, teacher) they were answered for
    (None, None in files written before these were kept)."""
    keys = {}
    if Path(path).is_file():
        for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {n}: not UTF-8 text ({e.reason}); remove the line to ask again") from e
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "key" in row:
                keys.setdefault(row["key"], (row.get("request"), row.get("teacher")))
    return keys


def check_answers_fit(done: dict, asked: dict, teacher: str, path) -> None:
    """Answers recorded for another question (the annotations changed) or another teacher (--model,
    --api-base) are not mixed in with this run's."""
    stale = [k for k, (digest, who) in done.items()
             if k in asked and ((digest and digest != asked[k]) or (who and teacher and who != teacher))]
    if stale:
        digest, who = done[stale[0]]
        raise ValueError(f"{path}: {len(stale)} answer(s) were asked another question or of another teacher than this "
                         f"run's (e.g. {stale[0]!r}, answered by {who!r}; this run asks {teacher!r}): pass another "
                         "--out, or remove those lines to ask again")


def drop_torn_line(path) -> None:
    """A run killed mid-write leaves half a line; cut it, or the next append would be glued onto it."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def run_requests(requests: list, teacher, results_path, workers: int = 4, progress=None, stop=None) -> dict:
    """Sends the (key, messages, meta) requests not answered yet, `workers` at a time, and appends a
    {"key", "response"} line per answer as it arrives (flushed). `stop` (a threading.Event) or Ctrl-C ends
    the run after the requests in flight. Returns counts: skipped (done before), answered, failed."""
    repeated = [k for k, n in Counter(r[0] for r in requests).items() if n > 1]
    if repeated:
        raise ValueError(f"requests repeat a key: {repeated[0]!r}")
    drop_torn_line(results_path)
    done, stop = done_keys(results_path), stop or threading.Event()
    asked, who = {key: request_digest(messages) for key, messages, _ in requests}, getattr(teacher, "identity", "")
    check_answers_fit(done, asked, who, results_path)
    todo = iter([r for r in requests if r[0] not in done])
    counts = {"skipped": len(done.keys() & asked.keys()), "answered": 0, "failed": 0}
    fatal, interrupted = None, False
    if progress is not None:
        progress.update(counts["skipped"])
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, workers)) as pool:
        running = {}
        while True:
            while not stop.is_set() and len(running) < 2 * max(1, workers):
                key, messages, meta = next(todo, (None, None, None))
                if key is None:
                    break
                running[pool.submit(teacher, messages, meta)] = key
            if not running:
                break
            try:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                stop.set()
                interrupted = True
                for future in [f for f in running if f.cancel()]:  # queued, not started: never sent
                    running.pop(future)
                print("interrupted: finishing the requests in flight; rerun to continue", flush=True)
                continue
            for future in finished:
                key = running.pop(future)
                try:
                    line = json.dumps({"key": key, "response": future.result(), "request": asked[key],
                                       "teacher": who}, ensure_ascii=False)
                except FatalTeacherError as e:
                    fatal = fatal or e
                    stop.set()
                    continue
                except Exception as e:  # noqa: BLE001 - one failed request must not end the run
                    counts["failed"] += 1
                    print(f"request {key} failed: {e}", flush=True)
                    continue
                out.write(line + "\n")
                out.flush()
                counts["answered"] += 1
                if progress is not None:
                    progress.update(1)
    if fatal:
        raise fatal
    if interrupted:
        raise KeyboardInterrupt
    return counts
