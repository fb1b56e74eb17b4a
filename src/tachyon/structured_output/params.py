"""What a request's output must match: exactly one of the fields below."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint. Frozen and made of strings and tuples, so it is its own cache key and
    travels to the engine core as it is (msgspec encodes dataclasses).

    ``json``: a JSON schema, serialized (``json.dumps``); ``json_object``: any JSON object;
    ``regex``: a regular expression; ``choice``: one of these strings exactly;
    ``grammar``: an EBNF grammar (xgrammar's dialect, GBNF-like, rule ``root`` first).
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        chosen = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, json_object, "
                             f"regex, choice, grammar; got {chosen or 'none'}")
        if self.choice is not None and (
                not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs choice must be a non-empty list of "
                             "non-empty strings")

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))
