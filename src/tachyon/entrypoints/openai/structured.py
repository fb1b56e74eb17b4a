"""The structured-output fields of a request, to one ``StructuredOutputsParams``.

OpenAI's ``response_format`` (``json_object``, ``json_schema``) and vLLM's extras: the
``structured_outputs`` object (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``)
and the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
At most one may be given. The constraint is checked here, in the API process, so a schema
the grammar engine cannot take is a 400 naming the problem before the core sees it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tachyon.entrypoints.openai.protocol import Fields, OpenAIError
from tachyon.structured_output.params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def _schema_text(v: Any, param: str) -> str:
    """A schema given as an object or as its JSON text, to canonical text (the cache key)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise OpenAIError(f"'{param}' is not valid JSON: {e}", param) from None
    if not isinstance(v, dict | bool):
        raise OpenAIError(f"'{param}' must be a JSON schema (an object)", param)
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def _build(kind: str, value: Any, param: str) -> StructuredOutputsParams:
    if kind == "json":
        return StructuredOutputsParams(json=_schema_text(value, param))
    if kind == "json_object":
        if value is not True:
            raise OpenAIError(f"'{param}' must be true", param)
        return StructuredOutputsParams(json_object=True)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(c, str) and c for c in value):
            raise OpenAIError(f"'{param}' must be a non-empty list of non-empty strings", param)
        return StructuredOutputsParams(choice=tuple(value))
    if not isinstance(value, str) or not value:
        raise OpenAIError(f"'{param}' must be a non-empty string", param)
    return StructuredOutputsParams(**{kind: value})


def _from_response_format(v: Any) -> StructuredOutputsParams | None:
    param = "response_format"
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise OpenAIError("'response_format' must be an object with a string 'type'", param)
    kind = v["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise OpenAIError("'response_format.json_schema' must be an object with a "
                              "'schema'", param)
        return StructuredOutputsParams(json=_schema_text(spec["schema"], param))
    raise OpenAIError(f"'response_format.type' must be 'text', 'json_object' or "
                      f"'json_schema', got {kind!r}", param)


def parse_structured(f: Fields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the field it came from (None, None: free text)."""
    found: list[tuple[StructuredOutputsParams | None, str]] = []
    if f.get("response_format") is not None:
        found.append((_from_response_format(f.get("response_format")), "response_format"))
    so = f.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise OpenAIError("'structured_outputs' must be an object", "structured_outputs")
        given = [k for k in _KEYS if so.get(k) not in (None, False)]
        if len(given) != 1:
            raise OpenAIError(f"'structured_outputs' needs exactly one of {', '.join(_KEYS)}",
                              "structured_outputs")
        found.append((_build(given[0], so[given[0]], "structured_outputs"),
                      "structured_outputs"))
    for name, kind in _GUIDED.items():
        if f.get(name) is not None:
            found.append((_build(kind, f.get(name), name), name))
    found = [(spec, name) for spec, name in found if spec is not None]
    if len(found) > 1:
        raise OpenAIError(f"give one structured-output constraint, got "
                          f"{', '.join(n for _, n in found)}", found[1][1])
    return found[0] if found else (None, None)


async def check_structured(spec: StructuredOutputsParams, param: str) -> None:
    """400 if the grammar engine cannot take ``spec``; parsed on a thread (a large schema
    takes milliseconds), cached by the spec."""
    from tachyon.structured_output.compiler import GrammarError, check

    try:
        await asyncio.to_thread(check, spec)
    except GrammarError as e:
        raise OpenAIError(str(e), param) from None
    except ImportError:
        raise OpenAIError("structured outputs need xgrammar: pip install xgrammar", param,
                          status=501) from None
