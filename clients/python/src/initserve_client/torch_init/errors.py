"""The one exception of the PyTorch integration: every reason a model's init cannot be served."""

from __future__ import annotations


class ModelInitError(ValueError):
    """The model's init cannot be served as asked; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"initserve cannot initialise this model ({len(problems)} problems):\n{lines}"
        )
