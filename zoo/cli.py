"""The `zoo` command line: one subcommand per module in `zoo/commands/` (found at start-up).

A command module defines `add_parser(subparsers)`, which adds its parser and sets
`run=fn(args, parser) -> exit status` and `subparser=` on it. This module holds what the
commands share: flag parsers and the preset + overrides -> ModelConfig step.
Bad flags end with a one-line error naming the flag and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from typing import Callable, Sequence

# Model fields a user may override from the command line: flag dest -> preset keyword.
MODEL_OVERRIDES = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len")


def _number(kind: type, lo: float | None, what: str, *, strict: bool = True) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or (
                lo is not None and (value <= lo if strict else value < lo)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 0, "a positive integer")
non_negative_int = _number(int, 0, "a non-negative integer", strict=False)
positive_float = _number(float, 0.0, "a positive number")
non_negative_float = _number(float, 0.0, "a non-negative number", strict=False)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def model_config(args: argparse.Namespace, parser: argparse.ArgumentParser, kind: str | None = "decoder"):
    """The preset named by --preset with the model overrides applied; `kind` restricts the
    presets to one model kind (zoo.presets.KINDS), None accepts every preset."""
    import zoo

    allowed = zoo.presets.names(kind)
    if args.preset not in allowed:
        what = "unknown preset" if args.preset not in zoo.presets.names() else f"not a {kind} preset:"
        parser.error(f"--preset: {what} {args.preset!r}; choose from {', '.join(allowed)}")
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    try:
        return zoo.presets.get(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0]
        named = [k for k in overrides if re.search(rf"\b{k}\b", msg)] or list(overrides)
        flags = "/".join(flag(k) for k in named) or "--preset"
        parser.error(f"{flags}: {msg}")


def add_model_overrides(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model overrides (default: the preset's values)")
    for name in MODEL_OVERRIDES:
        g.add_argument(flag(name), dest=name, type=positive_int, default=None)


def build_parser() -> argparse.ArgumentParser:
    import zoo.commands

    parser = argparse.ArgumentParser(prog="zoo", description="JAX model zoo command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(zoo.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"zoo.commands.{info.name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)  # errors after parsing report through the subcommand


def entry() -> None:
    """The console script: restart once with XLA's CPU buffers on huge pages (`zoo.hugepages`),
    then run the command. `main` is what tests call; it never restarts the process."""
    from zoo import hugepages

    hugepages.restart_with_hugepages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
