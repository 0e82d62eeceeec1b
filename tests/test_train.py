"""train.py on the `smoke` preset: what each stage freezes, that it learns, exact resume, DDP, and
checkpoints that load back in llava-min and in transformers."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llava_min
from llava_min.errors import DataError, OptionError
from llava_min.data.image import anyres_pixels
import train
from llava_min.train import stages
from llava_min.toy.pretrain import CaptionPairs
from llava_min.data.dataset import LlavaDataset, collate
from llava_min.tokenizer import Tokenizer
from llava_min.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


def stage1_model(parts):
    torch.manual_seed(0)  # the fresh projector
    return llava_min.build_llava(parts / "clip", parts / "lm", "mlp2x_gelu", dtype=torch.float32)


def fit(model, stage, parts, data="pretrain.json", steps=3, out=None, lr=1e-3, **cfg):
    tok = Tokenizer(parts / "tokenizer.model")
    ds = LlavaDataset(parts / "data" / data, tok, parts / "data" / "images", "plain" if stage == "1" else "vicuna_v1",
                      model.num_image_tokens, model.cfg.image_token_id, image_size=32)
    groups = stages.freeze_for_stage(model, stage, lr)
    cfg = TrainConfig(out_dir=str(out or parts / f"fit{stage}"), lr=lr, max_steps=steps, progress=False,
                      **{"batch_size": 4, **cfg})
    trainer = Trainer(model, groups, ds, collate, stages.llava_loss, stages.num_targets, cfg)
    return trainer.fit(save=lambda out: None)


def test_caption_pairs_name_the_file_and_record_of_a_bad_one(tmp_path):
    import json
    from llava_min.data.dataset import DataError
    (tmp_path / "pretrain.json").write_text(json.dumps([{"id": "cap-7", "conversations": [{"value": "x"}]}]))
    with pytest.raises(DataError, match="pretrain.json: record cap-7: a caption pair needs 'image'"):
        CaptionPairs(tmp_path / "pretrain.json", tmp_path, tok=None, image_size=32)
    pair = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red circle."}]
    for record, reason in [({"id": "cap-8", "image": "a.png", "conversations": [pair[0], {"from": "gpt"}]}, "value"),
                           ({"id": "cap-9", "image": ["a.png"], "conversations": pair}, "bad image field")]:
        (tmp_path / "pretrain.json").write_text(json.dumps([record]))
        with pytest.raises(DataError, match=f"pretrain.json: record {record['id']}: .*{reason}"):
            CaptionPairs(tmp_path / "pretrain.json", tmp_path, tok=None, image_size=32)
    (tmp_path / "pretrain.json").write_text(json.dumps([{"id": "cap-10", "image": "gone.png", "conversations": pair}]))
    tok = type("Tok", (), {"eos_id": 2, "encode": lambda self, text, bos: [1, 5]})()
    with pytest.raises(DataError, match="pretrain.json: record cap-10: bad image: .*gone.png"):
        CaptionPairs(tmp_path / "pretrain.json", tmp_path, tok=tok, image_size=32)[0]


def test_a_micro_batch_without_images_runs_a_blank_one_that_changes_nothing(hf_llava_dir):
    """So that under DDP / FSDP it meets the other processes in the same collectives (see with_blank_image)."""
    model = llava_min.load(hf_llava_dir)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels, "pixel_values": None}
    seen = []
    model.vision_tower.register_forward_hook(lambda *args: seen.append(True))
    _, loss = model(ids, labels=labels)
    torch.testing.assert_close(stages.llava_loss(model, batch), loss * stages.num_targets(batch), rtol=1e-6, atol=0)
    assert seen == [True]  # (the plain forward above ran no vision tower)
    empty = {"input_ids": torch.zeros(0, 0, dtype=torch.long), "labels": torch.zeros(0, 0, dtype=torch.long),
             "pixel_values": None}  # every record skipped
    zero = stages.llava_loss(model, empty)
    zero.backward()
    assert zero.item() == 0 and all(p.grad is not None for p in model.projector.parameters())


def test_stage1_changes_only_the_projector(parts):
    model = stage1_model(parts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, "1", parts)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("projector.")}


def test_stage2_leaves_the_vision_tower_untouched(parts):
    model = stage1_model(parts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, "2", parts, data="instruct.json")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(k.startswith("vision_tower.") for k in changed)
    assert any(k.startswith("language_model.layers.") for k in changed) and any(k.startswith("projector.") for k in changed)


def test_a_handful_of_records_is_overfit(parts, tmp_path):
    import json
    records = json.loads((parts / "data" / "instruct.json").read_text())[:4]
    (parts / "data" / "few.json").write_text(json.dumps(records))
    losses = fit(stage1_model(parts), "2", parts, data="few.json", steps=40, lr=1e-2, warmup_ratio=0.0)
    assert losses[-1] < 0.25 * losses[0], losses


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_reproduces_the_uninterrupted_losses(parts, tmp_path, group_by_length):
    run = dict(data="instruct.json", steps=6, group_by_length=group_by_length)
    whole = fit(stage1_model(parts), "2", parts, out=tmp_path / "a", **run)
    first = fit(stage1_model(parts), "2", parts, out=tmp_path / "b", stop_after=3, **run)
    assert (tmp_path / "b" / "resume" / "state.pt").is_file()
    with open(tmp_path / "b" / "resume" / "metrics.jsonl", "a") as f:  # a crash in the middle of a log line
        f.write('{"step": 4, "lo')
    state = tmp_path / "b" / "resume"  # and between the snapshot's two renames: only the previous one is left
    state.rename(state.with_name(".resume.old"))
    rest = fit(stage1_model(parts), "2", parts, out=tmp_path / "b", resume=True, **run)
    assert first + rest == whole
    logged = [l for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6


def stage2_in_process(parts, out, *extra, data=None):
    train.main(["--stage", "2", "--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
                "--tokenizer", str(parts / "tokenizer.model"), "--data", str(data or parts / "data" / "instruct.json"),
                "--image-folder", str(parts / "data" / "images"), "--max-steps", "4", "--batch-size", "4",
                "--no-progress", "--out", str(out), *extra])


@pytest.mark.parametrize("change,named", [(["--batch-size", "2"], "batch_size 4 there, 2 here"),
                                          (["--no-whiten-features"], "whitened True there, False here"),
                                          (["--max-steps", "6"], "total_steps 4 there, 6 here"),
                                          (["--lr", "5e-4"], "lr"), ("data", "data_sha256")])
def test_resume_refuses_other_settings_naming_them(parts, tmp_path, change, named):
    """Another batch size, schedule, data file or projector parametrization would continue a different run."""
    import json
    stage2_in_process(parts, tmp_path / "out", "--stop-after", "2")
    data = None
    if change == "data":  # the same file name, edited
        data = tmp_path / "instruct.json"
        data.write_text(json.dumps(json.loads((parts / "data" / "instruct.json").read_text())[::-1]))
        change = []
    with pytest.raises(ValueError, match=f"settings differ from the interrupted run's .*{named}"):
        stage2_in_process(parts, tmp_path / "out", "--resume", *change, data=data)


def test_nothing_left_after_skipping_is_said_so(parts, tmp_path):
    import json
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "only", "image": "x.png", "conversations": []}]))
    with pytest.raises(DataError, match="no record left to train on, all 1 were skipped: record only: empty"):
        stage2_in_process(parts, tmp_path / "out", "--on-error", "skip", data=tmp_path / "bad.json")


def test_a_snapshot_is_neither_made_up_nor_dropped(parts, tmp_path):
    """--resume without a snapshot, or a fresh start over an unfinished run's snapshot, is an error; a
    finished run removes its snapshot (the checkpoint supersedes it), and a crash's temporary copy goes. Both
    errors are the user's (an InputError: one line from the command line, see test_cli_errors.py)."""
    from llava_min.files import InputError
    from llava_min.train.snapshots import SnapshotError
    assert issubclass(SnapshotError, InputError)
    with pytest.raises(SnapshotError, match="--resume: no snapshot in"):
        stage2_in_process(parts, tmp_path / "typo", "--resume")
    stage2_in_process(parts, tmp_path / "out", "--stop-after", "2")
    with pytest.raises(SnapshotError, match="snapshot of an unfinished run \\(step 2\\): pass --resume"):
        stage2_in_process(parts, tmp_path / "out")
    (tmp_path / "out" / ".resume.k3j2x1ab").mkdir()  # what a kill in the middle of writing a snapshot leaves
    stage2_in_process(parts, tmp_path / "out", "--resume", "--save-every", "1")
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith((".", "resume"))) == []


