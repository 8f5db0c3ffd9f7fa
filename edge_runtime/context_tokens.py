"""Token ids of a purchase history's context text, assembled from per-title ids cached once.

Tokenizing the joined titles again on every call was the largest cost left around a small
student (about 0.1 ms of a 0.8 ms `recommend`). For a tokenizer that splits words on whitespace
and punctuation before its model sees them (BERT's WordPiece, the teacher's and so the
student's), the ids of `context_text(titles)` are the ids of each title joined by the ids of the
separator, cut to the length limit, between the special tokens. That is checked against the
tokenizer itself on real catalog histories when the bundle loads; where it does not hold
(byte-level BPE, SentencePiece), `usable` is False and the runtime tokenizes the text as before.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from tokenizers import Tokenizer

from fedrec.text import context_text

CHECKED_HISTORIES = 40
CACHED_TITLES = 50_000      # the most recently used titles' ids: tens of MB at most, for any catalog


class ContextTokens:
    def __init__(self, tokenizer: Tokenizer, titles: Sequence[str], max_tokens: int, max_items: int):
        self.tokenizer, self.titles = tokenizer, titles
        self.max_tokens, self.max_items = max_tokens, max_items
        self.title_ids = lru_cache(maxsize=CACHED_TITLES)(self._title_ids)
        word = self.tokenizer.encode("x", add_special_tokens=False).ids
        marked = self.tokenizer.encode("x").ids
        start = next((i for i in range(len(marked)) if marked[i:i + len(word)] == word), None)
        joined = self.tokenizer.encode(context_text(["x", "x"]), add_special_tokens=False).ids
        if start is None or joined[:len(word)] != word or joined[-len(word):] != word:
            self.usable = False
            return
        self.prefix, self.suffix = marked[:start], marked[start + len(word):]
        self.separator = joined[len(word):len(joined) - len(word)]
        self.usable = all(self.ids(history) == self.tokenizer.encode(self.text(history)).ids
                          for history in self.probe_histories())

    def text(self, positions: Sequence[int]) -> str:
        return context_text([self.titles[p] for p in positions], "", self.max_items)

    def probe_histories(self) -> list[list[int]]:
        """Long histories (cut by the length limit), short ones, one item, and none."""
        n = len(self.titles)
        long = [[(start + 7 * i) % n for i in range(self.max_items)] for start in range(0, n, max(1, n // 20))]
        short = [[p, (p + 1) % n] for p in range(0, n, max(1, n // 10))]
        return ([[0], []] + long + short)[:CHECKED_HISTORIES]

    def _title_ids(self, position: int) -> list[int]:
        return self.tokenizer.encode(self.titles[position], add_special_tokens=False).ids

    def ids(self, positions: Sequence[int]) -> list[int]:
        """What `tokenizer.encode(context_text(titles of positions)).ids` gives, with truncation."""
        if not positions:
            return self.tokenizer.encode(self.text(positions)).ids
        room = self.max_tokens - len(self.prefix) - len(self.suffix)
        body: list[int] = []
        for n, position in enumerate(positions[:self.max_items]):
            if len(body) >= room:
                break
            body += self.separator + self.title_ids(position) if n else self.title_ids(position)
        return self.prefix + body[:room] + self.suffix
