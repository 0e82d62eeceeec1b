"""The layout's promises: the tree shows Fig. 1, the method never imports the toy world, the tools or a
script, text needs no model code and the model no image or text code, and modules stay small."""
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llava_min"
SCRIPTS = {"train", "chat", "gen_data"}
CITATION = re.compile(r"SPEC( section|\.md| §)|\(issue[: ]")  # files a user of this repository lacks
TEXT = {"llava_min.tokenizer", "llava_min.conversation"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """Every module `path` imports (relative imports resolved), at any depth of the file."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).
                      with_suffix(".py").is_file()}
    return found


MODULES = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
METHOD = {m for m in MODULES if not m.startswith(("llava_min.toy", "llava_min.tools"))}


def test_import_llava_min_loads_no_script_toy_or_tool():
    code = "import sys, llava_min; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert not loaded & SCRIPTS
    assert not [m for m in loaded if m.startswith(("llava_min.toy", "llava_min.tools"))]


def test_the_method_imports_no_toy_tool_or_script():
    for name in METHOD:
        wrong = [m for m in MODULES[name] if m.split(".")[0] in SCRIPTS or m.startswith(("llava_min.toy",
                                                                                         "llava_min.tools"))]
        assert not wrong, f"{name} imports {wrong}"


def test_text_needs_no_model_and_the_model_no_image_or_text():
    for name in TEXT:
        assert not [m for m in MODULES[name] if m.startswith("llava_min.model")], name
    for name in (m for m in MODULES if m.startswith("llava_min.model")):
        outside = [m for m in MODULES[name] if m.startswith("llava_min") and not m.startswith("llava_min.model")]
        assert not outside, f"{name} imports {outside}"


# The pipeline's packages, each above what it may import (the shared errors, files and cli under all of them).
LAYERS = {"model": set(), "text": set(), "checkpoint": {"model", "text"}, "data": {"model", "text"},
          "train": {"model", "text", "data", "checkpoint"}, "eval": {"model", "text", "data", "checkpoint"},
          "lora": {"model", "text", "checkpoint"}}
SHARED = {"errors", "files", "cli"}


def group(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else ""
    return "text" if part in ("tokenizer", "conversation") else part


def test_the_pipeline_packages_import_only_what_is_below_them():
    for name, deps in MODULES.items():
        if group(name) not in LAYERS:
            continue
        above = {group(m) for m in deps if m.startswith("llava_min.") and group(m) != group(name)}
        wrong = above - LAYERS[group(name)] - SHARED
        assert not wrong, f"{name} imports from {sorted(wrong)}"


def test_no_import_cycles():
    graph = {m: {i for i in deps if i in MODULES and i != m} for m, deps in MODULES.items()}
    for m in graph:
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}  # a package's __init__ is not a cycle
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for n in sorted(graph[m]):
            visit(n, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        visit(m, [])


def test_the_model_folder_shows_fig_1():
    names = {p.stem for p in (PACKAGE / "model").glob("*.py")}
    assert {"clip", "projector", "llama", "llava", "anyres", "low_rank"} <= names


def test_modules_stay_small():
    for path in list(PACKAGE.rglob("*.py")) + [ROOT / f"{s}.py" for s in SCRIPTS]:
        assert len(path.read_text().splitlines()) <= 300, f"{path.relative_to(ROOT)} is over 300 lines"
    for path in (PACKAGE / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                assert n <= 60, f"{path.name}: {node.name} is {n} lines"


def test_nothing_cites_a_file_users_do_not_have():
    files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".md") and ".git" not in p.parts
             and p != Path(__file__)]
    for path in files:
        text = path.read_text(errors="ignore")
        found = CITATION.search(text)
        assert not found, f"{path.relative_to(ROOT)} cites {found.group(0)!r}"
