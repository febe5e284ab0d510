"""One conversation format, from data to serving.

A conversation is a list of `Message`s. What a model reads is that list rendered
in the model's *format*:

- "hh": the HH-RLHF transcript, "\\n\\nHuman: ...\\n\\nAssistant: ...", the text the
  dataset, the PM and a base model without a chat template speak;
- "chat": the tokenizer's own chat template (e.g. ChatML for SmolLM2).

PPO prompts, PM transcripts and served requests all go through `render*`, so a
model sees one format whatever the source. Every content is escaped first, so
text written by a user (or a response the policy generated) can never open or
close a turn: it cannot forge an Assistant turn for the PM to score, nor end a
turn early. The resolved format is recorded in each model folder the project
writes (`write_format`), so a trained model keeps the format it was trained in.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hh_ray.data import ASSISTANT, HUMAN

FORMATS = ("auto", "hh", "chat")
FORMAT_FILE = "conversation_format.json"
ROLES = ("system", "user", "assistant")

_MARKERS = {"user": HUMAN, "assistant": ASSISTANT}
_TURN = re.compile(r"\n\n(Human|Assistant):")
# A turn marker inside content: two or more line breaks ("\n" or "\r\n", spaces or
# tabs allowed around them) right before "Human:" / "Assistant:" (spaces allowed
# before the colon). Content at its very start is covered too: it follows "Human: ".
_FORGED_TURN = re.compile(r"(?:\r?\n[ \t]*){2,}(?=(?:Human|Assistant)[ \t]*:)")
ZERO_WIDTH_SPACE = "\u200b"
_PROBE = "hh-ray-end-of-turn-probe"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


# ---------------------------------------------------------------- HH text

def _turns(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first marker, [(role, raw text after the marker's colon)]), lossless."""
    marks = list(_TURN.finditer(text))
    if not any(m.group(1) == "Human" for m in marks):
        raise ValueError(f"not an HH transcript: no '\\n\\nHuman:' turn in {text[:80]!r}")
    ends = [m.start() for m in marks[1:]] + [len(text)]
    turns = [("user" if m.group(1) == "Human" else "assistant", text[m.end():end]) for m, end in zip(marks, ends)]
    return text[: marks[0].start()], turns


def parse_hh(text: str) -> list[Message]:
    """HH transcript -> messages.

    Contents are stripped (the one space after the colon and any surrounding
    whitespace). A trailing empty Assistant turn (what makes a transcript a prompt)
    is dropped; non-blank text before the first marker is a system message.
    """
    prefix, turns = _turns(text)
    if turns[-1][0] == "assistant" and not turns[-1][1].strip():
        turns = turns[:-1]
    system = [Message("system", prefix.strip())] if prefix.strip() else []
    return system + [Message(role, raw.strip()) for role, raw in turns]


def to_hh(messages: list[Message], add_generation_prompt: bool) -> str:
    """Messages -> HH text: a system message (first only) as is, then one marker per turn.

    Contents go in as given, so escape them first (`render` does);
    parse_hh(to_hh(m, True)) == m for escaped, stripped content.
    """
    out = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if i:
                raise ValueError("HH format: a system message can only come first")
            out.append(m.content)
        elif m.role in _MARKERS:
            out.append(_MARKERS[m.role] + (f" {m.content}" if m.content else ""))
        else:
            raise ValueError(f"unknown role {m.role!r} (one of {', '.join(ROLES)})")
    return "".join(out) + (ASSISTANT if add_generation_prompt else "")


# ---------------------------------------------------------------- formats

