"""Questions about a synthetic scene, answered exactly from its annotation.

Each generator returns a `QA`: its type, the question, the short answer (LLaVA-1.5's "single word or
phrase" format: lower case, numbers as digits) and a full sentence (for conversations). The same
generators make the training VQA and the held-out evaluation, so their formats agree; the images never
overlap. Yes/no questions take the answer they should have (`want`), so the caller can balance them.
"""
import random
from dataclasses import dataclass
from typing import Optional

from .world import (COLORS, PATTERNS, POSITIONS, SHAPES, SIZES, Obj, Scene, article, cap, plural, ref, where,
                    where_in_image)

SHORT_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 Sec. 3.2: response format prompt
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."  # ScienceQA / MMBench format
QUESTION_TYPES = ("color", "shape", "count", "position", "size", "exists", "reasoning")
WORLD_TYPES = {"shapes": QUESTION_TYPES,  # what each world asks; the detail world's first type needs full resolution
               "detail": ("pattern", "color", "shape", "position", "size")}
CHOICE_DOMAINS = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES),
                  "count": ["0", "1", "2", "3", "4"], "pattern": sorted(PATTERNS)}


def choice_types(world: str) -> list:
    """The question types a world asks as multiple choice."""
    return sorted(t for t in CHOICE_DOMAINS if t in WORLD_TYPES[world])


@dataclass
class QA:
    type: str
    question: str
    answer: str
    sentence: str


def coin(rng: random.Random) -> str:
    return rng.choice(("yes", "no"))


def is_are(n: int) -> str:
    return "is" if n == 1 else "are"


# ---------------------------------------------------------------- one generator per question type

