"""What the ``memdec-fast`` subcommands (``serve`` in :mod:`memdec_fast.server.cli` too) share: the parser class,
the model pair's flags and their checks. Importing it imports no torch, so that ``memdec-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from memdec_fast.ranges import FLAGS, RANGES

DEMO_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
"""The embedded demo pair: ``base/`` and ``memory/``, the default of --base and --memory."""
LMBDA_HELP = "weight of the memory (default: the memory's memdec_config.json, else 0.55)"
KNN_TEMP_HELP = "memory softmax temperature (default: the memory's memdec_config.json, else 1.0)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, or a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, without the usage block, and whose help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(ValueError):
    """An argument the parser accepted but the command cannot use."""


def common_flags(json_help: str = "print one JSON object on stdout") -> argparse.ArgumentParser:
    """A parent parser (``parents=[common_flags()]``): the model pair's flags and --json."""
    p = Parser(add_help=False)
    g = p.add_argument_group("model pair")
    g.add_argument("--base", metavar="PATH", help="base LM: directory or hub name (default: the embedded demo base)")
    g.add_argument("--memory", metavar="[NAME=]PATH", action="append",
                   help="memory: directory or hub name (default: the embedded demo memory); NAME=PATH names it "
                        "(serve takes several NAME=PATH, one model id each; elsewhere the name is a label)")
    g.add_argument("--memory-type", choices=("auto", "decoder", "mlp"), default="auto",
                   help="auto: an MLP Memory when its files say so, else a Memory Decoder")
    g.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--json", action="store_true", help=json_help)
    return p


class RangeType:
    """An argparse `type` that parses a number and refuses it outside its entry of :data:`memdec_fast.ranges.RANGES`."""

    def __init__(self, key: str):
        self.key, self.range = key, RANGES[key]
        self.__name__ = self.range.kind.__name__  # argparse names the type in some messages

    def __call__(self, text: str) -> int | float:
        try:
            return self.range.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of every subcommand, nested ones as "train mlp"."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + name, sub
                yield from subcommands(sub, prefix + name + " ")


def apply_ranges(parser: argparse.ArgumentParser) -> None:
    """Give every numeric flag listed in :data:`memdec_fast.ranges.FLAGS` the type and range of its entry.

    The table, not the code that adds a flag, decides what the flag accepts: the same entries the ops check their
    arguments against. The range is appended to the flag's help.
    """
    for command, sub in subcommands(parser):
        flags = FLAGS.get(command, {})
        for action in sub._actions:
            key = next((flags[o] for o in action.option_strings if o in flags), None)
            if key is None or isinstance(action.type, RangeType):
                continue
            action.type = RangeType(key)
            action.help = f"{action.help + '; ' if action.help else ''}range {RANGES[key].describe()}"


def split_memory(text: str) -> tuple[str | None, str]:
    """A --memory value: "NAME=PATH" -> (NAME, PATH); a PATH -> (None, PATH). The text before the first "=" is a
    name only when it has no "/" (so "./a=b" and "runs/lr=3" are paths); UsageError for a name that is not one.

    Example
    -------
    >>> split_memory("bio=/ckpt/bio"), split_memory("/ckpt/bio")
    (('bio', '/ckpt/bio'), (None, '/ckpt/bio'))
    """
    name, sep, path = text.partition("=")
    if not sep or "/" in name:
        return None, text
    from memdec_fast.models.checks import check_memory_names

    try:
        check_memory_names([name])
    except ValueError as err:
        raise UsageError(f"--memory {text}: {err}") from None
    if not path:
        raise UsageError(f"--memory {text}: no path after {name}=")
    return name, path


def memory_flags(args: argparse.Namespace) -> tuple[str, str | dict[str, str]]:
    """(base, memory): memory is a path (no --memory, or one plain PATH), or {name: path} (every --memory is
    NAME=PATH). UsageError for a mix, several plain paths, or a name given twice."""
    given = args.memory or []
    if not given:
        return pair_paths(args)
    split = [split_memory(m) for m in given]
    named = [n for n, _ in split if n is not None]
    if not named and len(split) == 1:
        return pair_paths(args)
    if len(named) != len(split):
        raise UsageError("--memory: several memories must each be NAME=PATH (e.g. --memory bio=PATH --memory "
                         "law=PATH2)")
    from memdec_fast.models.checks import check_memory_names

    try:
        check_memory_names(named)
    except ValueError as err:
        raise UsageError(f"--memory: {err}") from None
    return pair_paths(args, memory=False)[0], dict(split)


def pair_paths(args: argparse.Namespace, memory: bool = True) -> tuple[str, str]:
    """(base, memory): --base and --memory, else the embedded demo pair; UsageError when the demo pair is missing,
    or when --memory is given more than once. A NAME=PATH memory gives its PATH (the name is a label).
    memory=False: --memory is not read (the second item is None)."""
    given = args.memory or []
    if memory and len(given) > 1:
        raise UsageError(f"--memory: given {len(given)} times; this command takes one memory (serve takes several "
                         "NAME=PATH)")
    base = args.base or str(DEMO_DIR / "base")
    mem = split_memory(given[0])[1] if given else str(DEMO_DIR / "memory")
    for flag, flag_given, path in (("--base", args.base, base), ("--memory", given or not memory, mem)):
        if not flag_given and not (Path(path) / "config.json").is_file():
            raise UsageError(f"{flag}: not given, and the embedded demo pair is missing ({path}); pass --base and --memory")
    return base, mem if memory else None


def resolve_device(text: str | None):
    """The torch.device that --device names (default: cuda when available, else cpu); UsageError if it is not here."""
    import torch

    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"--device: {text!r} is not a device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {text} asked for, but no CUDA device is available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {text}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: {text!r} is not supported (cpu or cuda)")
    return device
