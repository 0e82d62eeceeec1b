"""Conversation templates, and the tokenization of a conversation with its training labels.

Table 2 of the paper: the model is trained to predict only the assistant's words and the marker that
ends each reply. The renderer cuts the prompt into (text, supervised) spans; the tokenizer turns them
into ids and labels in one pass (nanochat's `add_tokens(ids, mask)`), so the labels cannot drift from
the ids the way the official re-tokenize-and-subtract-offsets code can ("tokenization mismatch", which
masks the whole sample). Labels change only where sentencepiece cannot merge across: before a space,
at a special token, at an image. Any other junction is checked, and a merge across it is an error.

Around `<image>` we do what the official `tokenizer_image_token` does, because LLaVA-1.5 was trained on
it: the text on each side of the placeholder is tokenized on its own (BOS on the first piece only, the
leading "▁" on every piece), and the placeholder becomes `num_image_tokens` copies of `image_token_id`.

What is supervised, per template (official `llava/train/train.py`):
- vicuna_v1, llava_v1 (`preprocess_v1`): each reply with its leading space and its `</s>`.
- mistral_instruct, llava_llama_2 (`preprocess_llama_2`): each reply with its leading space and " </s>";
  llava_llama_2's `<s>` before a later `[INST]` belongs to the user's turn, so it is masked.
- chatml_direct (`preprocess_mpt`): each reply and its `<|im_end|>`.
- plain (`preprocess_plain`): the caption and its "\\n"; BOS and the image tokens are masked.
- llava_v0: each reply and its `###`, rendered like the official `conv_llava_v0` template (the one chat
  uses). The official trainer renders v0 differently (`_add_speaker_and_signal`: "{system}\\n\\n###
  Human: ...\\n### Assistant: ...\\n### ") and masks it with per-sentence lengths that are off by the
  BOS of each sentence (`_mask_targets`); we do not reproduce that, so v0 training and chat agree.
"""
import re
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import DataError, OptionError

IGNORE_INDEX = -100  # the label of a token the loss skips (PyTorch's cross_entropy default ignore_index)

IMAGE = "<image>"
ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


@dataclass(frozen=True)
class Template:
    system: str
    roles: tuple  # (user, assistant)
    sep: str  # after the system prompt and after each user turn (llama_2: before each user turn)
    sep2: str  # after each reply: the end marker the model learns to emit
    style: str = "two"  # how turns are joined: the official SeparatorStyle (TWO, LLAMA_2, MPT)


_ANSWERS = "an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the"
TEMPLATES = {
    "plain": Template("", ("", ""), "", "\n"),  # stage 1: <image> caption \n
    "vicuna_v1": Template(f"A chat between a curious user and {_ANSWERS} user's questions.", ("USER", "ASSISTANT"),
                          " ", "</s>"),
    "llava_v1": Template(f"A chat between a curious human and {_ANSWERS} human's questions.", ("USER", "ASSISTANT"),
                         " ", "</s>"),
    "llava_v0": Template(f"A chat between a curious human and {_ANSWERS} human's questions.", ("Human", "Assistant"),
                         "###", "###"),
    # LLaVA-1.6 Mistral-7B: `[INST] ... [/INST]` with no system text; the official sep is "", its sep2 "</s>"
    "mistral_instruct": Template("", ("USER", "ASSISTANT"), "", "</s>", "llama_2"),
    # LLaVA-1.6 34B (Nous-Hermes-2-Yi): ChatML; `<|im_end|>` ends the system text, each turn and each reply
    "chatml_direct": Template("<|im_start|>system\nAnswer the questions.",
                              ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>", "<|im_end|>", "mpt"),
    # LLaVA's LLaMA-2-chat models: the system text in `<<SYS>>` inside the first `[INST]`
    "llava_llama_2": Template("You are a helpful language and vision assistant. You are able to understand the visual "
                              "content that the user provides, and assist the user with a variety of tasks using "
                              "natural language.", ("USER", "ASSISTANT"), "<s>", "</s>", "llama_2"),
}


# ---------------------------------------------------------------- turns

def check_template(template: str) -> str:
    """A template this module renders; the error names the ones it knows."""
    if template not in TEMPLATES:
        raise OptionError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)} (a conversation template "
                          "llava-min has not implemented)")
    return template


def stop_text(template: str):
    """The end marker a reply of this template stops at when it is not EOS ("###" for llava_v0, "\\n" for
    plain), or None: the official CLI stops at `conv.sep` so."""
    sep2 = TEMPLATES[check_template(template)].sep2
    return None if sep2 == "</s>" else sep2


