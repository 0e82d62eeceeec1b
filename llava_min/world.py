"""A synthetic world a tiny model can learn to see: a few flat shapes on a plain background.

Each object has a shape, a colour, a size and a cell of a 3x3 grid (so positions have names);
every (colour, shape) pair appears at most once per scene, so each object can be named uniquely. The
scene's annotation (boxes included) is the "symbolic context" of the paper's Sec. 3: the captions
and boxes the text-only teacher sees, and the ground truth every answer is checked against.
"""
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 200, 30),
          "purple": (150, 60, 190), "orange": (245, 135, 30)}
SIZES = ("small", "large")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def cell_name(row: int, col: int) -> str:
    """Grid cell -> "top left", "top", "left", "center", ..."""
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
    objects: list

    @property
    def image(self) -> str:
        return f"{self.split}/{self.index:06d}.png"

    def to_json(self) -> dict:
        return {"image": self.image, "split": self.split, "size": self.size, "background": list(self.background),
                "objects": [{**asdict(o), "position": o.position, "box": list(o.box)} for o in self.objects]}


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """One generator per image, so workers and order cannot change the result."""
    return random.Random(f"{seed}/{split}/{index}")


def sample_scene(seed: int, split: str, index: int, size: int = 64, max_objects: int = 4) -> Scene:
    rng = scene_rng(seed, split, index)
    n = rng.randint(1, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    kinds = rng.sample([(col, shape) for col in COLORS for shape in SHAPES], n)  # unique (colour, shape)
    cell = size / 3
    objects = []
    for (row, col), (color, shape) in zip(cells, kinds):
        obj_size = rng.choice(SIZES)
        radius = cell * (0.42 if obj_size == "large" else 0.24)
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        box = tuple(round(v) for v in (cx - radius, cy - radius, cx + radius, cy + radius))
        objects.append(Obj(shape, color, obj_size, row, col, box))
    background = tuple(rng.randint(225, 250) for _ in range(3))
    return Scene(split, index, size, background, sorted(objects, key=lambda o: (o.row, o.col)))


def render(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        elif o.shape == "square":
            inset = (x2 - x1) * 0.1
            draw.rectangle((x1 + inset, y1 + inset, x2 - inset, y2 - inset), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return img


# ---------------------------------------------------------------- language about a scene

def ref(scene: Scene, o: Obj) -> str:
    """The shortest unique name: "the circle" if it is the only circle, else "the red circle"."""
    return f"the {o.shape}" if sum(x.shape == o.shape for x in scene.objects) == 1 else f"the {o.name}"


def where(o: Obj) -> str:
    return "in the center" if o.position == "center" else f"at the {o.position}"


def listing(scene: Scene, with_size=True, with_position=False) -> str:
    parts = [f"a {o.size + ' ' if with_size else ''}{o.name}" + (f" {where(o)}" if with_position else "")
             for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


CAPTIONS = (
    lambda s, rng: f"{listing(s).capitalize()}.",
    lambda s, rng: f"{listing(s, with_position=True).capitalize()}.",
    lambda s, rng: f"A picture of {listing(s, with_size=False)}.",
    lambda s, rng: f"{plural(len(s.objects), 'shape').capitalize()} on a plain background: {listing(s)}.",
    lambda s, rng: f"An image with {listing(s, with_position=True)}.",
)


def captions(scene: Scene, rng: random.Random) -> list:
    """Several captions of the scene (the paper's context type 1)."""
    return [make(scene, rng) for make in CAPTIONS]


def describe(scene: Scene) -> str:
    """A detailed description (one paragraph), as the rule teacher writes it."""
    n = len(scene.objects)
    first = f"The image shows {plural(n, 'object')} on a plain light background."
    details = " ".join(f"There is a {o.size} {o.name} {where(o)}." for o in scene.objects)
    colors = sorted({o.color for o in scene.objects})
    last = f"The colors in the image are {', '.join(colors[:-1]) + ' and ' if len(colors) > 1 else ''}{colors[-1]}."
    return f"{first} {details} {last}"
