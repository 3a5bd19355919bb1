"""First stage for a result file: read it safely, parse it strictly, check it against schema v1.0.4.

Everything here treats the file as hostile: symlinks, FIFOs, huge files, bad UTF-8, NaN, duplicate
keys and absurd nesting each end in a ResultRejected that names the problem, never a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
from pydantic import ValidationError

from ..document.metadata import (
    MAX_RESULT_BYTES,
    RELATIVE_PATH_PATTERN,
    RELATIVE_PATH_RULE,
    ResultFile,
)
from ..document.pipeline import FINAL_AGENT
from ..errors import PASSING_ERRNOS, ResultRejected

__all__ = [
    "Deferred",
    "Loaded",
    "load_result",
    "parse_result_bytes",
    "result_schema",
    "schema_problems",
]

MAX_DEPTH = 64
MAX_MESSAGE = 300
"""Characters of one problem's message."""
SCHEMA_FILE = "result-v1.0.4.schema.json"


class Deferred(Exception):
    """load_result(cheap_bytes=...) stopped where the rest would cost more than cheap: the file is
    over cheap_bytes, or it needs jsonschema's walk (milliseconds, a quarter of a second for 64 KiB
    of bad entries). load_result without cheap_bytes finishes the job."""


@dataclass(frozen=True)
class Loaded:
    """A result file that passed every check, with the hash of the exact bytes that were read."""

    path: Path
    sha256: str
    size: int
    document: ResultFile


