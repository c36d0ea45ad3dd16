"""The built-in policy's character tokenizer, as a Hugging Face fast tokenizer.

The tiny policy and a real model go through one code path: both tokenizers are
``PreTrainedTokenizerFast`` objects, saved beside the weights with ``save_pretrained`` and
loaded with ``AutoTokenizer``. The character tokenizer is built with the ``tokenizers`` library:
a word-level model over single characters (every character is its own pre-token), so each
character of the alphabet is one id.

Ids 0, 1, 2 are the special tokens ``<pad>``, ``<bos>``, ``<eos>``; the alphabet follows in
order. The default alphabet is the arithmetic task's, ``0123456789+=``: 15 ids. There is no
unknown token: text with a character outside the alphabet cannot be encoded (a prompt the model
cannot represent must not reach training), and :func:`encode_text` names the character. Special
tokens are never parsed out of text (``split_special_tokens``): ``"<eos>"`` in a prompt is five
characters, not an end of sequence.

Where generation stops is a property of the tokenizer too (:func:`default_stop_token_ids`: EOS
and the chat template's end-of-turn token), shared by the rollout engines and greedy evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerFast

# The addition task's characters (defined beside the task; re-exported here as the default).
from services.tasks.arithmetic import ARITHMETIC_ALPHABET

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")


def char_tokenizer(alphabet: str = ARITHMETIC_ALPHABET) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one id per character of ``alphabet`` (ids from 3, in order).

    Raises:
        ValueError: on an empty alphabet or a repeated character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if not alphabet:
        raise ValueError("alphabet is empty")
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # Every character, newlines included, is its own pre-token; Fuse joins ids back without
    # the spaces a word-level decoder would put between them.
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )


def char_tokenizer_from_texts(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A character tokenizer whose alphabet is every character in ``texts``, by code point."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    return char_tokenizer("".join(sorted(chars)))


# The old name: ``CharTokenizer(alphabet)`` still builds the character tokenizer.
CharTokenizer = char_tokenizer


def char_alphabet(tokenizer) -> str | None:
    """The alphabet of a character tokenizer built here (also after a save/load round trip),
    or None for any other tokenizer."""
    vocab = tokenizer.get_vocab()
    if any(vocab.get(tok) != i for i, tok in enumerate(SPECIAL_TOKENS)):
        return None
    rest = sorted((i, t) for t, i in vocab.items() if t not in SPECIAL_TOKENS)
    if any(len(t) != 1 or i != k + len(SPECIAL_TOKENS) for k, (i, t) in enumerate(rest)):
        return None
    return "".join(t for _, t in rest)


# Helpers every engine and evaluation use, so prompt encoding and response decoding are the
# same everywhere.


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens added (a chat template's markers, already in the
    text, are encoded as the special tokens they are).

    Raises:
        ValueError: when the tokenizer cannot encode ``text`` (a character outside a character
            tokenizer's alphabet), naming the characters.
    """
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except Exception as exc:  # the tokenizers library raises a bare Exception here
        alphabet = char_alphabet(tokenizer)
        if alphabet is None:
            raise ValueError(f"the tokenizer cannot encode {text[:80]!r}: {exc}") from None
        missing = sorted(set(text) - set(alphabet))
        raise ValueError(
            f"characters {''.join(missing)!r} are not in the tokenizer's alphabet {alphabet!r}"
        ) from None


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids`` (a list or a 1-D tensor) with special tokens skipped."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def special_ids(tokenizer) -> tuple[int, int]:
    """``(pad_id, eos_id)``; a tokenizer without a pad token pads with EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token; generation could not stop")
    pad = tokenizer.pad_token_id
    return (eos if pad is None else pad), eos


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with, if it has one.

    Renders a two-message chat whose assistant content is a marker and reads the token right
    after the marker (``<|im_end|>`` for Qwen, ``<|eot_id|>`` for Llama 3). Only a special
    (added) token counts: a template that closes turns with plain text has no such token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # a template that refuses this shape tells us nothing
        return None
    at = text.find(marker)
    if at < 0:
        return None
    after = text[at + len(marker) :]
    ids = tokenizer.encode(after, add_special_tokens=False)
    if not ids:
        return None
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return int(ids[0]) if int(ids[0]) in special else None


def default_stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS, then the chat template's end-of-turn token when it differs.

    Raises:
        ValueError: when the tokenizer has no EOS token (generation could not stop).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no EOS token; pass stop_token_ids explicitly")
    ids = [int(eos)]
    eot = end_of_turn_token_id(tokenizer)
    if eot is not None and eot not in ids:
        ids.append(eot)
    return ids
