"""Distillation: teacher data sets, the student, the trainer, torchrun, job progress."""
