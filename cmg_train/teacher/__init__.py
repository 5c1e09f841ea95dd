"""The teacher: CLIP-style image and text sides (model.py) and its training (fit.py)."""

from cmg_train.teacher.model import Teacher, build_teacher, teacher_from_state, teacher_state

__all__ = ["Teacher", "build_teacher", "teacher_from_state", "teacher_state"]
