"""Parity of the hand-written CLIP, LLaMA and LLaVA with transformers on tiny random checkpoints.

References are loaded in fp32 with eager attention; ours run SDPA in fp32. Tolerance: 1e-5 absolute
and relative (measured differences are ~1e-6: only the order of floating-point sums differs).
"""
import pytest
import torch

import llava_min
from llava_min.model.generate import generate, sample
from conftest import IMAGE_TOKEN, hf_reference

TOL = dict(atol=1e-5, rtol=1e-5)


def image_prompt(n_tokens, batch=1, seed=0, text_before=5, text_after=7):
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 100, (batch, text_before), generator=g)
    after = torch.randint(3, 100, (batch, text_after), generator=g)
    image = torch.full((batch, n_tokens), IMAGE_TOKEN)
    return torch.cat([torch.ones(batch, 1, dtype=torch.long), before, image, after], dim=1)


def pixels(n, size=28, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- CLIP

@pytest.mark.parametrize("select_layer,select_feature", [(-2, "patch"), (-1, "patch"), (-2, "cls_patch"), (1, "patch")])
def test_vision_features_match_transformers(hf_clip_dir, select_layer, select_feature):
    from transformers import CLIPVisionModel
    ref = hf_reference(CLIPVisionModel, hf_clip_dir)
    ours = llava_min.load_vision(hf_clip_dir, select_layer=select_layer, select_feature=select_feature)
    x = pixels(2)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states[select_layer]
        expected = hidden[:, 1:] if select_feature == "patch" else hidden
        got = ours(x)
    assert got.shape == (2, 16 + (select_feature == "cls_patch"), 32) == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_vision_pooled_matches_transformers(hf_clip_dir):
    from transformers import CLIPVisionModel
    ref = hf_reference(CLIPVisionModel, hf_clip_dir)
    ours = llava_min.load_vision(hf_clip_dir)
    x = pixels(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours.pooled(x), ref(pixel_values=x).pooler_output, **TOL)


@pytest.mark.parametrize("select_layer", [-2, -1, 0])
def test_pooled_and_features_in_one_pass_match_transformers(hf_clip_dir, select_layer):
    """What the toy CLIP's pretraining reads: the pooled embedding and one layer's patch features."""
    from transformers import CLIPVisionModel
    ref = hf_reference(CLIPVisionModel, hf_clip_dir)
    x = pixels(2, seed=2)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        pooled, features = llava_min.load_vision(hf_clip_dir).pooled_and_features(x, select_layer)
    torch.testing.assert_close(pooled, out.pooler_output, **TOL)
    torch.testing.assert_close(features, out.hidden_states[select_layer][:, 1:], **TOL)


def test_penultimate_layer_never_runs_last_block(hf_clip_dir):
    ours = llava_min.load_vision(hf_clip_dir, select_layer=-2)
    called = []
    ours.layers[-1].register_forward_hook(lambda *a: called.append(1))
    ours(pixels(1))
    assert not called


# ---------------------------------------------------------------- LLaMA

def test_llama_logits_and_loss_match_transformers_gqa(hf_llama_dir):
    from transformers import LlamaForCausalLM
    ref = hf_reference(LlamaForCausalLM, hf_llama_dir)
    ours = llava_min.load_llama(hf_llama_dir)
    assert ours.cfg.num_key_value_heads == 2 and ours.cfg.rope_theta == 500.0
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :10] = -100
    with torch.no_grad():
        out = ref(input_ids=ids, labels=labels)
        logits, loss = ours(ids, labels=labels)
    assert logits.shape == (2, 40, 128)
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_llama_loss_is_none_without_labels(hf_llama_dir):
    _, loss = llava_min.load_llama(hf_llama_dir)(torch.tensor([[1, 5, 6]]))
    assert loss is None


# ---------------------------------------------------------------- LLaVA

