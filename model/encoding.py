"""What every text encoder here shares (the teacher's frozen encoder and the student): batched,
length-sorted encoding of item texts and queries into L2-normalised embeddings."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class TextEncoder(torch.nn.Module):
    """Subclasses set `encoder` (a transformers model) and define `tokenize(texts, max_tokens)`
    and `dim`; `forward` mean-pools the last hidden state."""

    def __init__(self, max_item_tokens: int, max_query_tokens: int):
        super().__init__()
        self.max_item_tokens, self.max_query_tokens = max_item_tokens, max_query_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

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

    def encode_items(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        return self.encode(texts, self.max_item_tokens, batch_size)

    def encode_queries(self, queries: list[str], batch_size: int = 128) -> torch.Tensor:
        return self.encode(queries, self.max_query_tokens, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
