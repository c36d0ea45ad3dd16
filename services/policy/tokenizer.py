"""Character-level tokenizer shipped with the project (no hub access needed).

Ids 0, 1, 2 are the special tokens pad, bos, eos; the alphabet follows in order. The default
alphabet is the arithmetic task's: ``0123456789+=`` -> 15 symbols. There is no
unknown token: encoding a character outside the alphabet raises, because silently mapping it
would let a prompt the model cannot represent through to training. ``from_texts`` builds an
alphabet covering a corpus (e.g. JSONL prompts and answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

TOKENIZER_FILE = "char_tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
ARITHMETIC_ALPHABET = "0123456789+="


class CharTokenizer:
    """Maps each character of a fixed alphabet to one id.

    Attributes:
        alphabet: The ordinary characters, in id order (ids start at ``len(SPECIAL_TOKENS)``).
    """

    def __init__(self, alphabet: str = ARITHMETIC_ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet has repeated characters")
        if not alphabet:
            raise ValueError("alphabet is empty")
        self.alphabet = alphabet
        self._offset = len(SPECIAL_TOKENS)
        self._to_id = {c: i + self._offset for i, c in enumerate(alphabet)}

    # Special ids, under both our names and the Hugging Face names so code written against
    # an HF tokenizer (generation configs, the rollout engine) works with this one too.
    pad_id = pad_token_id = 0
    bos_id = bos_token_id = 1
    eos_id = eos_token_id = 2

    @property
    def vocab_size(self) -> int:
        return self._offset + len(self.alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """A tokenizer whose alphabet is every character in ``texts``, sorted by code point."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls("".join(sorted(chars)))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text`` (no special tokens unless asked).

        Raises:
            ValueError: on a character outside the alphabet.
        """
        try:
            ids = [self._to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer's alphabet") from None
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor). Special tokens are dropped, or written as
        ``<pad>``/``<bos>``/``<eos>`` with ``skip_special=False``.

        Raises:
            ValueError: on an id outside the vocabulary.
        """
        out: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < self._offset:
                if not skip_special:
                    out.append(SPECIAL_TOKENS[i])
            elif self._offset <= i < self.vocab_size:
                out.append(self.alphabet[i - self._offset])
            else:
                raise ValueError(f"token id {i} outside vocabulary of size {self.vocab_size}")
        return "".join(out)

    def save(self, directory: str | Path) -> Path:
        """Write ``char_tokenizer.json`` into ``directory`` (created if needed); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        payload = {"type": "CharTokenizer", "version": 1, "special_tokens": list(SPECIAL_TOKENS),
                   "alphabet": self.alphabet}
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        """Read the tokenizer that :meth:`save` wrote into ``directory``."""
        path = Path(directory) / TOKENIZER_FILE
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("type") != "CharTokenizer" or payload.get("special_tokens") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: not a CharTokenizer file this version can read")
        return cls(payload["alphabet"])

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / TOKENIZER_FILE).is_file()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.alphabet == self.alphabet

    def __hash__(self) -> int:
        return hash(self.alphabet)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, alphabet={self.alphabet!r})"


# Helpers that accept either a CharTokenizer or a Hugging Face tokenizer, so the rollout engine
# and evaluation run unchanged on a real model loaded from a local path.


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without special tokens."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """Text of ``ids`` with special tokens skipped."""
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.decode(ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def special_ids(tokenizer) -> tuple[int, int]:
    """``(pad_id, eos_id)``; an HF tokenizer without a pad token pads with EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no EOS token; generation could not stop")
    pad = tokenizer.pad_token_id
    return (eos if pad is None else pad), eos