def check_turns(conversations) -> list:
    """(role, text) pairs, role 0 = human, 1 = assistant. Raises DataError("<what is wrong>: <detail>")
    unless the turns alternate human, gpt, human, ... and every value is text."""
    if not isinstance(conversations, list):
        raise DataError(f"bad conversations: a {type(conversations).__name__}, expected a list of turns")
    if not conversations:
        raise DataError("empty conversation: no turns")
    turns = []
    for i, turn in enumerate(conversations):
        role, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if role not in ROLES:
            raise DataError(f"unknown role: turn {i} is from {role!r} (expected human/gpt or user/assistant)")
        if not isinstance(value, str):
            raise DataError(f"not text: turn {i} has a {type(value).__name__} value")
        if ROLES[role] != i % 2:
            expected = "gpt" if i % 2 else "human"
            raise DataError(f"roles out of order: turn {i} is from {role!r} where a {expected} turn belongs "
                            "(turns alternate human, gpt, human, ...)")
        turns.append((ROLES[role], value))
    return turns


def place_image(turns: list, has_image: bool) -> list:
    """`<image>` moves to the front of the first human turn ("<image>\\n" + the stripped text, as the
    official trainer's `preprocess_multimodal` does: Eq. 2 puts the image before or after the first question
    at random, the code always before); without an image, no placeholder anywhere."""
    turns = [(role, text.replace(IMAGE, "").strip() if IMAGE in text else text) for role, text in turns]
    if has_image:
        text = turns[0][1].strip()
        turns[0] = (0, IMAGE + "\n" + text if text else IMAGE)
    return turns


# ---------------------------------------------------------------- the renderer

def spans(turns: list, template: str) -> list:
    """The rendered conversation as (text, supervised) spans, as the official `Conversation.get_prompt`
    renders it. A conversation that ends with the user's turn is left open for the assistant ("... ASSISTANT:")."""
    t = TEMPLATES[check_template(template)]
    if template == "plain":  # stage 1: the image, then the caption: Sec. 4.2's X_q dropped, as preprocess_plain
        if len(turns) > 2:
            raise DataError(f"the plain template takes one human turn and one reply, got {len(turns)} turns")
        image = IMAGE if turns[0][1].startswith(IMAGE) else ""
        return [(image, False)] + [(text + t.sep2, True) for _, text in turns[1:]]
    return STYLES[t.style](turns, t)


def two_spans(turns: list, t: Template) -> list:
    """SeparatorStyle.TWO (and SINGLE, where sep2 is sep): "{system} USER: {q} ASSISTANT: {a}</s>USER: ..."."""
    out = [(t.system + t.sep, False)]
    for role, text in turns:
        if role == 0:
            out.append((f"{t.roles[0]}: {text}{t.sep}{t.roles[1]}:", False))
        else:
            out.append((f" {text}{t.sep2}", True))  # Table 2: the reply and its end marker are predicted
    return out


def llama_2_spans(turns: list, t: Template) -> list:
    """SeparatorStyle.LLAMA_2: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...": the
    system block (if any text) opens the first user turn, `sep` opens every later one, and an empty message
    renders nothing at all. The reply's " </s>" is predicted."""
    if not turns[0][1]:
        raise DataError("empty first turn: the LLaMA-2 templates wrap the first message (the official code asserts one)")
    out = []
    for i, (role, text) in enumerate(turns):
        if text and role == 0:
            system = f"<<SYS>>\n{t.system}\n<</SYS>>\n\n" if i == 0 and t.system else ""
            out.append((("" if i == 0 else t.sep) + f"[INST] {system}{text} [/INST]", False))
        elif text:
            out.append((f" {text} {t.sep2}", True))
    return out


def mpt_spans(turns: list, t: Template) -> list:
    """SeparatorStyle.MPT: "{system}<|im_end|><|im_start|>user\\n{q}<|im_end|><|im_start|>assistant\\n{a}<|im_end|>";
    an empty message leaves its role's header alone. The reply's `<|im_end|>` is predicted."""
    out = [(t.system + t.sep, False)]
    for role, text in turns:
        if role == 0:  # the user's turn, then the assistant's header (an open prompt ends there)
            out.append((t.roles[0] + (text + t.sep if text else "") + t.roles[1], False))
        elif text:
            out.append((text + t.sep, True))
    return out


STYLES = {"two": two_spans, "llama_2": llama_2_spans, "mpt": mpt_spans}


def image_in(turns: list, has_image) -> bool:
    return any(IMAGE in text for _, text in turns) if has_image is None else bool(has_image)


def render_prompt(conversations: list, template: str = "vicuna_v1", has_image=None) -> str:
    """The prompt string. `has_image=None` means "if a turn mentions <image>"."""
    turns = check_turns(conversations)
    return "".join(text for text, _ in spans(place_image(turns, image_in(turns, has_image)), template))


# ---------------------------------------------------------------- spans -> ids and labels

def merge_neighbours(parts: list) -> list:
    """Neighbouring spans with the same label become one, so boundaries fall only where labels change."""
    merged = []
    for text, supervised in parts:
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + text, supervised)
        else:
            merged.append((text, supervised))
    return merged


