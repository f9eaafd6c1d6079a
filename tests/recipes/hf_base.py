"""A tiny Hugging Face chat model built here: byte-level BPE tokenizer with a ChatML template,
random Llama weights, and arithmetic records in TRL's prompt/completion format."""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(out: Path):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    words = NUMBERS + ["plus", "minus", "what", "is", "the", "answer"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|eos|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_base(out: Path, vocab_size: int = 320, seed: int = 0, arch: str = "llama") -> Path:
    """A random 2-layer Llama (or, ``arch="mixtral"``, a Mixtral of 4 experts, top-2) with its
    tokenizer in ``out`` (float32 safetensors)."""
    import torch
    import transformers

    fast = make_tokenizer(out)
    common = dict(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(
            **common,
            hidden_size=32,
            intermediate_size=48,
            max_position_embeddings=128,
            num_local_experts=4,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
        )
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.LlamaConfig(
            **common, hidden_size=64, intermediate_size=128, max_position_embeddings=256
        )
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    cls(cfg).save_pretrained(out)
    return out


def write_records(path: Path, extra: list[str] = ()) -> Path:
    """Single-digit sums as {"prompt", "completion"} records, plus raw ``extra`` lines."""
    lines = [
        json.dumps(
            {
                "prompt": f"what is {NUMBERS[a]} plus {NUMBERS[b]}",
                "completion": f" {NUMBERS[a + b]}",
            }
        )
        for a in range(10)
        for b in range(10)
        if a + b < 10
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


def write_pairs(path: Path, extra: list[str] = ()) -> Path:
    """Single-digit sums as {"prompt", "chosen", "rejected"} pairs (the right sum is chosen, a
    wrong one rejected), plus raw ``extra`` lines."""
    lines = [
        json.dumps(
            {
                "prompt": f"what is {NUMBERS[a]} plus {NUMBERS[b]}",
                "chosen": f" {NUMBERS[a + b]}",
                "rejected": f" {NUMBERS[(a + b + 1 + (a * 7 + b) % 8) % 10]}",
            }
        )
        for a in range(10)
        for b in range(10)
        if a + b < 10
    ]
    path.write_text("\n".join([*lines, *extra]) + "\n")
    return path


# Reward functions for the RL tests, loaded by path as users load theirs (``file.py:function``).
RL_REWARDS = '''
def short_digits(prompts, completions, **fields):
    """More of the answer's letters and fewer tokens: varies between samples of a random model."""
    return [sum(ch in a for ch in c) / (1 + len(c)) for c, a in zip(completions, fields["answer"])]


def broken(prompts, completions, **fields):
    return [float("nan")] * len(completions)
'''


def write_prompts(d: Path) -> Path:
    """``d/prompts.jsonl`` (single-digit sums with an ``answer`` field) and ``d/rewards.py``."""
    rows = [
        {"prompt": f"what is {NUMBERS[a]} plus {NUMBERS[b]}", "answer": NUMBERS[a + b]}
        for a in range(10)
        for b in range(10)
        if a + b < 10
    ]
    (d / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "rewards.py").write_text(RL_REWARDS)
    return d