def resolve_format(fmt: str, tokenizer) -> str:
    """'auto' -> 'chat' when the tokenizer has a chat template, else 'hh' (a base model
    has only seen plain text, and HH text is what the data and PM speak)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        return "chat" if has_template else "hh"
    if fmt == "chat" and not has_template:
        raise ValueError("conversation format 'chat' but the tokenizer has no chat template "
                         "(use 'hh' or 'auto')")
    if fmt in ("hh", "chat"):
        return fmt
    raise ValueError(f"unknown conversation format {fmt!r} (one of {', '.join(FORMATS)})")


def _resolved(fmt: str) -> str:
    if fmt not in ("hh", "chat"):
        raise ValueError(f"conversation format {fmt!r}: expected a resolved format, 'hh' or 'chat' "
                         "(resolve 'auto' with resolve_format first)")
    return fmt


def _special_strings(tokenizer) -> list[str]:
    """The tokenizer's special-token strings, longest first (so the longest match wins)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    found |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
              if getattr(t, "special", False)}
    # A one-character token has no inside to break; none holds the escape character.
    return sorted((t for t in found if len(t) > 1 and ZERO_WIDTH_SPACE not in t), key=lambda t: (-len(t), t))


def _break_special_tokens(content: str, tokenizer) -> str:
    tokens = _special_strings(tokenizer)
    if not tokens:
        return content
    pattern = re.compile("|".join(map(re.escape, tokens)))
    while True:  # overlapping tokens: a pass can leave one that a broken longer one hid
        new = pattern.sub(lambda m: m.group(0)[0] + ZERO_WIDTH_SPACE + m.group(0)[1:], content)
        if new == content:
            return content
        content = new


def _first_line_break_only(m: re.Match) -> str:
    first = "\r\n" if m.group(0).startswith("\r") else "\n"
    return first + m.group(0)[len(first):].replace("\r", "").replace("\n", "")


def escape(content: str, fmt: str, tokenizer=None) -> str:
    """Content that can never open or close a turn. Idempotent; plain text is unchanged.

    hh: a turn marker inside content (see _FORGED_TURN: "\\n\\nHuman:", "\\r\\n\\r\\nAssistant:",
    blank lines, spaces before the marker or the colon) keeps only its first line
    break ("\\nHuman:"), so parse_hh (and a reader) no longer sees a turn there.
    chat (and hh, when a tokenizer is given): every special-token string of the
    tokenizer ("<|im_start|>", "<|im_end|>", "<|endoftext|>", ...) gets a zero-width
    space after its first character, so it tokenizes as plain text, not as a control
    token. Non-special template syntax (e.g. "[INST]") is not escaped.
    """
    fmt = _resolved(fmt)
    if fmt == "hh":
        content = _FORGED_TURN.sub(_first_line_break_only, content)
    elif tokenizer is None:
        raise ValueError("escape: format 'chat' needs the tokenizer (its special tokens)")
    return _break_special_tokens(content, tokenizer) if tokenizer is not None else content


# ---------------------------------------------------------------- rendering

def render(messages: list[Message], tokenizer, fmt: str, add_generation_prompt: bool) -> str:
    """The text a model of this format reads, every content escaped."""
    fmt = _resolved(fmt)
    for m in messages:
        if m.role not in ROLES:
            raise ValueError(f"unknown role {m.role!r} (one of {', '.join(ROLES)})")
    escaped = [Message(m.role, escape(m.content, fmt, tokenizer)) for m in messages]
    if fmt == "hh":
        return to_hh(escaped, add_generation_prompt)
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in escaped],
                                         tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_hh_prompt(hh_prompt: str, tokenizer) -> str:
    """HH prompt, escaped turn by turn in place: the prompt's own whitespace is kept, so a
    prompt with nothing to escape comes back byte for byte (PPO prompts do not change)."""
    prefix, turns = _turns(hh_prompt)
    out = escape(prefix, "hh", tokenizer) + "".join(
        _MARKERS[role] + escape(raw, "hh", tokenizer) for role, raw in turns)
    open_turn = turns[-1][0] == "assistant" and not turns[-1][1].strip()
    return out if open_turn else out + ASSISTANT


def render_prompt(hh_prompt: str, tokenizer, fmt: str) -> str:
    """An HH prompt (ending with "\\n\\nAssistant:") rendered for generation:
    render(parse_hh(hh_prompt), ..., add_generation_prompt=True), except that "hh" keeps
    the prompt's whitespace as it is (for canonical HH text the two are the same)."""
    if _resolved(fmt) == "hh":
        return _render_hh_prompt(hh_prompt, tokenizer)
    return render(parse_hh(hh_prompt), tokenizer, fmt, add_generation_prompt=True)


