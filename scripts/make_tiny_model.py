"""Make the built-in tiny GPT-OSS model (``--model tiny``) and the example data it is demonstrated on.

Writes, reproducibly (fixed seeds, no downloads):
  examples/sample.jsonl  ~200 rows of templated Q&A about an invented atlas, in every accepted row shape
  fastft/assets/tiny/    config.json, generation_config.json, model.safetensors (fp32, random init),
                         tokenizer.json + tokenizer_config.json + chat_template.jinja (byte-level BPE with the
                         harmony special tokens and a harmony chat template equivalent to gpt-oss's)

The model has every architectural feature of gpt-oss-20b at toy size: MoE with top-k routing and biased experts,
attention sinks, alternating sliding-window / full attention (window 16, so windows matter even on short rows),
q/k/v/o biases and YaRN RoPE with gpt-oss-20b's parameters. It is randomly initialised, so it only says anything
useful after fine-tuning, which is what it is for: tests and CPU demos of the whole pipeline.

Usage: python scripts/make_tiny_model.py [--out fastft/assets/tiny] [--sample examples/sample.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
BPE_TARGET = 4000  # the corpus runs out of frequent pairs first (~2k merges); the vocab is what it gives
N_SPECIAL_BLOCK = 21  # gpt-oss's ids 199998..200018, same order

# gpt-oss's special tokens in id order (o200k_harmony: 199998 + i); the unnamed ones are reserved.
_NAMED = {0: "<|startoftext|>", 1: "<|endoftext|>", 4: "<|return|>", 5: "<|constrain|>", 7: "<|channel|>",
          8: "<|start|>", 9: "<|end|>", 10: "<|message|>", 14: "<|call|>", 20: "<|endofprompt|>"}

# Written by hand (not copied) to render what gpt-oss's template renders for system/developer/user/assistant
# conversations: the harmony system message, an optional developer message from a leading system/developer turn,
# analysis (thinking) only on a final assistant turn, <|return|> closing a final assistant turn. Tools are refused
# rather than rendered approximately.
CHAT_TEMPLATE = """\
{%- if tools or builtin_tools -%}
{{- raise_exception("the tiny model's chat template does not render tools") -}}
{%- endif -%}
{%- set identity = model_identity if model_identity is defined else \
"You are ChatGPT, a large language model trained by OpenAI." -%}
{%- set effort = reasoning_effort if reasoning_effort is defined else "medium" -%}
<|start|>system<|message|>{{ identity }}
Knowledge cutoff: 2024-06
Current date: {{ strftime_now("%Y-%m-%d") }}