@cache
def result_schema() -> dict[str, Any]:
    """The shipped JSON Schema of a result file."""
    # A checkout reads the schema beside its code: the package maps schema/ only when installed,
    # and an editable install of another checkout would otherwise hand over that one's copy.
    beside = Path(__file__).resolve().parents[2] / "schema" / SCHEMA_FILE
    if beside.is_file():
        text = beside.read_text("utf-8")
    else:
        text = resources.files("prng_daemon.schema").joinpath(SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # ECMA-262's `$` (the schema's dialect) matches only at the very end; Python's also matches
    # before a final newline, which would let "step1_...\n" through.
    if isinstance(instance, str) and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), instance):
        if pattern == RELATIVE_PATH_PATTERN:
            yield jsonschema.ValidationError(f"{RELATIVE_PATH_RULE}, got {json.dumps(instance)}")
        else:
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _max_items(
    validator: Any, limit: int, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # jsonschema's own message quotes the whole list; saying how long it is says more.
    if isinstance(instance, list) and len(instance) > limit:
        yield jsonschema.ValidationError(
            f"has {len(instance)} items, more than the {limit} allowed"
        )


def _max_length(
    validator: Any, limit: int, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if isinstance(instance, str) and len(instance) > limit:
        yield jsonschema.ValidationError(
            f"is {len(instance)} characters long, more than the {limit} allowed"
        )


_ITEMS = jsonschema.Draft202012Validator.VALIDATORS["items"]


def _bounded_items(
    validator: Any, items: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    # A list over its maxItems is rejected by that keyword alone; checking each of its 200,000
    # entries as well would only burn seconds of CPU on a file that is refused anyway.
    if isinstance(instance, list) and len(instance) > schema.get("maxItems", len(instance)):
        return
    yield from _ITEMS(validator, items, instance, schema)


@cache
def _validator() -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.extend(
        jsonschema.Draft202012Validator,
        {
            "pattern": _ecma_pattern,
            "items": _bounded_items,
            "maxItems": _max_items,
            "maxLength": _max_length,
        },
    )
    return cls(result_schema())


@cache
def _gate() -> jsonschema_rs.Draft202012Validator:
    # The same schema, compiled in Rust: ~100x faster than jsonschema's walk (2 us against 200 us
    # for a typical result), but its messages are not ours. It only ever says "valid": a document
    # it passes is passed, anything else goes through jsonschema, whose verdict and messages
    # stand. Its regular expressions are ECMA-262's, the schema's dialect, so `$` is the very
    # end there too (what _ecma_pattern does for jsonschema).
    return jsonschema_rs.Draft202012Validator(result_schema())


def _surely_valid(document: object) -> bool:
    """The gate for what json.loads made: Rust reads a tuple as an array, jsonschema does not."""
    try:
        return _gate().is_valid(document)
    except ValueError:  # a string it cannot hold (a lone surrogate): jsonschema decides
        return False


def _pointer(parts: Collection[object]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _bounded(message: str) -> str:
    # jsonschema quotes the offending value: a 10 MB string must not become a 10 MB log line.
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def schema_problems(document: object) -> list[tuple[str, str]]:
    """Every schema violation as (JSON pointer, message), in document order."""
    errors = sorted(_validator().iter_errors(document), key=lambda e: list(map(str, e.path)))
    return [(_pointer(e.absolute_path), _bounded(e.message)) for e in errors]


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _too_deep(value: object) -> bool:
    """Deeper than MAX_DEPTH levels, the top level being 1 and a scalar in a list one more."""
    # Level by level, stopping at the limit: a quarter of the time of a walk node by node.
    level = [value]
    for _ in range(MAX_DEPTH):
        below: list[object] = []
        for node in level:
            if isinstance(node, dict):
                below.extend(node.values())
            elif isinstance(node, list):
                below.extend(node)
        if not below:
            return False
        level = below
    return True


def _check_document(raw: Any, cheap: bool) -> ResultFile:
    if not isinstance(raw, dict):
        raise ResultRejected(f"top level is a JSON {type(raw).__name__}, expected an object")
    if _too_deep(raw):
        raise ResultRejected(f"nested deeper than {MAX_DEPTH} levels")
    if _surely_valid(raw):
        problems = []
    elif cheap:
        raise Deferred
    else:
        problems = schema_problems(raw)
    if problems:
        pointer, message = problems[0]
        raise ResultRejected(message, pointer, problems)
    try:
        return ResultFile.model_validate(raw)
    except ValidationError as exc:  # the schema and the models disagree: still a rejection
        first = exc.errors()[0]
        pointer = _pointer(first["loc"])
        raise ResultRejected(first["msg"], pointer) from None


def parse_result_bytes(data: bytes, *, cheap: bool = False) -> ResultFile:
    """Decode, parse and check the bytes of a result file.

    `cheap`: raise Deferred rather than walk the schema with jsonschema (a document the gate
    does not pass).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultRejected(
            f"not UTF-8: invalid byte at offset {exc.start}", maybe_partial=True
        ) from None
    try:
        raw = json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ResultRejected(f"not valid JSON at {where}: {exc.msg}", maybe_partial=True) from None
    except ValueError as exc:
        raise ResultRejected(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ResultRejected(f"nested deeper than {MAX_DEPTH} levels") from None
    return _check_document(raw, cheap)


def _read_regular_file(path: Path, max_bytes: int, cheap_bytes: int | None = None) -> bytes:
    try:
        # O_NOFOLLOW: a symlink is refused, not followed; O_NONBLOCK: a FIFO cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ResultRejected("no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResultRejected("is a symbolic link; only regular files are read") from None
        if exc.errno in PASSING_ERRNOS:  # the system's fault, not the file's: raised as it is
            raise
        raise ResultRejected(f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ResultRejected("is a directory, expected a regular file")
        if not stat.S_ISREG(info.st_mode):
            raise ResultRejected("is not a regular file")
        if info.st_size > max_bytes:
            raise ResultRejected(f"is {info.st_size} bytes, over the {max_bytes}-byte limit")
        if cheap_bytes is not None and info.st_size > cheap_bytes:
            raise Deferred
        limit = max_bytes if cheap_bytes is None else min(max_bytes, cheap_bytes)
        # One read of the size fstat gave, and one more that finds the end (or what was added).
        chunks: list[bytes] = []
        size, want = 0, info.st_size + 1
        while size <= limit:
            chunk = os.read(fd, min(want, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            want = 1 << 16
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ResultRejected(f"grew past the {max_bytes}-byte limit while being read")
    if len(data) > limit:
        raise Deferred
    return data


def load_result(
    path: Path,
    *,
    max_bytes: int = MAX_RESULT_BYTES,
    root: Path | None = None,
    allowed_agents: Collection[str] | None = None,
    cheap_bytes: int | None = None,
) -> Loaded:
    """Read and check one result file; raise ResultRejected with the reason.

    `root`: the file must resolve inside this directory. `allowed_agents`: the configured agent
    allowlist the follow-up agent must be in (a final step needs none). `cheap_bytes`: do only
    what costs well under a millisecond a file, as an event loop may: a file of up to this many
    bytes whose schema check needs no jsonschema walk; raise Deferred for any other.
    """
    # A file named inside root is in it (the daemon's always are): resolving both costs ~20 us.
    if root is not None and path.parent != root:
        if not path.parent.resolve().is_relative_to(root.resolve()):
            raise ResultRejected(f"lies outside the results directory {root}")
    data = _read_regular_file(path, max_bytes, cheap_bytes)
    document = parse_result_bytes(data, cheap=cheap_bytes is not None)
    meta = document.agent_metadata
    if allowed_agents is not None and meta.follow_up_agent != FINAL_AGENT:
        if meta.follow_up_agent not in allowed_agents:
            raise ResultRejected(
                f"follow_up_agent {meta.follow_up_agent!r} is not a configured agent",
                "/agent_metadata/follow_up_agent",
            )
    digest = hashlib.sha256(data).hexdigest()
    return Loaded(path=path, sha256=digest, size=len(data), document=document)