def test_a_finished_model_is_replaced_only_when_asked_and_only_once_the_new_one_is_complete(parts, tmp_path,
                                                                                            monkeypatch, capsys):
    """tests/test_saving.py kills every file operation of a save in turn; here the whole command line."""
    import llava_min.checkpoint.save as ck
    out = tmp_path / "out"
    stage2_in_process(parts, out)
    before = load_file(out / "model.safetensors")
    with pytest.raises(SystemExit):
        stage2_in_process(parts, out, "--select-layer", "-1")
    assert "holds a finished model (config.json): pass --overwrite" in capsys.readouterr().err

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(ck, "save_safetensors", killed)  # dies writing the new weights
        with pytest.raises(KeyboardInterrupt):
            stage2_in_process(parts, out, "--select-layer", "-1", "--overwrite")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert llava_min.load(out).cfg.select_layer == -2  # the old model, whole: its config with its weights
    stage2_in_process(parts, out, "--select-layer", "-1", "--overwrite")
    assert llava_min.load(out).cfg.select_layer == -1 and len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / "resume").exists()


def test_accumulated_micro_batches_equal_one_big_batch(parts, tmp_path):
    """The 7B presets accumulate 16 micro-batches: 2 x 2 must take the steps 1 x 4 takes."""
    run = dict(data="instruct.json", steps=3)  # losses, not weights: Adam turns rounding-sized gradients into lr-sized steps
    losses = fit(stage1_model(parts), "2", parts, out=tmp_path / "a", **run)
    assert fit(stage1_model(parts), "2", parts, out=tmp_path / "b", batch_size=2, grad_accum=2, **run) == \
        pytest.approx(losses, rel=1e-6)


