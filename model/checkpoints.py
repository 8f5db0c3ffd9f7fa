"""One loader for every checkpoint fedrec writes: a teacher (`teacher.json`) or a student
(`student.json`, which names its teacher). What exporting or serving a model needs is the same
either way: the teacher, the encoder that will encode text after export, and its tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedrec.data.silo import Catalog
from fedrec.errors import FedrecError
from fedrec.model.encoding import TextEncoder
from fedrec.model.student import STUDENT_FILE, Student
from fedrec.model.teacher import TEACHER_FILE, Teacher


@dataclass
class LoadedCheckpoint:
    teacher: Teacher
    text_encoder: TextEncoder        # the student, or the teacher's own encoder
    tokenizer_json: str              # that encoder's tokenizer, in the `tokenizers` JSON format
    meta: dict                       # the checkpoint's metadata, with "kind": "student" | "teacher"


def load_checkpoint(checkpoint: str | Path, catalog: Catalog) -> LoadedCheckpoint:
    checkpoint = Path(checkpoint)
    if (checkpoint / STUDENT_FILE).is_file():
        meta = json.loads((checkpoint / STUDENT_FILE).read_text())
        student = Student.load(checkpoint)
        return LoadedCheckpoint(Teacher.load(meta["teacher"], catalog), student, student.tokenizer_json,
                                {**meta, "kind": "student"})
    if not (checkpoint / TEACHER_FILE).is_file():
        raise FedrecError(f"{checkpoint} is neither a student nor a teacher checkpoint "
                          f"(no {STUDENT_FILE} or {TEACHER_FILE})",
                          hint="Pass the folder `fedrec train`, `fedrec simulate` (RUN/final) or `fedrec distill` wrote.")
    meta = json.loads((checkpoint / TEACHER_FILE).read_text())
    teacher = Teacher.load(checkpoint, catalog)
    return LoadedCheckpoint(teacher, teacher.encoder, teacher.encoder.tokenizer.backend_tokenizer.to_str(),
                            {**meta, "kind": "teacher"})
