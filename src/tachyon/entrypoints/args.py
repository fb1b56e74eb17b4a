"""Command-line flags generated from ``EngineArgs``, and the parser every ``tachyon`` command
and benchmark shares.

One flag per ``EngineArgs`` field, named like vLLM's (``max_model_len`` ->
``--max-model-len``); its type, default, choices and help come from the field, so a new
engine option needs no CLI code. Importing this module does not import torch: ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from tachyon.config import EngineArgs
from tachyon.sampling_params import SamplingParams

EXIT_USAGE = 2
# difflib similarity above which an unknown option is taken for a typo of a known one.
_NEAR_MATCH = 0.75


class Parser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit status 2: no usage dump, no traceback."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"tachyon: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with an unknown option named as such (argparse would first
    complain about a missing command, or list every leftover word)."""
    ns, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(unknown_args_error(_chosen_parser(parser, ns), extra))
    return ns


def unknown_args_error(parser: argparse.ArgumentParser, extra: Sequence[str]) -> str:
    """Say which argument is unknown, and the nearest option of ``parser`` if one is close."""
    first = extra[0]
    if not first.startswith("-"):
        return f"unexpected argument {first!r} (quote a prompt that has spaces)"
    name = first.split("=", 1)[0]
    # argparse has no public list of a parser's options.
    known = [s for a in parser._actions for s in a.option_strings]
    near = difflib.get_close_matches(name, known, n=1, cutoff=_NEAR_MATCH)
    hint = f"; did you mean {near[0]}?" if near else f"; see {parser.prog} --help"
    return f"unknown option {name}{hint}"


def _chosen_parser(parser: argparse.ArgumentParser,
                   ns: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand that ``ns`` selected (``parser`` itself if none)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) and getattr(ns, a.dest, None) in a.choices:
            return _chosen_parser(a.choices[getattr(ns, a.dest)], ns)
    return parser


class Toggle(argparse.Action):
    """``--x`` sets True, ``--no-x`` sets False (argparse's BooleanOptionalAction adds its
    own "(default: ...)" on some Python versions; ours is added once, for every flag)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None,
                    notes: dict[str, str] | None = None) -> None:
    """One flag per ``EngineArgs`` field. ``defaults`` overrides a field's default for this
    parser only (a benchmark's model, say) and the help shows the value in force; ``notes``
    adds to a field's help what this command does differently."""
    defaults, notes = defaults or {}, notes or {}
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        _add_field(group, f, hints[f.name], defaults.get(f.name, f.default), notes.get(f.name))


def _add_field(group: Any, f: dataclasses.Field, hint: Any, default: Any,
               note: str | None) -> None:
    meta = f.metadata
    shown = _show(default) if default is not None else meta.get("default_help", "none")
    help_text = f"{meta['help']}{'; ' + note if note else ''} (default: {shown})"
    names = [flag_name(f.name), *meta.get("aliases", ())]
    kwargs: dict[str, Any] = {"dest": f.name, "default": default,
                              "help": help_text.replace("%", "%%")}
    scalar = _scalar_type(hint)
    if scalar is bool:  # with its negation: --enforce-eager / --no-enforce-eager
        names.insert(1, flag_name("no_" + f.name))
        group.add_argument(*names, action=Toggle, **kwargs)
        return
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    group.add_argument(*names, type=scalar, metavar=_metavar(scalar, meta), **kwargs)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


# Placeholder shown in --help for a flag's value, by the type it converts to.
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _metavar(scalar: type, meta: typing.Mapping[str, Any]) -> str | None:
    return None if "choices" in meta else meta.get("metavar", _METAVARS[scalar])


def _scalar_type(hint: Any) -> type:
    """The type a flag's text is converted to: the field's own scalar type, or ``str`` when
    the field also takes text (``"2GiB"`` for a size, JSON for a config)."""
    members = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    members.discard(type(None))
    for t in (bool, str, int, float):
        if t in members:
            return t
    return str


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """The ``EngineArgs`` a parsed command line asks for."""
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Per-request sampling flags of ``generate`` and ``chat`` (fields of SamplingParams)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, metavar="X",
                   help="sampling temperature; 0 picks the most likely token "
                        "(default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="X",
                   help="sample from the smallest set of tokens whose probability reaches "
                        "this (default: %(default)s: off)")
    g.add_argument("--top-k", type=int, default=0, metavar="N",
                   help="sample from the k most likely tokens (default: %(default)s: off)")
    g.add_argument("--min-p", type=float, default=0.0, metavar="X",
                   help="drop tokens below this fraction of the top token's probability "
                        "(default: %(default)s: off)")
    g.add_argument("--request-seed", type=int, default=None, metavar="N",
                   help="seed of this request's sampling alone (default: none: draw from "
                        "the engine's generator, seeded by --seed)")
    g.add_argument("--sampling-seed", dest="request_seed", type=int, help=argparse.SUPPRESS)
    g.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="tokens to generate before EOS or a stop may end the reply "
                        "(default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="penalize tokens already in the prompt or the reply; above 1 "
                        "discourages repeats (default: %(default)s: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X",
                   help="subtract this from the logits of tokens already generated "
                        "(default: %(default)s: off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X",
                   help="subtract this times a token's count so far from its logit "
                        "(default: %(default)s: off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the reply before this text; repeat for several "
                        "(default: none)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating after the end-of-sequence token (default: off)")


def sampling_params_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, min_p=ns.min_p,
        seed=ns.request_seed, max_tokens=ns.max_tokens, min_tokens=ns.min_tokens,
        repetition_penalty=ns.repetition_penalty, presence_penalty=ns.presence_penalty,
        frequency_penalty=ns.frequency_penalty, stop=ns.stop, ignore_eos=ns.ignore_eos,
    )