def test_learning_rate_warms_up_then_follows_the_cosine(parts, tmp_path):
    import json
    import math
    from llava_min.train.trainer import lr_at
    assert [lr_at(s, 100, 10, 1.0) for s in (0, 4, 9, 10, 55, 100)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 0.5, 0.0])
    fit(stage1_model(parts), "2", parts, data="instruct.json", steps=8, out=tmp_path, lr=1e-3, warmup_ratio=0.25)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [1e-3 * (s + 1) / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(8)]
    assert logged == pytest.approx(expected)


def test_loader_workers_change_nothing(parts, tmp_path):
    run = dict(data="instruct.json", steps=4, group_by_length=True)
    alone = fit(stage1_model(parts), "2", parts, out=tmp_path / "a", **run)
    assert fit(stage1_model(parts), "2", parts, out=tmp_path / "b", num_workers=2, **run) == alone


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocast_only_when_asked_with_fp32_weights(parts, tmp_path, bf16):
    model = stage1_model(parts)
    seen = set()
    model.language_model.lm_head.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    fit(model, "2", parts, data="instruct.json", steps=2, out=tmp_path, bf16=bf16)
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def run_stage2(parts, out, extra, nproc=None, data=None, images=None):
    args = ["--stage", "2", "--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
            "--tokenizer", str(parts / "tokenizer.model"), "--data", str(data or parts / "data" / "instruct.json"),
            "--image-folder", str(images or parts / "data" / "images"), "--max-steps", "3", "--out", str(out),
            "--no-progress",
            "--seed", "1", "--no-bf16"] + extra  # fp32: the sums over processes then agree to ~1e-6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    done = subprocess.run(launcher + [str(ROOT / "train.py")] + args, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # a collective mismatch hangs: fail instead
    assert done.returncode == 0, f"train.py {' '.join(extra)} failed:\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(parts, tmp_path, mode):
    """Stage 2 from a random projector (no stage 1): the projector must be seeded the same way too.
    The FSDP run is also interrupted after one step and resumed from its sharded snapshot. Most records
    are skipped as their batches come (images that cannot be decoded), so some micro-batch of one process has
    none left: it must still take part in every collective, and a step with none left at all updates nothing."""
    import json
    import shutil
    records = [r for r in json.loads((parts / "data" / "instruct.json").read_text()) if r.get("image")]
    images = tmp_path / "images"
    for r in records[:4]:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parts / "data" / "images" / r["image"], images / r["image"])
    from PIL import Image
    Image.effect_noise((64, 64), 64).save(images / "whole.png")
    for i in range(12):  # a good header, the pixels cut short: found only when read
        (images / f"broken-{i}.png").write_bytes((images / "whole.png").read_bytes()[:300])
    bad = [{**r, "id": f"bad-{i}", "image": f"broken-{i}.png"} for i, r in enumerate(records[4:16])]
    broken = {"id": "broken", "image": "x.png", "conversations": []}  # dropped before training
    (tmp_path / "mixed.json").write_text(json.dumps(records[:4] + bad + [broken]))
    plain = ["--on-error", "skip"] + ([] if mode == "ddp" else ["--no-whiten-features"])  # FSDP: unwhitened
    said = run_stage2(parts, tmp_path / "one", ["--batch-size", "4"] + plain, data=tmp_path / "mixed.json",
                      images=images)
    if mode == "ddp":
        said_two = run_stage2(parts, tmp_path / "two", ["--batch-size", "2"] + plain, nproc=2,
                              data=tmp_path / "mixed.json", images=images)
    else:
        for extra in (["--stop-after", "1"], ["--resume"]):  # the count goes on across the resume, per process
            said_two = run_stage2(parts, tmp_path / "two", ["--batch-size", "2", "--fsdp"] + extra + plain, nproc=2,
                                  data=tmp_path / "mixed.json", images=images)
    count = [line for line in said.splitlines() if line.startswith("skipped")]
    assert count and count[0].startswith("skipped bad records (--on-error skip): 1 when the data was read in, ")
    assert [line for line in said_two.splitlines() if line.startswith("skipped")] == count  # the total, once
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5, msg=k)


