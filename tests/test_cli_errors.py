"""Every command line met with a user's mistakes: a non-zero exit, one line `PROG: error: ...` naming the bad
thing, no traceback. Each test runs its command's catalogue in one subprocess, through the command's own
`if __name__ == "__main__"` (runpy), so the interpreter starts once per command, not once per mistake."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_min import errors
from llava_min.cli import run
from llava_min.checkpoint.weights import CheckpointError

ROOT = Path(__file__).resolve().parent.parent

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
results = []
for case in json.loads(sys.argv[1]):
    err, out, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            if case["target"].endswith(".py"):
                sys.argv = [case["target"]] + case["argv"]
                runpy.run_path(case["target"], run_name="__main__")
            else:
                sys.argv = ["-m"] + case["argv"]
                runpy.run_module(case["target"], run_name="__main__", alter_sys=True)
        except SystemExit as e:  # what the interpreter would print and return
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
print(json.dumps(results))
"""


def command_name(target: str) -> str:
    """What cli.run names a command: the script, `python -m PACKAGE`, or a module's file."""
    if target.endswith(".py"):
        return Path(target).name
    if (ROOT / target.replace(".", "/") / "__main__.py").is_file():
        return f"python -m {target}"
    return target.rpartition(".")[2] + ".py"


def run_catalogue(target: str, cases: list, prog: str = None) -> list:
    """cases: (argv, what the error line must name); each must fail with one clean line, `PROG: error: ...`
    (`prog`: a pattern for a command whose argparse names itself otherwise)."""
    payload = json.dumps([{"target": target, "argv": [str(a) for a in argv]} for argv, _ in cases])
    done = subprocess.run([sys.executable, "-c", DRIVER, payload], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    prog = prog or re.escape(command_name(target))
    for (argv, named), r in zip(cases, results):
        said = f"{target} {' '.join(map(str, argv))}:\n{r['stderr'][-2000:]}"
        assert "Traceback" not in r["stderr"], said
        assert r["code"] != 0, said
        line = r["stderr"].strip().splitlines()[-1]
        assert re.match(rf"{prog}( merge)?: error: ", line) and named in line, said  # (lora's subcommand: merge)
    return results


@pytest.mark.parametrize("kind", [CheckpointError, errors.InputError, errors.OptionError, errors.DataError,
                                  errors.ImageError, errors.TokenizerError, errors.TeacherError])
def test_cli_run_prints_a_users_mistake_in_one_line_and_keeps_a_bugs_traceback(capsys, monkeypatch, kind):
    monkeypatch.setattr(sys, "argv", ["inspect.py"])

    def mistake():  # each of the project's errors: one family, one type for cli.run to catch
        raise kind("ckpt/config.json is not valid JSON (Expecting value)\n")
    with pytest.raises(SystemExit) as stop:
        run(mistake)
    assert stop.value.code == "inspect.py: error: ckpt/config.json is not valid JSON (Expecting value)"
    with pytest.raises(ZeroDivisionError):
        run(lambda: 1 / 0)
    with pytest.raises(ValueError, match="a bug") as bug:  # a plain ValueError is no user's mistake
        run(lambda: int("a bug"))
    assert type(bug.value) is ValueError
    with pytest.raises(SystemExit) as stop:
        run(lambda: open("/nonexistent/x.json"))
    assert stop.value.code == "inspect.py: error: /nonexistent/x.json: No such file or directory"


def read_only() -> Path:
    """A directory this process cannot write in (as root, chmod does not stop it: /sys is mounted read-only)."""
    import tempfile
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only directory to try writing in")


@pytest.fixture
def world(tmp_path):
    """Records and images for the stages: good ones, and files for each mistake."""
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (28, 28), (200, 10, 10)).save(images / "a.png")
    pair = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red square."}]
    good = [{"id": f"ok{i}", "image": "a.png", "conversations": pair} for i in range(8)]
    (tmp_path / "good.json").write_text(json.dumps(good))
    bad = good[:7] + [{"id": "gone", "image": "gone.png", "conversations": pair},
                      {"id": "noimage", "conversations": pair},
                      {"id": "escape", "image": "../a.png", "conversations": pair}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "dup.json").write_text(json.dumps(good + good[:1]))
    (tmp_path / "broken.json").write_text('[{"id": "x", ')
    (tmp_path / "object.json").write_text(json.dumps({"data": good}))
    return tmp_path


def no_cuda(argv: list) -> list:
    """`--device cuda` on a machine without CUDA (the likeliest first mistake on a laptop), where there is none."""
    return [] if torch.cuda.is_available() else [(argv + ["--device", "cuda"],
                                                  "argument --device: cuda: CUDA is not available on this machine")]


