"""FinLoRA benchmark evaluation: ``evaluate_model`` for an in-memory (PEFT) model and the ``finlora eval`` command.

Modules: :mod:`eval.tasks` (the registry and data loading), :mod:`eval.scoring` (pure scoring rules),
:mod:`eval.batching`, :mod:`eval.generate` and :mod:`eval.fast` (inference), :mod:`eval.textscore`
(BERTScore or its labelled fallback), :mod:`eval.runner` (orchestration), :mod:`eval.report` (outputs),
:mod:`eval.cli` (the subcommand). Importing the package does not import torch.
"""

from finlora.eval.runner import MODES, TaskResult, evaluate_model
from finlora.eval.tasks import TASKS, EvalError, EvalTask

__all__ = ["MODES", "TASKS", "EvalError", "EvalTask", "TaskResult", "evaluate_model"]
