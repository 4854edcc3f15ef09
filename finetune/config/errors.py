"""ConfigError, the one error a config raises, listing every problem found; `_check` raises it."""

from ..cli import UserError


class ConfigError(UserError, ValueError):
    """One or more problems with a config; the message lists them all (one alone on the same line)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + problems[0] if len(problems) == 1 else
                         "invalid config:\n  - " + "\n  - ".join(problems))


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)