def test_train(world, hf_clip_dir, hf_llama_dir, tiny_tokenizer, running):
    t = world
    (t / ".locked.lock").write_text(str(running))  # another run writes --out locked
    finished, unfinished, a_file = t / "finished", t / "unfinished", t / "a_file"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    (unfinished / "resume").mkdir(parents=True)
    torch.save({"step": 2}, unfinished / "resume" / "state.pt")
    a_file.write_text("x")
    one = ["--stage", "1", "--preset", "smoke", "--vision", hf_clip_dir, "--llm", hf_llama_dir, "--tokenizer",
           tiny_tokenizer, "--image-folder", t / "images", "--no-progress", "--no-whiten-features", "--batch-size", "2"]
    results = run_catalogue("train.py", [
        (["--stage", "1"], "--stage 1 needs --vision, --llm, --data, --image-folder, --out"),
        (["--stage", "2", "--data", t / "good.json", "--image-folder", t / "images", "--out", t / "o"],
         "--stage 2 needs --vision, --llm (or --init STAGE1_DIR"),
        (["--stage", "clip", "--out", t / "o"], "--stage clip needs --data, --image-folder, --tokenizer"),
        (["--stage", "lm", "--data", t / "good.json", "--out", t / "o"], "--stage lm needs --tokenizer"),
        (["--stage", "tokenizer", "--out", t / "tok.model"], "--stage tokenizer needs --data"),
        (["--stage", "1", "--vision", hf_clip_dir, "--llm", hf_llama_dir, "--data", t / "good.json",
          "--image-folder", t / "images", "--out", t / "o"], f"no tokenizer.model in {hf_llama_dir}"),
        (["--stage", "2", "--init", t / "nowhere"], f"argument --init: {t / 'nowhere'} does not exist"),
        (one + ["--data", t / "missing.json", "--out", t / "o"], f"argument --data: {t / 'missing.json'} does not"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--vision", t / "nowhere"], "argument --vision: "),
        (one + ["--data", t / "good.json", "--out", t / "o", "--image-folder", t / "nowhere"],
         f"argument --image-folder: {t / 'nowhere'} does not exist"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--vision", t / "images"], f"{t / 'images'} has no "
                                                                                        "config.json"),
        (one + ["--data", t / "good.json", "--out", a_file], f"--out {a_file} is a file, expected a directory"),
        (one + ["--data", t / "good.json", "--out", finished], f"--out {finished} holds a finished model"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--template", "nope"], "argument --template: invalid"),
        (one + ["--data", t / "broken.json", "--out", t / "o"], "broken.json: not a valid JSON list"),
        (one + ["--data", t / "object.json", "--out", t / "o"], "object.json: a JSON object, expected a JSON list"),
        (one + ["--data", t / "bad.json", "--out", t / "bad_out"],
         "bad.json: 3 of 10 records cannot be used: record gone: bad image: image "),
        (one + ["--data", t / "good.json", "--out", t / "o", "--resume"], "--resume: no snapshot in"),
        (one + ["--data", t / "good.json", "--out", unfinished], "holds the snapshot of an unfinished run (step 2)"),
        (one + ["--data", t / "good.json", "--out", t / "locked"], f"another run (pid {running}) is writing"),
        (["--preset", "smoke", "--out", t / "locked"], f"another run (pid {running}) is writing {t / 'locked'}"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--device", "gpu0"], "argument --device: 'gpu0' is not"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--device", "meta"], "argument --device: meta: not a"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--device", "cuda:99"], "argument --device: cuda:99: "),
        (one + ["--data", t / "good.json", "--out", t / "o", "--lora-dropout", "1.5"],
         "argument --lora-dropout: must be in [0, 1), got 1.5"),
        (one + ["--data", t / "good.json", "--out", t / "o", "--select-layer", "99"],
         f"--select-layer 99: the CLIP in {hf_clip_dir} has 3 layers, so the layer is one of -4 to 3"),
        (["--stage", "2", "--init", t / "images", "--select-layer", "-1", "--data", t / "good.json", "--image-folder",
          t / "images", "--out", t / "o"], f"--select-layer is fixed by the stage-1 model in --init {t / 'images'}"),
        (one + ["--data", t / "dup.json", "--out", t / "o"], "dup.json: record ok0: duplicate id: 'ok0' is also the "
                                                             "id of record #0"),
    ] + no_cuda(one + ["--data", t / "good.json", "--out", t / "o"]))
    line = results[16]["stderr"].strip().splitlines()[-1]  # every bad record, found before the first step
    assert "gone.png does not exist; record noimage: <image> without image" in line and "record escape:" in line
    assert not (t / "bad_out" / "metrics.jsonl").exists()


def test_chat(chat_model, tmp_path):
    adapter, truncated, not_json, no_tok = (tmp_path / n for n in ("adapter", "truncated", "not_json", "no_tok"))
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    shutil.copy(chat_model / "tokenizer.model", adapter)
    for d in (truncated, not_json, no_tok):
        shutil.copytree(chat_model, d)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (not_json / "config.json").write_text("{model_type: llava")
    (no_tok / "tokenizer.model").unlink()
    base = ["--prompt", "hi", "--device", "cpu"]
    run_catalogue("chat.py", [
        (["--model", tmp_path / "nowhere"] + base, f"argument --model: {tmp_path / 'nowhere'} does not exist"),
        (["--model", adapter] + base, f"{adapter}/adapter_config.json: peft_type None is not supported"),
        (["--model", truncated] + base, f"weight file {truncated / 'model.safetensors'} cannot be read"),
        (["--model", not_json] + base, f"{not_json / 'config.json'} is not valid JSON"),
        (["--model", no_tok] + base, f"no tokenizer at {no_tok / 'tokenizer.model'}"),
        (["--model", chat_model, "--max-new-tokens", "0"] + base, "argument --max-new-tokens: must be above 0"),
        (["--model", chat_model, "--temperature", "-1"] + base, "argument --temperature: must be at least 0"),
        (["--model", chat_model, "--top-p", "2"] + base, "argument --top-p: must be in (0, 1]"),
        (["--model", chat_model, "--prompt", " ", "--device", "cpu"], "--prompt is empty"),
        (["--model", chat_model, "--image", tmp_path / "missing.png"] + base, "missing.png does not exist"),
        (["--model", chat_model, "--prompt", "word " * 400, "--device", "cpu"], "shorten the prompt, or use a model"),
        (["--model", chat_model, "--prompt", "hi", "--device", "gpu0"], "argument --device: 'gpu0' is not a device"),
        (["--model", chat_model, "--prompt", "hi", "--device", "cuda:99"], "argument --device: cuda:99: "),
    ] + no_cuda(["--model", chat_model, "--prompt", "hi"]))


def test_eval(chat_model, tmp_path):
    record = {"id": "q1", "format": "short", "answer": "red", "image": "gone.png",
              "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}]}
    (tmp_path / "eval.json").write_text(json.dumps([record]))
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "empty.json").write_text("[]")
    model = ["--model", chat_model, "--device", "cpu"]
    unwritable = read_only() / "llava-min-results.json"
    run_catalogue("llava_min.eval", [
        (["--model", tmp_path / "nowhere", "--data", tmp_path / "eval.json"], "argument --model: "),
        (model, "give --data and/or --bench"),
        (model + ["--data", tmp_path / "eval.json", "--batch-size", "0"], "argument --batch-size: must be above 0"),
        (model + ["--data", tmp_path / "eval.json", "--out", unwritable],
         f"argument --out: cannot write in {read_only()}"),
        (model + ["--data", tmp_path / "missing.json"], f"argument --data: {tmp_path / 'missing.json'} does not"),
        (model + ["--data", tmp_path / "broken.json"], f"{tmp_path / 'broken.json'} is not valid JSON"),
        (model + ["--data", tmp_path / "eval.json", "--image-folder", tmp_path / "nowhere"], "argument --image-folder"),
        (model + ["--data", tmp_path / "eval.json", "--image-folder", tmp_path], "eval.json: record q1: image "),
        (model + ["--bench", tmp_path / "eval.json", "--api-base", closed_url()], "did not answer: connection refused"),
        (model + ["--data", tmp_path / "empty.json"], f"{tmp_path / 'empty.json'}: holds no records"),
        (["--model", chat_model, "--data", tmp_path / "eval.json", "--device", "meta"], "argument --device: meta: "),
    ] + no_cuda(["--model", chat_model, "--data", tmp_path / "eval.json"]))


def test_lora_merge(chat_model, tmp_path, running):
    import llava_min
    from llava_min.checkpoint.save import save_adapter
    from llava_min.model.low_rank import LoRAConfig, add_lora
    model = llava_min.load(chat_model)
    add_lora(model.language_model, LoRAConfig(r=2, alpha=4.0, dropout=0.0))
    adapter, misfit = tmp_path / "adapter", tmp_path / "misfit"
    save_adapter(model, adapter, base=tmp_path / "the-base-it-was-trained-on")
    shutil.copytree(adapter, misfit)
    config = json.loads((misfit / "adapter_config.json").read_text())
    (misfit / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # tensors of rank 2
    (tmp_path / "a_file").write_text("x")
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.json").write_text("{}")
    merge = ["merge", "--base", chat_model]
    (tmp_path / ".locked.lock").write_text(str(running))
    results = run_catalogue("llava_min.lora", [
        (merge + ["--adapter", tmp_path / "nowhere", "--out", tmp_path / "m"], "argument --adapter: "),
        (merge + ["--adapter", chat_model, "--out", tmp_path / "m"], f"{chat_model} is not a LoRA adapter"),
        (merge + ["--adapter", misfit, "--out", tmp_path / "m"], "has shape (2, "),
        (merge + ["--adapter", adapter, "--out", tmp_path / "a_file"], "is a file, expected a directory"),
        (merge + ["--adapter", adapter, "--out", finished], f"--out {finished} holds a finished model"),
        (merge + ["--adapter", adapter, "--out", tmp_path / "locked"],
         f"another run (pid {running}) is writing {tmp_path / 'locked'}"),
    ])
    assert "note: " in results[2]["stderr"]  # the recorded base is named when it is not --base
    done = run_catalogue_ok("llava_min.lora", merge + ["--adapter", adapter, "--out", tmp_path / "merged"])
    assert f"note: {adapter} was trained on {tmp_path / 'the-base-it-was-trained-on'}, not on --base" in done["stderr"]
    assert (tmp_path / "merged" / "config.json").is_file()


def closed_url() -> str:
    """An endpoint on a local port nothing listens on (bound, then closed): refused, offline."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def run_catalogue_ok(target: str, argv: list) -> dict:
    payload = json.dumps([{"target": target, "argv": [str(a) for a in argv]}])
    done = subprocess.run([sys.executable, "-c", DRIVER, payload], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    result = json.loads(done.stdout.splitlines()[-1])[0]
    assert result["code"] == 0 and "Traceback" not in result["stderr"], result["stderr"][-2000:]
    return result


def test_gen_data_bench_and_memory(tmp_path):
    """(gen_data.py checks its --out before drawing anything; bench and memory are one process each.)"""
    from llava_min.toy.build import build_world
    build_world(tmp_path / "w", num_images=2, num_eval=1, image_size=32, workers=1, progress=False)
    captions, instances = tmp_path / "captions.json", tmp_path / "instances.json"
    image = {"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}
    captions.write_text(json.dumps({"images": [image], "annotations": [{"image_id": 1, "caption": "A cat."}]}))
    instances.write_text(json.dumps({"images": [image], "annotations": [], "categories": []}))
    url = closed_url()
    run_catalogue("gen_data.py", [
        (["--out", read_only() / "llava-min-world"], f"argument --out: cannot write in {read_only()}"),
        (["--out", tmp_path / "w", "--num-images", "3", "--num-eval", "1", "--image-size", "32", "--workers", "1"],
         f"the world in {tmp_path / 'w'} was made with num_images 2 (this command: 3)"),
        (["--out", tmp_path / "x", "--num-images", "0"], "need at least one training image"),
        (["--out", tmp_path / "x", "--workers", "0"], "argument --workers: must be above 0"),
        (["--out", tmp_path / "x", "--coco-captions", tmp_path / "c.json", "--coco-instances", tmp_path / "i.json"],
         "argument --coco-captions: "),
        (["--out", tmp_path / "coco", "--coco-captions", captions, "--coco-instances", instances, "--teacher", "openai",
          "--api-base", url], f"{url}/chat/completions did not answer: connection refused"),
    ])
    assert not (tmp_path / "coco" / "instruct.json").exists()
    run_catalogue("llava_min.tools.bench", [
        (["--repeats", "0"], "argument --repeats: must be above 0"),
        (["--batches", "1", "0"], "argument --batches: must be above 0"),
        (["--out", read_only() / "llava-min-bench.json"], f"argument --out: cannot write in {read_only()}"),
        (["--device", "gpu0"], "argument --device: 'gpu0' is not a device name"),
    ] + no_cuda([]))
    run_catalogue("llava_min.tools.memory", [(["--seq-len", "0"], "--seq-len and --micro-batch must be at least 1")])


def test_inspect(chat_model, tiny_tokenizer, tmp_path):
    record = {"id": "r", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    assistant_first = json.dumps([{"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Hi"}])
    labels = ["labels", "--tokenizer", tiny_tokenizer]
    run_catalogue("llava_min.tools.inspect", [
        (labels + ["--data", tmp_path / "data.json", "--index", "-1"], "argument --index: must be at least 0, got -1"),
        (labels + ["--data", tmp_path / "data.json", "--index", "1"], "record index 1 is out of range: "),
        (labels + ["--conversation", assistant_first], "roles out of order: turn 0 is from 'gpt'"),
        (["shapes", "--model", chat_model, "--image", chat_model / "cat.png", "--device", "gpu0"],
         "argument --device: 'gpu0' is not a device name"),
    ], prog=r"(inspect\.py|python -m llava_min\.tools\.inspect (labels|shapes))")