def test_checkpoint_loads_back_and_in_transformers(parts, tmp_path):
    from transformers import LlavaForConditionalGeneration
    from conftest import hf_reference
    run_stage2(parts, tmp_path / "ckpt", ["--batch-size", "4"])
    ours = llava_min.load(tmp_path / "ckpt")
    theirs = hf_reference(LlavaForConditionalGeneration, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.model").is_file()
    ids = torch.tensor([[1] + [ours.cfg.image_token_id] * ours.num_image_tokens + [5, 6, 7, 8]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=x)[0], theirs(input_ids=ids, pixel_values=x).logits,
                                   atol=1e-5, rtol=1e-5)


def test_stage2_from_an_official_stage1_release_saves_what_transformers_loads(parts, tmp_path):
    """An official stage-1 release names no image token (the -200 placeholder): stage 2 gives `<image>` a row."""
    import json
    from transformers import LlavaForConditionalGeneration
    from conftest import hf_reference
    common = ["--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"), "--tokenizer",
              str(parts / "tokenizer.model"), "--image-folder", str(parts / "data" / "images"), "--max-steps", "2",
              "--no-progress", "--no-whiten-features"]
    release = tmp_path / "release"
    train.main(["--stage", "1", "--data", str(parts / "data" / "pretrain.json"), "--out", str(release)] + common)
    cfg = json.loads((release / "config.json").read_text())
    del cfg["image_token_index"]
    (release / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "lmsys/vicuna-7b-v1.5",
                                                     "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    assert llava_min.load(release, vision_path=parts / "clip", llm_path=parts / "lm").cfg.image_token_id == -200
    train.main(["--stage", "2", "--init", str(release), "--data", str(parts / "data" / "instruct.json"),
                "--out", str(tmp_path / "s2")] + common)
    ours = llava_min.load(tmp_path / "s2")
    vocab = Tokenizer(parts / "tokenizer.model").sp.get_piece_size()
    assert ours.cfg.image_token_id == vocab and ours.cfg.text.vocab_size % 64 == 0
    theirs = hf_reference(LlavaForConditionalGeneration, tmp_path / "s2")
    ids = torch.tensor([[1] + [ours.cfg.image_token_id] * ours.num_image_tokens + [5, 6, 7, 8]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=x)[0], theirs(input_ids=ids, pixel_values=x).logits,
                                   atol=1e-5, rtol=1e-5)
    # LoRA on the release, merged by naming the same CLIP and LLM
    from llava_min.lora import main as lora_main
    train.main(["--stage", "2", "--init", str(release), "--data", str(parts / "data" / "instruct.json"),
                "--out", str(tmp_path / "lora"), "--lora", "--lora-r", "4"] + common)
    lora_main(["merge", "--base", str(release), "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"),
               "--vision", str(parts / "clip"), "--llm", str(parts / "lm")])
    assert llava_min.load(tmp_path / "merged").cfg.image_token_id == vocab