Reasoning: {{ effort }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>
{%- set turns = messages -%}
{%- if messages and messages[0].role in ["system", "developer"] -%}
{%- set turns = messages[1:] -%}
{%- if messages[0].content -%}
<|start|>developer<|message|># Instructions

{{ messages[0].content }}

<|end|>
{%- endif -%}
{%- endif -%}
{%- for m in turns -%}
{%- if m.role == "user" -%}
<|start|>user<|message|>{{ m.content }}<|end|>
{%- elif m.role == "assistant" -%}
{%- if m.tool_calls is defined -%}
{{- raise_exception("the tiny model's chat template does not render tool calls") -}}
{%- endif -%}
{%- if loop.last and not add_generation_prompt -%}
{%- if m.thinking is defined -%}
<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>
{%- endif -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|return|>
{%- else -%}
<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>
{%- endif -%}
{%- elif m.role == "tool" -%}
{{- raise_exception("the tiny model's chat template does not render tool messages") -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|start|>assistant
{%- endif -%}
"""


# ----------------------------------------------------------------------------------------------- example data

_SYLLABLES = ["ka", "lo", "ver", "an", "mi", "tor", "sa", "len", "qu", "ri", "bel", "do", "na", "zo", "pe", "ush"]
_DISHES = ["smoked river fish", "barley dumplings", "honey flatbread", "pepper stew", "salted plums",
           "goat cheese pie", "lentil soup", "fried mushrooms"]
_LANGS = ["Velish", "Ordic", "Samaran", "Kettish", "Luvan", "Pemric"]


def _name(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def _atlas(rng: random.Random, n: int = 24) -> list[dict]:
    seen, countries = set(), []
    while len(countries) < n:
        name = _name(rng, rng.choice([2, 3]))
        if name in seen:
            continue
        seen.add(name)
        countries.append({
            "name": name, "capital": _name(rng, 2), "river": _name(rng, 2) + " River",
            "language": rng.choice(_LANGS), "dish": rng.choice(_DISHES),
            "population": f"{rng.randint(2, 90)}.{rng.randint(0, 9)} million", "founded": rng.randint(1200, 1950),
        })
    return countries


def _facts(c: dict) -> list[tuple[str, str]]:
    n = c["name"]
    return [
        (f"What is the capital of {n}?", f"The capital of {n} is {c['capital']}."),
        (f"Which river flows through {n}?", f"The {c['river']} flows through {n}."),
        (f"What language is spoken in {n}?", f"People in {n} speak {c['language']}."),
        (f"What is the national dish of {n}?", f"The national dish of {n} is {c['dish']}."),
        (f"How many people live in {n}?", f"About {c['population']} people live in {n}."),
        (f"When was {n} founded?", f"{n} was founded in {c['founded']}."),
    ]


def _profile(c: dict) -> str:
    return " ".join(a for _, a in _facts(c)) + (
        f" Visitors to {c['capital']} often walk along the {c['river']} and try {c['dish']} in the old market.")


def sample_rows(seed: int = 0) -> list[dict]:
    """~200 rows in every accepted shape; short facts, multi-turn chats and long profiles, so lengths vary."""
    rng = random.Random(seed)
    atlas = _atlas(rng)
    system = "You are a concise atlas assistant. Answer in one or two sentences."
    rows = []
    for i, c in enumerate(atlas):
        facts = _facts(c)
        rng.shuffle(facts)
        (q1, a1), (q2, a2), (q3, a3), (q4, a4), (q5, a5), (q6, a6) = facts
        rows.append({"question": q1, "answer": a1})
        rows.append({"user": q2, "assistant": a2} | ({"system": system} if i % 3 == 0 else {}))
        rows.append({"prompt": q3 + "\n", "completion": a3})
        rows.append({"instruction": "Answer the question about the atlas.", "input": q4, "output": a4})
        rows.append({"instruction": f"Write a short profile of {c['name']}.", "output": _profile(c)})
        rows.append({"messages": [
            {"role": "user", "content": q5}, {"role": "assistant", "content": a5},
            {"role": "user", "content": q6}, {"role": "assistant", "content": a6}]})
        if i % 2 == 0:
            rows.append({"messages": [
                {"role": "developer", "content": system},
                {"role": "user", "content": f"Tell me about {c['name']}."},
                {"role": "assistant", "content": _profile(c),
                 "thinking": f"The user wants facts about {c['name']}. I know its capital, river, language, dish,"
                             f" population and founding year, so I list them."}]})
        else:
            rows.append({"system": system, "messages": [
                {"role": "user", "content": f"Compare {c['name']} and {atlas[i - 1]['name']}."},
                {"role": "assistant", "content": f"{_profile(c)} By contrast, {_profile(atlas[i - 1])}"}]})
        rows.append({"question": f"Is {c['capital']} the capital of {c['name']}? Answer yes or no.",
                     "answer": "Yes."})
        if i % 3 == 1:
            other = atlas[(i + 5) % len(atlas)]
            rows.append({"question": f"Is {other['capital']} the capital of {c['name']}? Answer yes or no.",
                         "answer": f"No. The capital of {c['name']} is {c['capital']}."})
    rng.shuffle(rows)
    return rows


def write_sample(path: Path, seed: int = 0) -> list[dict]:
    rows = sample_rows(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return rows


# ----------------------------------------------------------------------------------------------- tokenizer

def _corpus(rows: list[dict], seed: int) -> list[str]:
    """BPE training text: the example data, the harmony scaffolding and some generic prose and digits, so the
    tokenizer compresses what the demo trains on and still byte-falls-back gracefully on anything else."""
    rng = random.Random(seed + 1)
    texts = [json.dumps(r, ensure_ascii=False) for r in rows]
    for r in rows:
        texts.extend(str(v) for v in r.values() if isinstance(v, str))
        for m in r.get("messages", []):
            texts.extend(str(v) for v in m.values())
    texts += ["You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: 2024-06\n"
              "Current date: 2025-08-05\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
              "Channel must be included for every message.", "# Instructions\n\n", "system", "developer", "user",
              "assistant", "analysis", "final", "commentary", "Reasoning: low", "Reasoning: high"] * 20
    words = ("the of and to in is was for on that with as by at from it this be are or an which you not have "
             "question answer write explain summarise list name number city river country language food people "
             "year day time water light small large first last good new old because however therefore").split()
    for _ in range(3000):
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))).capitalize()
                     + rng.choice([".", "?", "!", ":", ";", ","]) + f" {rng.randint(0, 99999)}")
    return texts


def build_tokenizer(rows: list[dict], seed: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_TARGET, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(rows, seed), trainer=trainer)
    base = tok.get_vocab_size()
    vocab_size = -(-(base + N_SPECIAL_BLOCK) // 64) * 64  # reserved tokens pad to a multiple of 64, as gpt-oss's
    specials = [_NAMED.get(i, f"<|reserved_{base + i}|>") for i in range(N_SPECIAL_BLOCK)]
    specials += [f"<|reserved_{i}|>" for i in range(base + N_SPECIAL_BLOCK, vocab_size)]
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    # As gpt-oss: no BOS is added; <|return|> ends generation; <|endoftext|> pads.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|return|>",
                                   pad_token="<|endoftext|>", model_max_length=131072,
                                   chat_template=CHAT_TEMPLATE)


# ----------------------------------------------------------------------------------------------- model

def build_model(tokenizer, seed: int) -> GptOssForCausalLM:
    ids = tokenizer.convert_tokens_to_ids
    config = GptOssConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=131072, rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096},
        attention_bias=True, tie_word_embeddings=False, router_aux_loss_coef=0.9,
        # gpt-oss's 0.02 suits hidden 2880; at hidden 64 it leaves activations so small that LoRA on a random model
        # barely moves the loss (measured: 7.5 -> 7.1 vs 7.3 -> 5.4 with 0.1 over the same 6 epochs of the sample).
        initializer_range=0.1,
        bos_token_id=ids("<|startoftext|>"), eos_token_id=ids("<|return|>"), pad_token_id=ids("<|endoftext|>"),
    )
    config.swiglu_limit = 7.0  # as gpt-oss-20b's config.json (HF hard-codes it; fastft's loader reads it)
    config.initial_context_length = 4096
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).float().eval()
    # HF zero-initialises biases: randomise them (and the sinks, a little more) so code paths that drop a bias
    # or a sink produce a visible difference in tests.
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "fastft" / "assets" / "tiny")
    ap.add_argument("--sample", type=Path, default=ROOT / "examples" / "sample.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = write_sample(args.sample, args.seed)
    tokenizer = build_tokenizer(rows, args.seed)
    model = build_model(tokenizer, args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.iterdir():
        stale.unlink()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # Name the class both transformers 4.x and 5.x resolve (5.x writes its new "TokenizersBackend" alias).
    tc_path = args.out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("backend", None)
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")]
    GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=eos,
                     pad_token_id=model.config.pad_token_id, do_sample=True).save_pretrained(args.out)
    n_params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {len(rows)} rows to {args.sample}")
    print(f"wrote {args.out}: {n_params:,} parameters, {size / 2**20:.2f} MiB, "
          f"{', '.join(sorted(f.name for f in args.out.iterdir()))}")


if __name__ == "__main__":
    main()
