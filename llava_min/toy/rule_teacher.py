"""The rule teacher: GPT-4's stand-in for the synthetic world (paper Sec. 3, offline).

It receives the same request as the real teacher (system message, few-shot pairs, the context of
captions and boxes) and writes its answer as text in the format the system message asks for, so the
same parser turns it into records. What it knows comes from the scene's annotation, passed alongside,
so every answer is exact: conversations (3-5 question/answer exchanges), detailed descriptions (one
paragraph) and complex reasoning (one question, answered with its steps).
"""
import random
from typing import Optional

from ..data.gpt_data import response_type
from .questions import QA, WORLD_TYPES, ask, coin, is_are, relation_pair
from .world import SIZES, Scene, and_list, cap, describe, listing, plural, ref, where


def remove_group(scene: Scene, rng: random.Random) -> QA:
    """Counting after removing a group, with the steps spelled out."""
    attribute, value = rng.choice([("size", s) for s in SIZES] + [("color", o.color) for o in scene.objects])
    gone = [o for o in scene.objects if getattr(o, attribute) == value]
    n, left = len(scene.objects), len(scene.objects) - len(gone)
    steps = [f"There {is_are(n)} {plural(n, 'object')} in the image."]
    if gone:
        group, one = and_list([f"the {o.name}" for o in gone]), len(gone) == 1
        steps.append(f"The {value} {'one is' if one else 'ones are'} {group}; taking {'it' if one else 'them'} away "
                     f"leaves {plural(left, 'object')}.")
    else:
        none = "None of them is" if n > 1 else "It is not"
        steps.append(f"{none} {value}, so {plural(left, 'object')} would be left.")
    q = f"If every {value} object were taken away, how many objects would be left? Explain."
    return QA("complex", q, str(left), f"{left}. " + " ".join(steps))


def highest(scene: Scene, rng: random.Random) -> Optional[QA]:
    """Which object is highest (or lowest)? Asked only when one object alone holds that row."""
    top = rng.random() < 0.5
    row = (min if top else max)(o.row for o in scene.objects)
    winners = [o for o in scene.objects if o.row == row]
    if len(scene.objects) < 2 or len(winners) != 1:
        return None
    w, others = winners[0], [o for o in scene.objects if o is not winners[0]]
    word = "highest" if top else "lowest"
    reasons = and_list([f"{ref(scene, o)} is {where(o)}" for o in others])
    return QA("complex", f"Which object is the {word} in the image, and why?", w.name,
              f"{cap(ref(scene, w))} is the {word}: it is {where(w)}, while {reasons}.")


def complex_qa(scene: Scene, rng: random.Random) -> QA:
    """A question that needs a step of reasoning, answered with the steps (falls back to counting)."""
    kind = rng.choice(("relation", "highest", "remove"))
    if kind == "relation":
        return relation_pair(scene, rng, coin(rng)) or remove_group(scene, rng)
    return (highest(scene, rng) if kind == "highest" else None) or remove_group(scene, rng)


def inventory(scene: Scene, rng: random.Random) -> QA:
    q = rng.choice(("What objects can you see in the image?", "What is in the picture?"))
    return QA("inventory", q, "", f"I can see {listing(scene.objects, place=True)}.")


def qa_block(qa: QA) -> str:
    return f"Question:\n{qa.question}\n===\nAnswer:\n{qa.sentence}"


def rule_response(rtype: str, scene: Scene, rng: random.Random) -> str:
    """The teacher's text, from the annotation exactly, in the format its system message asks for."""
    if rtype == "detail":
        return describe(scene, rng)
    if rtype == "complex":
        return qa_block(complex_qa(scene, rng))
    qas = [ask(scene, rng, t) for t in rng.sample(WORLD_TYPES[scene.world], rng.randint(2, 4))]
    if rng.random() < 0.4:
        qas.insert(0, inventory(scene, rng))
    return "\n===\n".join(qa_block(qa) for qa in qas)


class RuleTeacher:
    """GPT-4's stand-in for the synthetic world. It receives the same request as the real teacher
    (system message, few-shot pairs, context) and answers in the same text format, so the same parser
    turns its answer into records; its knowledge is the scene's annotation, passed alongside."""

    def __call__(self, messages: list, scene: Scene) -> str:
        rtype = response_type(messages)
        context = messages[-1]["content"]
        missing = [o.name for o in scene.objects if o.name not in context]
        if missing:
            raise ValueError(f"the request's context does not describe {scene.image} (no {missing[0]} in it)")
        return rule_response(rtype, scene, random.Random(context))  # a pure function of the request
