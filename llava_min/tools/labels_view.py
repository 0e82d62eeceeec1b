"""What Eq. 3 trains on, token by token: a conversation's input_ids and labels (Table 2) rendered as text.

Supervised tokens (label = the token) are what the loss predicts: the assistant's words and the marker
that ends each reply. Masked tokens (label -100): BOS, the system prompt, the user's turns, the image's
visual tokens, which are folded into one run "<image> x N". Three forms: ANSI colours for a terminal,
plain text with every supervised run in [brackets] (`\\[`, `\\]` and `\\\\` stand for literal brackets and
backslashes), and a self-contained HTML page. Tokens past `max_length` are what training never sees.
"""
import html
import re

from ..conversation import IGNORE_INDEX

SPECIAL_TEXT = {0: "<unk>", 1: "<s>", 2: "</s>"}
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
IMAGE_RUN = "<image> x {}"
CUT_MARK = "<max_length {} cuts here>"


def token_texts(tok, ids: list) -> list:
    """The text each token stands for ("▁" as a space). Byte-fallback pieces join into their character,
    shown on the byte that completes it (the others show ""); bytes that form no character stay <0xNN>."""
    texts, pending = [], []  # pending: (index, byte) of an unfinished UTF-8 character
    for i in ids:
        piece = SPECIAL_TEXT.get(i) or (tok.id_to_piece(i) if 0 <= i < tok.vocab_size else "")
        byte = BYTE_PIECE.fullmatch(piece)
        if not byte:
            texts += [f"<0x{b:02X}>" for _, b in pending]
            texts.append(piece.replace("▁", " "))
            pending = []
            continue
        pending.append((len(texts) + len(pending), int(byte.group(1), 16)))
        try:
            char = bytes(b for _, b in pending).decode("utf-8")
        except UnicodeDecodeError:
            if len(pending) == 4:  # no UTF-8 character is longer
                texts += [f"<0x{b:02X}>" for _, b in pending]
                pending = []
            continue
        texts += [""] * (len(pending) - 1) + [char]
        pending = []
    return texts + [f"<0x{b:02X}>" for _, b in pending]


def runs(ids: list, labels: list, image_token_id: int, cut: int) -> list:
    """Maximal runs of tokens treated alike, as (kind, start, end): kind "image", "supervised" or "masked".
    A run never crosses `cut` (the max_length boundary)."""
    out = []
    for n, (i, label) in enumerate(zip(ids, labels)):
        kind = "image" if i == image_token_id else "masked" if label == IGNORE_INDEX else "supervised"
        if out and out[-1][0] == kind and n != cut:
            out[-1] = (kind, out[-1][1], n + 1)
        else:
            out.append((kind, n, n + 1))
    return out


def counts(ids: list, labels: list, image_token_id: int, max_length: int, skip_reason) -> list:
    """The summary lines: tokens, supervised, masked, image tokens, and what max_length does."""
    supervised = sum(label != IGNORE_INDEX for label in labels)
    image = ids.count(image_token_id)
    lines = [f"tokens {len(ids)}  supervised {supervised}  masked {len(ids) - supervised}  image tokens {image}"]
    if skip_reason:
        lines.append(f"max_length {max_length}: the trainer skips this record ({skip_reason})")
    elif len(ids) > max_length:
        lost = sum(label != IGNORE_INDEX for label in labels[max_length:])
        lines.append(f"max_length {max_length}: truncation cuts the last {len(ids) - max_length} tokens "
                     f"({lost} of them supervised)")
    else:
        lines.append(f"max_length {max_length}: nothing cut")
    return lines


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def render_plain(ids: list, labels: list, texts: list, image_token_id: int, max_length: int) -> str:
    out = []
    for kind, start, end in runs(ids, labels, image_token_id, max_length):
        if start == max_length:
            out.append(CUT_MARK.format(max_length))
        text = escape("".join(texts[start:end]))
        out.append(IMAGE_RUN.format(end - start) if kind == "image" else f"[{text}]" if kind == "supervised" else text)
    return "".join(out)


IMAGE_RUN_RE = re.compile(re.escape(IMAGE_RUN).replace(r"\{\}", r"(\d+)"))
CUT_MARK_RE = re.compile(re.escape(CUT_MARK).replace(r"\{\}", r"\d+"))


