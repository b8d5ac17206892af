"""Conversations -> harmony tokens and labels: rendered by the tokenizer's own chat template, masked by structure.

gpt-oss's chat template has changed between releases (e.g. whether a developer message ends in a blank line), so
fastft does not hard-code it: the text comes from ``tokenizer.apply_chat_template`` (a built-in harmony renderer,
harmony_text(), is used only for a tokenizer without a template). One difference: the system message's
"Current date" is replaced by PINNED_DATE, so a dataset renders to the same tokens on every day.

The rendered text is then cut at the harmony special tokens into segments; a harmony message is
``<|start|>{role}[<|channel|>{channel}]<|message|>{body}<|end|> (or <|return|> / <|call|>)``. Segments are
tokenised one by one, which equals whole-string tokenisation (tokenizers split at special tokens first), and
the mask is exact by construction:

  Trained (label = token id; all else -100): the body of every assistant message and the token that ends it.
  That is each assistant turn's content with its <|end|> (or <|return|> on the final turn), and the final turn's
  thinking (its analysis-channel message) with its <|end|>: thinking is the model's own output, and a dataset
  that carries it wants the model to learn to reason that way. Headers (<|start|>assistant<|channel|>final
  <|message|>) are not trained. gpt-oss's template renders thinking on the final assistant turn only (shapes.py
  drops it elsewhere and says so). With train_on_all every token is trained.

Either way the first token of every conversation has label -100, so that after packing nothing is ever predicted
across a document boundary. Each conversation's trained bodies are checked against its messages, so a template
that renders something unexpected is a clear UsageError, never a silently wrong mask.
"""

from __future__ import annotations

import hashlib
import re

from .config import UsageError

IGNORE_INDEX = -100
PINNED_DATE = "2025-08-05"  # gpt-oss's release date; any fixed date would do
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>")
_ENDS = ("<|end|>", "<|return|>", "<|call|>")
_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in HARMONY_TOKENS) + ")")
_DATE = re.compile(r"Current date: \d{4}-\d{2}-\d{2}")
RENDER_VERSION = "harmony-2"  # bump when the rendering below changes: it keys the tokenisation cache

# A segment: (text, is_special_token, trained)
Segment = tuple[str, bool, bool]


def harmony_text(messages: list[dict], reasoning_effort: str = "medium", date: str = PINNED_DATE) -> str:
    """What gpt-oss's template renders for a normalised conversation (see shapes.py), for template-less
    tokenizers."""
    out = [f"<|start|>system<|message|>{MODEL_IDENTITY}\nKnowledge cutoff: 2024-06\nCurrent date: {date}\n\n"
           f"Reasoning: {reasoning_effort}\n\n# Valid channels: analysis, commentary, final. Channel must be "
           "included for every message.<|end|>"]
    turns = messages
    if messages[0]["role"] in ("system", "developer"):
        out.append(f"<|start|>developer<|message|># Instructions\n\n{messages[0]['content']}\n\n<|end|>")
        turns = messages[1:]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            out.append(f"<|start|>user<|message|>{m['content']}<|end|>")
            continue
        last = i == len(turns) - 1
        if last and "thinking" in m:
            out.append(f"<|start|>assistant<|channel|>analysis<|message|>{m['thinking']}<|end|>")
        out.append(f"<|start|>assistant<|channel|>final<|message|>{m['content']}{'<|return|>' if last else '<|end|>'}")
    return "".join(out)


def render(conversations: list[list[dict]], tokenizer, reasoning_effort: str = "medium") -> list[str]:
    """Harmony text of each conversation, by the tokenizer's chat template, with the date pinned."""
    if not getattr(tokenizer, "chat_template", None):
        return [harmony_text(c, reasoning_effort) for c in conversations]
    try:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False, reasoning_effort=reasoning_effort)
    except Exception as e:  # a template error: say whose template failed, not a jinja traceback
        raise UsageError(f"the tokenizer's chat template failed to render a conversation: {e}") from None
    return [_pin_date(t) for t in texts]


def _pin_date(text: str) -> str:
    head, sep, rest = text.partition("<|end|>")  # only inside the system message
    return _DATE.sub(f"Current date: {PINNED_DATE}", head, count=1) + sep + rest


def segments(text: str) -> list[Segment]:
    """Harmony text -> segments; trained marks assistant message bodies and their end tokens."""
    segs: list[Segment] = []
    header, in_body, trained = None, False, False
    for part in _SPLIT.split(text):
        if not part:
            continue
        if part == "<|start|>":
            header, in_body, trained = [], False, False
            segs.append((part, True, False))
        elif part == "<|message|>" and header is not None:
            trained = "".join(header).startswith("assistant")
            header, in_body = None, True
            segs.append((part, True, False))
        elif part in _ENDS and in_body:
            segs.append((part, True, trained))
            in_body, trained = False, False
        else:
            if header is not None:
                header.append(part)
            segs.append((part, part in HARMONY_TOKENS, trained and in_body))
    return segs


def expected_trained(messages: list[dict]) -> list[str]:
    """The assistant bodies a correct rendering trains on, in order."""
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    out = []
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            if i == len(turns) - 1 and "thinking" in m:
                out.append(m["thinking"])
            out.append(m["content"])
    return out


def special_ids(tokenizer) -> dict[str, int]:
    """The harmony tokens' ids; UsageError when the tokenizer is not a GPT-OSS (harmony) one."""
    ids = {}
    for tok in HARMONY_TOKENS:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise UsageError(f"the tokenizer has no {tok} token: fastft needs a GPT-OSS (harmony) tokenizer")
        ids[tok] = i
    return ids


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer or its chat template does; keys the tokenisation cache."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def encode(conversations: list[list[dict]], tokenizer, train_on_all: bool = False,
           reasoning_effort: str = "medium") -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels (aligned with the ids; the model shifts them) for a batch of conversations."""
    specials = special_ids(tokenizer)
    all_segs = []
    for conv, text in zip(conversations, render(conversations, tokenizer, reasoning_effort)):
        segs = segments(text)
        got = [s[0] for s in segs if s[2] and not s[1]]
        want = [t for t in expected_trained(conv) if t]
        if got != want:
            raise UsageError("the tokenizer's chat template does not render assistant turns as harmony messages "
                             f"(expected bodies {want!r}, found {got!r}); fastft needs gpt-oss's template")
        all_segs.append(segs)
    texts = [s[0] for segs in all_segs for s in segs if not s[1]]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    ids_out, labels_out = [], []
    for segs in all_segs:
        ids, labels = [], []
        for text, special, trained in segs:
            piece = [specials[text]] if special else next(text_ids)
            ids.extend(piece)
            labels.extend(piece if (trained or train_on_all) else [IGNORE_INDEX] * len(piece))
        labels[0] = IGNORE_INDEX
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out
