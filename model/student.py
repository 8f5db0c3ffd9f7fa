"""The student in one file: a small BERT over a pruned vocabulary, mean-pooled and projected
into the teacher's text-embedding space, with a `tokenizers` JSON tokenizer the edge can use as is.

It stands in for the teacher's large frozen encoder wherever text must be encoded after export:
search queries and items added to the catalog later. Everything else the teacher knows (the tower,
the catalog's item vectors) ships exactly."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tokenizers import Tokenizer
import transformers

import fedrec
from fedrec.atomic import atomic_file, write_json
from fedrec.config import DistillConfig, ModelConfig
from fedrec.errors import FedrecError
from fedrec.model.encoding import TextEncoder, mean_pool

WEIGHTS_FILE = "student.safetensors"
STUDENT_FILE = "student.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class StudentConfig:
    vocab_size: int
    out_dim: int                     # the teacher encoder's embedding size
    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_item_tokens: int
    max_query_tokens: int

    @classmethod
    def derive(cls, distill: DistillConfig, model: ModelConfig, vocab_size: int, out_dim: int) -> "StudentConfig":
        return cls(vocab_size, out_dim, distill.layers, distill.hidden, distill.heads, distill.intermediate,
                   model.max_item_tokens, model.max_query_tokens)


class Student(TextEncoder):
    def __init__(self, config: StudentConfig, tokenizer_json: str):
        super().__init__(config.max_item_tokens, config.max_query_tokens)
        self.config, self.tokenizer_json = config, tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.encoder = transformers.BertModel(transformers.BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
            num_attention_heads=config.heads, intermediate_size=config.intermediate,
            max_position_embeddings=max(config.max_item_tokens, config.max_query_tokens),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), add_pooling_layer=False)
        self.project = torch.nn.Linear(config.hidden, config.out_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.project(mean_pool(hidden, attention_mask)), dim=-1)

    def tokenize(self, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
        self.tokenizer.enable_truncation(max_length=max_tokens)
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], device=self.device)
        mask = torch.tensor([e.attention_mask for e in encodings], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def dim(self) -> int:
        return self.config.out_dim

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_from_teacher(self, teacher_embeddings: np.ndarray, teacher_positions: np.ndarray,
                          kept: list[int]) -> None:
        """Kept tokens' embedding rows (and positions), projected to the student's width by PCA."""
        rows = teacher_embeddings[kept]
        mean = rows.mean(0, keepdims=True)
        _, _, basis = np.linalg.svd(rows - mean, full_matrices=False)
        basis = basis[: self.config.hidden].T              # teacher dim × min(teacher dim, student dim)
        with torch.no_grad():
            embed = self.encoder.embeddings
            positions = teacher_positions[: embed.position_embeddings.weight.shape[0]]
            for table, values in ((embed.word_embeddings.weight, (rows - mean) @ basis),
                                  (embed.position_embeddings.weight,
                                   (positions - positions.mean(0, keepdims=True)) @ basis)):
                table[:, : values.shape[1]] = torch.as_tensor(values, dtype=torch.float32)

    def save(self, out_dir: str | Path, provenance: dict) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_file(out_dir / WEIGHTS_FILE, "wb") as handle:
            handle.write(save(state))
        with atomic_file(out_dir / TOKENIZER_FILE) as handle:
            handle.write(self.tokenizer_json)
        write_json(out_dir / STUDENT_FILE, {"fedrec_version": fedrec.__version__,
                                            "student": dataclasses.asdict(self.config),
                                            "parameters": self.parameter_count(), **provenance})
        return out_dir

    @classmethod
    def load(cls, checkpoint: str | Path) -> "Student":
        checkpoint = Path(checkpoint)
        meta_path = checkpoint / STUDENT_FILE
        if not meta_path.is_file():
            raise FedrecError(f"{checkpoint} is not a student checkpoint (no {STUDENT_FILE})")
        meta = json.loads(meta_path.read_text())
        student = cls(StudentConfig(**meta["student"]), (checkpoint / TOKENIZER_FILE).read_text())
        student.load_state_dict(load_file(checkpoint / WEIGHTS_FILE))
        return student.eval()
