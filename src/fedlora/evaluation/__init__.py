"""Using a finished run: read its folder, score a model on held-out data and multiple choice."""

from fedlora.evaluation.runs import Run, RunFolderError, open_run

__all__ = ["Run", "RunFolderError", "open_run"]
