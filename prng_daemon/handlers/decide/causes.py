"""Whether a failure's stated cause repeats on a rerun (issue 26). A rerun reads the same input,
the same configuration and the same code on the same cluster: a corrupt input, an invalid
configuration, a name that does not resolve, an exception the code raises on its data, a
request larger than any device, or a version mismatch fails again, whatever the agent hopes
("possibly flaky, will retry"). A busy GPU, a preemption, a crash, a reboot or a timeout
does not.

Read from the reasoning and the payload's strings (an `error` message). What the cause words
say, not the agent's plan, decides; words that only recall a fixed fault ("the file itself is
fine", "checksum verified after re-fetching") are not a cause.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .consistency import first_stated, flatten

__all__ = ["failure_text", "permanent_cause", "transient_cause"]

_SIZE = r"(\d+(?:\.\d+)?)\s*(GiB|GB|MiB|MB|TiB|TB)\b"
_UNITS = {"mib": 1 / 1024, "mb": 1 / 1024, "gib": 1.0, "gb": 1.0, "tib": 1024.0, "tb": 1024.0}
_REQUEST = re.compile(
    rf"\b(?:asks? for|requests?|requested|needs?|requires?|required|allocate)\b\D{{0,40}}?{_SIZE}",
    re.IGNORECASE,
)
_GPUS = re.compile(
    r"\b(?:asks? for|requests?|requested|needs?|requires?|required)\s+(\d+)\s+GPUs?\b",
    re.IGNORECASE,
)
_CAPACITY = re.compile(
    rf"\b(?:biggest|largest|max(?:imum)?|most|only has|each has|have only)\b\D{{0,40}}?{_SIZE}|"
    rf"{_SIZE}\s+(?:is|being) the (?:biggest|largest|most)",
    re.IGNORECASE,
)
_EXCEPTION = "an exception the code raises on its data"
_DIVERGED = re.compile(r"\bdiverg\w*|\bNaN\b|\b(?:inf|infinite|exploding) (?:loss|gradients?)\b",
                       re.IGNORECASE)  # fmt: skip
_PERMANENT = {
    "corrupt or truncated input": re.compile(
        r"\b(?:corrupt\w*|malformed|garbled)\b|"
        r"\b(?:input|file|capture|data|stream|records?|\w+\.(?:bin|json|csv))\b[^.]{0,40}"
        r"\btruncated\b|\btruncated (?:input|file|capture|data|\w+ stream|records?)\b|"
        r"\bnot (?:divisible by|a (?:whole )?multiple of)\b|"
        r"\bends? in the middle of\b|"
        r"\b(?:sha-?256|hash|checksum)\b[^.]{0,30}\b(?:does not|doesn't|no longer|did not) "
        r"match(?:es)?\b|"
        r"\b(?:hash|checksum|CRC) (?:mismatch|error)\b|"
        r"\bunexpected (?:EOF|end of (?:file|stream))\b|"
        r"\b(?:invalid|bad|unknown) (?:header|magic|file format|encoding)\b|"
        r"\bbytes\b[^.]{0,20}\b(?:where|but|while)\b[^.]{0,30}\bexpected\b",
        re.IGNORECASE,
    ),
    _EXCEPTION: re.compile(
        r"\b(?:Type|Key|Value|Assertion|Attribute|Index|Import|ModuleNotFound|Name|Syntax|"
        r"NotImplemented|ZeroDivision|Unicode(?:Decode|Encode)?|JSONDecode|Schema|Validation|"
        r"FileNotFound|Permission)Error\b|\bdevice-side assert\b",
    ),
    "an invalid configuration": re.compile(
        r"\b(?:invalid|unknown|unrecognized|unsupported|missing)\s+(?:config\w*|option|"
        r"parameter|key|field|column|setting|block|section|argument)\b|"
        r"\bhas no [\w'`\"-]+ (?:column|field|key|block|section)\b|"
        r"\bno such (?:file|key|column|option)\b|"
        r"\b(?:permission|access) denied\b|\b(?:authentication|authorization) failed\b|"
        r"\binvalid credentials\b|"
        r"\blow(?:er bound)?\s*>\s*high\b|\bmisconfigur\w+\b|\bconfig\w* error\b|"
        r"\b(?:config\w*|input|set|\w+\.(?:json|ya?ml|bin|csv))\b[^.]{0,20}\bis empty\b|"
        r"\b(?:needs|requires|has to be|must be) (?:a )?(?:corrected|regenerated|redone|"
        r"re-?exported|recaptured|fixed)\b",
        re.IGNORECASE,
    ),
    "a name that does not resolve": re.compile(
        r"\bname resolution\b|\b(?:could not|cannot|can't|failed to|unable to) resolve\b|"
        r"\bunknown host\b|\bname or service not known\b|\bNXDOMAIN\b|\bno such host\b",
        re.IGNORECASE,
    ),
    "a version mismatch": re.compile(
        r"\b(?:size|shape|version|dimension|schema) mismatch\b|\bincompatible\b|"
        r"\b(?:written|produced|built|generated|created|saved|exported) (?:by|with|for) "
        r"(?:an? |the )?(?:older|newer|previous|earlier|different|\d+(?:\.\d+)+)\b|"
        r"\bAPI (?:changed|was changed)\b|\b(?:compiled|built) against\b|\bversion conflict\b",
        re.IGNORECASE,
    ),
    "the same failure on every attempt": re.compile(
        r"\b(?:fail(?:s|ed)?|crash(?:es|ed)?|dies|died) (?:identically|the same way)\b|"
        r"\bsame (?:error|exception|failure) (?:on|in|for) every\b|"
        r"(?<!non-)\bdeterministic(?:ally)?\b(?!\s+(?:mode|seed\w*|algorithms?|ops|kernels?))|"
        r"\b(?:rerun\w*|re-run\w*|retrain\w*|another (?:run|attempt)|every attempt)\b"
        r"[^.]{0,30}\b(?:would|will|gives?|hits?)\s+(?:just\s+)?(?:hit\s+|read\s+|fail\s+)?"
        r"(?:the\s+)?(?:same|identical)\b",
        re.IGNORECASE,
    ),
}
_TRANSIENT = re.compile(
    r"\bpreempt\w*|\bevicted\b|\bmaintenance\b|\bnode (?:crash\w*|failure|went down|lost)\b|"
    r"\b(?:spot|capacity) (?:reclaim\w*|interrupt\w*)|\breclaimed\b|\bdrain(?:ed|ing)\b|"
    r"\b(?:resum\w+|restart\w*|pick(?:s|ed)? up) from (?:the |its |a )?(?:last )?checkpoint\b|"
    r"\bcheckpoint\b[^.]{0,30}\b(?:kept|saved|on disk|intact|written)\b|"
    r"\b(?:crash(?:ed)?|went down|rebooted|reboot|power (?:blip|cut|loss)|mains drop)\b|"
    r"\b(?:timed? ?out|timeout)\b|\bconnection (?:reset|refused|lost|dropped)\b|"
    r"\bConnection\w*Error\b|\blost the connection\b|\bnetwork (?:blip|partition|glitch)\b|"
    r"\b(?:busy|shared) (?:GPU|card|device)\b|\banother (?:job|process|user)\b|"
    r"\bXid\b|\bECC\b|\bNFS (?:stall|hiccup|timeout)\b|\bwall[- ]?time\b|\bspot instance\b|"
    r"\bfell off the bus\b|\bkernel panic\b",
    re.IGNORECASE,
)
# What only recalls a fault that no longer holds: not the cause of this failure.
_RECALLED = re.compile(
    r"\b(?:the (?:file|input|data) (?:itself )?is fine|verified (?:afterwards|after)|"
    r"re-?fetched|re-?downloaded)\b[^.]*",
    re.IGNORECASE,
)


def failure_text(reasoning: str, payload: Mapping[str, Any] | None) -> str:
    """The reasoning and the payload's strings (an error's type and message), as one text."""
    strings = [f"{n}: {v}" for n, v in flatten(payload or {}) if isinstance(v, str)]
    return " ".join([reasoning, *strings])


def _gib(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit.lower()]


def permanent_cause(text: str, total_gpus: int | None = None) -> str | None:
    """The stated cause of a failure that a rerun repeats, quoted, or None. `total_gpus` (the
    report's cluster_resources) bounds what a job may ask for."""
    text = _RECALLED.sub(" ", text)
    gpus = _GPUS.search(text)
    if gpus and total_gpus is not None and int(gpus[1]) > total_gpus:
        return f"a request larger than the cluster: {gpus[0]!r}, {total_gpus} GPUs in all"
    request, capacity = _REQUEST.search(text), _CAPACITY.search(text)
    if request and capacity and transient_cause(text) is None:  # not "12 GiB free: shared"
        wanted, largest = _gib(request[1], request[2]), _gib(*[g for g in capacity.groups() if g])
        if wanted > largest:
            return f"a request larger than any device: {request[0]!r} vs {capacity[0]!r}"
    for why, pattern in _PERMANENT.items():
        found = first_stated(pattern, text)
        if found and why == _EXCEPTION and _DIVERGED.search(text):
            continue  # a NaN loss raises too: an unlucky start, not the code
        if found:
            return f"{why}: {' '.join(found[0].split())!r}"
    return None


def transient_cause(text: str) -> str | None:
    """The stated cause of a failure that a rerun may not meet again, quoted, or None."""
    found = _TRANSIENT.search(text)
    return None if found is None else " ".join(found[0].split())
