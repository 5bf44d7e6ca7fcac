"""CLIP's byte-level BPE tokenizer, producing the same token ids as OpenAI's.

Text is cleaned the way CLIP was trained (``ftfy.fix_text``, HTML entities unescaped twice, runs of whitespace
collapsed, lower-cased), split into words, numbers (one digit each), contractions and punctuation runs, and each
piece is turned into UTF-8 bytes, mapped to printable stand-in characters and merged by the BPE merge list in
``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP's vocabulary, MIT licence; see docs/clip.md). Ids: the 256 byte
symbols, the same with an end-of-word mark, one per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import ftfy
import numpy as np
import regex

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # merges used by CLIP (the file holds more); vocabulary = 2*256 + merges + 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def byte_symbols() -> list[str]:
    """The printable character standing for each byte value, in CLIP's vocabulary order: bytes that are
    already visible characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 bytes are
    given the characters from U+0100 upwards. Returns a list of (byte, char) pairs in vocabulary order."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = sorted(set(range(256)) - set(visible))
    return [(b, chr(b)) for b in visible] + [(b, chr(0x100 + i)) for i, b in enumerate(hidden)]


class Tokenizer:
    """OpenAI CLIP's BPE tokenizer (our implementation). ``encode(text) -> list[int]`` without start/end."""

    def __init__(self, vocab_path: str | Path = VOCAB_PATH):
        lines = gzip.open(vocab_path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
        pairs = byte_symbols()
        self.byte_to_char = {b: c for b, c in pairs}
        self.char_to_byte = {c: b for b, c in pairs}
        symbols = [c for _, c in pairs]
        vocab = symbols + [c + END_OF_WORD for c in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.token_id = {tok: i for i, tok in enumerate(vocab)}
        self.id_token = vocab
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id = self.token_id[SOT], self.token_id[EOT]
        # special tokens, contractions, letter runs, single digits, runs of other non-space characters
        self._split = regex.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
            regex.IGNORECASE)
        self._spaces = regex.compile(r"\s+")
        self._bpe_cached = lru_cache(maxsize=1 << 16)(self._bpe)

    @property
    def vocab_size(self) -> int:
        return len(self.id_token)

    def clean(self, text: str) -> str:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return self._spaces.sub(" ", text).strip().lower()

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """Merge the characters of one piece (already byte-mapped) by ascending merge rank."""
        if piece in (SOT, EOT):
            return (piece,)
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        rank = self.merge_rank
        while len(word) > 1:
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = rank.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right, without overlap
                if i + 1 < len(word) and word[i] == best[0] and word[i + 1] == best[1]:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.findall(self.clean(text)):
            mapped = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.token_id[tok] for tok in self._bpe_cached(mapped))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (stops at ``<|endoftext|>``, so padding is ignored); words separated by spaces."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i == self.sot_id:
                continue
            token = self.id_token[i]
            word_end = token.endswith(END_OF_WORD)
            out.extend(self.char_to_byte[c] for c in (token[:-len(END_OF_WORD)] if word_end else token))
            if word_end:
                out.extend(b" ")
        return out.decode("utf-8", errors="replace").strip()


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts: str | Iterable[str], context_length: int = 77) -> np.ndarray:
    """Token ids for CLIP's text tower: int64 array [N, context_length], ``<|startoftext|>`` ids ``<|endoftext|>``
    then zeros. Texts too long for the context are cut and end with ``<|endoftext|>`` (never an error)."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    tok = get_tokenizer()
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects strings, got {type(text).__name__} at position {row}")
        ids = [tok.sot_id] + tok.encode(text)[:context_length - 2] + [tok.eot_id]
        out[row, :len(ids)] = ids
    return out
