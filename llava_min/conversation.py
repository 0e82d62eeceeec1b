"""Conversation templates, and the tokenization of a conversation with its training labels.

Table 2 of the paper: the model is trained to predict only the assistant's words (and the `</s>` that
ends each reply). The labels are built span by span in the same pass as the tokens (nanochat's
`add_tokens(ids, mask)`), so they cannot drift from the ids the way re-tokenizing with offsets can
("tokenization mismatch" in the official code). Span boundaries sit where sentencepiece cannot merge
across: before a space or around a special token.

Around `<image>` we do what the official `tokenizer_image_token` does, because LLaVA-1.5 was trained on
it: the text on each side of the placeholder is tokenized on its own (only the first piece gets BOS,
each piece gets the leading "▁"), and the placeholder becomes `num_image_tokens` image ids.
"""
from dataclasses import dataclass

from .llama import IGNORE_INDEX

IMAGE = "<image>"
ROLES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1}


@dataclass(frozen=True)
class Template:
    system: str
    roles: tuple
    sep: str  # after the system prompt and after each user turn
    sep2: str  # after each assistant turn (what the model learns to end its reply with)


_ASSISTANT = "an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the"
TEMPLATES = {
    "plain": Template("", ("", ""), "", "\n"),  # stage 1: <image> caption \n
    "vicuna_v1": Template(f"A chat between a curious user and {_ASSISTANT} user's questions.",
                          ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v1": Template(f"A chat between a curious human and {_ASSISTANT} human's questions.",
                         ("USER", "ASSISTANT"), " ", "</s>"),
    "llava_v0": Template(f"A chat between a curious human and {_ASSISTANT} human's questions.",
                         ("Human", "Assistant"), "###", "###"),
}


def check_turns(conversations: list) -> list:
    """(role index, text) pairs; raises ValueError when roles do not alternate human, gpt, human, ..."""
    if not conversations:
        raise ValueError("empty conversation")
    turns = []
    for i, turn in enumerate(conversations):
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise ValueError(f"turn {i}: unknown role {role!r} (expected human/gpt or user/assistant)")
        if not isinstance(value, str):
            raise ValueError(f"turn {i}: value is {type(value).__name__}, not text")
        if ROLES[role] != i % 2:
            raise ValueError(f"turn {i}: roles out of order ({role!r} where a {'gpt' if i % 2 else 'human'} turn "
                             "belongs; conversations alternate human, gpt, human, ...)")
        turns.append((ROLES[role], value))
    return turns


def place_image(turns: list, has_image: bool) -> list:
    """`<image>` moves to the front of the first human turn ("<image>\\n" + text); no image, no placeholder."""
    turns = [(role, text.replace(IMAGE, "").strip() if IMAGE in text else text) for role, text in turns]
    if has_image:
        turns[0] = (0, IMAGE + "\n" + turns[0][1])
    return turns


def spans(turns: list, template: str) -> list:
    """The rendered conversation as (text, supervised) spans; an unanswered last turn is left open."""
    t = TEMPLATES[template]
    if template == "plain":  # stage 1: the image, then the caption and "\n" to predict
        if len(turns) != 2:
            raise ValueError(f"the plain template takes one human turn and one reply, got {len(turns)} turns")
        return [(IMAGE if IMAGE in turns[0][1] else "", False), (turns[1][1] + t.sep2, True)]
    out = [(t.system + t.sep, False)]
    for role, text in turns:
        if role == 0:
            out.append((f"{t.roles[0]}: {text}{t.sep}{t.roles[1]}:", False))
        else:
            out.append((" " + text + t.sep2, True))  # Table 2: the reply and its end marker are predicted
    return out


def render_prompt(conversations: list, template: str = "vicuna_v1", has_image=None) -> str:
    """The prompt string; it ends with "ASSISTANT:" (the open turn) when the user spoke last."""
    turns = check_turns(conversations)
    has_image = any(IMAGE in text for _, text in turns) if has_image is None else has_image
    return "".join(text for text, _ in spans(place_image(turns, has_image), template))


def encode_spans(parts: list, tok, num_image_tokens: int, image_token_id: int) -> tuple:
    """(text, supervised) spans -> ids and labels, the official way around `<image>` (see module doc)."""
    merged = []  # neighbouring spans with the same label become one, so boundaries only fall at label changes
    for text, supervised in parts:
        if merged and merged[-1][1] == supervised:
            merged[-1] = (merged[-1][0] + text, supervised)
        else:
            merged.append((text, supervised))
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    chunk_start = True  # at the start of the prompt and right after an image: a leading "▁"
    for text, supervised in merged:
        for k, piece in enumerate(text.split(IMAGE)):
            if k > 0:
                ids += [image_token_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
                chunk_start = True
            if piece:
                new = tok.encode(piece, prefix=chunk_start)
                ids += new
                labels += new if supervised else [IGNORE_INDEX] * len(new)
                chunk_start = False
    return ids, labels


def tokenize_conversation(conversations: list, tok, template: str = "vicuna_v1", num_image_tokens: int = 576,
                          image_token_id: int = -200, has_image=None) -> tuple:
    """input_ids and labels (list[int] each): labels are -100 except on the assistant's replies."""
    turns = check_turns(conversations)
    has_image = any(IMAGE in text for _, text in turns) if has_image is None else has_image
    return encode_spans(spans(place_image(turns, has_image), template), tok, num_image_tokens, image_token_id)


def tokenize_prompt(conversations: list, tok, template: str = "vicuna_v1", num_image_tokens: int = 576,
                    image_token_id: int = -200, has_image: bool = True) -> list:
    """input_ids of a prompt for generation: the conversation so far, the assistant's turn left open."""
    if len(conversations) % 2 == 0:
        raise ValueError("a prompt ends with the user's turn")
    return tokenize_conversation(conversations, tok, template, num_image_tokens, image_token_id, has_image)[0]
