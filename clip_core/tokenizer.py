"""CLIP's text tokenizer: OpenAI's byte-level BPE (49,408 ids) giving the same ids as OpenCLIP's `tokenize` on
any text, made fast for caption batches by a per-chunk cache and by cleaning captions with exact shortcuts
around ftfy (clip_core.text_cleaning).
"""

from __future__ import annotations

import gzip
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from tokenizers import models as hf_models

from clip_core.text_cleaning import FTFY_CHECKED_VERSIONS, FTFY_SHORTCUTS, fix_and_unescape

DEFAULT_CONTEXT_LENGTH = 77
VOCAB_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps the first 49,152 - 256 - 2 merges, so that with 512 byte tokens and 2 special tokens
# the vocabulary has 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# OpenAI's pre-tokenizer: special tokens, English contractions, letter runs, single digits, runs of other
# symbols. The `regex` module (for \p{L} and \p{N}) and IGNORECASE, as OpenAI and OpenCLIP compile it.
WORD_RE = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# The same split for ASCII-only text, where \p{L} is [a-zA-Z], \p{N} is [0-9] and the `regex` module's \s is
# [\t\n\v\f\r ]; the standard `re` engine runs it faster than `regex` does. Letters and digits are tried first:
# no other alternative can match at a letter or a digit, so the order does not change any match.
ASCII_WORD_RE = re.compile(
    r"[a-zA-Z]+|[0-9]|<start_of_text>|<end_of_text>|'(?:s|t|re|ve|m|ll|d)|[^\t\n\x0b\x0c\r a-zA-Z0-9]+",
    re.IGNORECASE | re.ASCII,
)