def test_stage1_crops_and_stage2_pads_as_the_official_scripts(parts, tmp_path, monkeypatch):
    """LLaVA-1.5: pretrain.sh leaves the plain CLIP processor (center crop), finetune.sh pads (image_aspect_ratio pad)."""
    import json
    seen = []
    original = stages.LlavaDataset
    monkeypatch.setattr(stages, "LlavaDataset", lambda *a, **kw: seen.append(kw["image_aspect"]) or original(*a, **kw))
    common = ["--preset", "llava-v1.5-7b", "--tokenizer", str(parts / "tokenizer.model"), "--image-folder",
              str(parts / "data" / "images"), "--batch-size", "4", "--grad-accum", "1", "--max-steps", "1",
              "--no-progress", "--device", "cpu"]
    train.main(["--stage", "1", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"), "--data",
                str(parts / "data" / "pretrain.json"), "--out", str(tmp_path / "s1")] + common)
    train.main(["--stage", "2", "--init", str(tmp_path / "s1"), "--data", str(parts / "data" / "instruct.json"),
                "--out", str(tmp_path / "s2")] + common)
    assert seen == ["crop", "pad"]
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["image_aspect_ratio"] == "crop"
    assert llava_min.load(tmp_path / "s2").cfg.image_aspect_ratio == "pad"
    from llava_min.lora import main as lora_main  # LoRA: the adapter says what stage 2 trained with
    train.main(["--stage", "2", "--init", str(tmp_path / "s1"), "--data", str(parts / "data" / "instruct.json"),
                "--out", str(tmp_path / "lora"), "--lora", "--lora-r", "2"] + common)
    lora_main(["merge", "--base", str(tmp_path / "s1"), "--adapter", str(tmp_path / "lora"), "--out",
               str(tmp_path / "merged")])
    assert llava_min.load(tmp_path / "merged").cfg.image_aspect_ratio == "pad"


def test_nan_loss_stops_with_a_clear_message(parts, tmp_path, monkeypatch):
    calls, clean = [], stages.llava_loss

    def poisoned(model, batch):  # the third step's loss is NaN
        calls.append(1)
        loss = clean(model, batch)
        return loss * float("nan") if len(calls) > 2 else loss
    monkeypatch.setattr(stages, "llava_loss", poisoned)
    with pytest.raises(OptionError, match="loss is nan at step 2.*intact"):
        fit(stage1_model(parts), "2", parts, data="instruct.json", steps=4, out=tmp_path, save_every=1)
    state = torch.load(tmp_path / "resume" / "state.pt", weights_only=True)
    assert state["step"] == 2  # the snapshot of the last good step survives


