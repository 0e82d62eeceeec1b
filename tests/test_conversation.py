"""Templates and labels (Table 2: only the assistant's replies and their end markers are predicted).

The expected prompts are written out by hand from the official llava/conversation.py. The expected ids are the official
recipe, written here independently of our code: render the prompt, split it on `<image>`, tokenize each
piece with the reference tokenizer (BOS on the first piece only), put the image tokens between.
"""
import pytest

from llava_min.conversation import (TEMPLATES, encode_spans, render_prompt, tokenize_conversation,
                                    tokenize_prompt)
from llava_min.tokenizer import Tokenizer
from test_tokenizer import slow_reference

IMG = -200
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")
QUESTIONS = ["What is shown here?\n<image>", "Where is it?", "Is it large?"]
REPLIES = ["A red circle.", "At the top left, near 2 squares.", "No, it is small."]
RECORD = [{"from": f, "value": v} for q, a in zip(QUESTIONS, REPLIES) for f, v in (("human", q), ("gpt", a))]
CAPTION = [{"from": "human", "value": "Describe the image concisely.\n<image>"},
           {"from": "gpt", "value": "A red circle and a blue square."}]


def expected_prompt(template, record=RECORD):
    """The rendered record, by hand from the official conversation.py (`<image>` moved to the front of the first turn)."""
    q = [t["value"] for t in record[0::2]]
    a = [t["value"] for t in record[1::2]]
    q[0] = "<image>\n" + q[0].replace("<image>", "").strip()
    if template == "plain":
        return "<image>" + a[0] + "\n"
    if template in ("vicuna_v1", "llava_v1"):
        system = SYSTEM_V1 if template == "vicuna_v1" else SYSTEM_HUMAN
        return system + " " + "".join(f"USER: {qi} ASSISTANT: {ai}</s>" for qi, ai in zip(q, a))
    return SYSTEM_HUMAN + "###" + "".join(f"Human: {qi}###Assistant: {ai}###" for qi, ai in zip(q, a))


def official_ids(prompt, encode, n_image, image_id=IMG):
    """tokenizer_image_token: BOS, then each piece around <image> tokenized on its own."""
    ids = [1]
    for k, piece in enumerate(prompt.split("<image>")):
        if k:
            ids += [image_id] * n_image
        ids += encode(piece)
    return ids


