"""GPT-assisted visual instruction data (LLaVA Sec. 3).

An image becomes a symbolic context, its captions and (for detail and complex reasoning) its object
boxes; a text-only teacher, given a system message and a few hand-written (context -> response)
examples, writes a conversation, a detailed description or a complex-reasoning answer; the response is
parsed into an LLaVA record. `ChatClient` speaks to any OpenAI-compatible `/v1/chat/completions`
endpoint with the standard library; `run_requests` keeps a few requests in flight and appends each
result to a JSONL file as it arrives, so an interrupted run resumes without losing or redoing work.
"""
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

RESPONSE_TYPES = ("conversation", "detail", "complex")

BRIEF_INSTRUCTIONS = (  # stage 1: a brief-description instruction, then a caption
    "Describe the image concisely.", "Provide a brief description of the given image.",
    "Give a short and clear explanation of the picture.", "Summarize the visual content of the image.",
    "Offer a succinct account of the picture.", "Write a terse but informative summary of the image.",
    "Share a concise interpretation of the image provided.", "Present a compact description of the photo.",
    "Describe the picture in a few words.", "What does the image show, in brief?",
    "Create a short caption for the image.",
)
DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail.", "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
    "Offer a thorough analysis of the image.", "Explain the various aspects of the image before you.",
    "Clarify the contents of the displayed image with great detail.", "Characterize the image using a well-detailed "
    "description.", "Break down the elements of the image in a detailed manner.", "Walk through the important "
    "details of the image.", "Portray the image with a rich, descriptive narrative.", "Narrate the contents of the "
    "image with precision.", "Analyze the image in a comprehensive and detailed manner.", "Illustrate the image "
    "through a descriptive explanation.", "Examine the image closely and share its details.", "Write an exhaustive "
    "depiction of the given image.",
)

SYSTEM = {
    "conversation": "You are an AI visual assistant looking at a single image. You do not see the image: you are "
                    "given its captions. Write a conversation between a person asking about the image and you "
                    "answering, as if you could see it. Ask about what is visible (objects, their kinds, colors, "
                    "counts, positions) and answer only with what the captions make certain. Format every exchange "
                    "as 'Question:' on one line, the question, '===', 'Answer:', the answer, then '===' before the "
                    "next exchange.",
    "detail": "You are an AI visual assistant. You are given the captions of an image and the boxes of its objects "
              "as 'label: [x1, y1, x2, y2]', coordinates between 0 and 1 from the top left. Describe the image in "
              "one detailed paragraph, as if you could see it: what is there, where, how large. Do not mention "
              "captions or coordinates.",
    "complex": "You are an AI visual assistant. You are given the captions of an image and the boxes of its objects "
               "as 'label: [x1, y1, x2, y2]', coordinates between 0 and 1 from the top left. Ask one question whose "
               "answer needs reasoning about the image (relations between objects, counting under a condition), and "
               "answer it step by step, as if you could see the image. Write 'Question:', the question, '===', "
               "'Answer:', the answer.",
}

_EXAMPLE_CAPTIONS = ["A red ball sits next to a blue box on a wooden table.", "A toy ball and a box on a table."]
_EXAMPLE_BOXES = [("ball", (0.10, 0.40, 0.35, 0.70)), ("box", (0.55, 0.30, 0.90, 0.75)), ("table", (0.0, 0.6, 1.0, 1.0))]
FEW_SHOT = {
    "conversation": [(_EXAMPLE_CAPTIONS, None,
                      "Question:\nWhat color is the ball?\n===\nAnswer:\nThe ball is red.\n===\nQuestion:\nWhat is "
                      "next to the ball?\n===\nAnswer:\nA blue box stands next to the ball, on the same table.")],
    "detail": [(_EXAMPLE_CAPTIONS, _EXAMPLE_BOXES,
                "The image shows a wooden table with two toys on it. On the left there is a red ball, and on the "
                "right a larger blue box. The table fills the bottom part of the picture.")],
    "complex": [(_EXAMPLE_CAPTIONS, _EXAMPLE_BOXES,
                 "Question:\nCould the ball roll into the box without moving anything?\n===\nAnswer:\nNo. The ball is "
                 "on the left side of the table and the box is on the right, with open space between them, and the "
                 "box's sides are taller than the ball, so the ball would stop against the box rather than fall in.")],
}


class MalformedResponse(ValueError):
    """A teacher response that does not follow the requested format."""


def context_text(captions: list, boxes=None) -> str:
    """The symbolic context: captions, then `label: [x1, y1, x2, y2]` boxes normalized to 0-1."""
    text = "\n".join(captions)
    if boxes:
        text += "\n\n" + "\n".join(f"{label}: [{', '.join(f'{v:.3f}' for v in box)}]" for label, box in boxes)
    return text


