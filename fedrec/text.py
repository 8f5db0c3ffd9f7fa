"""How an item becomes text: what the frozen encoder reads for each catalog item."""

from __future__ import annotations


def item_text(title: str, category: str = "") -> str:
    return f"{title} ({category})" if category else title
