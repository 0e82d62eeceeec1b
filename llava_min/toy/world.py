"""A synthetic world a tiny model can learn to see: a few flat shapes on a plain, light background.

Each object has a shape, a colour, a size and a cell of a 3x3 grid (so positions have names); objects
sit in distinct cells and never leave their cell, so a patch grid aligned to the cells sees one object
per patch. Every (colour, shape) pair appears at most once per scene, so each object can be named
uniquely ("the red circle", or "the circle" when it is the only one). The annotation (exact boxes
included) plays the part of the paper's symbolic context (Sec. 3): the captions and boxes the
text-only teacher reads, and the ground truth every answer is checked against.

The "detail" world (for AnyRes) adds one fact a low-resolution view loses: every object is filled with
a pattern of one-pixel lines or checks, at the same pixel scale whatever the image size. The pattern
is clear at the encoder's size; halved, every pattern averages to the same flat tint.
"""
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 205, 30),
          "purple": (150, 60, 190), "orange": (245, 125, 25)}
SIZES = ("small", "large")
RADIUS = {"small": 0.24, "large": 0.42}  # in cells; with the jitter below an object never leaves its cell
JITTER = 0.08
NUMBER_WORDS = ("no", "one", "two", "three", "four")
PATTERNS = {  # name -> which pixels take the object's colour (the rest are white); all cover half the object
    "horizontal stripes": lambda y, x: y % 2 == 0,
    "vertical stripes": lambda y, x: x % 2 == 0,
    "checks": lambda y, x: (x + y) % 2 == 0,
}
WORLDS = ("shapes", "detail")


def cell_name(row: int, col: int) -> str:
    """Grid cell -> "top left", "top", "top right", "left", "center", ..., "bottom right"."""
    r, c = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return f"{r} {c}".strip() or "center"


POSITIONS = tuple(cell_name(r, c) for r in range(3) for c in range(3))


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int
    box: tuple  # (x1, y1, x2, y2) in pixels
    pattern: str = ""  # the detail world's fill: a key of PATTERNS ("" = solid)

    @property
    def position(self) -> str:
        return cell_name(self.row, self.col)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    split: str
    index: int
    size: int
    background: tuple
    objects: list  # in reading order: by row, then column
    world: str = "shapes"
    suffix: str = ""  # names a second rendering of the same scene: "-low" (the detail world's small copy)

    @property
    def image(self) -> str:
        """The image path relative to the output's images/ folder, as records name it."""
        return f"{self.split}/{self.index:06d}{self.suffix}.png"

    def to_json(self) -> dict:
        objects = [{"shape": o.shape, "color": o.color, "size": o.size, "row": o.row, "col": o.col,
                    "position": o.position, "box": list(o.box), **({"pattern": o.pattern} if o.pattern else {})}
                   for o in self.objects]
        return {"image": self.image, "split": self.split, "index": self.index, "size": self.size,
                "background": list(self.background), "world": self.world, "objects": objects}


def scene_rng(seed: int, split: str, index: int, purpose: str = "scene") -> random.Random:
    """One generator per image (and purpose), so worker count and order cannot change the result."""
    return random.Random(f"{seed}/{split}/{index}/{purpose}")


def sample_scene(seed: int, split: str, index: int, size: int = 64, max_objects: int = 4,
                 world: str = "shapes") -> Scene:
    """The scene is a function of (seed, split, index, world) alone; `size` only scales it, so one scene
    can be drawn at two sizes."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; choose one of {', '.join(WORLDS)}")
    rng = scene_rng(seed, split, index)
    n = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    kinds = rng.sample([(color, shape) for color in COLORS for shape in SHAPES], n)  # unique (colour, shape)
    cell = size / 3
    objects = []
    for (row, col), (color, shape) in zip(cells, kinds):
        obj_size = rng.choice(SIZES)
        radius = cell * RADIUS[obj_size]
        cx = (col + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-JITTER, JITTER)) * cell
        box = tuple(round(v) for v in (cx - radius, cy - radius, cx + radius, cy + radius))
        pattern = rng.choice(sorted(PATTERNS)) if world == "detail" else ""  # shapes world: no draw, scenes unchanged
        objects.append(Obj(shape, color, obj_size, row, col, box, pattern))
    background = tuple(rng.randint(228, 250) for _ in range(3))
    return Scene(split, index, size, background, sorted(objects, key=lambda o: (o.row, o.col)), world)


def draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x1, y1, x2, y2 = o.box
    if o.shape == "circle":
        draw.ellipse(o.box, fill=fill)
    elif o.shape == "square":  # a little inset, so a square and a circle of one size cover similar areas
        inset = (x2 - x1) * 0.1
        draw.rectangle((x1 + inset, y1 + inset, x2 - inset, y2 - inset), fill=fill)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)


def pattern_fill(size: int, color: tuple, pattern: str) -> Image.Image:
    """The whole canvas in the pattern: the colour on the pattern's pixels, white between them."""
    y, x = np.mgrid[:size, :size]
    on = PATTERNS[pattern](y, x)[..., None]
    return Image.fromarray(np.where(on, np.array(color, np.uint8), np.uint8(255)).astype(np.uint8))


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        if not o.pattern:
            draw_shape(draw, o, COLORS[o.color])
            continue
        mask = Image.new("L", img.size, 0)
        draw_shape(ImageDraw.Draw(mask), o, 255)
        img.paste(pattern_fill(scene.size, COLORS[o.color], o.pattern), (0, 0), mask)
    return img


