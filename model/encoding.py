"""What every text encoder here shares (teacher and student): batched, length-sorted encoding
of catalog items and user contexts into L2-normalised embeddings."""

from __future__ import annotations

import numpy as np
import torch

from fedrec.data.silo import Catalog


class TextEncoder(torch.nn.Module):
    """Subclasses define `forward(input_ids, attention_mask)`, `tokenize(texts, max_tokens)`,
    `dim`, and a `config` with max_item_tokens / max_context_tokens / context_items."""

    @torch.no_grad()
    def encode(self, texts: list[str], max_tokens: int, batch_size: int = 128) -> torch.Tensor:
        """Embeddings in eval mode, batched by similar length to waste little padding."""
        was_training = self.training
        self.eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = torch.empty(len(texts), self.dim, device=self.device)
        for start in range(0, len(texts), batch_size):
            chunk = order[start:start + batch_size]
            out[torch.as_tensor(chunk, device=self.device)] = self(
                **self.tokenize([texts[i] for i in chunk], max_tokens))
        self.train(was_training)
        return out

    def encode_items(self, catalog: Catalog, batch_size: int = 128) -> torch.Tensor:
        return self.encode(catalog.texts(), self.config.max_item_tokens, batch_size)

    def encode_contexts(self, contexts: list[str], batch_size: int = 128) -> torch.Tensor:
        return self.encode(contexts, self.config.max_context_tokens, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
