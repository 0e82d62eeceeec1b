"""Every checkpoint layout loads strictly, and a bad checkpoint fails with a message naming the tensor."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import llava_min
from llava_min import CheckpointError
from conftest import IMAGE_TOKEN, hf_reference
from test_model import TOL, image_prompt, pixels


def reference_logits(hf_llava_dir, ids, x):
    from transformers import LlavaForConditionalGeneration
    with torch.no_grad():
        return hf_reference(LlavaForConditionalGeneration, hf_llava_dir)(input_ids=ids, pixel_values=x).logits


def copy_with_tensors(src, dst, tensors, fmt="safetensors"):
    """A copy of checkpoint `src` whose weights are replaced by `tensors` (in the given format)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    if fmt == "safetensors":
        save_file(tensors, dst / "model.safetensors")
    else:
        torch.save(tensors, dst / "pytorch_model.bin")
    return dst


def renamed(tensors, rules):
    out = {}
    for k, v in tensors.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


@pytest.fixture(scope="module")
def hf_tensors(hf_llava_dir):
    return load_file(hf_llava_dir / "model.safetensors")


@pytest.fixture(scope="module")
def expected(hf_llava_dir):
    ids, x = image_prompt(16, batch=2), pixels(2)
    return ids, x, reference_logits(hf_llava_dir, ids, x)


def assert_same_logits(model, expected):
    ids, x, ref = expected
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixel_values=x)[0], ref, **TOL)


# ---------------------------------------------------------------- llava-hf in every naming

HUB = [("vision_tower.", "vision_tower.vision_model.")]
IN_MEMORY = [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
             ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]


@pytest.mark.parametrize("naming,rules,fmt", [("transformers5", [], "safetensors"), ("hub", HUB, "safetensors"),
                                              ("hub-bin", HUB, "bin"), ("in-memory", IN_MEMORY, "safetensors")])
def test_llava_hf_namings_load(hf_llava_dir, hf_tensors, expected, tmp_path, naming, rules, fmt):
    path = copy_with_tensors(hf_llava_dir, tmp_path / naming, renamed(hf_tensors, rules), fmt)
    assert_same_logits(llava_min.load(path), expected)


