"""Questions about a synthetic scene, answered exactly from its annotation.

Each generator returns a `QA`: its type, the question, the short answer (LLaVA-1.5's "single word or
phrase" format) and a full sentence (for conversations). The same generators make the training VQA
and the held-out evaluation, so their formats agree; the images never overlap.
"""
import random
from dataclasses import dataclass
from typing import Optional

from .world import COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, plural, ref, where

SHORT_PROMPT = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 Sec. 3.2
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
QUESTION_TYPES = ("color", "shape", "count", "position", "size", "exists", "reasoning")


@dataclass
class QA:
    type: str
    question: str
    answer: str
    sentence: str


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def ref_without_color(scene: Scene, o: Obj) -> str:
    unique = sum(x.shape == o.shape for x in scene.objects) == 1
    return f"the {o.shape}" if unique else f"the {o.shape} {where(o)}"


def ask_color(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref_without_color(scene, o)
    return QA("color", f"What color is {r}?", o.color, f"{cap(r)} is {o.color}.")


def ask_shape(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    unique = sum(x.color == o.color for x in scene.objects) == 1
    r = f"the {o.color} object" + ("" if unique else f" {where(o)}")
    return QA("shape", f"What shape is {r}?", o.shape, f"{cap(r)} is a {o.shape}.")


def ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(["all", "color", "shape"])
    if kind == "all":
        n = len(scene.objects)
        return QA("count", "How many objects are there?", str(n), f"There {'is' if n == 1 else 'are'} "
                  f"{plural(n, 'object')} in the image.")
    if kind == "color":
        color = rng.choice([o.color for o in scene.objects] + [rng.choice(list(COLORS))])
        n = sum(o.color == color for o in scene.objects)
        return QA("count", f"How many {color} objects are there?", str(n),
                  f"There {'is' if n == 1 else 'are'} {plural(n, color + ' object')}.")
    shape = rng.choice([o.shape for o in scene.objects] + [rng.choice(SHAPES)])
    n = sum(o.shape == shape for o in scene.objects)
    return QA("count", f"How many {shape}s are there?", str(n), f"There {'is' if n == 1 else 'are'} {plural(n, shape)}.")


def ask_position(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref(scene, o)
    return QA("position", f"Where is {r}?", o.position, f"{cap(r)} is {where(o)} of the image."
              if o.position != "center" else f"{cap(r)} is in the center of the image.")


def ask_size(scene: Scene, rng: random.Random) -> QA:
    o = rng.choice(scene.objects)
    r = ref(scene, o)
    return QA("size", f"Is {r} small or large?", o.size, f"{cap(r)} is {o.size}.")


def ask_exists(scene: Scene, rng: random.Random) -> QA:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
    yes = (color, shape) in present
    return QA("exists", f"Is there a {color} {shape}?", "yes" if yes else "no",
              f"{'Yes' if yes else 'No'}, there is {'a' if yes else 'no'} {color} {shape} in the image.")


RELATIONS = {"to the left of": lambda a, b: a.col < b.col, "to the right of": lambda a, b: a.col > b.col,
             "above": lambda a, b: a.row < b.row, "below": lambda a, b: a.row > b.row}


def ask_relation(scene: Scene, rng: random.Random) -> Optional[QA]:
    """Reasoning: is A left of / right of / above / below B? Asked only where the grid decides it."""
    if len(scene.objects) < 2:
        return None
    a, b = rng.sample(scene.objects, 2)
    options = [w for w in RELATIONS if (a.col != b.col if "of" in w else a.row != b.row)]
    word = rng.choice(options)
    yes = RELATIONS[word](a, b)
    ra, rb = ref(scene, a), ref(scene, b)
    sentence = (f"{'Yes' if yes else 'No'}. {cap(ra)} is {where(a)} and {rb} is {where(b)}, so {ra} is "
                f"{'' if yes else 'not '}{word} {rb}.")
    return QA("reasoning", f"Is {ra} {word} {rb}?", "yes" if yes else "no", sentence)


ASK = {"color": ask_color, "shape": ask_shape, "count": ask_count, "position": ask_position, "size": ask_size,
       "exists": ask_exists, "reasoning": ask_relation}


def ask(scene: Scene, rng: random.Random, qtype: str) -> QA:
    qa = ASK[qtype](scene, rng)
    return qa if qa is not None else ask_exists(scene, rng)


CHOICE_DOMAINS = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS), "size": list(SIZES),
                  "count": ["0", "1", "2", "3", "4"]}


def multiple_choice(qa: QA, rng: random.Random, num_choices: int = 3):
    """ScienceQA's format: options "A. ..." and the answer's letter."""
    distractors = rng.sample([c for c in CHOICE_DOMAINS[qa.type] if c != qa.answer],
                             min(num_choices - 1, len(CHOICE_DOMAINS[qa.type]) - 1))
    choices = distractors + [qa.answer]
    rng.shuffle(choices)
    letter = "ABCDE"[choices.index(qa.answer)]
    options = "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(choices))
    return f"{qa.question}\n{options}\n{CHOICE_PROMPT}", choices, letter


# ---------------------------------------------------------------- the rule teacher (GPT-4's stand-in)

def ask_conditional_count(scene: Scene, rng: random.Random) -> QA:
    """Complex reasoning: counting after removing a group, with the steps spelled out."""
    size = rng.choice(SIZES)
    gone = [o for o in scene.objects if o.size == size]
    left = len(scene.objects) - len(gone)
    steps = (f"The image has {plural(len(scene.objects), 'object')}. "
             + (f"The {size} ones are {', '.join('the ' + o.name for o in gone)}. " if gone else f"None is {size}. ")
             + f"Removing them leaves {plural(left, 'object')}.")
    return QA("reasoning", f"If every {size} object were removed, how many objects would remain?", str(left),
              f"{left}. {steps}")


def rule_response(rtype: str, scene: Scene, rng: random.Random) -> str:
    """What the teacher writes, from the annotation exactly, in the format the prompts ask for."""
    if rtype == "detail":
        from .world import describe
        return describe(scene)
    if rtype == "complex":
        qa = ask_relation(scene, rng) if len(scene.objects) > 1 and rng.random() < 0.5 else None
        qa = qa or ask_conditional_count(scene, rng)
        return f"Question:\n{qa.question}\n===\nAnswer:\n{qa.sentence}"
    kinds = rng.sample(QUESTION_TYPES, rng.randint(3, 4))
    return "\n===\n".join(f"Question:\n{qa.question}\n===\nAnswer:\n{qa.sentence}"
                          for qa in (ask(scene, rng, k) for k in kinds))
