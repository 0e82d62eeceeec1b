"""The teacher's endpoint (LLaVA Sec. 3 asked GPT-4): any OpenAI-compatible `/v1/chat/completions`, and a
resumable way to ask it many questions.

`ChatClient` speaks to the endpoint with the standard library: retries with backoff, the key read from the
environment and never shown, redirects refused; an endpoint that does not answer at all (connection refused,
a host name that does not resolve, a timeout) stops the run after a few seconds. `run_requests` keeps a few requests in flight and appends
each answer (with a digest of its request and who answered) to a JSONL file as it arrives, so an
interrupted run resumes without losing, redoing or mixing work. Standard library only.
"""
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import InputError, OptionError, TeacherError
from ..files import room_for

URL = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[^\s/:?#\[\]@]+)(:\d{1,5})?(/\S*)?")  # what urllib can send to


class FatalTeacherError(TeacherError):
    """The endpoint refuses every request (bad key, no such model or URL): the run stops."""


class Unreachable(FatalTeacherError):
    """The endpoint did not answer: nothing listens at the URL, its host does not resolve, or it timed out."""


def why_unanswered(e: OSError) -> str:
    """What the operating system said about a request that got no reply, in words."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return f"the host name did not resolve ({reason.strerror})"
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason)


class RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header (the key) to wherever it points: not followed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, not followed: pass the final URL "
                                     "as --api-base", headers, fp)


NO_REDIRECTS = urllib.request.build_opener(RefuseRedirects)


class ChatClient:
    """POST {api_base}/chat/completions. Retries 429, 5xx and replies cut off with exponential backoff and
    jitter (Retry-After respected). A request that gets no reply (not connected, or no answer in `timeout`)
    is tried `connect_retries` more times, a second or two apart, then ends the run: every other request
    would wait the same way. The key is read from the environment at each request and never stored, shown,
    logged or written."""

    def __init__(self, api_base: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 4, backoff: float = 1.0, max_backoff: float = 30.0, temperature: float = 0.7,
                 connect_retries: int = 2):
        if not URL.fullmatch(api_base):  # (urllib would raise its ValueError at the first request)
            raise OptionError(f"--api-base {api_base!r} is not an http:// or https:// URL")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.key_env, self.timeout, self.temperature = model, key_env, timeout, temperature
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.connect_retries = connect_retries

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

    def answered(self, send):
        """`send()`, tried again briefly while it gets no reply; then Unreachable, naming the URL and why."""
        for attempt in range(self.connect_retries + 1):
            try:
                return send()
            except urllib.error.HTTPError:
                raise  # a reply, with an error status: the caller sorts it
            except (urllib.error.URLError, TimeoutError) as e:
                why = self.redact(why_unanswered(e))[:200]
            if attempt < self.connect_retries:
                time.sleep(min(self.backoff, 1.0) * 2 ** attempt)
        raise Unreachable(f"{self.url} did not answer: {why} ({attempt + 1} attempts); check --api-base and that "
                          "the server is running")

    def check_reachable(self, timeout: float = 10.0) -> None:
        """Before a long run: one GET without the key (nothing is paid). Any HTTP reply, 404 or 405 included,
        shows the endpoint answers; none raises Unreachable."""
        def probe():
            try:
                NO_REDIRECTS.open(urllib.request.Request(self.url, method="GET"), timeout=timeout).close()
            except urllib.error.HTTPError as e:
                e.close()
        self.answered(probe)

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
                return self.answered(lambda: self.post(messages))
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
            except (http.client.HTTPException, OSError) as e:  # connected, then cut off
                reason = f"{type(e).__name__}: {self.redact(str(e))[:200]}"
            if attempt == self.max_retries:
                raise TeacherError(f"{self.url}: {reason}; gave up after {attempt + 1} attempts")
            time.sleep(self.delay(attempt, retry_after))
        raise AssertionError("unreachable")


def request_digest(messages: list) -> str:
    """What was asked, in 16 hex digits: an answer is reused only for the same question."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def done_keys(path) -> dict:
    """Keys already answered in a results JSONL -> (request digest, teacher) they were answered for. An
    answer recorded without them cannot be matched to this run's question: an error naming the line."""
    keys = {}
    if Path(path).is_file():
        for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{path}, line {n}: not UTF-8 text ({e.reason}); remove the line to ask again") from e
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                continue  # not a line this code wrote
            if not isinstance(row.get("request"), str) or not isinstance(row.get("teacher"), str):
                raise InputError(f"{path}, line {n}: an answer without the digest of its request or its teacher "
                                 "(an earlier llava-min wrote it): pass another --out, or remove the file to ask again")
            keys.setdefault(row["key"], (row["request"], row["teacher"]))
    return keys


def check_answers_fit(done: dict, asked: dict, teacher: str, path) -> None:
    """Answers recorded for another question (the annotations changed) or another teacher (--model,
    --api-base) are not mixed in with this run's."""
    stale = [k for k, (digest, who) in done.items()
             if k in asked and (digest != asked[k] or (who and teacher and who != teacher))]
    if stale:
        digest, who = done[stale[0]]
        raise InputError(f"{path}: {len(stale)} answer(s) were asked another question or of another teacher than this "
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


def append_line(out, path, line: str) -> None:
    """One answer, written through (an unbuffered file: nothing is left to fail when it closes); a disk that fills
    is a DiskFullError naming the file, and the torn line it may leave is cut on the next run (drop_torn_line)."""
    data = (line + "\n").encode("utf-8")
    with room_for(path, len(data)):
        while data:
            data = data[out.write(data):]


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
    with open(results_path, "ab", buffering=0) as out, ThreadPoolExecutor(max(1, workers)) as pool:
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
                except TeacherError as e:  # one failed request does not end the run (a bug does)
                    counts["failed"] += 1
                    print(f"request {key} failed: {e}", flush=True)
                    continue
                append_line(out, results_path, line)
                counts["answered"] += 1
                if progress is not None:
                    progress.update(1)
    if fatal:
        raise fatal
    if interrupted:
        raise KeyboardInterrupt
    return counts
