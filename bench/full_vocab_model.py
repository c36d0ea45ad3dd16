"""A small random-initialised Qwen2 with Qwen's full 151,936-entry vocabulary and a byte-level
BPE tokenizer trained here with a Qwen-style chat template: a real-model stand-in for CPU tests
and benchmarks (no hub).

The vocabulary is what makes a real model expensive to sample and train (every step's logits are
``[rows, 151936]``), so it is full size; hidden size and depth stay tiny so CPU runs are quick.

``steer=True`` shapes the output head so that sampling behaves like a trained instruct model
rather than uniform noise over 151,936 ids: most samples are ordinary tokens of the tokenizer,
and the chat template's end-of-turn token ``<|im_end|>`` comes with probability ~8% per step (so
responses end on it, with a few running to the length limit), while EOS ``<|endoftext|>`` is
never favoured. It works through one residual dimension: every input embedding carries a large
constant there, the final norm keeps only that dimension, and the head's weights on it set the
logits.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

QWEN_VOCAB = 151_936
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs $100. Put the final answer after ####.",
    "12+34=46 7+8=15 100-1=99 3*4=12 so the answer is 5 apples and 3 pears.",
    "You are a careful math tutor. Think step by step, then give the final answer.",
]
# Logits the steered head gives: ordinary tokens, the end-of-turn token; everything else 0.
TOKEN_LOGIT, END_OF_TURN_LOGIT = 8.0, 11.5
RESIDUAL = 10.0


def build_tokenizer(vocab_size: int = 400):
    """Byte-level BPE trained on a small corpus: EOS ``<|endoftext|>`` (also pad), and a chat
    template whose turns end with ``<|im_end|>``, a second stop token distinct from EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    tokenizer,
    hidden_size: int = 32,
    layers: int = 2,
    *,
    vocab_size: int = QWEN_VOCAB,
    max_positions: int = 1024,
    steer: bool = True,
    seed: int = 0,
):
    """A Qwen2 causal LM with ``vocab_size`` logits (float32, eval mode, untied head).

    Args:
        tokenizer: From :func:`build_tokenizer` (its ids are the low ones of the vocabulary).
        hidden_size: A multiple of 16 (two heads of hidden_size / 2, one KV head).
        steer: Shape the head as the module docstring says.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).float()
    if steer:
        steer_head(model, tokenizer)
    return model.eval()


@torch.no_grad()
def steer_head(model, tokenizer) -> None:
    """Shape the head as the module docstring says (any model with embed_tokens, norm, lm_head)."""
    hidden = model.config.hidden_size
    model.model.embed_tokens.weight[:, 0] = RESIDUAL
    model.model.norm.weight.zero_()
    model.model.norm.weight[0] = 1.0
    # After the norm the residual is ~(sqrt(hidden), 0, ..., 0): the head's column 0 / sqrt(hidden)
    # is each token's logit.
    scale = 1.0 / math.sqrt(hidden)
    head = model.lm_head.weight
    head.zero_()
    specials = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in specials]
    head[ordinary, 0] = TOKEN_LOGIT * scale
    head[tokenizer.convert_tokens_to_ids(IM_END), 0] = END_OF_TURN_LOGIT * scale


def save(model, tokenizer, directory: str | Path) -> Path:
    """``save_pretrained`` of both into ``directory``."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