def parse_plain(text: str) -> list:
    """`render_plain`'s text -> (text, supervised) segments, an image run as ("<image>", N), the cut mark
    dropped: the inverse the tests check against the labels."""
    segments, buf, inside, i = [], "", False, 0
    while i < len(text):
        mark = None if inside else IMAGE_RUN_RE.match(text, i) or CUT_MARK_RE.match(text, i)
        if mark or text[i] in "[]":  # a segment ends
            segments += [(buf, inside)] if buf else []
            buf = ""
            if mark:
                segments += [("<image>", int(mark.group(1)))] if mark.re is IMAGE_RUN_RE else []
                i = mark.end()
            else:
                inside, i = text[i] == "[", i + 1
        else:  # a character, or an escaped one
            escaped = text[i] == "\\"
            buf, i = buf + text[i + escaped], i + 1 + escaped
    return segments + ([(buf, inside)] if buf else [])


# ---------------------------------------------------------------- colour: terminal and HTML

ANSI = {"supervised": ("\x1b[30;102m", "\x1b[30;42m"), "masked": ("\x1b[37;100m", "\x1b[90;40m"),
        "image": ("\x1b[30;105m",), "cut": ("\x1b[2m",)}
RESET = "\x1b[0m"


def render_ansi(ids: list, labels: list, texts: list, image_token_id: int, max_length: int) -> str:
    """Every token on its own background (two shades alternate so token boundaries show): green
    supervised, grey masked, magenta the image; past max_length dimmed. A newline shows as ↵."""
    out = []
    for kind, start, end in runs(ids, labels, image_token_id, max_length):
        if start == max_length:
            out.append(f"{ANSI['cut'][0]}{CUT_MARK.format(max_length)}{RESET}")
        if kind == "image":
            out.append(f"{ANSI['image'][0]}{IMAGE_RUN.format(end - start)}{RESET}")
            continue
        for n in range(start, end):
            shade = ANSI[kind][n % 2] + (ANSI["cut"][0] if n >= max_length else "")
            out.append(shade + texts[n].replace("\n", "↵") + RESET + ("\n" if "\n" in texts[n] else ""))
    return "".join(out)


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; font-size: 15px; line-height: 1.8; }}
span {{ border-radius: 3px; padding: 1px 0; }}
.supervised {{ background: #9be39b; }} .supervised.odd {{ background: #6fcf6f; }}
.masked {{ background: #e4e4e4; color: #555; }} .masked.odd {{ background: #d0d0d0; }}
.image {{ background: #e7a6f0; font-weight: bold; padding: 1px 4px; }}
.cut {{ opacity: 0.4; }} .mark {{ color: #c00; font-weight: bold; }}
</style></head><body>
<h3>{title}</h3>
<p><span class="supervised">supervised</span> the loss predicts it (its label is the token) &nbsp;
<span class="masked">masked</span> label -100 &nbsp; <span class="image">&lt;image&gt; x N</span> visual tokens
(masked). Hover a token for its id and piece.</p>
<pre>{body}</pre>
<p>{summary}</p>
</body></html>
"""


def render_html(tok, ids: list, labels: list, texts: list, image_token_id: int, max_length: int, title: str,
                summary: list) -> str:
    """A self-contained page: the tokens as in the terminal, each with its id, piece and label on hover."""
    body = []
    for kind, start, end in runs(ids, labels, image_token_id, max_length):
        if start == max_length:
            body.append(f'<span class="mark">{html.escape(CUT_MARK.format(max_length))}</span>')
        cut = " cut" if start >= max_length else ""
        if kind == "image":
            body.append(f'<span class="image{cut}" title="{end - start} visual tokens, id {image_token_id}, label -100">'
                        f'{html.escape(IMAGE_RUN.format(end - start))}</span>')
            continue
        for n in range(start, end):
            piece = SPECIAL_TEXT.get(ids[n]) or tok.id_to_piece(ids[n])
            tip = html.escape(f"id {ids[n]} · piece {piece!r} · label {labels[n]}", quote=True)
            body.append(f'<span class="{kind}{" odd" if n % 2 else ""}{cut}" title="{tip}">{html.escape(texts[n])}</span>')
    return PAGE.format(title=html.escape(title), body="".join(body), summary="<br>".join(map(html.escape, summary)))