def test_lora_stage2_saves_an_adapter_that_resumes_and_merges(parts, tmp_path):
    import json
    from llava_min.checkpoint.peft import load_adapter
    from llava_min.lora import main as lora_main
    stage1 = tmp_path / "stage1"
    train.main(["--stage", "1", "--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
                "--tokenizer", str(parts / "tokenizer.model"), "--data", str(parts / "data" / "pretrain.json"),
                "--image-folder", str(parts / "data" / "images"), "--max-steps", "2", "--out", str(stage1),
                "--no-progress"])
    args = ["--stage", "2", "--preset", "smoke", "--init", str(stage1), "--data", str(parts / "data" / "instruct.json"),
            "--image-folder", str(parts / "data" / "images"), "--max-steps", "4", "--no-progress", "--lora",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.3"]  # dropout: resume restores its RNG
    train.main(args + ["--out", str(tmp_path / "whole")])
    train.main(args + ["--out", str(tmp_path / "parts"), "--stop-after", "2"])
    assert not (tmp_path / "parts" / "adapter_model.safetensors").exists()
    train.main(args + ["--out", str(tmp_path / "parts"), "--resume"])
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("whole", "parts")]
    assert losses[0] == losses[1] and len(losses[0]) == 4

    adapter = tmp_path / "whole"
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors", "config.json"]  # peft's layout + the model's settings
    lora_main(["merge", "--base", str(stage1), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    base = llava_min.load(stage1)
    load_adapter(base, adapter)
    merged = llava_min.load(tmp_path / "merged")
    ids = torch.tensor([[1] + [merged.cfg.image_token_id] * merged.num_image_tokens + [5, 6, 7]])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, pixel_values=x)[0], base.eval()(ids, pixel_values=x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra,adapter_lr,projector_lr", [([], 1e-2, 1e-3), (["--lr", "5e-4"], 5e-4, 1e-3),
                                                            (["--projector-lr", "2e-4"], 1e-2, 2e-4)])
def test_lora_learning_rates_unless_given(parts, monkeypatch, tmp_path, extra, adapter_lr, projector_lr):
    """LLaVA-1.5's LoRA recipe: 10 times the stage-2 lr for the adapters, the projector's lr unchanged."""
    from llava_min.checkpoint.save import save_stage1
    stage1 = tmp_path / "stage1"  # an untrained stage 1: the adapter's base (a LoRA stage 2 needs --init)
    save_stage1(llava_min.build_llava(parts / "clip", parts / "lm"), stage1, parts / "clip", parts / "lm",
                parts / "tokenizer.model")
    seen = []

    def record(model, stage, lr, projector_lr=None, lora=None):
        seen.append((lr, projector_lr))
        raise KeyboardInterrupt  # enough: the learning rates are decided
    monkeypatch.setattr(stages, "freeze_for_stage", record)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--stage", "2", "--preset", "smoke", "--init", str(stage1),
                    "--tokenizer", str(parts / "tokenizer.model"), "--data", str(parts / "data" / "instruct.json"),
                    "--image-folder", str(parts / "data" / "images"), "--out", "unused", "--lora"] + extra)
    assert seen == [(pytest.approx(adapter_lr), pytest.approx(projector_lr))]


def test_trained_parts_keep_fp32_masters_the_rest_bf16(parts):
    """What train.py does to a bf16-loaded model on CUDA, checked here on CPU."""
    model = llava_min.build_llava(parts / "clip", parts / "lm", "mlp2x_gelu", dtype=torch.bfloat16)
    model.use_anyres([(64, 32), (32, 64)])
    train.master_weights(model, "2", lora=None)
    dtypes = lambda m: {p.dtype for p in m.parameters()}  # noqa: E731
    assert dtypes(model.vision_tower) == {torch.bfloat16}
    assert dtypes(model.projector) == dtypes(model.language_model) == {torch.float32}
    assert model.image_newline.dtype == torch.float32  # trained with the projector