# Chunks and words longer than this are rarely seen twice, so they are encoded without entering a cache.
MAX_CACHED_KEY_CHARS = 64
DEFAULT_CACHE_ENTRIES = 1 << 18
# Cached ids are packed as little-endian int32 bytes: a caption's ids are then one bytes.join of its chunks'
# ids, and a batch one np.frombuffer, with no Python int per id (and nothing for the GC to track).
ID_DTYPE = np.dtype("<i4")


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (and GPT-2's) reversible byte -> character map: the 188 printable Latin-1 bytes keep their own
    character, the other 68 bytes get chr(256), chr(257), ... in byte order, so no BPE symbol is a space or
    a control character. Insertion order (printable bytes first) fixes the first 256 ids."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + len(table) - len(printable))
    return table


def load_vocab(path: str | Path = VOCAB_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's vocabulary (token string -> id) and BPE merges (in rank order) from the gzipped merge list."""
    with gzip.open(path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} is not OpenAI's CLIP BPE merge list ({NUM_MERGES} merges of two symbols)")
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += SPECIAL_TOKENS
    # dict() keeps the last id of a repeated string, as OpenAI's encoder does
    return dict(zip(tokens, range(len(tokens)))), merges


# ---------------------------------------------------------------------------------------------------------
# The tokenizer.
# ---------------------------------------------------------------------------------------------------------
def pack_ids(ids: Sequence[int]) -> bytes:
    """`ids` as ID_DTYPE bytes."""
    return struct.pack(f"<{len(ids)}i", *ids)


class _BoundedCache(dict):
    """A dict that computes missing values with `compute` and empties itself when full. Losing entries only
    costs time: a value depends on its key alone, so ids never depend on the cache's state."""

    def __init__(self, compute: Callable[[str], bytes], max_entries: int, max_key_chars: int):
        super().__init__()
        self.compute = compute
        self.max_entries = max_entries
        self.max_key_chars = max_key_chars

    def __missing__(self, key: str) -> bytes:
        value = self.compute(key)
        if len(key) <= self.max_key_chars:
            if len(self) >= self.max_entries:
                self.clear()
            self[key] = value
        return value


class ClipTokenizer:
    """OpenAI CLIP's BPE tokenizer, id-for-id identical to OpenCLIP's `SimpleTokenizer` (clean 'lower').

    A cleaned caption is split on spaces into chunks; OpenAI's word regex never matches across whitespace, so
    the caption's ids are the concatenation of its chunks' ids, which are cached. Unseen words go through
    the Rust BPE of the `tokenizers` package with OpenAI's merges. Thread-safe; ids never depend on the batch,
    the thread count or the cache.
    """

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        num_threads: int = 1,
        vocab_path: str | Path = VOCAB_PATH,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ):
        if not FTFY_SHORTCUTS:
            warnings.warn(
                f"ftfy {ftfy.__version__} is not one of {FTFY_CHECKED_VERSIONS}: tokenizing calls ftfy.fix_text "
                "on every caption (same ids, several times slower)",
                stacklevel=2,
            )
        self.context_length = context_length
        self.num_threads = num_threads
        self.vocab_path = vocab_path
        self.cache_entries = cache_entries

        self.encoder, merges = load_vocab(vocab_path)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.vocab_size = len(self.decoder)
        self.sot_token_id = self.encoder["<start_of_text>"]
        self.eot_token_id = self.encoder["<end_of_text>"]
        self.pad_token_id = 0
        self._special_ids = {token: self.encoder[token] for token in SPECIAL_TOKENS}
        self._bpe = hf_models.BPE(vocab=self.encoder, merges=merges, end_of_word_suffix="</w>")
        # UTF-8 bytes -> BPE symbols in one str.translate: bytes are decoded as Latin-1 (one char per byte)
        self._byte_symbols = bytes_to_unicode()
        self._symbol_bytes = {s: b for b, s in self._byte_symbols.items()}
        self._word_ids = _BoundedCache(self._encode_word, cache_entries, MAX_CACHED_KEY_CHARS)
        self._chunk_ids = _BoundedCache(self._encode_chunk, cache_entries, MAX_CACHED_KEY_CHARS)

    def __reduce__(self):
        # rebuild from the vocabulary file instead of pickling caches and the Rust model (e.g. for Ray tasks)
        return type(self), (self.context_length, self.num_threads, self.vocab_path, self.cache_entries)

    def _encode_word(self, word: str) -> bytes:
        symbols = word  # printable ASCII bytes are their own BPE symbols
        if not (word.isascii() and word.isprintable()):
            symbols = word.encode("utf-8").decode("latin-1").translate(self._byte_symbols)
        return pack_ids([token.id for token in self._bpe.tokenize(symbols)])

    def _encode_chunk(self, chunk: str) -> bytes:
        words = (ASCII_WORD_RE if chunk.isascii() else WORD_RE).findall(chunk)
        # Only the exact words "<start_of_text>" and "<end_of_text>" get the special ids (OpenAI's BPE cache
        # holds them; the regex also matches odd-cased variants, which then go through BPE like any word).
        if "_of_text>" not in chunk:
            return b"".join(map(self._word_ids.__getitem__, words))
        return b"".join(
            pack_ids([self._special_ids[word]]) if word in self._special_ids else self._word_ids[word]
            for word in words
        )

    def _chunks(self, text: str) -> list[str]:
        """The cleaned, lower-cased caption's whitespace-separated pieces ("chunks")."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        # Lower-casing before collapsing whitespace yields the same pieces as clean_text(text).split(): no
        # whitespace character is cased or case-ignorable, so each ends a final-sigma context like a space.
        return fix_and_unescape(text).lower().split()

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end-of-text and without truncation."""
        return np.frombuffer(
            b"".join(map(self._chunk_ids.__getitem__, self._chunks(text))), ID_DTYPE
        ).tolist()

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray) -> str:
        """Text of `ids` as OpenCLIP decodes it: end of word becomes a space, special tokens stay literal."""
        if isinstance(ids, torch.Tensor | np.ndarray):
            ids = ids.tolist()
        symbols = "".join(self.decoder[int(i)] for i in ids)
        text = bytes(self._symbol_bytes[s] for s in symbols).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def _encode_truncated(self, texts: Sequence[str], keep: int) -> list[bytes]:
        """The first `keep` ids of each text, packed. OpenAI's regex matches every non-space character, so
        every chunk has at least one id and chunks past the first `keep` need not be looked up."""
        rows: list[bytes] = []
        append, chunk_ids, keep_bytes = rows.append, self._chunk_ids.__getitem__, keep * ID_DTYPE.itemsize
        for text in texts:
            append(b"".join(map(chunk_ids, self._chunks(text)[:keep]))[:keep_bytes])
        return rows

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids [len(texts), context_length] (int64): start-of-text, ids, end-of-text, zero padding.
        Longer captions are cut so that end-of-text still fills the last position."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        context_length = self.context_length if context_length is None else context_length
        if context_length < 1:
            raise ValueError(f"context_length must be at least 1, got {context_length}")
        keep = max(context_length - 2, 0)

        if self.num_threads <= 1 or len(texts) < 2 * self.num_threads:
            rows = self._encode_truncated(texts, keep)
        else:
            # Contiguous shards joined in order, so the output does not depend on the thread count. The work
            # is Python code, so threads only run in parallel on a free-threaded CPython build.
            bounds = np.linspace(0, len(texts), self.num_threads + 1).astype(int).tolist()
            shards = [texts[a:b] for a, b in zip(bounds, bounds[1:])]
            with ThreadPoolExecutor(self.num_threads) as pool:
                rows = list(
                    chain.from_iterable(pool.map(self._encode_truncated, shards, [keep] * len(shards)))
                )

        out = np.zeros((len(texts), context_length), dtype=np.int64)
        if context_length == 1:  # OpenAI's truncation overwrites the only slot with end-of-text
            out[:, 0] = self.eot_token_id
            return torch.from_numpy(out)
        # row i's ids go to positions 1..n_i: flat index = row start + 1 + rank within the row
        n_ids = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows)) // ID_DTYPE.itemsize
        row_starts = np.arange(len(texts), dtype=np.int64) * context_length
        ranks = np.arange(int(n_ids.sum()), dtype=np.int64) - np.repeat(np.cumsum(n_ids) - n_ids, n_ids)
        out.reshape(-1)[np.repeat(row_starts + 1, n_ids) + ranks] = np.frombuffer(b"".join(rows), ID_DTYPE)
        out[:, 0] = self.sot_token_id
        out.reshape(-1)[row_starts + n_ids + 1] = self.eot_token_id
        return torch.from_numpy(out)


_default_tokenizer: ClipTokenizer | None = None
_default_tokenizer_lock = threading.Lock()


def get_tokenizer() -> ClipTokenizer:
    """The process-wide tokenizer that `tokenize` uses (built on first use)."""
    global _default_tokenizer
    with _default_tokenizer_lock:
        if _default_tokenizer is None:
            _default_tokenizer = ClipTokenizer()
        return _default_tokenizer


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
    """Token ids [N, context_length] for one or more captions, as `open_clip.tokenize` returns them."""
    return get_tokenizer()(texts, context_length)