def test_sharded_checkpoint_loads(hf_llava_dir, hf_tensors, expected, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(hf_llava_dir, path)
    (path / "model.safetensors").unlink()
    keys = sorted(hf_tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: hf_tensors[k] for k in shard_keys}, path / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_logits(llava_min.load(path), expected)


def test_load_in_a_chosen_dtype(hf_llava_dir):
    model = llava_min.load(hf_llava_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


# ---------------------------------------------------------------- official LLaVA layouts

def official_dir(hf_llava_dir, hf_tensors, tmp_path, vision_tower, include_projector=True, tuned_tower=False,
                 **cfg_overrides):
    """An official `liuhaotian/llava-v1.5` style directory: Vicuna keys + model.mm_projector.{0,2}; a LLaVA-NeXT
    checkpoint's row-end vector becomes model.image_newline, and `tuned_tower` keeps the vision tower in the
    checkpoint (model.vision_tower.vision_tower.*), as the 1.6 releases do."""
    hf_cfg = json.loads((hf_llava_dir / "config.json").read_text())
    tensors = {}
    for k, v in hf_tensors.items():
        if k.startswith("language_model.model."):
            tensors["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            tensors["lm_head.weight"] = v
        elif k.startswith("multi_modal_projector.linear_") and include_projector:
            tensors[f"model.mm_projector.{0 if 'linear_1' in k else 2}." + k.split(".")[-1]] = v
        elif k == "image_newline":
            tensors["model.image_newline"] = v
        elif k.startswith("vision_tower.") and tuned_tower:
            tensors["model.vision_tower.vision_tower.vision_model." + k[len("vision_tower."):]] = v
    cfg = {**hf_cfg["text_config"], "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
           "mm_vision_tower": str(vision_tower), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, **cfg_overrides}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    return tmp_path


def save_clip(hf_llava_dir, hf_tensors, path):
    """A llava-hf model's vision tower saved as a full CLIPModel directory (text tower included)."""
    from transformers import CLIPConfig, CLIPModel
    hf_cfg = json.loads((hf_llava_dir / "config.json").read_text())
    clip = CLIPModel(CLIPConfig(vision_config=hf_cfg["vision_config"],
                                text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4), projection_dim=16))
    vision = {k[len("vision_tower."):]: v for k, v in hf_tensors.items() if k.startswith("vision_tower.")}
    clip.vision_model.load_state_dict(vision)
    clip.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava_clip_dir(hf_llava_dir, hf_tensors, tmp_path_factory):
    return save_clip(hf_llava_dir, hf_tensors, tmp_path_factory.mktemp("llava_clip"))


def official_ids(expected):
    ids, x, ref = expected
    return ids.masked_fill(ids == IMAGE_TOKEN, -200), x, ref


def test_official_layout_loads_with_the_clip_it_names(hf_llava_dir, hf_tensors, llava_clip_dir, expected, tmp_path):
    path = official_dir(hf_llava_dir, hf_tensors, tmp_path / "official", vision_tower=llava_clip_dir)
    model = llava_min.load(path)
    assert model.cfg.image_token_id == -200 and model.cfg.projector_type == "mlp2x_gelu"
    assert any("text_model" in k for k, _ in model.ignored_keys)
    assert model.cfg.image_aspect_ratio == "pad"
    assert_same_logits(model, official_ids(expected))
    cfg = json.loads((path / "config.json").read_text())  # what the official stage 1 writes: the plain processor
    (path / "config.json").write_text(json.dumps({**cfg, "image_aspect_ratio": "square"}))
    assert llava_min.load(path).cfg.image_aspect_ratio == "crop"


def test_official_layout_explicit_vision_path_overrides_the_name(hf_llava_dir, hf_tensors, llava_clip_dir, expected,
                                                                tmp_path):
    path = official_dir(hf_llava_dir, hf_tensors, tmp_path / "official", vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(CheckpointError, match="vision_path"):
        llava_min.load(path)
    assert_same_logits(llava_min.load(path, vision_path=llava_clip_dir), official_ids(expected))


def test_vision_tower_from_the_hub_cache_is_the_one_refs_main_names(hf_llava_dir, hf_tensors, llava_clip_dir, expected,
                                                                      tmp_path, monkeypatch):
    import shutil
    repo = tmp_path / "hub" / "models--org--clip"
    shutil.copytree(llava_clip_dir, repo / "snapshots" / "aaa")
    (repo / "snapshots" / "zzz").mkdir()  # another copy, newer and last by name: not the one main points to
    (repo / "snapshots" / "zzz" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaa\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = official_dir(hf_llava_dir, hf_tensors, tmp_path / "official", vision_tower="org/clip")
    assert_same_logits(llava_min.load(path), official_ids(expected))


def test_stage1_projector_on_clip_and_vicuna(hf_llava_dir, hf_tensors, llava_clip_dir, expected, tmp_path):
    vicuna = official_dir(hf_llava_dir, hf_tensors, tmp_path / "vicuna", vision_tower="unused", include_projector=False)
    cfg = json.loads((vicuna / "config.json").read_text())
    (vicuna / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("mm_")}
                                                   | {"model_type": "llama"}))
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    proj = {f"model.mm_projector.{0 if 'linear_1' in k else 2}." + k.split(".")[-1]: v.to(torch.bfloat16)
            for k, v in hf_tensors.items() if k.startswith("multi_modal_projector.")}
    torch.save(proj, stage1 / "mm_projector.bin")
    model = llava_min.load(vicuna, vision_path=llava_clip_dir, projector_path=stage1 / "mm_projector.bin")
    from transformers import LlavaForConditionalGeneration
    from conftest import hf_reference
    reference = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)
    with torch.no_grad():  # the projector went through bf16, as the official release stores it: so does the reference's
        for p in reference.model.multi_modal_projector.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        ids, x, _ = expected
        ref = reference(input_ids=ids, pixel_values=x).logits
        torch.testing.assert_close(model(official_ids(expected)[0], pixel_values=x)[0], ref, **TOL)
    with pytest.raises(CheckpointError, match="load_llama"):
        llava_min.load(vicuna)
    torch.save({**proj, "model.embed_tokens.weight": torch.zeros(3, 4)}, stage1 / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):  # tuned rows would be lost: refused
        llava_min.load(vicuna, vision_path=llava_clip_dir, projector_path=stage1 / "mm_projector.bin")


def test_build_llava_initializes_only_the_projector(hf_clip_dir, hf_llama_dir):
    model = llava_min.build_llava(hf_clip_dir, hf_llama_dir, projector_type="linear")
    assert not any(p.is_meta for p in model.parameters())
    assert model.projector.linear_2 is None
    ref = llava_min.load_llama(hf_llama_dir)
    # `<image>` is appended after the vocabulary (llava-hf style), padded to a multiple of 64
    assert model.cfg.image_token_id == 128 and model.cfg.text.vocab_size == 192
    for name in ("embed_tokens", "lm_head"):
        ours, theirs = getattr(model.language_model, name).weight, getattr(ref, name).weight
        torch.testing.assert_close(ours[:128], theirs, atol=0, rtol=0)
        torch.testing.assert_close(ours[128:], theirs.mean(0).expand(64, -1))
    x = pixels(1)
    torch.testing.assert_close(model.vision_tower(x), llava_min.load_vision(hf_clip_dir)(x), atol=0, rtol=0)


# ---------------------------------------------------------------- CLIP and LLaMA directories

def test_clip_vision_only_and_full_model_agree(hf_clip_dir, tmp_path):
    from transformers import CLIPVisionModel
    vision_only = tmp_path / "vision_only"
    hf_reference(CLIPVisionModel, hf_clip_dir).save_pretrained(vision_only)
    full = llava_min.load_vision(hf_clip_dir)
    reasons = dict(full.ignored_keys)
    assert "logit_scale" in reasons and any(k.startswith("text_model.") for k in reasons)
    x = pixels(1)
    torch.testing.assert_close(llava_min.load_vision(vision_only)(x), full(x), atol=0, rtol=0)


# ---------------------------------------------------------------- bad checkpoints

@pytest.mark.parametrize("case", ["missing", "extra", "misshapen"])
def test_bad_checkpoint_names_the_tensor_and_file(hf_llava_dir, hf_tensors, tmp_path, case):
    tensors = dict(hf_tensors)
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        del tensors[key]
        match = f"missing from .*model.safetensors.*{key.replace('language_model.model.', 'language_model.')}"
    elif case == "extra":
        tensors["language_model.model.layers.1.mlp.extra.weight"] = torch.zeros(2)
        match = "unexpected tensor 'language_model.model.layers.1.mlp.extra.weight' in .*model.safetensors"
    else:
        tensors[key] = tensors[key][:, :-1].contiguous()
        match = f"'{key}' in .*model.safetensors has shape \\(96, 63\\), the model expects \\(96, 64\\)"
    path = copy_with_tensors(hf_llava_dir, tmp_path / case, tensors)
    with pytest.raises(CheckpointError, match=match):
        llava_min.load(path)


def with_config(src, dst, edit, tensors=None):
    """A copy of checkpoint `src` with its config.json edited (and its weights replaced, if given)."""
    path = copy_with_tensors(src, dst, tensors if tensors is not None else load_file(src / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("where,key,value", [
    ("text_config", "hidden_act", "gelu"), ("text_config", "model_type", "gemma"),
    ("text_config", "attention_bias", True), ("text_config", "mlp_bias", True),
    ("vision_config", "hidden_act", "gelu_new"), (None, "projector_hidden_act", "quick_gelu"),
    (None, "multimodal_projector_bias", False)])
def test_a_setting_the_model_lacks_is_named(hf_llava_dir, tmp_path, where, key, value):
    """Settings transformers implements and llava-min does not: an error, never a model that computes something else."""
    def edit(cfg):
        (cfg[where] if where else cfg)[key] = value
    with pytest.raises(CheckpointError, match=f"{key} {value!r} is not supported"):
        llava_min.load(with_config(hf_llava_dir, tmp_path / "edited", edit))


@pytest.mark.parametrize("model_type,window", [("llama", None), ("mistral", None), ("mistral", 64)])
def test_settings_real_checkpoints_carry_are_read(hf_llava_dir, expected, tmp_path, model_type, window):
    """Mistral-7B-v0.1 carries a 4096-token window: plain causal attention inside it, so the context is cut there."""
    def edit(cfg):
        cfg["text_config"].update(model_type=model_type, sliding_window=window, hidden_act="silu")
    model = llava_min.load(with_config(hf_llava_dir, tmp_path / "edited", edit))
    assert model.cfg.text.max_position_embeddings == (window or 256)
    assert_same_logits(model, expected)


def test_a_tied_head_must_equal_the_embedding(hf_llava_dir, hf_tensors, expected, tmp_path):
    tie = lambda cfg: cfg["text_config"].update(tie_word_embeddings=True)  # noqa: E731
    with pytest.raises(CheckpointError, match="'language_model.lm_head.weight' in .* differs from .*tie_word_embeddings"):
        llava_min.load(with_config(hf_llava_dir, tmp_path / "distinct", tie))  # the file's own, different head
    tensors = dict(hf_tensors)
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].clone()
    model = llava_min.load(with_config(hf_llava_dir, tmp_path / "copy", tie, tensors))  # a copy of it: tied
    assert model.language_model.lm_head.weight is model.language_model.embed_tokens.weight


def test_tying_at_the_top_level_and_unset_key_value_heads_read_as_transformers_reads_them(hf_llava_dir, hf_tensors,
                                                                                          tmp_path):
    from transformers import LlavaForConditionalGeneration
    tensors = {k: v for k, v in hf_tensors.items() if k != "language_model.lm_head.weight"}

    def edit(cfg):
        cfg["tie_word_embeddings"], cfg["text_config"]["tie_word_embeddings"] = True, False
        cfg["text_config"].update(num_attention_heads=4, num_key_value_heads=None)
        for name in ("k_proj", "v_proj"):  # 4 heads of key/value now, not 2
            for layer in range(2):
                key = f"language_model.model.layers.{layer}.self_attn.{name}.weight"
                tensors[key] = torch.randn(64, 64, generator=torch.Generator().manual_seed(layer))
    path = with_config(hf_llava_dir, tmp_path / "tied", edit)
    save_file(tensors, path / "model.safetensors")
    ids, x = image_prompt(16, batch=2), pixels(2)
    ours = llava_min.load(path)
    assert ours.cfg.text.num_key_value_heads == 4 and ours.language_model.lm_head.weight is \
        ours.language_model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=x)[0],
                                   hf_reference(LlavaForConditionalGeneration, path)(input_ids=ids, pixel_values=x).logits,
                                   **TOL)


