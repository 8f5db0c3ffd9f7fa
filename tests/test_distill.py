"""Distillation: pruned vocabulary, a student that learns the teacher, exact provenance."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from fedrec.config import FedrecConfig
from fedrec.data.silo import Catalog
from fedrec.distill.distill import PUBLIC_INPUTS, agreement, distill, public_texts
from fedrec.model.student import Student, StudentConfig
from fedrec.distill.vocab import prune_vocabulary
from fedrec.model.teacher import Teacher
from fedrec.privacy.audit import audit
from fedrec.privacy.claims import PrivacyClaim
from fedrec.privacy.budget import RegionBudget
from fedrec.privacy.spend import RegionPrivacy

SMALL = {"distill.layers": 2, "distill.hidden": 32, "distill.heads": 2, "distill.intermediate": 64,
         "distill.queries_per_item": 1, "distill.epochs": 6, "distill.patience": 6, "distill.vocab_reserve": 50,
         "distill.batch_size": 32, "distill.candidates": 64, "distill.lr": 0.005}


@pytest.fixture(scope="module")
def catalog(prepared):
    return Catalog.load(prepared / "catalog.parquet")


def test_pruned_vocabulary_reproduces_catalog_tokens(tiny_encoder, catalog, tmp_path):
    teacher_json = (tiny_encoder / "tokenizer.json").read_text()
    pruned, kept = prune_vocabulary(teacher_json, catalog.texts(), reserve=100)
    teacher_tok, student_tok = Tokenizer.from_str(teacher_json), Tokenizer.from_str(pruned)
    teacher_tok.no_truncation()
    student_tok.no_truncation()
    for title in catalog.titles:
        assert student_tok.encode(title).tokens == teacher_tok.encode(title).tokens[:len(student_tok.encode(title).tokens)]
        assert "[UNK]" not in student_tok.encode(title).tokens
    assert len(kept) < teacher_tok.get_vocab_size() / 5
    assert student_tok.token_to_id("[PAD]") == 0 and student_tok.encode("mug").tokens[0] == "[CLS]"
    # an unseen word decomposes into kept pieces instead of [UNK]
    assert "[UNK]" not in student_tok.encode("zyxwvut").tokens
    # the saved file loads with `tokenizers` alone
    (tmp_path / "tokenizer.json").write_text(pruned)
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
            "from tokenizers import Tokenizer\n"
            f"print(Tokenizer.from_file({str(tmp_path / 'tokenizer.json')!r}).encode('red mug').tokens)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'red'" in out and "'mug'" in out


def dp_teacher_checkpoint(tiny_encoder, catalog, tmp_path):
    """A teacher checkpoint whose privacy claim points at a real region ledger."""
    privacy = RegionPrivacy("eu", RegionBudget(epsilon=8, delta=1e-5, noise_multiplier=1.0), tmp_path / "eu")
    entry = privacy.record(privacy.plan_round(400, 32, 1, 2, run="run"), 1)
    torch.manual_seed(0)
    teacher = Teacher(FedrecConfig.from_flat({"model.encoder": str(tiny_encoder)}).model, catalog)
    claim = {"eu": PrivacyClaim.of_entry(entry).to_json()}
    return teacher, teacher.save(tmp_path / "teacher", {"privacy": claim}), privacy


def test_distillation_raises_agreement_and_records_provenance(tiny_encoder, catalog, tmp_path):
    teacher, checkpoint, privacy = dp_teacher_checkpoint(tiny_encoder, catalog, tmp_path)
    config = FedrecConfig.from_flat(SMALL)
    probe = public_texts(catalog, 1, np.random.default_rng(123))[-200:]         # title fragments
    targets, items = teacher.encoder.encode_queries(probe), teacher.item_matrix()

    pruned, kept = prune_vocabulary((tiny_encoder / "tokenizer.json").read_text(), catalog.texts() + probe, 50)
    torch.manual_seed(0)
    untrained = Student(StudentConfig.derive(config.distill, teacher.config, len(kept), teacher.encoder.dim), pruned)
    before = agreement(untrained, teacher, probe, targets, items)

    student, result = distill(teacher, checkpoint, config, tmp_path / "student")
    after = agreement(student, teacher, probe, targets, items)
    assert after["cosine"] > before["cosine"] + 0.3, (before, after)
    assert after["search_top10_overlap"] > before["search_top10_overlap"] + 0.15, (before, after)

    meta = json.loads((tmp_path / "student" / "student.json").read_text())
    assert meta["teacher"] == str(checkpoint.resolve()) and meta["distillation_inputs"] == PUBLIC_INPUTS
    assert meta["privacy"]["eu"]["ledger_head"] == privacy.ledger.head() and meta["additional_epsilon"] == 0.0
    reloaded = Student.load(tmp_path / "student")
    torch.testing.assert_close(reloaded.encode_queries(probe[:5]), student.encode_queries(probe[:5]))

    report = audit([tmp_path / "eu"], bundle=tmp_path / "student")
    assert report.ok and [c["source"].split("/")[-1] for c in report.claims_checked] == ["student.json", "teacher.json"]
    # the teacher given as a path and reached through the student's link is one claim, checked once
    both = audit([tmp_path / "eu", tmp_path / "teacher"], bundle=tmp_path / "student")
    assert both.ok and [c["source"].split("/")[-1] for c in both.claims_checked] == ["teacher.json", "student.json"]
    # a ledger that no longer holds the claimed entry breaks the student's claim too
    privacy.ledger.path.write_text("")
    broken = audit([tmp_path / "eu"], bundle=tmp_path / "student")
    assert not broken.ok and all("not in its ledger" in c["problem"] for c in broken.claims_checked)