def test_llava_logits_with_image_match_transformers(hf_llava_dir):
    from transformers import LlavaForConditionalGeneration
    ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)
    ours = llava_min.load(hf_llava_dir)
    assert ours.num_image_tokens == 16
    ids, x = image_prompt(16, batch=2), pixels(2)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    with torch.no_grad():
        out = ref(input_ids=ids, pixel_values=x, labels=labels)
        logits, loss = ours(ids, pixel_values=x, labels=labels)
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_training_loss_without_logits_matches_transformers_with_its_gradients(hf_llava_dir):
    """return_logits=False (what training uses) projects only the supervised positions: the same loss and
    the same gradients as transformers' full logits, with labels scattered differently in each row."""
    from transformers import LlavaForConditionalGeneration
    ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16, batch=2, text_after=20), pixels(2)
    kept = torch.rand(ids.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | ~kept, -100)
    logits, loss = ours(ids, pixel_values=x, labels=labels, return_logits=False)
    out = ref(input_ids=ids, pixel_values=x, labels=labels)
    assert logits is None
    torch.testing.assert_close(loss, out.loss, **TOL)
    loss.backward()
    out.loss.backward()
    for name, theirs in [("language_model.lm_head.weight", ref.lm_head.weight),
                         ("language_model.norm.weight", ref.model.language_model.norm.weight),
                         ("projector.linear_1.weight", ref.model.multi_modal_projector.linear_1.weight)]:
        torch.testing.assert_close(ours.get_parameter(name).grad, theirs.grad, **TOL, msg=name)


def test_out_of_vocabulary_image_token(hf_llava_dir):
    """The official -200 placeholder works like the in-vocabulary id."""
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16), pixels(1)
    expected, _ = ours(ids, pixel_values=x)
    ours.cfg.image_token_id = -200
    got, _ = ours(ids.masked_fill(ids == IMAGE_TOKEN, -200), pixel_values=x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_image_token_count_mismatch_is_a_clear_error(hf_llava_dir):
    ours = llava_min.load(hf_llava_dir)
    with pytest.raises(ValueError, match="15 image tokens .* 1 image\\(s\\) x 16 visual tokens"):
        ours(image_prompt(15), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(image_prompt(16))
    official = image_prompt(16).masked_fill(image_prompt(16) == IMAGE_TOKEN, -200)  # tokenized for another layout
    with pytest.raises(ValueError, match="id -200, which is neither in the vocabulary \\(128 tokens\\) nor this "
                                         "model's image token 120"):
        ours(official, pixel_values=pixels(1))


def test_cached_logits_equal_uncached(hf_llava_dir):
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16, text_after=12), pixels(1)
    with torch.no_grad():
        full, _ = ours(ids, pixel_values=x)
        cache = ours.new_cache(1, ids.shape[1])
        split = 16 + 6 + 4
        parts = [ours(ids[:, :split], pixel_values=x, cache=cache)[0]]
        parts.append(ours(ids[:, split:split + 5], cache=cache)[0])  # several tokens after a cache: offset causality
        for t in range(split + 5, ids.shape[1]):
            parts.append(ours(ids[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **TOL)
    assert cache.length == ids.shape[1]


def test_greedy_generation_matches_transformers(hf_llava_dir):
    from transformers import LlavaForConditionalGeneration
    ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16), pixels(1)
    expected = ref.generate(input_ids=ids, pixel_values=x, max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    got = ours.generate(ids, pixel_values=x, max_new_tokens=24)
    assert got.shape[1] >= 20, "the tiny model hit EOS too early for a meaningful comparison"
    assert got.tolist() == expected.tolist()


def test_batched_left_padded_generation_matches_transformers(hf_llava_dir):
    from transformers import LlavaForConditionalGeneration
    ref = hf_reference(LlavaForConditionalGeneration, hf_llava_dir)
    ours = llava_min.load(hf_llava_dir)
    long, short = image_prompt(16, seed=1, text_after=9), image_prompt(16, seed=2, text_after=3)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [pad]])).long()
    x = pixels(2, seed=3)
    expected = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=x, max_new_tokens=20, do_sample=False,
                            pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, pixel_values=x, attention_mask=mask, max_new_tokens=20)
    # each row alone (no padding) must agree with the batch too
    alone = ours.generate(short, pixel_values=x[1:], max_new_tokens=20)
    for row in range(2):  # up to EOS: after it transformers pads with pad_token_id, we repeat EOS
        want = expected[row].tolist()
        want = want[: want.index(2) + 1] if 2 in want else want
        assert got[row, :len(want)].tolist() == want
    assert got[1, :alone.shape[1]].tolist() == alone[0].tolist()