def check_junction(tok, left: str, right: str) -> None:
    """Raises if sentencepiece would put one piece across the end of `left` and the start of `right`
    (two spans of one chunk). A piece never crosses a special token, nor goes from a non-space into a
    space, so only the word glued across the junction is tokenized to check."""
    before, after = tok.special_re.split(left)[-1], tok.special_re.split(right)[0]
    i = len(before)  # a: the last word of `before` with the spaces in front of it (or its trailing spaces)
    while i and not before[i - 1].isspace():
        i -= 1
    while i and before[i - 1].isspace():
        i -= 1
    a, b = before[i:], re.match(r"\s*\S*", after).group()
    if not a or not b or (not a[-1].isspace() and b[0].isspace()):
        return
    if a == left:  # the word starts the chunk, which has the leading "▁"
        a = " " + a
    if tok.encode(a + b, prefix=False) != tok.encode(a, prefix=False) + tok.encode(b, prefix=False):
        raise DataError(f"tokenization mismatch: the tokenizer merges {a!r} and {b!r} across a label boundary")


def encode_spans(parts: list, tok, num_image_tokens: int, image_token_id: int) -> tuple:
    """(text, supervised) spans -> (input_ids, labels), the official way around `<image>` (module doc)."""
    ids, labels = [], []

    def add(new: list, supervised: bool):  # nanochat's add_tokens(ids, mask): one pass, no drift
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE_INDEX] * len(new))

    add([tok.bos_id], False)
    chunk = ""  # the text since the start or the last image: each such chunk is tokenized with its "▁"
    for text, supervised in merge_neighbours(parts):
        for k, piece in enumerate(text.split(IMAGE)):
            if k > 0:
                if num_image_tokens < 1:
                    raise ValueError(f"no image tokens: num_image_tokens is {num_image_tokens}, at least 1 is needed")
                add([image_token_id] * num_image_tokens, False)
                chunk = ""
            if piece:
                if chunk:
                    check_junction(tok, chunk, piece)
                add(tok.encode(piece, prefix=not chunk), supervised)
                chunk += piece
    return ids, labels


def check_markers(tok, template: str) -> None:
    """The template's special tokens (`</s>`, ChatML's `<|im_end|>`, ...) must be tokens of the tokenizer: spelled
    as text they are not what the model was trained on (e.g. chatml_direct, Yi's template, on a LLaMA tokenizer)."""
    t = TEMPLATES[check_template(template)]
    text = t.system + t.sep + t.sep2 + "".join(t.roles)
    missing = [m for m in ("<s>", "</s>", "<|im_start|>", "<|im_end|>") if m in text and m not in tok.special]
    if missing:
        raise OptionError(f"the {template} template needs {' and '.join(missing)} as tokens, and this tokenizer "
                         "spells them as text: the template belongs to another model")


def tokenize_conversation(conversations: list, tok, template: str = "vicuna_v1", num_image_tokens: int = 576,
                          image_token_id: int = -200, has_image=None) -> tuple:
    """input_ids and labels (list[int] each, equal length): labels are -100 except on the replies and
    their end markers. The ids equal the official tokenizer_image_token of `render_prompt(...)`."""
    turns = check_turns(conversations)
    has_image = image_in(turns, has_image)
    check_markers(tok, template)
    ids, labels = encode_spans(spans(place_image(turns, has_image), template), tok, num_image_tokens, image_token_id)
    expected = num_image_tokens if has_image else 0
    if ids.count(image_token_id) != expected:  # an image id inside the vocabulary that the text also produced
        raise DataError(f"image token collision: id {image_token_id} appears {ids.count(image_token_id)} times, "
                        f"expected {expected}; the text produces it too, use an id the tokenizer never emits")
    return ids, labels


def tokenize_prompt(conversations: list, tok, template: str = "vicuna_v1", num_image_tokens: int = 576,
                    image_token_id: int = -200, has_image: bool = True) -> list:
    """input_ids of a prompt for generation: the conversation so far, the assistant's turn left open."""
    if len(conversations) % 2 == 0:
        raise ValueError("a prompt ends with the user's turn")
    return tokenize_conversation(conversations, tok, template, num_image_tokens, image_token_id, has_image)[0]


def stop_at(tok, text: Optional[str]) -> Optional[Callable[[list], bool]]:
    """A `stop` for `generate`: the decoded row holds `text`, or, where `text` is one of the tokenizer's
    special tokens (ChatML's `<|im_end|>`, which decoding leaves out), the row's last id is its id.
    None: EOS alone ends a row."""
    if text is None:
        return None
    if text in tok.special:
        return lambda ids, end=tok.special[text]: bool(ids) and ids[-1] == end
    return lambda ids: text in tok.decode(ids)


def cut_at(reply: str, text: Optional[str]) -> str:
    """The reply before the end marker `text`, if any."""
    return reply.split(text)[0] if text else reply