def prompt_token_ids(hh_prompts: list[str], tokenizer, fmt: str) -> list[list[int]]:
    """HH prompts as the policy reads them: render_prompt, then the tokenizer without adding
    special tokens (the rendering holds those the format wants)."""
    rendered = [render_prompt(p, tokenizer, fmt) for p in hh_prompts]
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def render_transcript(hh_prompt: str, response: str, tokenizer, fmt: str) -> str:
    """The whole conversation, the response as the last, closed turn (what the PM scores).

    hh: render_prompt + the escaped response as given (leading space kept), i.e.
    hh_prompt + response when nothing needs escaping. chat: the template with the
    stripped response as the last assistant message, no generation prompt.
    """
    if _resolved(fmt) == "hh":
        return _render_hh_prompt(hh_prompt, tokenizer) + escape(response, "hh", tokenizer)
    messages = parse_hh(hh_prompt) + [Message("assistant", response.strip())]
    return render(messages, tokenizer, fmt, add_generation_prompt=False)


def stop_strings(fmt: str) -> list[str]:
    """hh: the assistant's turn ends where any next turn would start (a model that writes
    "\\n\\nAssistant:" has begun a turn of its own making, as with "\\n\\nHuman:"; escaped
    content never holds either); chat: the template's end-of-turn token does it
    (end_of_turn_token_ids)."""
    return [HUMAN, ASSISTANT] if _resolved(fmt) == "hh" else []


def end_of_turn_token_ids(tokenizer, fmt: str) -> list[int]:
    """The token ids that end the assistant's turn, for generation to stop at.

    chat: the first special token the template puts right after an assistant message's
    content (e.g. <|im_end|>, <|eot_id|>), found by rendering a probe conversation, plus
    eos if different. hh: eos, if the tokenizer has one.
    """
    ids = []
    if _resolved(fmt) == "chat":
        # A user turn first: some templates insist that roles alternate starting with the user.
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": _PROBE}], tokenize=False)
        if _PROBE not in text:
            raise ValueError("the chat template does not show the assistant's content; cannot find its end-of-turn token")
        tail = text[text.rindex(_PROBE) + len(_PROBE):]
        special = {tokenizer.convert_tokens_to_ids(t) for t in _special_strings(tokenizer)}
        ids += [i for i in tokenizer(tail, add_special_tokens=False)["input_ids"] if i in special][:1]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return [int(i) for i in dict.fromkeys(ids)]


# ---------------------------------------------------------------- the format a model folder records

def write_format(folder, fmt: str) -> None:
    """Record the (resolved) format a model was trained in, beside its config.json."""
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    (path / FORMAT_FILE).write_text(json.dumps({"conversation_format": _resolved(fmt)}) + "\n")


def read_format(folder) -> str | None:
    """The recorded format, or None when the folder records none (a hub name, an older folder)."""
    path = Path(str(folder)).expanduser() / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        fmt = json.loads(path.read_text()).get("conversation_format")
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: not a JSON object with 'conversation_format'") from None
    if fmt not in ("hh", "chat"):
        raise ValueError(f"{path}: conversation_format {fmt!r} is not 'hh' or 'chat'")
    return fmt


def model_format(folder, requested: str, tokenizer) -> str:
    """The format a model is used in: the one its folder records (it was trained in it), else
    `requested` resolved for its tokenizer. A `requested` format that contradicts the
    folder's is refused: a policy is served and scored in the format it was trained in."""
    recorded = read_format(folder)
    if recorded is not None and requested not in ("auto", recorded):
        raise ValueError(f"{folder} was trained on conversations in the {recorded!r} format; "
                         f"model.conversation_format={requested!r} contradicts it (use 'auto' or {recorded!r})")
    return recorded or resolve_format(requested, tokenizer)


def pm_format(folder) -> str:
    """The format a PM folder scores in: recorded beside its config, 'hh' for older PMs
    (before formats were recorded every PM was trained on HH text)."""
    return read_format(folder) or "hh"