def test_generation_stops_at_eos(hf_llava_dir):
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16), pixels(1)
    first = ours.generate(ids, pixel_values=x, max_new_tokens=5)
    ours.cfg.text.eos_token_id = int(first[0, 2])  # pretend the third token is EOS
    got = ours.generate(ids, pixel_values=x, max_new_tokens=5)
    assert got.tolist() == first[:, :3].tolist()
    ours.cfg.text.eos_token_id = [127, int(first[0, 1])]  # a config may list several end tokens: any one ends it
    assert ours.generate(ids, pixel_values=x, max_new_tokens=5).tolist() == first[:, :2].tolist()


def test_top_p_sampling_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert draws == {0, 1}
    assert int(sample(logits, temperature=0.0)) == 0
    assert int(sample(logits, temperature=1.0, top_p=0.0, generator=g)) == 0  # nothing but the top token


def test_temperature_sharpens_the_distribution_it_samples():
    """At temperature 0.5 the probabilities are p^2 renormalized: 0.25 / 0.3725 = 0.671 for the top token."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    for temperature, top_share in [(1.0, 0.5), (0.5, 0.25 / 0.3725), (2.0, 0.5 ** 0.5 / sum(
            p ** 0.5 for p in (0.5, 0.3, 0.15, 0.05)))]:
        draws = [int(sample(logits, temperature=temperature, generator=g)) for _ in range(4000)]
        assert abs(draws.count(0) / 4000 - top_share) < 0.025, temperature


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(hf_llava_dir):
    model = llava_min.load(hf_llava_dir).train()
    ids, x = image_prompt(16, batch=2), pixels(2)
    labels = ids.masked_fill(ids >= 100, -100)
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.language_model.grad_checkpointing = checkpointing
        loss = model(ids, pixel_values=x, labels=labels)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (checkpointed, grads) = results
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-6)
    assert grads.keys() == plain_grads.keys() and any(n.startswith("language_model.layers") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5, msg=n)


def test_select_layer_outside_the_tower_is_refused(hf_clip_dir):
    with pytest.raises(ValueError, match="select_layer -6 is outside the 4 hidden states"):
        llava_min.load_vision(hf_clip_dir, select_layer=-6)


def test_sampling_is_reproducible_with_a_generator(hf_llava_dir):
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16), pixels(1)
    runs = [generate(ours, ids, 10, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(7),
                     pixel_values=x) for _ in range(2)]
    assert runs[0].tolist() == runs[1].tolist()


def test_attention_under_cpu_autocast_runs_in_fp32():
    """bf16 autocast would make SDPA bf16; on a CPU attention stays fp32 (faster there, and exact)."""
    from llava_min.model.llama import attend
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, generator=g)
    k, v = torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with torch.autocast("cpu", torch.bfloat16):
        got = attend(q, k, v, None, causal=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)


def test_module_output_shapes():
    cfg = llava_min.LlavaConfig(vision=llava_min.VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, image_size=32, patch_size=8),
                                text=llava_min.LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40,
                                                           num_hidden_layers=2, num_attention_heads=4,
                                                           num_key_value_heads=1),
                                projector_type="linear", image_token_id=49)
    model = llava_min.Llava(cfg)
    x = torch.randn(3, 3, 32, 32)
    assert model.vision_tower(x).shape == (3, 16, 16)
    assert model.visual_tokens(x).shape == (3, 16, 24)
    ids = torch.cat([torch.full((3, 16), 49), torch.randint(0, 40, (3, 4))], dim=1)
    logits, loss = model(ids, pixel_values=x, labels=ids.masked_fill(ids == 49, -100))
    assert logits.shape == (3, 20, 50) and loss.ndim == 0


def test_static_shape_decode_step_matches_the_cached_forward(hf_llava_dir):
    """`decode_step` (what gets compiled) attends over the whole preallocated cache with a mask; it must
    give the same logits as the exact-length incremental forward, with stale slots from an earlier use."""
    ours = llava_min.load(hf_llava_dir)
    ids, x = image_prompt(16, text_after=8), pixels(1)
    prefix = ids.shape[1] - 6
    with torch.no_grad():
        full, _ = ours(ids, pixel_values=x)
        cache = ours.new_cache(1, 64)
        [t.normal_() for t in cache.k + cache.v]  # garbage past the current slot must stay invisible
        ours(ids[:, :prefix], pixel_values=x, cache=cache)
        steps = []
        for t in range(prefix, ids.shape[1]):
            steps.append(ours.decode_step(ids[:, t:t + 1], torch.tensor([cache.length]), cache))
            cache.length += 1
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, prefix:], **TOL)


def test_compiled_generation_path_gives_the_eager_tokens(hf_llava_dir, monkeypatch):
    """generate(compile=True) without the compiler (the step itself is checked above and, compiled, on
    CUDA in test_cuda.py): the reused static cache, slot positions and batch changes."""
    from llava_min.model import generate as gen
    monkeypatch.setattr(gen, "compiled_decode_step", lambda model: model.decode_step)
    ours = llava_min.load(hf_llava_dir)
    ours.cfg.text.eos_token_id = -1  # decode every asked token
    ids, x = image_prompt(16, seed=25, text_after=5), pixels(2, seed=26)
    ids = ids.expand(2, -1)
    eager = ours.generate(ids, pixel_values=x, max_new_tokens=12)
    assert eager.shape[1] == 12 and len(set(eager[0].tolist())) > 3
    for batch in (2, 2, 1):  # a second call reuses the cache; a new batch size replaces it
        got = ours.generate(ids[:batch], pixel_values=x[:batch], max_new_tokens=12, compile=True)
        assert got.tolist() == eager[:batch].tolist()
    assert ours._static_cache.batch_size == 1 and ours._static_cache.max_len == 256


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_generation_stops_at_eos_like_eager(hf_llava_dir, monkeypatch, batch):
    """The compiled path looks for the end only every 16 steps: the tokens it returns and the cache it
    leaves (what a chat continues from) must still be the eager path's."""
    from llava_min.model import generate as gen
    monkeypatch.setattr(gen, "compiled_decode_step", lambda model: model.decode_step)
    ours = llava_min.load(hf_llava_dir)
    ours.cfg.text.eos_token_id = -1
    ids, x = image_prompt(16, batch=2, seed=28, text_after=5), pixels(2, seed=29)
    free = ours.generate(ids[:batch], pixel_values=x[:batch], max_new_tokens=24)
    # pretend the token that ends every row soonest is EOS (rows end at different steps when batch = 2)
    ending = lambda t: max(row.tolist().index(t) for row in free)  # noqa: E731
    ours.cfg.text.eos_token_id = min(set.intersection(*(set(row.tolist()) for row in free)), key=ending)
    runs = {}
    for compiled in (False, True):
        cache = ours.new_cache(batch, ids.shape[1] + 24)
        runs[compiled] = ours.generate(ids[:batch], pixel_values=x[:batch], max_new_tokens=24, cache=cache,
                                       compile=compiled), cache.length
    (eager, eager_len), (got, got_len) = runs[False], runs[True]
    assert eager.shape[1] < 24 and got.tolist() == eager.tolist() and got_len == eager_len


def test_compiled_generation_refuses_to_overrun_the_cache(hf_llava_dir, monkeypatch):
    from llava_min.model import generate as gen
    monkeypatch.setattr(gen, "compiled_decode_step", lambda model: model.decode_step)
    ours = llava_min.load(hf_llava_dir)
    ours.cfg.text.eos_token_id = -1
    ids, x = image_prompt(16), pixels(1)
    cache = ours.new_cache(1, ids.shape[1] + 3)
    with pytest.raises(ValueError, match="KV cache holds"):
        ours.generate(ids, pixel_values=x, max_new_tokens=6, cache=cache, compile=True)
