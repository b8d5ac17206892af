"""Conversations -> harmony tokens and labels, rendered segment by segment so the loss mask is exact.

The text is what gpt-oss's chat template renders for the same messages (tests/test_data_render.py checks token
equality with ``tokenizer.apply_chat_template`` on the tiny model), with one difference: the system message's
"Current date" is pinned (PINNED_DATE), so a dataset renders to the same tokens on every day.

  <|start|>system<|message|>{identity, knowledge cutoff, date, reasoning effort, valid channels}<|end|>
  <|start|>developer<|message|># Instructions\\n\\n{system or developer message}\\n\\n<|end|>        (if any)
  <|start|>user<|message|>{content}<|end|>
  <|start|>assistant<|channel|>final<|message|>{content}<|end|>                       (earlier assistant turns)
  <|start|>assistant<|channel|>analysis<|message|>{thinking}<|end|>                   (final turn, if thinking)
  <|start|>assistant<|channel|>final<|message|>{content}<|return|>                    (final assistant turn)

Trained tokens (label = token id; everything else -100): the content of every assistant turn and the token that
ends it (<|end|> or <|return|>), and the final turn's thinking with its <|end|>: thinking is the model's own output,
and a dataset that carries it wants the model to learn to reason that way. The headers (<|start|>assistant...
<|message|>) are not trained. With train_on_all every token is trained. Either way the first token of every
conversation has label -100, so that after packing nothing is ever predicted across a document boundary.

Special tokens only ever come from here (shapes.py rejects text containing them), and each text segment is
tokenised on its own: both the stock template's tokenisation and ours split at special tokens first, so the
concatenation equals whole-string tokenisation.
"""

from __future__ import annotations

import hashlib

from .config import UsageError

IGNORE_INDEX = -100
PINNED_DATE = "2025-08-05"  # gpt-oss's release date; any fixed date would do
KNOWLEDGE_CUTOFF = "2024-06"
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
HARMONY_TOKENS = ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>")
RENDER_VERSION = "harmony-1"  # bump when the rendering below changes: it keys the tokenisation cache

# A segment: (text, is_special_token, trained)
Segment = tuple[str, bool, bool]


def system_text(reasoning_effort: str = "medium", date: str = PINNED_DATE) -> str:
    return (f"{MODEL_IDENTITY}\nKnowledge cutoff: {KNOWLEDGE_CUTOFF}\nCurrent date: {date}\n\n"
            f"Reasoning: {reasoning_effort}\n\n"
            "# Valid channels: analysis, commentary, final. Channel must be included for every message.")


def harmony_segments(messages: list[dict], reasoning_effort: str = "medium", date: str = PINNED_DATE
                     ) -> list[Segment]:
    """A normalised conversation (see shapes.py) -> segments; trained marks assistant output."""
    segs: list[Segment] = []

    def message(header: list[str], text: str, end: str, trained: bool = False):
        # header alternates text and special tokens: ["system"] or ["assistant", "<|channel|>", "final"]
        segs.append(("<|start|>", True, False))
        for part in header:
            segs.append((part, part in HARMONY_TOKENS, False))
        segs.append(("<|message|>", True, False))
        segs.append((text, False, trained))
        segs.append((end, True, trained))

    message(["system"], system_text(reasoning_effort, date), "<|end|>")
    turns = messages
    if messages[0]["role"] in ("system", "developer"):
        message(["developer"], f"# Instructions\n\n{messages[0]['content']}\n\n", "<|end|>")
        turns = messages[1:]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            message(["user"], m["content"], "<|end|>")
            continue
        last = i == len(turns) - 1
        if last and "thinking" in m:
            message(["assistant", "<|channel|>", "analysis"], m["thinking"], "<|end|>", trained=True)
        message(["assistant", "<|channel|>", "final"], m["content"], "<|return|>" if last else "<|end|>",
                trained=True)
    return segs


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
    all_segs = [harmony_segments(c, reasoning_effort) for c in conversations]
    texts = [s[0] for segs in all_segs for s in segs if not s[1]]
    text_ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
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