def test_anyres_stage2_trains_and_loads_in_transformers(parts, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    from conftest import hf_reference
    run_stage2(parts, tmp_path / "next", ["--batch-size", "4", "--anyres"])
    ours = llava_min.load(tmp_path / "next")
    assert ours.anyres is not None and (ours.image_newline != 0).any()
    theirs = hf_reference(LlavaNextForConditionalGeneration, tmp_path / "next")
    size = (40, 90)
    img = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (size[1], size[0]), (200, 30, 30))
    pixels = anyres_pixels(img, ours.anyres)
    ids = torch.tensor([[1] + [ours.cfg.image_token_id] * ours.image_token_count(size) + [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels, image_sizes=[size])[0],
                                   theirs(input_ids=ids, pixel_values=pixels[None], image_sizes=torch.tensor([size])).logits,
                                   atol=1e-5, rtol=1e-5)


def test_whitened_stages_save_plain_checkpoints(parts, tmp_path):
    """Stage 1 and 2 with --whiten-features write the usual keys, which load back; the flag changes the result."""
    common = ["--preset", "smoke", "--tokenizer", str(parts / "tokenizer.model"),
              "--image-folder", str(parts / "data" / "images"), "--max-steps", "3", "--no-progress"]
    outs = {}
    for flag in ("--whiten-features", "--no-whiten-features"):
        s1, s2 = tmp_path / flag / "s1", tmp_path / flag / "s2"
        train.main(["--stage", "1", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
                    "--data", str(parts / "data" / "pretrain.json"), "--out", str(s1), flag] + common)
        train.main(["--stage", "2", "--init", str(s1), "--data", str(parts / "data" / "instruct.json"),
                    "--out", str(s2), flag] + common)
        outs[flag] = (load_file(s1 / "mm_projector.safetensors"), load_file(s2 / "model.safetensors"))
        llava_min.load(s2)
    (w1, w2), (p1, p2) = outs["--whiten-features"], outs["--no-whiten-features"]
    assert w1.keys() == p1.keys() and w2.keys() == p2.keys()
    assert not torch.allclose(w1["model.mm_projector.0.weight"], p1["model.mm_projector.0.weight"])


def test_length_grouped_order_is_the_same_samples_with_less_padding():
    from llava_min.train.trainer import length_grouped
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1003,), generator=g).tolist()
    order = torch.randperm(1003, generator=g)
    grouped = length_grouped(order, lengths, batch=8, generator=torch.Generator().manual_seed(1), megabatch=10)
    assert sorted(grouped.tolist()) == list(range(1003))
    assert grouped[-3:].tolist() == order[-3:].tolist()  # the part of a batch the epoch drops stays at the end

    def padded(o):
        return sum(max(lengths[i] for i in o[k: k + 8].tolist()) * 8 for k in range(0, 1000, 8))
    assert padded(grouped) < 0.75 * padded(order)
    again = length_grouped(order, lengths, batch=8, generator=torch.Generator().manual_seed(1), megabatch=10)
    assert torch.equal(grouped, again)
    first = [max(lengths[i] for i in grouped[k: k + 8].tolist()) for k in range(0, 80, 8)]
    assert first != sorted(first, reverse=True)  # the batches are shuffled, not longest first


def test_record_lengths_rank_the_tokenized_lengths(parts):
    from llava_min.train.trainer import sample_lengths
    tok = Tokenizer(parts / "tokenizer.model")
    ds = LlavaDataset(parts / "data" / "instruct.json", tok, parts / "data" / "images", "vicuna_v1", 4, -200,
                      image_size=32)
    tokens = torch.tensor([float(len(ds.tokens(r, 4)[0])) for _, r in ds.records])
    words = torch.tensor(ds.lengths, dtype=torch.float)
    ranks = torch.stack([tokens.argsort().argsort(), words.argsort().argsort()]).float()
    assert torch.corrcoef(ranks)[0, 1] > 0.9  # Spearman
    subset = torch.utils.data.Subset(ds, [3, 1])
    assert sample_lengths(subset) == [ds.lengths[3], ds.lengths[1]]
    with pytest.raises(ValueError, match="lengths"):
        sample_lengths(torch.utils.data.TensorDataset(torch.zeros(3)))
