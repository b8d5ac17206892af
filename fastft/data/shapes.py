"""Accepted row shapes, all normalised to one chat: a list of {role, content[, thinking]} messages.

  {"question": q, "answer": a}            user q, assistant a
  {"user": u, "assistant": a}             user u, assistant a
  {"prompt": p, "completion": c}          user p, assistant c
  {"instruction": i, "input": x?, "output": o}
                                          user "i\\n\\nx" (just i when input is absent or empty), assistant o
  {"messages": [{"role", "content", "thinking"?}, ...]}
                                          roles system, developer, user, assistant; thinking on assistant turns
Every shape takes an optional top-level "system" (becomes a leading system message).

The shape is decided by its first key (messages / question / user / prompt / instruction); a row with none or
several of them is an error that lists the keys found. Required text must be a non-empty, non-blank string;
optional text (system, input, thinking) may also be absent, null or blank, which all mean "none". Keys outside the
shape are ignored, and counted as a warning. A conversation is: an optional system or developer message (first,
at most one), then user and assistant turns starting with a user turn and ending with an assistant turn. Text may
not contain harmony special tokens such as <|end|>: they would be read as structure, not text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from .reading import json_kind

# shape name -> (first key, required text keys, optional text keys)
SHAPES = {
    "messages": ("messages", (), ()),
    "question/answer": ("question", ("question", "answer"), ()),
    "user/assistant": ("user", ("user", "assistant"), ()),
    "prompt/completion": ("prompt", ("prompt", "completion"), ()),
    "instruction/output": ("instruction", ("instruction", "output"), ("input",)),
}
ACCEPTED = "{question, answer}, {user, assistant}, {prompt, completion}, {instruction, input?, output}, " \
           "{messages: [{role, content}]}, each with an optional system"
ROLES = ("system", "developer", "user", "assistant")
_MESSAGE_KEYS = {"role", "content", "thinking"}
_SPECIAL = re.compile(r"<\|(?:start|end|message|channel|return|call|constrain|endoftext|startoftext|endofprompt|"
                      r"reserved_\d+)\|>")


class RowProblem(Exception):
    """What is wrong with one row (its message goes after PATH:LINE:)."""


@dataclass
class Conversation:
    shape: str
    messages: list[dict]
    ignored_keys: tuple[str, ...] = ()
    dropped_thinking: bool = False  # thinking on a non-final assistant turn (not rendered, as gpt-oss's template)

    def digest(self) -> str:
        """Identity of the conversation as trained, for duplicate detection and the eval split."""
        canon = json.dumps(self.messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canon.encode("utf-8")).hexdigest()


def _text(value, where: str, present: bool = True) -> str:
    if not present:
        raise RowProblem(f"{where} is missing")
    if value is None:
        raise RowProblem(f"{where} is null")
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string, not {json_kind(value)}")
    if not value.strip():
        raise RowProblem(f"{where} is empty" if value == "" else f"{where} is only whitespace")
    return _clean(value, where)


def _optional_text(value, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string, not {json_kind(value)}")
    return _clean(value, where)


def _clean(value: str, where: str) -> str:
    if "\x00" in value:
        raise RowProblem(f"{where} contains a NUL character")
    m = _SPECIAL.search(value)
    if m:
        raise RowProblem(f"{where} contains the special token {m.group()}, which would be read as structure")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowProblem(f"{where} contains an unpaired surrogate escape (not valid Unicode)") from None
    return value


def detect_shape(obj: dict) -> str:
    found = [name for name, (first, _, _) in SHAPES.items() if first in obj]
    keys = ", ".join(sorted(map(str, obj))) or "none"
    if not found:
        raise RowProblem(f"unknown row shape (keys found: {keys}); accepted shapes: {ACCEPTED}")
    if len(found) > 1:
        raise RowProblem(f"ambiguous row shape: its keys ({keys}) start several shapes ({', '.join(found)}); "
                         f"keep one")
    return found[0]


def normalise(obj: dict) -> Conversation:
    """One parsed JSON object -> Conversation, or RowProblem saying what is wrong."""
    shape = detect_shape(obj)
    first, required, optional = SHAPES[shape]
    known = {first, *required, *optional, "system"}
    ignored = tuple(sorted(str(k) for k in obj if k not in known))
    system = _optional_text(obj.get("system"), "system")
    if shape == "messages":
        inner_ignored: list[str] = []
        messages, dropped = _messages(obj["messages"], system, inner_ignored)
        return Conversation(shape, messages, ignored + tuple(inner_ignored), dropped)
    for key in required:
        if key not in obj:
            keys = ", ".join(sorted(map(str, obj)))
            raise RowProblem(f"{shape} row without {key!r} (keys found: {keys})")
    text = {k: _text(obj[k], k) for k in required}
    user = text[required[0]]
    if shape == "instruction/output":
        extra = _optional_text(obj.get("input"), "input")
        user = user if extra is None else f"{user}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": text[required[1]]}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(shape, messages, ignored)


def _messages(items, system: str | None, ignored: list) -> tuple[list[dict], bool]:
    if not isinstance(items, list):
        raise RowProblem(f"messages must be a list of {{role, content}} objects, not {json_kind(items)}")
    if not items:
        raise RowProblem("messages is empty")
    out = []
    for i, m in enumerate(items):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RowProblem(f"{where} must be an object with role and content, not {json_kind(m)}")
        if "tool_calls" in m or m.get("role") == "tool":
            raise RowProblem(f"{where}: tool calls and tool messages are not supported")
        if "role" not in m:
            raise RowProblem(f"{where} has no 'role' (keys found: {', '.join(sorted(map(str, m)))})")
        role = m["role"]
        if role not in ROLES:
            raise RowProblem(f"{where}.role is {json.dumps(role)}; accepted roles: {', '.join(ROLES)}")
        msg = {"role": role, "content": _text(m.get("content"), f"{where}.content", "content" in m)}
        thinking = _optional_text(m.get("thinking"), f"{where}.thinking")
        if thinking is not None:
            if role != "assistant":
                raise RowProblem(f"{where}.thinking is only allowed on assistant turns (this one is {role})")
            msg["thinking"] = thinking
        ignored.extend(f"{where}.{k}" for k in sorted(map(str, m)) if k not in _MESSAGE_KEYS)
        out.append(msg)

    if system is not None:
        if out[0]["role"] in ("system", "developer"):
            raise RowProblem(f"both a top-level system and a {out[0]['role']} message in messages[0]; keep one")
        out.insert(0, {"role": "system", "content": system})
    offset = 1 if system is not None else 0  # report positions in the user's messages list
    for i, m in enumerate(out[1:], start=1):
        if m["role"] in ("system", "developer"):
            raise RowProblem(f"messages[{i - offset}]: a {m['role']} message is only allowed first, and only once")
    turns = out[1:] if out[0]["role"] in ("system", "developer") else out
    if not any(m["role"] == "assistant" for m in turns):
        raise RowProblem("no assistant turn: nothing to train on")
    if turns[0]["role"] != "user":
        raise RowProblem("the conversation must start with a user turn (after an optional system message)")
    if turns[-1]["role"] != "assistant":
        raise RowProblem("the conversation must end with an assistant turn")
    dropped = False
    for m in turns[:-1]:
        if "thinking" in m:
            del m["thinking"]
            dropped = True
    return out, dropped