def build_messages(rtype: str, captions: list, boxes=None) -> list:
    """System message, few-shot (context -> response) pairs, then the image's context."""
    messages = [{"role": "system", "content": SYSTEM[rtype]}]
    for example_captions, example_boxes, response in FEW_SHOT[rtype]:
        messages.append({"role": "user", "content": context_text(example_captions, example_boxes if rtype != "conversation" else None)})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": context_text(captions, boxes if rtype != "conversation" else None)})
    return messages


def parse_pairs(text: str) -> list:
    """'Question:' / '===' / 'Answer:' blocks -> [(question, answer), ...]."""
    blocks = [b.strip() for b in text.split("===") if b.strip()]
    pairs = []
    for q, a in zip(blocks[0::2], blocks[1::2]):
        if not q.startswith("Question:") or not a.startswith("Answer:"):
            raise MalformedResponse(f"expected a Question: / Answer: pair, got {q[:40]!r} / {a[:40]!r}")
        q, a = q[len("Question:"):].strip(), a[len("Answer:"):].strip()
        if not q or not a:
            raise MalformedResponse("an empty question or answer")
        pairs.append((q, a))
    if not pairs or len(blocks) % 2:
        raise MalformedResponse(f"{len(blocks)} blocks do not form Question / Answer pairs")
    return pairs


def parse_response(rtype: str, text: str, rng: random.Random) -> list:
    """A teacher's response -> conversation turns (the first question carries `<image>`)."""
    text = (text or "").strip()
    if rtype == "detail":
        if not text or "===" in text or "Question:" in text:
            raise MalformedResponse("a detailed description must be one paragraph")
        pairs = [(rng.choice(DETAIL_INSTRUCTIONS), " ".join(text.split()))]
    else:
        pairs = parse_pairs(text)
        if rtype == "complex" and len(pairs) != 1:
            raise MalformedResponse(f"complex reasoning takes one question, got {len(pairs)}")
    turns = []
    for i, (q, a) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


# ---------------------------------------------------------------- the OpenAI-compatible teacher

class ChatClient:
    """POST {api_base}/chat/completions with retries: exponential backoff with jitter on 429, 5xx and
    connection errors (Retry-After respected). The key is read from the environment and never shown."""

    def __init__(self, api_base: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 6, backoff: float = 1.0, temperature: float = 0.7):
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.max_retries, self.backoff = model, timeout, max_retries, backoff
        self.temperature, self._key = temperature, os.environ.get(key_env, "")

    def __repr__(self):
        return f"ChatClient({self.url!r}, model={self.model!r})"  # no key

    def request(self, messages: list) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = "Bearer " + self._key
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    def __call__(self, messages: list, meta=None) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                return self.request(messages)
            except urllib.error.HTTPError as e:
                retryable, wait = e.code == 429 or e.code >= 500, e.headers.get("Retry-After")
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                retryable, wait, reason = True, None, type(e).__name__
            if not retryable or attempt == self.max_retries:
                raise RuntimeError(f"{self.url}: {reason} after {attempt + 1} attempt(s)")
            delay = float(wait) if wait and str(wait).replace(".", "", 1).isdigit() else self.backoff * 2 ** attempt
            time.sleep(delay * (0.5 + random.random() / 2) if not wait else delay)
        raise AssertionError("unreachable")


def done_keys(path) -> set:
    """Keys already answered in a results JSONL (a torn last line from a killed run is ignored)."""
    keys = set()
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                continue
    return keys


def drop_torn_line(path) -> None:
    """A run killed mid-write leaves half a line; cut it, or the next append would be glued onto it."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def run_requests(requests: list, teacher, results_path, workers: int = 4, progress=None) -> dict:
    """Sends (key, messages, meta) requests not answered yet; appends {"key", "response"} lines as they
    arrive. Returns counts: done before, answered now, failed (left for the next run)."""
    drop_torn_line(results_path)
    done = done_keys(results_path)
    todo = [r for r in requests if r[0] not in done]
    lock, counts = threading.Lock(), {"skipped": len(requests) - len(todo), "answered": 0, "failed": 0}
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    with open(results_path, "a", encoding="utf-8") as out, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(teacher, messages, meta): key for key, messages, meta in todo}
        for future in as_completed(futures):
            try:
                line = json.dumps({"key": futures[future], "response": future.result()}, ensure_ascii=False)
            except Exception as e:  # noqa: BLE001 - one failed request must not end the run
                counts["failed"] += 1
                print(f"request {futures[future]} failed: {e}")
                continue
            with lock:
                out.write(line + "\n")
                out.flush()
                counts["answered"] += 1
            if progress is not None:
                progress.update(1)
    return counts