def test_no_weights_is_a_clear_error(hf_llava_dir, tmp_path):
    shutil.copy(hf_llava_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights in"):
        llava_min.load(tmp_path)


def test_bin_files_are_not_unpickled(hf_llava_dir, tmp_path):
    """A .bin holding arbitrary Python objects is refused (weights_only=True), never executed."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    path = copy_with_tensors(hf_llava_dir, tmp_path / "evil", {"x": torch.zeros(1)}, fmt="bin")
    torch.save({"x": Evil()}, path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        llava_min.load(path)


# ---------------------------------------------------------------- writing llava-hf directories

def test_saved_checkpoint_loads_back_and_in_transformers(hf_llava_dir, expected, tmp_path):
    from transformers import LlavaForConditionalGeneration
    model = llava_min.load(hf_llava_dir)
    llava_min.save_llava(model, tmp_path / "out")
    keys = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert_same_logits(llava_min.load(tmp_path / "out"), expected)
    ids, x, ref = expected
    with torch.no_grad():
        theirs = hf_reference(LlavaForConditionalGeneration, tmp_path / "out")(input_ids=ids, pixel_values=x).logits
    torch.testing.assert_close(theirs, ref, **TOL)
    assert not list((tmp_path / "out").glob(".*")), "temporary files were left behind"


def test_a_linear_projector_saves_as_linear_identity_identity_which_transformers_loads(hf_clip_dir, hf_llama_dir,
                                                                                         tmp_path):
    """llava-hf's projector is Linear -> act -> Linear: LLaVA v1's linear W is written as W -> identity -> I."""
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)
    model = llava_min.build_llava(hf_clip_dir, hf_llama_dir, projector_type="linear")
    llava_min.save_llava(model, tmp_path / "linear")
    ids = torch.tensor([[1] + [model.cfg.image_token_id] * model.num_image_tokens + [5, 6, 7]])
    x = pixels(1)
    with torch.no_grad():
        ours = model(ids, pixel_values=x)[0]
        torch.testing.assert_close(llava_min.load(tmp_path / "linear")(ids, pixel_values=x)[0], ours, atol=0, rtol=0)
        theirs = hf_reference(LlavaForConditionalGeneration, tmp_path / "linear")(input_ids=ids, pixel_values=x).logits
    torch.testing.assert_close(theirs, ours, **TOL)
    tensors = load_file(tmp_path / "linear" / "model.safetensors")
    tensors["multi_modal_projector.linear_2.bias"] += 0.1  # no longer the identity: not what the config says
    save_file(tensors, tmp_path / "linear" / "model.safetensors")
    with pytest.raises(CheckpointError, match="linear projector, but multi_modal_projector.linear_2"):
        llava_min.load(tmp_path / "linear")
