"""Shared fixtures: a tiny random Llama and a character-level tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT / "data" / "gsm8k"  # a copy of ../shared/data/gsm8k (MIT)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_script(name: str):
    """scripts/<name>.py imported as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, plus <|im_start|> and <|im_end|> (which is both EOS and pad, as in SmolLM2)."""
    specials = ["<|im_end|>", "<|im_start|>"]
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(vocab_size: int, seed: int = 0, hidden_size: int = 32, heads: int = 4) -> LlamaForCausalLM:
    """heads: attention heads of hidden_size / heads dimensions (vLLM's CPU attention needs 32 or more)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mixed_rollouts():
    """(tiny Llama, 16 sampled rollouts of 4 prompts x 4): two generation rounds with different prompt widths,
    concatenated as dynamic sampling does, completions of different lengths (at most 7 tokens)."""
    from grpo.config import RolloutConfig
    from grpo.rollout import concat_rollouts, generate

    tok = make_tokenizer()
    tok.padding_side = "left"
    model = make_model(len(tok), seed=1)
    torch.manual_seed(0)
    cfg = RolloutConfig(max_completion_length=7, temperature=0.8)
    first = generate(model, tok, ["What is 1 + 2?", "Hi"], 4, cfg)
    second = generate(model, tok, ["A much longer prompt than the others", "x"], 4, cfg)
    return model, concat_rollouts([first, second], tok.pad_token_id)


def micro_batched_gradients(model, batch, make_cfg, sizes=(16, 4, 2)) -> None:
    """accumulate_gradients over `batch` with each micro-batch size: the gradients agree within 1e-5 and are
    not all zero. make_cfg(micro_batch_size) -> Config."""
    from grpo.algo.update import accumulate_gradients

    grads = []
    for mb in sizes:
        model.zero_grad()
        accumulate_gradients(model, batch, make_cfg(mb))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model + tokenizer folder, loadable like any Hugging Face model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def save_tiny_model(folder: Path) -> Path:
    """The tiny Llama and the character tokenizer, saved as a Hugging Face model folder."""
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def length_rule(tmp_path_factory) -> Path:
    """A user reward file whose `length_reward` differs between samples, so a random model's groups have signal."""
    path = tmp_path_factory.mktemp("rules") / "rules.py"
    path.write_text("def length_reward(completion, example):\n    return len(completion) / 10\n")
    return path


@pytest.fixture
def tokenizer():
    tok = make_tokenizer()
    tok.padding_side = "left"
    return tok
