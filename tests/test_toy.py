"""The whole toy pipeline (`python train.py`) at the smallest size: every step runs, every field of the
results file is filled, a rerun skips what exists, and the ablation table is produced."""
import dataclasses
import json

import pytest
import torch

import llava_min
import train
from llava_min.errors import OptionError
from llava_min.toy.pipeline import check_settings
from llava_min.toy.presets import TOY_PRESETS
from llava_min.toy.plan import ABLATIONS, made_with, plan, stage_epochs, variant_name, with_row


def filled(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(filled(v) for v in value.values())
    if isinstance(value, list):
        return bool(value) and all(filled(v) for v in value)
    return value is not None and value != ""


def test_smoke_pipeline_and_ablations(tmp_path, capsys):
    args = ["--preset", "smoke", "--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
            "--max-steps", "2", "--no-progress"]
    train.main(args)
    results = json.loads((tmp_path / "runs" / "full" / "results.json").read_text())
    assert filled(results), results
    for key in ("scores", "blind_scores", "samples", "stage_seconds", "wall_seconds", "device", "precision", "seed",
                "variant"):
        assert key in results
    assert set(results["stage_seconds"]) == {"data", "tokenizer", "clip", "lm", "stage 1", "stage 2"}
    assert {"color", "count", "position", "overall"} <= set(results["scores"]["short"])
    assert (tmp_path / "runs" / "full" / "loss.png").is_file()
    out = capsys.readouterr().out
    assert "held-out results" in out and "sample answers" in out
    assert f"results: {tmp_path / 'runs/full/results.json'}" in out and str(tmp_path / "runs/full/stage2") in out
    assert list(results["scores"]["short"])[0] == "overall"

    train.main(args)  # a rerun finds every output, only evaluates again, and keeps the times the steps took
    rerun = json.loads((tmp_path / "runs" / "full" / "results.json").read_text())
    assert rerun["stage_seconds"] == results["stage_seconds"]
    assert rerun["wall_seconds"] == round(sum(results["stage_seconds"].values()) + rerun["eval_seconds"], 1)
    assert "[stage 2] output exists, skipped (it took" in capsys.readouterr().out

    with pytest.raises(OptionError, match="the world in .* was made with seed 0 \\(this command: 1\\)"):
        train.main(args + ["--seed", "1"])  # not labelled seed 1 while every model is seed 0's
    train.main(args + ["--num-images", "48", "--whiten-features"])  # the preset's own values, given: the same run
    with pytest.raises(OptionError, match="the models in .* were made with lr None \\(this command: 0.01\\)"):
        train.main(args + ["--lr", "1e-2"])

    train.main(args + ["--ablations"])
    table = (tmp_path / "runs" / "ablations.md").read_text()
    took = results["stage_seconds"]["stage 1"] + results["stage_seconds"]["stage 2"]
    assert f"| full | {results['scores']['short']['overall']['accuracy']:.1f} |" in table
    assert table.split("| full |")[1].split("\n")[0].rstrip().endswith(f"| {took:.0f}s |")
    for row in ("full", "no-stage2", "no-stage1", "linear", "last-layer", "half-data", "no-whiten"):
        assert f"| {row} |" in table
    for row in ("linear", "no-stage1"):  # every row runs with the command line's settings (--max-steps 2)
        assert len((tmp_path / "runs" / row / "stage2" / "metrics.jsonl").read_text().splitlines()) == 2


def changed(a, b) -> dict:
    """The fields of two presets that differ, with what each part of the LLM's shape is relative to the other's."""
    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x != y:
            out[f.name] = {g.name: getattr(y, g.name) / getattr(x, g.name) for g in dataclasses.fields(x)
                           if getattr(x, g.name) != getattr(y, g.name)} if dataclasses.is_dataclass(x) else y / x \
                if isinstance(x, (int, float)) and not isinstance(x, bool) else y
    return out


def test_the_large_presets_smoke_twin_changes_what_toy_large_changes_and_runs(tmp_path, monkeypatch):
    from llava_min.toy import pretrain
    large, twin = changed(TOY_PRESETS["toy"], TOY_PRESETS["toy-large"]), changed(TOY_PRESETS["smoke"],
                                                                                 TOY_PRESETS["smoke-large"])
    assert large == twin and twin["lm_sees_answer_formats"] is False, (large, twin)
    documents = []
    monkeypatch.setattr(pretrain.PackedText, "__init__", record_documents(pretrain.PackedText.__init__, documents))
    train.main(["--preset", "smoke-large", "--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
                "--max-steps", "2", "--no-progress"])
    results = json.loads((tmp_path / "runs" / "full" / "results.json").read_text())
    assert filled(results["scores"]) and results["num_train_images"] == 96
    corpus = (tmp_path / "data" / "corpus.txt").read_text().splitlines()
    asked = [d for d in corpus if "single word or phrase" in d or "option's letter" in d]
    assert asked and documents == [d for d in corpus if d not in asked]  # the LM read the rest, in order


def test_each_toy_preset_has_its_own_default_directories():
    from pathlib import Path
    made = {(preset, world): (a.out, a.data_dir) for preset in ("toy", "toy-large") for world in ("shapes", "detail")
            for a in [train.parse_args(["--preset", preset, "--world", world])]}
    assert made == {("toy", "shapes"): (Path("runs/toy"), Path("data/toy")),
                    ("toy", "detail"): (Path("runs/toy-detail"), Path("data/toy-detail")),
                    ("toy-large", "shapes"): (Path("runs/toy-large"), Path("data/toy-large")),
                    ("toy-large", "detail"): (Path("runs/toy-detail-large"), Path("data/toy-detail-large"))}


def record_documents(init, documents: list):
    def wrapped(self, corpus_path, tok, seq_len, skip=()):
        encode = tok.encode
        tok.encode = lambda text, **kw: documents.append(text) or encode(text, **kw)
        try:
            init(self, corpus_path, tok, seq_len, skip)
        finally:
            tok.encode = encode
    return wrapped


def test_a_rerun_retrains_a_lost_stage_as_the_first_run_did(tmp_path):
    """Fresh weights depend on the seed alone, not on whether CLIP and the LM were trained in this process."""
    import shutil
    from safetensors.torch import load_file
    args = ["--preset", "smoke", "--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"),
            "--max-steps", "2", "--no-progress", "--no-stage2"]
    stage1 = tmp_path / "runs" / "no-stage2" / "stage1"
    train.main(args)
    first = load_file(stage1 / "mm_projector.safetensors")
    shutil.rmtree(stage1)
    train.main(args)  # CLIP and the LM are found on disk; stage 1 trains again
    again = load_file(stage1 / "mm_projector.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_smoke_detail_world_with_anyres(tmp_path):
    """The AnyRes variant of the toy: its own world, and stage 2 on tiles with row-end tokens."""
    args = ["--preset", "smoke", "--world", "detail", "--anyres", "--out", str(tmp_path / "runs"),
            "--data-dir", str(tmp_path / "data"), "--max-steps", "2", "--no-progress"]
    train.main(args)
    results = json.loads((tmp_path / "runs" / "anyres" / "results.json").read_text())
    assert filled(results) and results["world"] == "detail" and results["variant"] == "anyres"
    assert {"pattern", "color", "shape", "position", "size"} <= set(results["scores"]["short"])
    model = llava_min.load(tmp_path / "runs" / "anyres" / "stage2")
    assert model.anyres is not None and model.image_token_count((64, 64)) > model.num_image_tokens  # tiles + global


def toy(argv):
    args = train.parse_args(argv)
    return train.toy_run(args), train.loop(args)


def test_world_epochs_unless_given():
    (detail, loop), (shapes, _) = toy(["--world", "detail"]), toy([])
    assert stage_epochs(detail, "clip") == 6 and stage_epochs(detail, "stage 2") == 2
    assert stage_epochs(detail, "lm") is None and stage_epochs(shapes, "clip") is None  # the preset's
    assert stage_epochs(toy(["--world", "detail", "--epochs", "3"])[0], "clip") == 3
    steps = {name: args[0].steps.epochs for name, (_, args) in plan(detail, loop).items() if name != "tokenizer"}
    assert steps == {"clip": 6, "lm": detail.toy.lm.epochs, "stage 1": 2, "stage 2": 2}


# what 61a5136's `python train.py` wrote (world.json, settings.json, full/settings.json), as its runs hold them
TODAY = ({"preset": "toy", "seed": 0, "world": "shapes", "num_images": 8000, "num_eval": 500},
         {"preset": "toy", "max_steps": None, "epochs": None, "batch_size": None, "grad_accum": None, "lr": None,
          "seed": 0, "num_images": 8000, "num_eval": 500, "world": "shapes", "clip_decorrelation": None},
         {"no_stage1": False, "no_stage2": False, "projector": "mlp2x_gelu", "select_layer": -2, "data_fraction": 1.0,
          "anyres": False, "whiten_features": True, "lora": False, "lora_r": 128, "lora_alpha": 256.0,
          "lora_dropout": 0.05, "template": "vicuna_v1", "max_length": 256, "projector_lr": None,
          "group_by_length": True, "grad_checkpointing": None})


def test_a_new_train_flag_changes_no_toy_setting_and_todays_runs_are_reused(tmp_path, monkeypatch):
    """The toy pipeline takes its settings explicitly: a flag added to train.py changes neither what any step runs
    with (tokenizer, CLIP, LM, stages 1 and 2) nor what settings.json records, for every ablation row."""
    places = ["--out", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")]

    def settings(argv):
        run, loop = toy(argv + places)
        return {name: (plan(with_row(run, row), loop), made_with(with_row(run, row), loop))
                for name, row in ABLATIONS.items()}
    before = {preset: settings(["--preset", preset]) for preset in ("toy", "smoke")}
    parser = train.parser

    def with_a_new_flag():
        p = parser()
        p.add_argument("--new-knob", type=int, default=7)
        return p
    monkeypatch.setattr(train, "parser", with_a_new_flag)
    assert train.parse_args([]).new_knob == 7
    assert {preset: settings(["--preset", preset]) for preset in ("toy", "smoke")} == before

    world, models, full = TODAY  # the files today's runs hold: a rerun (with the new flag) takes them as its own
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world.json").write_text(json.dumps(world))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "settings.json").write_text(json.dumps(models))
    for row in ABLATIONS.values():
        run, loop = toy(places)
        run = with_row(run, row)
        (tmp_path / "runs" / variant_name(run)).mkdir()
        (tmp_path / "runs" / variant_name(run) / "settings.json").write_text(json.dumps({**full, **row}))
        check_settings(run, loop, tmp_path / "runs" / variant_name(run))
    with pytest.raises(OptionError, match="made with max_length 256 \\(this command: 128\\)"):
        check_settings(toy(places + ["--max-length", "128"])[0], loop, tmp_path / "runs" / "full")


def test_toy_stages_and_the_toy_pipeline_need_a_toy_preset(capsys):
    for argv, said in [(["--preset", "llava-v1.5-7b"], "the toy pipeline (no --stage) runs a toy preset"),
                       (["--stage", "clip", "--preset", "llava-v1.5-7b"], "--stage clip trains the toy's own model")]:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert said in capsys.readouterr().err


def test_a_rerun_resumes_an_interrupted_stage(tmp_path, monkeypatch):
    """With --save-every, a stage cut short leaves a snapshot; the rerun continues it (same losses as a run
    never cut), rather than starting over or refusing."""
    from llava_min.train.trainer import Trainer
    common = ["--preset", "smoke", "--data-dir", str(tmp_path / "data"), "--max-steps", "3", "--save-every", "1",
              "--no-progress"]
    train.main(common + ["--out", str(tmp_path / "whole")])
    fit = Trainer.fit

    def cut_stage2(self, save):
        if self.cfg.out_dir.endswith("stage2"):
            self.cfg.stop_after = 1
        return fit(self, save)
    monkeypatch.setattr(Trainer, "fit", cut_stage2)
    args = common + ["--out", str(tmp_path / "cut")]
    from llava_min import CheckpointError
    with pytest.raises(CheckpointError, match="stage2 has no config.json"):
        train.main(args)  # stage 2 leaves after one step; its evaluation then finds no model
    assert (tmp_path / "cut" / "full" / "stage2" / "resume" / "state.pt").is_file()
    monkeypatch.setattr(Trainer, "fit", fit)
    train.main(args)  # (the times of the steps that finished before the cut are kept: no results.json had them)
    assert set(json.loads((tmp_path / "cut" / "full" / "results.json").read_text())["stage_seconds"]) == \
        {"data", "tokenizer", "clip", "lm", "stage 1", "stage 2"}
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "full" / "stage2" / "metrics.jsonl").read_text()
               .splitlines()] for d in ("whole", "cut")]
    assert losses[0] == losses[1] and len(losses[0]) == 3