# ---------------------------------------------------------------- language about a scene

def ref(scene: Scene, o: Obj) -> str:
    """The shortest unique name: "the circle" if it is the only circle, else "the red circle"."""
    return f"the {o.shape}" if sum(x.shape == o.shape for x in scene.objects) == 1 else f"the {o.name}"


def where(o: Obj) -> str:
    """"at the top left", "at the top", "on the left", "in the center"."""
    if o.position == "center":
        return "in the center"
    return f"on the {o.position}" if o.position in ("left", "right") else f"at the {o.position}"


def where_in_image(o: Obj) -> str:
    """"at the top left of the image", "on the left side of the image", "in the center of the image"."""
    side = " side" if o.position in ("left", "right") else ""
    return f"{where(o)}{side} of the image"


def plural(n: int, word: str, words: bool = False) -> str:
    """plural(2, "circle") -> "2 circles"; with words=True -> "two circles"."""
    count = NUMBER_WORDS[n] if words and n < len(NUMBER_WORDS) else str(n)
    return f"{count} {word}" + ("" if n == 1 else "s")


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def article(phrase: str) -> str:
    """"an orange circle", "a red circle"."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def and_list(parts: list) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def looks(o: Obj) -> str:
    """The detail world's pattern as a phrase after the name: " with checks" ("" for a solid object)."""
    return f" with {o.pattern}" if o.pattern else ""


def listing(objects: list, size=True, place=False) -> str:
    """"a large red circle at the top left and a small blue square with checks in the center"."""
    return and_list([article(f"{o.size + ' ' if size else ''}{o.name}") + looks(o) + (f" {where(o)}" if place else "")
                     for o in objects])


CAPTIONS = (  # (objects, scene) -> caption; several phrasings, as COCO has five captions per image
    lambda objs, s: f"{cap(listing(objs))}.",
    lambda objs, s: f"{cap(listing(objs, place=True))}.",
    lambda objs, s: f"A picture of {listing(objs, size=False)}.",
    lambda objs, s: f"{cap(plural(len(objs), 'shape', words=True))} on a plain background: {listing(objs)}.",
    lambda objs, s: f"An image with {listing(objs, place=True)}.",
    lambda objs, s: f"There is {listing(objs, size=False, place=True)}.",
    lambda objs, s: f"This image contains {plural(len(objs), 'object', words=True)}: {listing(objs)}.",
    lambda objs, s: f"A simple drawing of {listing(objs)} on a light background.",
    lambda objs, s: f"{cap(listing(objs, size=False, place=True))}.",
)


def captions(scene: Scene, rng: random.Random, k: int = 5) -> list:
    """k captions in k different phrasings; about half list the objects in a shuffled order."""
    out = []
    for make in rng.sample(CAPTIONS, k):
        objs = list(scene.objects)
        if rng.random() < 0.5:
            rng.shuffle(objs)
        out.append(make(objs, scene))
    return out


OPENINGS = ("The image shows {n} on a plain light background.",
            "This is a simple picture of {n} drawn on a light background.",
            "In this image, {n} {verb} out against a plain, light background.")
OBJECT_SENTENCES = ("There is a {size} {name} {where}.", "{Where}, there is a {size} {name}.",
                    "A {size} {name} sits {where}.")


def relation_sentence(scene: Scene, rng: random.Random) -> str:
    """One spatial relation between two objects in different columns (or rows), or "" if none."""
    objs = scene.objects
    pairs = [(a, b) for a in objs for b in objs if a.col < b.col or (a.col == b.col and a.row < b.row)]
    if not pairs:
        return ""
    a, b = rng.choice(pairs)
    word = "to the left of" if a.col < b.col else "above"
    return f"{cap(ref(scene, a))} is {word} {ref(scene, b)}."


def describe(scene: Scene, rng: random.Random) -> str:
    """A detailed description in one paragraph, as the rule teacher writes it."""
    objs = scene.objects
    noun = plural(len(objs), "object" if rng.random() < 0.5 else "shape", words=True)
    parts = [rng.choice(OPENINGS).format(n=noun, verb="stands" if len(objs) == 1 else "stand")]
    for o in objs:
        parts.append(rng.choice(OBJECT_SENTENCES).format(size=o.size, name=o.name + looks(o), where=where(o),
                                                         Where=cap(where(o))))
    parts.append(relation_sentence(scene, rng))
    colors = sorted({o.color for o in objs})
    parts.append(f"The only color besides the background is {colors[0]}." if len(colors) == 1
                 else f"The colors in the image are {and_list(colors)}.")
    return " ".join(p for p in parts if p)