def ask_color(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    unique = sum(x.shape == o.shape for x in scene.objects) == 1
    r = f"the {o.shape}" if unique else f"the {o.shape} {where(o)}"  # named without the colour asked for
    q = rng.choice(("What color is {r}?", "What is the color of {r}?", "Which color does {r} have?"))
    return QA("color", q.format(r=r), o.color, f"{cap(r)} is {o.color}.")


def ask_shape(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    unique = sum(x.color == o.color for x in scene.objects) == 1
    r = f"the {o.color} object" + ("" if unique else f" {where(o)}")
    q = rng.choice(("What shape is {r}?", "What is the shape of {r}?", "Which shape is {r}?"))
    return QA("shape", q.format(r=r), o.shape, f"{cap(r)} is a {o.shape}.")


def ask_pattern(scene: Scene, rng: random.Random) -> QA:
    """The detail world: one-pixel lines or checks, visible only at full resolution."""
    o = rng.choice(scene.objects)
    r = ref(scene, o)
    q = rng.choice(("What pattern is on {r}?", "What pattern does {r} have?", "How is {r} filled?"))
    return QA("pattern", q.format(r=r), o.pattern, f"{cap(r)} is filled with {o.pattern}.")


def ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(("all", "color", "shape", "size"))
    if kind == "all":
        n = len(scene.objects)
        q = rng.choice(("How many objects are there?", "How many shapes are in the image?",
                        "How many objects can you see?"))
        return QA("count", q, str(n), f"There {is_are(n)} {plural(n, 'object')} in the image.")
    pick = {"color": lambda o: o.color, "shape": lambda o: o.shape, "size": lambda o: o.size}[kind]
    domain = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[kind]
    value = rng.choice([pick(o) for o in scene.objects] + [rng.choice(domain)])  # sometimes absent: "0"
    n = sum(pick(o) == value for o in scene.objects)
    noun = value if kind == "shape" else f"{value} object"
    q = rng.choice(("How many {n}s are there?", "How many {n}s are in the image?", "How many {n}s can you see?"))
    sentence = f"There are no {noun}s in the image." if n == 0 else f"There {is_are(n)} {plural(n, noun)}."
    return QA("count", q.format(n=noun), str(n), sentence)


def ask_position(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref(scene, o)
    q = rng.choice(("Where is {r}?", "Where is {r} located?", "In which part of the image is {r}?"))
    return QA("position", q.format(r=r), o.position, f"{cap(r)} is {where_in_image(o)}.")


def ask_size(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref(scene, o)
    q = rng.choice(("Is {r} small or large?", "Is {r} large or small?", "What size is {r}?"))
    return QA("size", q.format(r=r), o.size, f"{cap(r)} is {o.size}.")


def ask_exists(scene: Scene, rng: random.Random, want: Optional[str] = None) -> QA:
    """"Is there a blue triangle?" (a pair: binding colour to shape) or "Is there anything green?"."""
    want = want or coin(rng)
    present = sorted({(o.color, o.shape) for o in scene.objects})
    colors = sorted({o.color for o in scene.objects})
    if rng.random() < 0.25:  # one attribute
        color = rng.choice(colors if want == "yes" else [c for c in COLORS if c not in colors])
        q = rng.choice(("Is there anything {c} in the image?", "Is there {a} object?"))
        sentence = f"Yes, there is something {color} in the image." if want == "yes" else f"No, nothing is {color}."
        return QA("exists", q.format(c=color, a=article(color)), want, sentence)
    if want == "yes":
        color, shape = rng.choice(present)
    else:  # half the time a near miss: a colour or shape that is there, but not this pair
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if c in colors or s in {o.shape for o in scene.objects}]
        color, shape = rng.choice(near if near and rng.random() < 0.5 else absent)
    q = rng.choice(("Is there {x}?", "Is there {x} in the image?", "Can you see {x}?", "Does the image contain {x}?"))
    x = article(f"{color} {shape}")
    sentence = f"Yes, there is {x} in the image." if want == "yes" else f"No, there is no {color} {shape} in the image."
    return QA("exists", q.format(x=x), want, sentence)


RELATIONS = {"to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col,
             "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row}


def decided(word: str, a: Obj, b: Obj) -> bool:
    """The grid decides left/right only between columns, above/below only between rows."""
    return a.col != b.col if word in ("to the left of", "to the right of") else a.row != b.row


def relation_pair(scene: Scene, rng: random.Random, want: str) -> Optional[QA]:
    """"Is the circle above the red square?", explained from the two positions."""
    options = [(a, b, w) for a in scene.objects for b in scene.objects if a is not b for w in RELATIONS
               if decided(w, a, b) and (RELATIONS[w](a, b) == (want == "yes"))]
    if not options:
        return None
    a, b, word = rng.choice(options)
    ra, rb = ref(scene, a), ref(scene, b)
    q = rng.choice(("Is {a} {w} {b}?", "Is {a} located {w} {b}?")).format(a=ra, w=word, b=rb)
    sentence = (f"{cap(want)}. {cap(ra)} is {where(a)} and {rb} is {where(b)}, so {ra} is "
                f"{'' if want == 'yes' else 'not '}{word} {rb}.")
    return QA("reasoning", q, want, sentence)


def relation_any(scene: Scene, rng: random.Random, want: str) -> Optional[QA]:
    """"Is there anything below the triangle?"."""
    options = [(b, w) for b in scene.objects for w in RELATIONS
               if any(RELATIONS[w](x, b) for x in scene.objects if x is not b) == (want == "yes")]
    if not options:
        return None
    b, word = rng.choice(options)
    rb = ref(scene, b)
    q = rng.choice(("Is there anything {w} {b}?", "Is there an object {w} {b}?")).format(w=word, b=rb)
    if want == "yes":
        x = rng.choice([x for x in scene.objects if x is not b and RELATIONS[word](x, b)])
        sentence = f"Yes, {ref(scene, x)} is {where(x)}, {word} {rb}."
    else:
        sentence = f"No. {cap(rb)} is {where(b)}, and nothing is {word} it."
    return QA("reasoning", q, want, sentence)


def relation_attribute(scene: Scene, rng: random.Random) -> Optional[QA]:
    """"What color is the object to the left of the square?", asked only where one object fits."""
    options = []
    for b in scene.objects:
        for word, rel in RELATIONS.items():
            fits = [x for x in scene.objects if x is not b and rel(x, b)]
            if len(fits) == 1:
                options.append((fits[0], word, b))
    if not options:
        return None
    x, word, b = rng.choice(options)
    attribute = rng.choice(("color", "shape"))
    answer = x.color if attribute == "color" else x.shape
    q = f"What {attribute} is the object {word} {ref(scene, b)}?"
    return QA("reasoning", q, answer, f"The object {word} {ref(scene, b)} is the {x.name} {where(x)}, so its "
                                      f"{attribute} is {answer}.")


def ask_reasoning(scene: Scene, rng: random.Random, want: Optional[str] = None) -> QA:
    """A relation between two objects: yes/no, or (want="attribute", or a third of the time when no answer
    is wanted) what colour or shape the object in some direction has."""
    if want == "attribute" or (want is None and rng.random() < 1 / 3):
        qa = relation_attribute(scene, rng)
        if qa:
            return qa
    want = want if want in ("yes", "no") else coin(rng)
    for w in (want, "no" if want == "yes" else "yes"):  # a lone object cannot have anything "yes" about it
        forms = (relation_pair, relation_any) if rng.random() < 0.7 else (relation_any, relation_pair)
        for form in forms:
            qa = form(scene, rng, w)
            if qa:
                return qa
    raise AssertionError("unreachable: 'is there anything left of X' always has an answer")


ASK = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position, "size": ask_size,
       "exists": ask_exists, "reasoning": ask_reasoning, "pattern": ask_pattern}


def ask(scene: Scene, rng: random.Random, qtype: str, want: Optional[str] = None) -> QA:
    """A question of the given type (every type of the scene's world fits every scene); `want` steers yes/no
    answers."""
    return ASK[qtype](scene, rng, want) if qtype in ("exists", "reasoning") else ASK[qtype](scene, rng)


def multiple_choice(qa: QA, rng: random.Random, num_choices: int = 3) -> tuple:
    """ScienceQA's format: options "A. ...", then the prompt; returns (prompt, choices, answer letter)."""
    domain = CHOICE_DOMAINS[qa.type]
    choices = rng.sample([c for c in domain if c != qa.answer], min(num_choices, len(domain)) - 1) + [qa.answer]
    rng.shuffle(choices)
    options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
    return f"{qa.question}\n{options}\n{CHOICE_PROMPT}", choices, "ABCDE"[choices.index(qa.answer)]
