"""Templates and labels (Table 2: only the assistant's replies and their `</s>` are predicted).

The reference ids come from the official recipe, written out here independently of our code: render
the prompt, split it on `<image>`, tokenize each piece with transformers' tokenizer (BOS on the first
piece only), and put the image tokens between.
"""
import pytest

from llava_min.conversation import TEMPLATES, render_prompt, tokenize_conversation, tokenize_prompt
from llava_min.tokenizer import Tokenizer
from test_tokenizer import slow_reference

IMG = -200
SYSTEM_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
SYSTEM_HUMAN = SYSTEM_V1.replace("curious user", "curious human").replace("user's", "human's")
RECORD = [{"from": "human", "value": "What is shown here?\n<image>"}, {"from": "gpt", "value": "A red circle."},
          {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left, near 2 squares."},
          {"from": "human", "value": "Is it large?"}, {"from": "gpt", "value": "No, it is small."}]


def expected_prompt(template):
    """The rendered record, written out by hand from SPEC section 2."""
    q = ["<image>\nWhat is shown here?", "Where is it?", "Is it large?"]
    a = ["A red circle.", "At the top left, near 2 squares.", "No, it is small."]
    if template in ("vicuna_v1", "llava_v1"):
        system = SYSTEM_V1 if template == "vicuna_v1" else SYSTEM_HUMAN
        return system + " " + "".join(f"USER: {qi} ASSISTANT: {ai}</s>" for qi, ai in zip(q, a))
    return SYSTEM_HUMAN + "###" + "".join(f"Human: {qi}###Assistant: {ai}###" for qi, ai in zip(q, a))


def official_ids(prompt, encode, n_image):
    """tokenizer_image_token: BOS, then each piece around <image> tokenized on its own."""
    ids = [1]
    for k, piece in enumerate(prompt.split("<image>")):
        if k:
            ids += [IMG] * n_image
        ids += encode(piece) if piece else []
    return ids


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llava_v0"])
def test_rendered_prompt_is_the_official_string(template):
    assert render_prompt(RECORD, template) == expected_prompt(template)


def test_open_assistant_turn():
    assert render_prompt(RECORD[:1], "vicuna_v1") == SYSTEM_V1 + " USER: <image>\nWhat is shown here? ASSISTANT:"
    assert render_prompt(RECORD[:1], "llava_v0").endswith("###Assistant:")


@pytest.mark.parametrize("template,end", [("vicuna_v1", "</s>"), ("llava_v1", "</s>"), ("llava_v0", "###")])
def test_labels_are_exactly_the_replies(llama_tokenizer_path, template, end):
    tok = Tokenizer(llama_tokenizer_path)
    ids, labels = tokenize_conversation(RECORD, tok, template, num_image_tokens=5, image_token_id=IMG)
    assert ids == official_ids(expected_prompt(template), slow_reference(llama_tokenizer_path), 5)
    assert len(labels) == len(ids) and ids.count(IMG) == 5
    # each supervised run decodes to one reply followed by its end marker
    runs, current = [], []
    for i, label in enumerate(labels):
        if label != -100:
            assert label == ids[i]
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    runs.append(current) if current else None
    replies = [t["value"] for t in RECORD[1::2]]
    assert len(runs) == 3
    for run, reply in zip(runs, replies):
        if end == "</s>":
            assert run[-1] == tok.eos_id and tok.decode(run[:-1]) == reply
        else:
            assert tok.decode(run) == reply + end


def test_plain_masks_only_bos_and_image(llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path)
    record = [{"from": "human", "value": "<image>\nDescribe the image concisely."},
              {"from": "gpt", "value": "A red circle and a blue square."}]
    ids, labels = tokenize_conversation(record, tok, "plain", num_image_tokens=4, image_token_id=IMG)
    caption = tok.encode("A red circle and a blue square.\n")
    assert ids == [1] + [IMG] * 4 + caption
    assert labels == [-100] * 5 + caption


def test_text_only_record(llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path)
    record = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]
    ids, labels = tokenize_conversation(record, tok, "vicuna_v1", num_image_tokens=5, image_token_id=IMG)
    assert IMG not in ids
    assert ids == [1] + slow_reference(llama_tokenizer_path)(SYSTEM_V1 + " USER: Say hi. ASSISTANT: Hi!</s>")
    assert tok.decode([label for label in labels if label != -100]) == "Hi!"


def test_image_placeholder_moves_to_the_front_and_expands(llama_tokenizer_path):
    tok = Tokenizer(llama_tokenizer_path)
    ids = tokenize_prompt([{"from": "human", "value": "Look: <image> what is it?"}], tok, "vicuna_v1",
                          num_image_tokens=3, image_token_id=32000)
    pieces = [tok.id_to_piece(i) if i < 32000 else "IMG" for i in ids]
    start = pieces.index("IMG")
    assert pieces[start - 4: start + 6] == ["▁US", "ER", ":", "▁", "IMG", "IMG", "IMG", "▁", "<0x0A>", "Look"]
    blind = tokenize_prompt([{"from": "human", "value": "Look: <image> what is it?"}], tok, "vicuna_v1",
                            num_image_tokens=3, image_token_id=32000, has_image=False)
    assert 32000 not in blind


@pytest.mark.parametrize("turns,message", [
    ([], "empty conversation"),
    ([{"from": "gpt", "value": "hi"}], "roles out of order"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "roles out of order"),
    ([{"from": "robot", "value": "a"}], "unknown role"),
    ([{"from": "human", "value": 3}], "not text"),
])
def test_malformed_conversations(turns, message):
    with pytest.raises(ValueError, match=message):
        render_prompt(turns)


def test_templates_known():
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "llava_v1", "llava_v0"}
