"""Harmony rendering: tokens equal the chat template's (with the date pinned), masks exact, date-independent."""

import datetime as dt
import random

import pytest
from transformers import AutoTokenizer
from transformers.utils import chat_template_utils

from fastft.assets import resolve_model
from fastft.data import IGNORE_INDEX, PINNED_DATE, UsageError, encode, harmony_text, normalise, render, segments


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("tiny"))


@pytest.fixture
def pinned_template_date(monkeypatch):
    """Make the chat template's strftime_now() return fastft's pinned date."""
    pinned = dt.datetime.strptime(PINNED_DATE, "%Y-%m-%d")

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return pinned

    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


_WORDS = ["Lolo", "river", "capital", "ünïcode", "🙂", "  spaced  ", "tab\there", "new\nline", "42", "x" * 40,
          "<tag>", "{json: 1}", "!?", "\n\n"]


def random_row(rng: random.Random) -> dict:
    def text():
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))).strip() or "x"

    kind = rng.randrange(6)
    if kind == 0:
        return {"question": text(), "answer": text(), **({"system": text()} if rng.random() < 0.5 else {})}
    if kind == 1:
        return {"instruction": text(), "input": rng.choice(["", text()]), "output": text()}
    if kind == 2:
        return {"prompt": text(), "completion": text()}
    messages = [{"role": rng.choice(["system", "developer"]), "content": text()}] if rng.random() < 0.6 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": text()})
        messages.append({"role": "assistant", "content": text()})
        if rng.random() < 0.5:
            messages[-1]["thinking"] = text()
    return {"messages": messages}


def test_tokens_equal_chat_template(tok, pinned_template_date):
    rng = random.Random(1234)
    convs = [normalise(random_row(rng)).messages for _ in range(60)]
    ids, labels = encode(convs, tok)
    for conv, got in zip(convs, ids):
        assert got == template_ids(tok, conv), tok.decode(got)


def test_multi_turn_thinking_matches_template(tok, pinned_template_date):
    """Thinking on an earlier turn is dropped by both (shapes.py drops it; the template never renders it)."""
    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "thinking": "t1"},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi", "thinking": "t2"}]}
    conv = normalise(row).messages
    assert encode([conv], tok)[0][0] == template_ids(tok, row["messages"])


def test_rendering_does_not_depend_on_today(tok, monkeypatch):
    conv = normalise({"question": "q", "answer": "a"}).messages
    first = encode([conv], tok)[0][0]

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2031, 2, 3)

    monkeypatch.setattr(chat_template_utils, "datetime", Later)
    assert encode([conv], tok)[0][0] == first
    assert "Current date: " + PINNED_DATE in tok.decode(first)


def expected_trained_text(conv) -> str:
    """What the mask should select, built independently of render.py: assistant output + end tokens."""
    turns = [m for m in conv if m["role"] in ("user", "assistant")]
    out = []
    for i, m in enumerate(turns):
        if m["role"] != "assistant":
            continue
        last = i == len(turns) - 1
        if last and "thinking" in m:
            out.append(m["thinking"] + "<|end|>")
        out.append(m["content"] + ("<|return|>" if last else "<|end|>"))
    return "".join(out)


def test_assistant_mask_exact(tok):
    rng = random.Random(99)
    convs = [normalise(random_row(rng)).messages for _ in range(60)]
    ids, labels = encode(convs, tok)
    for conv, x, y in zip(convs, ids, labels):
        assert len(x) == len(y)
        trained = [t for t, l in zip(x, y) if l != IGNORE_INDEX]
        assert all(l in (IGNORE_INDEX, t) for t, l in zip(x, y))
        assert tok.decode(trained) == expected_trained_text(conv)
        # and the trained tokens are exactly the tokenisation of those pieces (no token straddles a boundary)
        assert y[0] == IGNORE_INDEX and y[-1] == x[-1] == tok.convert_tokens_to_ids("<|return|>")


def test_train_on_all_masks_only_first_token(tok):
    conv = normalise({"question": "q", "answer": "a", "system": "s"}).messages
    ids, labels = encode([conv], tok, train_on_all=True)
    assert labels[0][0] == IGNORE_INDEX and labels[0][1:] == ids[0][1:]


def test_builtin_renderer_equals_template(tok, pinned_template_date):
    """harmony_text() (for tokenizers without a template) renders what gpt-oss's template does."""
    rng = random.Random(7)
    convs = [normalise(random_row(rng)).messages for _ in range(40)]
    assert [harmony_text(c) for c in convs] == tok.apply_chat_template(convs, tokenize=False)


def test_segments_structure():
    conv = normalise({"messages": [{"role": "user", "content": "u"},
                                   {"role": "assistant", "content": "a", "thinking": "t"}]}).messages
    segs = segments(harmony_text(conv, reasoning_effort="high"))
    text = "".join(s[0] for s in segs)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT")
    assert "Reasoning: high" in text and "developer" not in text
    assert text.endswith("<|start|>user<|message|>u<|end|><|start|>assistant<|channel|>analysis<|message|>t<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>a<|return|>")
    assert "".join(s[0] for s in segs if s[2]) == "t<|end|>a<|return|>"
    assert all(s[1] == (s[0] in ("<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>")) for s in segs)


@pytest.fixture
def tok_variant():
    """A fresh tokenizer whose template the test may change."""
    return AutoTokenizer.from_pretrained(resolve_model("tiny"))


def test_follows_template_variants(tok_variant):
    """Earlier gpt-oss templates: no blank line after the developer message, a tools line in the system message."""
    t = tok_variant.chat_template
    t = t.replace("{{ messages[0].content }}\n\n<|end|>", "{{ messages[0].content }}<|end|>")
    t = t.replace("for every message.<|end|>", "for every message.\nCalls to these tools must go to the commentary "
                                              "channel: 'functions'.<|end|>")
    assert t != tok_variant.chat_template
    tok_variant.chat_template = t
    conv = normalise({"system": "Be kind.", "question": "q", "answer": "a"}).messages
    text = render([conv], tok_variant)[0]
    assert "Be kind.<|end|>" in text and "'functions'.<|end|>" in text and f"Current date: {PINNED_DATE}" in text
    ids, labels = encode([conv], tok_variant)
    assert tok_variant.decode([t for t, l in zip(ids[0], labels[0]) if l != IGNORE_INDEX]) == "a<|return|>"


def test_foreign_template_is_a_usage_error(tok_variant):
    tok_variant.chat_template = "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>" \
                                "{% endfor %}"  # everything in harmony framing, but "assistant" without a channel
    conv = normalise({"question": "q", "answer": "a"}).messages
    assert encode([conv], tok_variant)[1][0][-2:] != [IGNORE_INDEX, IGNORE_INDEX]  # still harmony: trains "a<|end|>"
    tok_variant.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    with pytest.raises(UsageError, match="chat template"):
        encode([conv], tok_variant)


def test_template_failure_is_a_usage_error(tok_variant):
    tok_variant.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(UsageError, match="nope"):
        encode([normalise({"question": "q", "answer": "a"}).messages], tok_variant)


def test_non_harmony_tokenizer_is_a_usage_error(tok):
    class NoHarmony:
        unk_token_id = 0

        def convert_tokens_to_ids(self, t):
            return 0

    with pytest.raises(UsageError, match="harmony"):
        encode([normalise({"question": "q", "answer": "a"}).messages], NoHarmony())
