"""Vocabulary pruning: the teacher's WordPiece vocabulary cut to what the catalog needs.

Most of a small encoder's parameters sit in its embedding table, so this is the main size
lever. WordPiece matches greedily longest-first, so keeping every token the teacher produced
for the catalog and query texts (and removing only others) reproduces those tokenisations
exactly. Single characters (and their ## forms) stay so unseen words still decompose instead
of becoming [UNK]; a reserve of the teacher's lowest-id whole words covers common query words.
"""

from __future__ import annotations

import copy
import json
from typing import Iterable

from tokenizers import Tokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FIRST_WORD_ID = 1996     # in BERT vocabularies, whole words start here ("the")


def prune_vocabulary(teacher_tokenizer: str, texts: Iterable[str], reserve: int = 1000,
                     max_tokens: int = 64) -> tuple[str, list[int]]:
    """(student tokenizer JSON, teacher id of each student id)."""
    spec = json.loads(teacher_tokenizer)
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"vocabulary pruning needs a WordPiece tokenizer, not {spec['model']['type']}")
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokenizer = Tokenizer.from_str(teacher_tokenizer)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    used = {i for encoding in tokenizer.encode_batch(list(texts), add_special_tokens=False) for i in encoding.ids}
    characters = {i for token, i in vocab.items()
                  if len(token.removeprefix("##")) == 1 and ord(token.removeprefix("##")) < 0x250}
    words = sorted(i for token, i in vocab.items() if i >= FIRST_WORD_ID and not token.startswith("##")
                   and i not in used)[:reserve]
    specials = [vocab[t] for t in SPECIALS if t in vocab]
    kept = specials + sorted((used | characters | set(words)) - set(specials))
    return rebuild(spec, kept, max_tokens), kept


def rebuild(spec: dict, kept: list[int], max_tokens: int) -> str:
    """The teacher's tokenizer JSON with the vocabulary renumbered to `kept` order."""
    spec = copy.deepcopy(spec)
    by_id = {i: token for token, i in spec["model"]["vocab"].items()}
    new_id = {old: new for new, old in enumerate(kept)}
    spec["model"]["vocab"] = {by_id[old]: new for new, old in enumerate(kept)}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    processor = spec.get("post_processor") or {}
    for special in processor.get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    pad = spec["model"]["vocab"]["[PAD]"]
    spec["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": pad, "pad_type_id": 0, "pad_token": "[PAD]"}
    spec["truncation"] = {"max_length": max_tokens, "strategy": "LongestFirst", "stride": 0,
                          "direction": "Right"}
    return json.dumps(spec, ensure_ascii=False)
