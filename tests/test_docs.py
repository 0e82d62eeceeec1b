"""Every command in the README and the reading guide runs, so the documentation cannot rot.

Commands run from a scratch directory with the repository on PYTHONPATH. The toy pipeline runs at
smoke size; the README's chat commands and Python snippet run against tiny random stand-ins of the
checkpoints they name. Commands that need real weights, a GPU, several GPUs or the network are listed
in SKIPPED with the reason, and any other command the documents gain must be run here.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = {  # a command's start -> why it is not run here
    "pip install": "installation: .ci/run installs on a fresh machine",
    "python -m pytest": "the test suite itself",
    "hf download": "downloads: no network in tests (stand-ins of the downloads are built instead)",
    "torchrun": "several GPUs",
    "python train.py --preset llava-v1.5-7b": "real 7B weights and data",
    "python -m llava_min.tools.bench --config 7b": "a CUDA GPU",
    "python train.py --ablations": "the whole ablation table (an hour); its smoke size runs in test_toy.py",
}


def commands(doc: Path, lang: str = "bash") -> list:
    """The commands of a document's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    for block in re.findall(rf"```{lang}\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                found.append(re.sub(r"\s+", " ", line))
    return found


def skipped(command: str):
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def run(command: str, cwd: Path, smoke: bool = False) -> str:
    """Runs a documented command as a reader would, from `cwd`; `smoke`: the toy pipeline at smoke size."""
    command = re.sub(r"^python (train|chat|gen_data)\.py", lambda m: f"{sys.executable} {ROOT}/{m.group(1)}.py",
                     command)
    command = re.sub(r"^python -", f"{sys.executable} -", command)
    if smoke:
        command += " --preset smoke --no-progress"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "Traceback" not in done.stderr, f"{command}\n{done.stdout[-2000:]}\n{done.stderr}"
    return done.stdout


def test_the_reading_guide_runs(tmp_path):
    """The guide's commands name the toy's paths; here `python train.py` (the toy, then its LoRA stage) runs at
    smoke size into those paths, and every other command runs on what it made."""
    for command in commands(ROOT / "docs" / "reading-guide.md"):
        assert not skipped(command), command
        run(command, tmp_path, smoke=command.startswith("python train.py"))
    assert (tmp_path / "runs/toy/lora/adapter_config.json").is_file()
    assert (tmp_path / "runs/toy/square.png").is_file() and (tmp_path / "runs/toy/attention.png").is_file()


@pytest.fixture(scope="module")
def stand_ins(chat_model, tmp_path_factory):
    """The checkpoints the README downloads, as tiny random stand-ins under the same names: llava-hf's
    llava-1.5-7b-hf, and the official trio (LLaVA weights + CLIP + the tokenizer)."""
    import torch
    from PIL import Image

    import llava_min
    from llava_min.checkpoint.save import save_vision
    from llava_min.checkpoint.weights import read_tensors, weight_files
    cwd = tmp_path_factory.mktemp("readme")
    shutil.copytree(chat_model, cwd / "llava-1.5-7b-hf")
    Image.open(chat_model / "cat.png").convert("RGB").save(cwd / "cat.jpg")
    save_vision(llava_min.load(chat_model).vision_tower, cwd / "clip-vit-large-patch14-336")
    official, names = cwd / "llava-v1.5-7b", {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
                                              "multi_modal_projector.linear_1.": "model.mm_projector.0.",
                                              "multi_modal_projector.linear_2.": "model.mm_projector.2."}
    official.mkdir()
    tensors = {}
    for key, tensor, _ in read_tensors(weight_files(chat_model)):
        for old, new in names.items():
            if key.startswith(old):
                tensors[new + key[len(old):]] = tensor
    torch.save(tensors, official / "pytorch_model.bin")
    text = json.loads((chat_model / "config.json").read_text())["text_config"]
    (official / "config.json").write_text(json.dumps({
        **text, "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False}))
    shutil.copy(chat_model / "tokenizer.model", official / "tokenizer.model")
    return cwd


def test_every_readme_command_runs_or_is_listed(stand_ins):
    for command in commands(ROOT / "README.md"):
        if skipped(command):
            continue
        if command == "python train.py":
            run(command, stand_ins, smoke=True)
            assert (stand_ins / "runs/toy/full/results.json").is_file()
        else:
            run(command, stand_ins)


def test_the_quick_start_installs_the_cpu_torch_first_and_ci_follows_it():
    """Followed line by line, the quick start installs the CPU torch before requirements.txt could pull a
    CUDA build; .ci/run runs the same install lines in the same order."""
    installs = [c.split(" && ")[0] for c in commands(ROOT / "README.md")
                if c.startswith("pip install") and ("torch" in c or "requirements" in c)]
    assert installs[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    ci = (ROOT / ".ci/run").read_text()
    assert [ci.index(c) for c in installs] == sorted(ci.index(c) for c in installs)


def test_the_readme_python_snippet_runs(stand_ins):
    (snippet,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    snippet = snippet.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
    out = subprocess.run([sys.executable, "-c", snippet], cwd=stand_ins, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_the_readme_model_table_counts_lines():
    """The README's first table gives each model file's size, as nanoVLM does: it must stay true."""
    rows = [r for r in (ROOT / "README.md").read_text().splitlines() if r.startswith("| [`llava_min/model/")]
    assert rows
    for row in rows:
        files = re.findall(r"\]\((llava_min/model/\w+\.py)\)", row)
        counts = [int(c) for c in re.findall(r"\d+", row.split("|")[2])]
        assert counts == [len((ROOT / f).read_text().splitlines()) for f in files], row