def supervised_runs(ids, labels):
    """The maximal runs of supervised tokens; each label must be its token."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def llama(llama_tokenizer_path):
    return Tokenizer(llama_tokenizer_path), slow_reference(llama_tokenizer_path)


@pytest.fixture(scope="module", params=["llama", "tiny"])
def tokenizers(request):
    """The real LLaMA tokenizer (skipped where it is absent, as in CI) and the toy's: what the labels must
    hold for any sentencepiece model, checked with both."""
    path = request.getfixturevalue("llama_tokenizer_path" if request.param == "llama" else "tiny_tokenizer")
    return Tokenizer(path), slow_reference(path)


# ---------------------------------------------------------------- rendering

@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_rendered_prompt_is_the_official_string(template):
    assert render_prompt(RECORD, template) == expected_prompt(template)


def test_rendered_examples_written_out():
    two = RECORD[:4]
    assert render_prompt(two, "vicuna_v1") == (
        SYSTEM_V1 + " USER: <image>\nWhat is shown here? ASSISTANT: A red circle.</s>"
        "USER: Where is it? ASSISTANT: At the top left, near 2 squares.</s>")
    assert render_prompt(two, "llava_v0") == (
        SYSTEM_HUMAN + "###Human: <image>\nWhat is shown here?###Assistant: A red circle.###"
        "Human: Where is it?###Assistant: At the top left, near 2 squares.###")
    assert render_prompt(CAPTION, "plain") == "<image>A red circle and a blue square.\n"


def test_open_assistant_turn():
    assert render_prompt(RECORD[:1], "vicuna_v1") == SYSTEM_V1 + " USER: <image>\nWhat is shown here? ASSISTANT:"
    assert render_prompt(RECORD[:1], "llava_v1") == SYSTEM_HUMAN + " USER: <image>\nWhat is shown here? ASSISTANT:"
    assert render_prompt(RECORD[:3], "llava_v0").endswith("###Human: Where is it?###Assistant:")
    assert render_prompt(CAPTION[:1], "plain") == "<image>"


def turn(text):
    return [{"from": "human", "value": text}]


def test_image_placement():
    assert render_prompt(turn("Look: <image> what is it? "), "plain") == "<image>"
    assert render_prompt(turn("  Look: <image> what?  ")).endswith(" USER: <image>\nLook:  what? ASSISTANT:")
    assert render_prompt(turn("<image>")).endswith(" USER: <image> ASSISTANT:")  # the trainer strips "\n" too
    assert render_prompt(turn("What is it?"), has_image=True).endswith(" USER: <image>\nWhat is it? ASSISTANT:")
    assert render_prompt(turn("<image>\nWhat is it?"), has_image=False).endswith(" USER: What is it? ASSISTANT:")
    assert render_prompt(turn(" What is it?")).endswith(" USER:  What is it? ASSISTANT:")  # no image: untouched


def test_user_and_assistant_roles_are_accepted():
    renamed = [{"from": "user" if t["from"] == "human" else "assistant", "value": t["value"]} for t in RECORD]
    assert render_prompt(renamed) == render_prompt(RECORD)


# ---------------------------------------------------------------- ids and labels

@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_labels_are_exactly_the_replies(tokenizers, template):
    tok, reference = tokenizers
    ids, labels = tokenize_conversation(RECORD, tok, template, num_image_tokens=5, image_token_id=IMG)
    assert ids == official_ids(expected_prompt(template), reference, 5)
    assert len(labels) == len(ids) and ids.count(IMG) == 5
    runs = supervised_runs(ids, labels)
    assert len(runs) == len(REPLIES)
    for run, reply in zip(runs, REPLIES):
        assert tok.id_to_piece(run[0]).startswith("▁")  # the reply's leading space is in its first token
        if template == "llava_v0":
            assert tok.decode(run) == reply + "###"
        else:
            assert run[-1] == tok.eos_id and tok.decode(run[:-1]) == reply


def test_plain_masks_only_bos_and_image(tokenizers):
    tok, reference = tokenizers
    ids, labels = tokenize_conversation(CAPTION, tok, "plain", num_image_tokens=4, image_token_id=IMG)
    caption = reference("A red circle and a blue square.\n")
    assert ids == official_ids(expected_prompt("plain", CAPTION), reference, 4) == [1] + [IMG] * 4 + caption
    assert labels == [-100] * 5 + caption


def test_text_only_record(tokenizers):
    tok, reference = tokenizers
    record = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"},
              {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Hi again!"}]
    ids, labels = tokenize_conversation(record, tok, "vicuna_v1", num_image_tokens=5, image_token_id=IMG)
    assert ids == [1] + reference(SYSTEM_V1 + " USER: Say hi. ASSISTANT: Hi!</s>USER: Again? ASSISTANT: Hi again!</s>")
    assert [tok.decode(run) for run in supervised_runs(ids, labels)] == ["Hi!", "Hi again!"]


AWKWARD = ["  two leading spaces", "trailing spaces  ", "\nnewline first", "ends with a newline\n", "emoji 🦙 中文",
           "a###b ###", "#hashtag", "1. 2. 3.", "x</s>y", "tabs\tin\ttext", "   ", "A\n\nB", "?"]


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_awkward_text_still_equals_the_official_ids(tokenizers, template):
    """Spaces, newlines, '#' and special tokens around the span boundaries must not change a single id."""
    tok, reference = tokenizers
    record = [{"from": "human", "value": "<image>" + AWKWARD[0]}]
    for q, a in zip(AWKWARD[1:] + AWKWARD[:1], AWKWARD):
        record += [{"from": "gpt", "value": a}, {"from": "human", "value": q}]
    record += [{"from": "gpt", "value": "Done."}]
    ids, labels = tokenize_conversation(record, tok, template, num_image_tokens=3, image_token_id=IMG)
    assert ids == official_ids(render_prompt(record, template), reference, 3)
    assert sum(label != -100 for label in labels) > 0


def test_image_expands_where_the_official_code_puts_it(llama):
    tok, _ = llama
    ids = tokenize_prompt([{"from": "human", "value": "Look: <image> what is it?"}], tok, "vicuna_v1",
                          num_image_tokens=3, image_token_id=32000)
    pieces = [tok.id_to_piece(i) if i < 32000 else "IMG" for i in ids]
    start = pieces.index("IMG")
    # "USER: " and "\nLook: ..." are tokenized apart, each with its own leading "▁"
    assert pieces[start - 4: start + 6] == ["▁US", "ER", ":", "▁", "IMG", "IMG", "IMG", "▁", "<0x0A>", "Look"]


def test_prompt_is_a_prefix_of_the_finished_conversation(tokenizers):
    """Chat reuses its KV cache: the open prompt's ids must start the next turn's ids unchanged."""
    tok, _ = tokenizers
    for template in ("vicuna_v1", "llava_v0"):
        prompt = tokenize_prompt(RECORD[:3], tok, template, num_image_tokens=2, image_token_id=IMG)
        ids, labels = tokenize_conversation(RECORD[:4], tok, template, num_image_tokens=2, image_token_id=IMG)
        assert ids[: len(prompt)] == prompt and labels[len(prompt)] != -100


def test_a_merge_across_a_label_boundary_is_an_error(tokenizers):
    tok, _ = tokenizers
    ids, _ = encode_spans([("Say", False), (" the end", True)], tok, 1, IMG)  # boundary before a space: fine
    assert ids == [1] + tok.encode("Say the end")
    for left in ("Say th", "th"):  # "th" starts the prompt: it has the leading "▁" too
        with pytest.raises(ValueError, match="tokenization mismatch: the tokenizer merges ' th' and 'e' across"):
            encode_spans([(left, False), ("e end", True)], tok, 1, IMG)


def test_an_image_id_the_text_produces_is_an_error(tokenizers):
    tok, _ = tokenizers
    red = tok.encode("red")[0]
    record = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    with pytest.raises(ValueError, match=f"image token collision: id {red} appears [0-9]+ times, expected 2"):
        tokenize_conversation(record, tok, num_image_tokens=2, image_token_id=red)


def test_tiny_tokenizer_labels(tiny_tokenizer):
    """The same code on the toy pipeline's tokenizer, with an image id just past its vocabulary."""
    tok = Tokenizer(tiny_tokenizer)
    record = [{"from": "human", "value": "<image>\nHow many circles are there?"},
              {"from": "gpt", "value": "There are 3 objects."}]
    ids, labels = tokenize_conversation(record, tok, "vicuna_v1", num_image_tokens=4, image_token_id=tok.vocab_size)
    assert ids == official_ids(render_prompt(record), slow_reference(tiny_tokenizer), 4, tok.vocab_size)
    (run,) = supervised_runs(ids, labels)
    assert run[-1] == tok.eos_id and tok.decode(run) == "There are 3 objects."


@pytest.mark.parametrize("turns,message", [
    ([], "empty conversation"),
    ({"from": "human"}, "bad conversations: a dict"),
    ([{"from": "gpt", "value": "hi"}], "roles out of order: turn 0 is from 'gpt' where a human turn belongs"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "roles out of order: turn 1"),
    ([{"from": "robot", "value": "a"}], "unknown role: turn 0 is from 'robot'"),
    ([{"from": "human", "value": 3}], "not text: turn 0 has a int value"),
    (["hello"], "unknown role: turn 0"),
])
def test_malformed_conversations(turns, message):
    with pytest.raises(ValueError, match=message):
        render_prompt(turns)


def test_template_errors():
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "llava_v1", "llava_v0", "mistral_instruct", "chatml_direct",
                              "llava_llama_2"}
    with pytest.raises(ValueError, match="unknown template 'chatml'; known: plain, vicuna_v1"):
        render_prompt(RECORD, "chatml")
    with pytest.raises(ValueError, match="plain template takes one human turn and one reply, got 6"):
        render_prompt(RECORD, "plain")
    with pytest.raises(ValueError, match="a prompt ends with the user's turn"):
        tokenize_prompt(RECORD[:2], None)
