"""What every command shares: a parser that takes `--snake_case` flags too and shows defaults, and `run`, which
turns a mistake of the user's into one line, `error: <what> — <fix>`, and exit status 2.

A mistake is a `UserError` (a path, a value, a missing base, being offline) or a `config.ConfigError`. Anything
else is a bug and keeps its traceback; `--debug` (or FINETUNE_DEBUG=1) shows the traceback of a mistake too.
"""

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "FINETUNE_DEBUG"


class UserError(ValueError):
    """A mistake the user fixes: the message names what is wrong and what to do, in one line."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default after its help (unless there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default is None or default is False or default is argparse.SUPPRESS or default == []:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ToolParser(argparse.ArgumentParser):
    """argparse with this project's habits: `--num_inference_steps` is `--num-inference-steps` (diffusers'
    scripts spell flags with underscores), `--debug` on every tool, and a mistake is one line, not the usage."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the Python traceback of an error (or set {DEBUG_ENV}=1)")

    def _dashed(self, args: list[str] | None) -> list[str]:
        """`args` with each `--some_flag[=value]` spelled `--some-flag` when that is an option of this parser."""
        args = sys.argv[1:] if args is None else list(args)
        known = set(self._option_string_actions)
        out = []
        for arg in args:
            name, sep, value = arg.partition("=")
            dashed = "--" + name[2:].replace("_", "-")
            out.append(dashed + sep + value if name.startswith("--") and name not in known and dashed in known
                       else arg)
        return out

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._dashed(args), namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):
        return super().parse_known_intermixed_args(self._dashed(args), namespace)

    def error(self, message: str):
        """One line: the mistake, and where the options are listed."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def debugging(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The message of `error` (a ConfigError lists one problem per line, indented)."""
    return str(error).strip()


def run(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)`; a user's mistake is printed once (by the first process of a launch) as `error: ...`
    and exits 2, with no traceback unless debugging."""
    try:
        return main(argv)
    except UserError as error:  # config.ConfigError among them
        if debugging(argv):
            raise
        if int(os.environ.get("RANK", 0)) == 0:  # every process of a launch meets the same mistake
            print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
