"""The built-in tiny model: stock transformers loads it, it has gpt-oss's features, the script reproduces it."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastft.assets import resolve_model

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(resolve_model("tiny"))
HARMONY = ["<|start|>", "<|message|>", "<|end|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
           "<|endoftext|>", "<|startoftext|>", "<|endofprompt|>"]


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_pretrained(TINY).eval(), AutoTokenizer.from_pretrained(TINY)


def test_resolve_model():
    assert resolve_model("tiny") == str(TINY) and (TINY / "model.safetensors").exists()
    assert resolve_model("openai/gpt-oss-20b") == "openai/gpt-oss-20b"
    assert sum(f.stat().st_size for f in TINY.iterdir()) < 5 * 2**20


def test_loads_and_runs_forward(tiny):
    model, tok = tiny
    assert type(model).__name__ == "GptOssForCausalLM" and model.dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Lolo?"}],
                                  add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.loss)
    assert 6.0 < out.loss.item() < 9.0  # random init: about ln(vocab) = 7.6


def test_architecture_features(tiny):
    model, tok = tiny
    c = model.config
    assert c.vocab_size == len(tok) and c.vocab_size % 64 == 0 and 2000 <= c.vocab_size <= 4096
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (64, 4, 4, 2, 16)
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.sliding_window) == (4, 2, 64, 16)
    assert c.layer_types == ["sliding_attention", "full_attention"] * 2
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 32.0
    assert c.attention_bias and not c.tie_word_embeddings
    w = load_file(str(TINY / "model.safetensors"))
    sinks = [v for k, v in w.items() if k.endswith("sinks")]
    biases = [v for k, v in w.items() if k.endswith("bias")]
    assert len(sinks) == 4 and all(s.abs().min() > 0 for s in sinks)
    assert biases and all(b.abs().max() > 0 for b in biases)
    assert w["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 128)
    assert all(v.dtype == torch.float32 for v in w.values())


def test_sliding_window_matters(tiny):
    model, _ = tiny
    ids = torch.randint(0, 2000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        windowed = model(input_ids=ids).logits
        full = AutoModelForCausalLM.from_pretrained(TINY, sliding_window=4096).eval()(input_ids=ids).logits
    assert torch.allclose(windowed[0, :16], full[0, :16], atol=1e-5)  # within the window: identical
    assert not torch.allclose(windowed[0, 20:], full[0, 20:], atol=1e-4)


def test_tokenizer_has_harmony_tokens_and_template(tiny):
    _, tok = tiny
    vocab = tok.get_vocab()
    assert all(t in vocab for t in HARMONY)
    assert tok.eos_token == "<|return|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_ids_to_tokens(tok("<|start|>user<|message|>")["input_ids"]) == \
        ["<|start|>", "user", "<|message|>"]
    assert tok.decode(tok("héllo wörld 🙂 42")["input_ids"]) == "héllo wörld 🙂 42"  # byte-level: nothing is unk
    text = tok.apply_chat_template([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello", "thinking": "greet"}], tokenize=False)
    assert text.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                           "Knowledge cutoff: 2024-06\nCurrent date: ")
    assert text.endswith("<|start|>developer<|message|># Instructions\n\nBe brief.\n\n<|end|>"
                         "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>analysis<|message|>greet<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>Hello<|return|>")
    gen = json.loads((TINY / "generation_config.json").read_text())
    assert vocab["<|return|>"] in gen["eos_token_id"] and vocab["<|call|>"] in gen["eos_token_id"]


def test_script_reproduces_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "scripts" / "make_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--out", str(tmp_path / "tiny"), "--sample", str(tmp_path / "sample.jsonl")])
    assert (tmp_path / "sample.jsonl").read_bytes() == (ROOT / "examples" / "sample.jsonl").read_bytes()
    for name in ("tokenizer.json", "chat_template.jinja", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "tiny" / name).read_bytes() == (TINY / name).read_bytes(), name
    shipped = json.loads((TINY / "config.json").read_text())
    if shipped.get("transformers_version") != transformers.__version__:
        pytest.skip("weights compared only under the transformers version that made them")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text()) == shipped
    new, old = load_file(str(tmp_path / "tiny" / "model.safetensors")), load_file(str(TINY / "model.safetensors"))
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)


@pytest.mark.gpu
def test_forward_on_gpu_matches_cpu(tiny):
    model, tok = tiny
    ids = torch.randint(0, len(tok), (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        gpu = AutoModelForCausalLM.from_pretrained(TINY).cuda().eval()(input_ids=ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, ref, atol=2e-3, rtol=2e-3)
