"""The one error type of evaluation, shared by its modules so `llm eval` catches one class."""


class EvalError(ValueError):
    """An evaluation problem, phrased as one line (bad task, data, checkpoint or argument)."""
