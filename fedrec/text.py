"""How items and users become text. Pure Python, shared by training, evaluation and the edge."""

from __future__ import annotations

from typing import Sequence


def item_text(title: str, category: str = "") -> str:
    return f"{title} ({category})" if category else title


def context_text(titles_newest_first: Sequence[str], query: str = "", max_items: int = 10) -> str:
    """What the user tower reads: the search query (if any), then recent item titles, newest first."""
    parts = ([f"search: {query}"] if query else []) + list(titles_newest_first[:max_items])
    return ". ".join(parts) if parts else "new customer"
