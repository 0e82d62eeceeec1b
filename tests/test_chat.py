"""chat.py: greedy answers equal transformers' generate; the KV cache carries over between turns."""
import io
import shutil
import sys

import pytest
import torch
from PIL import Image

import chat
from conftest import CHAT_IMAGE_TOKEN as IMAGE_TOKEN, hf_reference
from llava_min.conversation import tokenize_prompt
from llava_min.data.image import preprocess
from llava_min.tokenizer import Tokenizer



def open_chat(path, **kw):
    return chat.open_chat(chat.parse_args(["--model", str(path), "--temperature", "0", "--device", "cpu", *kw.get("extra", [])]))


def test_prompt_answer_equals_transformers_generate(chat_model, capsys):
    from transformers import LlavaForConditionalGeneration
    tok = Tokenizer(chat_model / "tokenizer.model")
    ref = hf_reference(LlavaForConditionalGeneration, chat_model)
    ids = torch.tensor([tokenize_prompt([{"from": "human", "value": "What is in the image?"}], tok, "vicuna_v1",
                                        num_image_tokens=16, image_token_id=IMAGE_TOKEN)])
    pixels = preprocess(Image.open(chat_model / "cat.png").convert("RGB"), size=28, aspect="pad")[None]
    expected = ref.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    expected = expected.tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected

    session = open_chat(chat_model)
    session.set_image(chat_model / "cat.png")
    session.max_new_tokens = 24
    got = []
    session.ask("What is in the image?", stream=None)
    got = session.cached_ids[len(ids[0]):]  # the reply's tokens as they were generated and cached
    assert len(expected) >= 10, "random model stopped too early to compare"
    assert got == expected[: len(got)] and len(got) >= len(expected) - 1

    chat.main(["--model", str(chat_model), "--image", str(chat_model / "cat.png"), "--prompt", "What is in the image?",
               "--temperature", "0", "--max-new-tokens", "24", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == tok.decode(expected).strip()


def test_second_turn_prefills_only_new_tokens(chat_model):
    session = open_chat(chat_model)
    session.set_image(chat_model / "cat.png")
    session.max_new_tokens = 8
    first = session.ask("Describe it.")
    fed_first = session.prefilled
    assert fed_first == len(session.prompt_ids([{"from": "human", "value": "Describe it."}]))
    second = session.ask("And the colors?")
    fed_second = session.prefilled - fed_first
    full = len(session.prompt_ids(session.turns[:-1]))
    # Turn 2 feeds at most the reply (re-read from its text: a detokenized reply may split differently)
    # and the new question: never the first prompt with its 16 image tokens.
    assert fed_second <= full - fed_first
    # the cached conversation answers exactly like a fresh one that prefills the whole history
    fresh = open_chat(chat_model)
    fresh.set_image(chat_model / "cat.png")
    fresh.max_new_tokens = 8
    fresh.turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": first}]
    assert fresh.ask("And the colors?") == second


@pytest.mark.parametrize("template,marker", [("llava_v0", "###"), ("plain", "\n")])
def test_reply_stops_at_the_templates_end_marker(chat_model, monkeypatch, template, marker):
    """Templates whose replies end in text, not EOS: the official CLI stops at that marker, and so do we."""
    import llava_min.model.generate as g
    from llava_min.eval.answer import answer
    session = open_chat(chat_model, extra=["--template", template])
    tok = session.tok
    scripted = tok.encode(f"It is a cat.{marker}Human: And the dog?{marker}", prefix=False)
    assert marker in tok.decode(scripted)  # the tiny tokenizer can spell the marker
    feed = iter(scripted + [5] * 64)
    monkeypatch.setattr(g, "sample", lambda logits, *args, **kwargs: torch.full(logits.shape[:1], next(feed)))
    streamed = []
    assert session.ask("What is it?", stream=streamed.append) == "It is a cat."
    assert "".join(streamed).strip() == "It is a cat."
    prompt = session.prompt_ids([{"from": "human", "value": "What is it?"}])
    assert "Human" not in tok.decode(session.cached_ids[len(prompt):])  # generation ended at the marker
    feed = iter(scripted + [5] * 64)  # a batch of one: eval's answer is cut at the marker too
    record = {"id": "q", "image": "cat.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
    assert answer(session.model, tok, [record], chat_model, template=template) == ["It is a cat."]


def test_streamed_text_is_the_reply_when_characters_come_in_bytes(chat_model, monkeypatch):
    """Byte-fallback pieces: a character is whole only after its last byte; what streams must not keep the
    replacement characters of the bytes before it."""
    import llava_min.model.generate as g
    session = open_chat(chat_model)
    scripted = session.tok.encode("café 你好 😀 ok", prefix=False)
    assert len(scripted) > len("café 你好 😀 ok".split())  # the tiny tokenizer spells some of it in bytes
    feed = iter(scripted + [session.tok.eos_id] * 8)
    monkeypatch.setattr(g, "sample", lambda logits, *args, **kwargs: torch.full(logits.shape[:1], next(feed)))
    streamed = []
    assert session.ask("Say it.", stream=streamed.append) == "café 你好 😀 ok"
    assert "".join(streamed).strip() == "café 你好 😀 ok"


def test_interactive_chat_through_stdin(chat_model, monkeypatch, capsys):
    script = "Hi there\nMore please\n/image " + str(chat_model / "dog.png") + "\nWhat now?\n/image missing.png\n" \
             "/clear\nAgain?\n/quit\nnever reached\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    chat.main(["--model", str(chat_model), "--image", str(chat_model / "cat.png"), "--temperature", "0",
               "--max-new-tokens", "6", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.count("ASSISTANT:") == 4
    assert "[new conversation about" in out and "[conversation cleared]" in out
    assert "missing.png does not exist" in out  # a bad image is reported and the chat goes on


def test_bad_inputs_are_clear(chat_model, tmp_path, capsys):
    with pytest.raises(SystemExit, match="missing.png does not exist"):
        chat.main(["--model", str(chat_model), "--image", str(tmp_path / "missing.png"), "--prompt", "hi", "--device", "cpu"])
    shutil.copytree(chat_model, tmp_path / "no_tok")
    (tmp_path / "no_tok" / "tokenizer.model").unlink()
    with pytest.raises(SystemExit, match="no tokenizer at"):
        chat.main(["--model", str(tmp_path / "no_tok"), "--prompt", "hi", "--device", "cpu"])
    session = open_chat(chat_model)
    with pytest.raises(ValueError, match="the model's context is 256"):
        session.ask("word " * 400)
    assert session.ask("short?", stream=None) is not None  # the chat goes on


def test_compiled_decoding_keeps_a_conversation_identical(chat_model, monkeypatch):
    """--compile decodes each turn's tokens at the cache slots after everything already seen; the step
    is the eager `decode_step` here (compiled on CUDA in test_cuda.py)."""
    from llava_min.model import generate as gen
    monkeypatch.setattr(gen, "compiled_decode_step", lambda model: model.decode_step)
    replies = []
    for extra in ([], ["--compile"]):
        session = open_chat(chat_model, extra=extra)
        assert session.compile == bool(extra)
        session.set_image(chat_model / "cat.png")
        session.max_new_tokens = 10
        replies.append([session.ask("Describe it."), session.ask("And the colors?"), list(session.cached_ids)])
    assert replies[0] == replies[1]


def test_ctrl_c_mid_answer_stops_it_and_the_chat_goes_on_with_whole_turns(chat_model, monkeypatch, capsys):
    """The interrupted question and its partial answer are forgotten; the next answer is the one a fresh chat
    with the same history gives, so the KV cache kept nothing of the stopped turn."""
    real, calls = chat.generate, []

    def generate(*args, on_token, **kwargs):
        calls.append(1)
        if len(calls) != 2:
            return real(*args, on_token=on_token, **kwargs)
        seen = []

        def then_ctrl_c(token):
            on_token(token)
            seen.append(token)
            if len(seen) == 3:
                raise KeyboardInterrupt
        return real(*args, on_token=then_ctrl_c, **kwargs)
    monkeypatch.setattr(chat, "generate", generate)
    session = open_chat(chat_model)
    session.set_image(chat_model / "cat.png")
    session.max_new_tokens = 8
    chat.converse(session, iter(["Describe it.\n", "And the colors?\n", "What shape?\n", "/quit\n", "never\n"]))
    out = capsys.readouterr().out
    assert out.count("ASSISTANT:") == 3 and out.count("[stopped;") == 1 and len(calls) == 3
    assert [t["value"] for t in session.turns[::2]] == ["Describe it.", "What shape?"]
    fresh = open_chat(chat_model)
    fresh.set_image(chat_model / "cat.png")
    fresh.max_new_tokens = 8
    fresh.turns = session.turns[:2]
    assert fresh.ask("What shape?") == session.turns[3]["value"]


def test_ctrl_c_or_ctrl_d_at_the_prompt_leaves(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stdin", Terminal())
    for key in (KeyboardInterrupt, EOFError):
        monkeypatch.setattr("builtins.input", lambda prompt, key=key: (_ for _ in ()).throw(key()))
        assert list(chat.user_lines()) == []


def test_image_without_a_path_and_prompts_past_the_context_say_what_to_do(chat_model, capsys):
    session = open_chat(chat_model)
    chat.converse(session, iter(["/image\n", "/image   \n", "word " * 400 + "\n", "Hi\n", "word " * 400 + "\n"]))
    out = capsys.readouterr().out
    assert out.count("[usage: /image PATH") == 2 and "does not exist" not in out
    first, second = [line for line in out.splitlines() if "the model's context is 256" in line]
    assert "/clear" not in first and "ask something shorter" in first  # nothing to clear yet
    assert "/clear to start over" in second
    with pytest.raises(SystemExit) as stop:  # one-shot: no /clear to suggest
        chat.main(["--model", str(chat_model), "--prompt", "word " * 400, "--device", "cpu"])
    assert "shorten the prompt, or use a model with a longer context" in str(stop.value)
    assert "/clear" not in str(stop.value)
