"""GPT-assisted visual instruction data (LLaVA Sec. 3).

An image becomes a symbolic context: its captions and, for detailed description and complex
reasoning, its object boxes as `label: [x1, y1, x2, y2]` normalized to 0-1. A text-only teacher, given
a system message and a few hand-written (context -> response) examples, writes a conversation, a
detailed description or a complex-reasoning answer; the response is parsed into an LLaVA record.
The teacher itself (any OpenAI-compatible endpoint) is `teacher.py`. Standard library only.
"""
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

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


class MalformedResponse(DataError):
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
        raise DataError(f"{path}: cannot read it as JSON ({e})") from e


def need(ok: bool, path, entry: str, what: str) -> None:
    if not ok:
        raise DataError(f"{path}: {entry} {what}")


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


def human(text: str, image: bool = False) -> dict:
    return {"from": "human", "value": ("<image>\n" if image else "") + text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}
