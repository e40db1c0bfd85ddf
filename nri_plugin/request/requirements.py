"""The ``NVIDIA_REQUIRE_*`` requirement language with libnvidia-container's semantics.

Reference: ``src/cli/dsl.c`` (``dsl_evaluate``, ``evaluate_rule``, ``dsl_compare_version``,
``dsl_compare_string``) and ``src/cli/configure.c`` (the four rules and the ``--require`` limit).

Grammar of one requirement value: alternatives separated by single spaces are ORed, terms
separated by commas inside an alternative are ANDed, empty tokens are ignored; separate
requirements are ANDed.  A term is ``<key><op><value>``:

* ``key`` is everything before the first of ``<>=!``; it must equal ``cuda``, ``driver``,
  ``arch`` or ``brand`` ignoring ASCII case;
* ``op`` is the whole run of ``<>=!`` characters that follows, and must be a prefix of one of
  ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` tried in that order (so a lone ``!`` means ``!=``,
  exactly as ``strncmp`` makes it in ``dsl.c``);
* ``value`` is the non-empty rest.

Evaluation follows the C code step by step, including its laziness: terms after a false term
of the same alternative, and alternatives after a satisfied one, are never looked at (so they
cannot be invalid); a term whose host fact is unknown (``None``) is true without looking at its
value; versions (digits and dots only) compare numerically component by component, trailing
zero components being insignificant; a *false* term whose text ``"<key> <op> <value>"`` needs
128 bytes or more is reported as invalid (the CLI's fixed error buffer).  When a requirement is
not met, the message quotes the requirement's *first* space-separated alternative — not the
failing one — with the CLI's hint appended when that alternative starts with ``cuda>=``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from nri_plugin.errors import RequirementError

__all__ = [
    "MAX_REQUIREMENTS",
    "MAX_REQUIREMENT_BYTES",
    "HostFacts",
    "Requirement",
    "Term",
    "check_requirement",
    "check_requirements",
    "parse_requirement",
]

# nvidia-container-cli keeps at most this many --require values ("too many requirements").
MAX_REQUIREMENTS = 32
# Linux's MAX_ARG_STRLEN (32 pages): the longest single string execve() accepts. The hook passed
# each requirement to nvidia-container-cli as one `--require=<value>` argument, so a longer value
# could never be evaluated there (E2BIG), and the container's own execve() of its environment
# would fail as well. Refusing it up front also keeps a hostile value from holding the event loop
# for seconds (evaluating a multi-megabyte expression costs about as much in C as here).
MAX_REQUIREMENT_BYTES = 32 * 4096
# dsl.c EXPR_MAX: size of the buffer the failing term is formatted into.
_EXPR_MAX = 128
_CUDA_REQUIRE_GREATER = "cuda>="
_CUDA_HINT = ", please update your driver to a newer version, or use an earlier cuda container"
_OPERATOR_CHARS = "<>=!"
_VERSION_CHARS = frozenset("0123456789.")
# The character runs dsl.c scans with strcspn/strspn/strtoumax, as regular expressions (linear, and
# C-speed: a request may carry thousands of terms). Each matches the empty string, so never None.
_KEY_RUN = re.compile(r"[^<>=!]*")
_OPERATOR_RUN = re.compile(r"[<>=!]*")
_DIGIT_RUN = re.compile(r"[0-9]*")


def _run_end(run: re.Pattern[str], text: str, pos: int) -> int:
    match = run.match(text, pos)
    assert match is not None  # every run pattern matches the empty string
    return match.end()


_UINTMAX_MAX = 2**64 - 1
_UINTMAX_DIGITS = len(str(_UINTMAX_MAX))
_KEYS = ("cuda", "driver", "arch", "brand")
# Every non-empty prefix of the operators, in dsl.c's table order, mapped to the operator it
# selects (strncmp over the length of the operator run in the input).
_OPERATOR_PREFIXES = {"=": "=", "!": "!=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SYNTAX_HELP = (
    "write <key><op><value> with key cuda, driver, arch or brand, op one of = != < <= > >=, "
    "and a version made of digits and dots (brand takes only = or !=)"
)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What one evaluation sees: host CUDA version (``"12.4"``), driver version
    (``"550.54.14"``), the device's compute capability (``"8.0"``) and brand (``"Tesla"``).
    ``None`` makes every term on that key true, as the CLI does without device/driver info."""

    cuda: str | None
    driver: str | None
    arch: str | None
    brand: str | None
    # Facts that exist but that discovery could not read (e.g. no NVML: no CUDA version, brand or
    # arch). A term on one of them fails the requirement with a message that says so, instead of
    # counting as satisfied the way a missing device makes it.
    unknown: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Term:
    """One ``<key><op><value>`` term.  ``error`` says why evaluating it fails whatever the
    host; ``value_error`` why it fails once the host fact for ``key`` is known."""

    text: str
    key: str  # as written
    operator: str  # canonical: "=", "!=", "<", "<=", ">", ">="
    value: str
    error: str | None = None
    value_error: str | None = None

    @property
    def name(self) -> str:
        """The key in lower case (``cuda``/``driver``/``arch``/``brand`` for a valid term)."""
        return self.key.translate(_ASCII_FOLD)


@dataclass(frozen=True, slots=True)
class Requirement:
    """A parsed requirement: an OR of ANDs.  An alternative written only of commas is kept as
    an empty tuple because the C evaluator treats it specially (it ends the OR loop)."""

    text: str
    alternatives: tuple[tuple[Term, ...], ...]

    @property
    def reported(self) -> str:
        """The text quoted by "unsatisfied condition": the first space-separated token."""
        return self.text.split(" ", 1)[0]

    @property
    def problems(self) -> tuple[tuple[Term, str], ...]:
        """Every term that is invalid on some host, with the reason."""
        found: list[tuple[Term, str]] = []
        for alternative in self.alternatives:
            for term in alternative:
                reason = term.error or term.value_error
                if reason is not None:
                    found.append((term, reason))
        return tuple(found)


class _Invalid(Exception):
    """Internal: dsl.c returned -1 ("invalid expression")."""


class _UnknownFact(Exception):
    """Internal: a term needs a host fact that discovery could not read."""


FACT_DESCRIPTIONS = {
    "cuda": "CUDA version the driver supports",
    "driver": "driver version",
    "arch": "GPU's compute capability",
    "brand": "GPU's brand",
}


def _parse_term(text: str) -> Term:
    # strcspn: length of the prefix without operator characters; strspn: the operator run after it
    key_len = _run_end(_KEY_RUN, text, 0)
    op_end = _run_end(_OPERATOR_RUN, text, key_len)
    key = text[:key_len]
    op_len = op_end - key_len
    op_run = text[key_len:op_end]
    value = text[op_end:]
    if key_len == 0:
        return Term(text, key, op_run, value, error="missing key before the operator")
    if op_len == 0:
        return Term(text, key, op_run, value, error="missing operator")
    operator = _OPERATOR_PREFIXES.get(op_run)
    if operator is None:
        return Term(text, key, op_run, value, error=f"unknown operator {op_run!r}")
    if value == "":
        return Term(text, key, operator, value, error="missing value after the operator")
    term = Term(text, key, operator, value)
    name = term.name
    if name not in _KEYS:
        return Term(text, key, operator, value, error=f"unknown key {key!r}")
    if name == "brand":
        if operator not in ("=", "!="):
            return Term(text, key, operator, value, value_error=f"brand takes only = or !=, not {operator}")
        return term
    if not set(value) <= _VERSION_CHARS:
        reason = f"version {value!r} is not made of digits and dots"
        return Term(text, key, operator, value, value_error=reason)
    if value.startswith("."):
        return Term(text, key, operator, value, value_error=f"version {value!r} starts with a dot")
    if any(part and _at_least_uintmax(part) for part in value.split(".")):
        return Term(text, key, operator, value, value_error=f"version {value!r} has a component too large")
    return term


def _alternatives(text: str) -> Iterator[Iterator[Term]]:
    """The OR of ANDs of ``text``, parsed only as far as it is iterated (as dsl.c does)."""
    for alternative in text.split(" "):
        if alternative != "":
            yield (_parse_term(term) for term in alternative.split(",") if term != "")


def _parse(text: str) -> Requirement:
    return Requirement(text, tuple(tuple(alternative) for alternative in _alternatives(text)))


# The caches below are keyed by container-controlled strings.  Values longer than this (real
# NVIDIA_REQUIRE_CUDA strings are well under 2 KiB) bypass them: a parsed multi-megabyte value
# costs tens of MB, and thousands of them would be kept. 512 entries of at most 4 KiB keep a
# pod that creates many distinct requirement strings from growing the plugin (a node sees few).
_CACHE_MAX_CHARS = 4096

_compile = functools.lru_cache(maxsize=512)(_parse)


def parse_requirement(expr: str) -> Requirement:
    """Parse one requirement value strictly: any term that could be invalid raises.

    (``check_requirements`` is lenient exactly where the CLI is: it only rejects terms it
    actually evaluates.)  Raises :class:`RequirementError` naming the first bad term.
    """
    if "\x00" in expr:
        raise RequirementError(_nul_message(expr))
    requirement = _compile(expr) if len(expr) <= _CACHE_MAX_CHARS else _parse(expr)
    problems = requirement.problems
    if problems:
        term, reason = problems[0]
        raise RequirementError(_invalid_message(term.text, expr, reason))
    return requirement


def _nul_message(requirement: str) -> str:
    return f"invalid expression: requirement {requirement!r} contains a NUL character; remove it"


def _invalid_message(term: str, requirement: str, reason: str) -> str:
    return f"invalid expression: {term!r} in requirement {requirement!r}: {reason}; {_SYNTAX_HELP}"


def _at_least_uintmax(digits: str) -> bool:
    """Whether strtoumax of these ASCII digits gives UINTMAX_MAX (saturating), which dsl.c
    rejects.  Any number of leading zeros is fine, and Python's int() (which refuses more
    than ``sys.get_int_max_str_digits()`` digits) only sees short strings."""
    significant = digits.lstrip("0")
    return len(significant) > _UINTMAX_DIGITS or int(significant or "0") >= _UINTMAX_MAX


def _strtoumax(text: str, start: int) -> tuple[int, int]:
    end = _run_end(_DIGIT_RUN, text, start)
    if end == start:
        raise _Invalid("a version component is empty")
    digits = text[start:end]
    if _at_least_uintmax(digits):  # strtoumax saturates; dsl.c rejects UINTMAX_MAX itself too
        raise _Invalid("a version component is too large")
    return int(digits.lstrip("0") or "0"), end


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _compare_version(host: str, operator: str, wanted: str) -> bool:
    """``dsl_compare_version(host, op, wanted)``, step by step."""
    if not set(host) <= _VERSION_CHARS:
        raise _Invalid(f"host version {host!r} is not made of digits and dots")
    if not set(wanted) <= _VERSION_CHARS:
        raise _Invalid(f"version {wanted!r} is not made of digits and dots")
    i = j = 0
    while i < len(host) and j < len(wanted):
        n1, i = _strtoumax(host, i)
        n2, j = _strtoumax(wanted, j)
        if n1 != n2:
            if operator == "=":
                return False
            if operator == "!=":
                return True
            if operator in ("<", "<="):
                return n1 < n2
            return n1 > n2
        i = _skip(host, i, ".")
        j = _skip(wanted, j, ".")
    host_rest = _skip(host, i, ".0") < len(host)
    wanted_rest = _skip(wanted, j, ".0") < len(wanted)
    if operator == "!=":
        return host_rest or wanted_rest
    if operator in ("=", "<=", ">=") and not host_rest and not wanted_rest:
        return True
    if operator == "=":
        return False
    if operator in ("<", "<="):
        return not host_rest and wanted_rest
    return host_rest and not wanted_rest


def _fact(facts: HostFacts, name: str) -> str | None:
    if name == "cuda":
        return facts.cuda
    if name == "driver":
        return facts.driver
    if name == "arch":
        return facts.arch
    return facts.brand


def _evaluate_term(term: Term, facts: HostFacts) -> bool:
    """``evaluate_rule``: True/False, or :class:`_Invalid` where it returns -1."""
    if term.error is not None:
        raise _Invalid(term.error)
    fact = _fact(facts, term.name)
    if fact is None:
        if term.name in facts.unknown:
            raise _UnknownFact(term.name)
        return True
    if term.name == "brand":
        if term.operator not in ("=", "!="):
            raise _Invalid(term.value_error or "brand takes only = or !=")
        equal = fact.translate(_ASCII_FOLD) == term.value.translate(_ASCII_FOLD)
        result = equal if term.operator == "=" else not equal
    else:
        result = _compare_version(fact, term.operator, term.value)
    if not result:
        formatted = f"{term.key} {term.operator} {term.value}"
        if len(formatted.encode("utf-8", "surrogatepass")) >= _EXPR_MAX:
            raise _Invalid(f"the unsatisfied term is too long to report ({_EXPR_MAX - 1} bytes at most)")
    return result


def check_requirement(expr: str, facts: HostFacts) -> None:
    """``dsl_evaluate`` of one requirement value; raises :class:`RequirementError`."""
    if len(expr) <= _CACHE_MAX_CHARS:
        problem = _outcome(expr, facts)
    else:
        problem = _evaluate(expr, facts, _alternatives(expr))
    if problem is not None:
        raise RequirementError(problem)


@functools.lru_cache(maxsize=512)
def _outcome(expr: str, facts: HostFacts) -> str | None:
    """:func:`_evaluate` of a short ``expr``, cached: a node sees few distinct (requirement,
    device) pairs."""
    if "\x00" in expr:
        return _nul_message(expr)
    return _evaluate(expr, facts, _compile(expr).alternatives)


def _evaluate(expr: str, facts: HostFacts, alternatives: Iterable[Iterable[Term]]) -> str | None:
    """The error message of evaluating ``expr`` against ``facts`` (``None``: satisfied).

    A term on a fact discovery could not read (``facts.unknown``) leaves its alternative
    undetermined: the other alternatives are still evaluated, and only when none holds does the
    requirement fail -- with the unknown-fact message if an undetermined one might have held."""
    if "\x00" in expr:
        return _nul_message(expr)
    result = True
    undetermined: Term | None = None
    for alternative in alternatives:
        unknown_here: Term | None = None
        for term in alternative:
            try:
                result = _evaluate_term(term, facts)
            except _Invalid as exc:
                return _invalid_message(term.text, expr, str(exc))
            except _UnknownFact:
                unknown_here = unknown_here or term
                result = True  # undetermined: look at the other terms of this alternative
                continue
            if not result:
                break
        else:
            if unknown_here is None:
                break  # every term held (or there were none): the OR is decided
            undetermined = undetermined or unknown_here
            result = False
    if result:
        return None
    if undetermined is not None:
        return (
            f"cannot check the requirement term {undetermined.text!r}: it needs the "
            f"{FACT_DESCRIPTIONS[undetermined.name]}, which driver discovery could not read on this node "
            "(NVML unavailable; `nvidia-nri-plugin info` shows where the device facts came from); fix "
            "NVML on the node, or set NVIDIA_DISABLE_REQUIRE=true to skip the requirements"
        )
    reported = expr.split(" ", 1)[0]  # Requirement.reported
    hint = _CUDA_HINT if reported.startswith(_CUDA_REQUIRE_GREATER) else ""
    return f"unsatisfied condition: {reported}{hint}"


def check_requirements(requirements: Sequence[str], facts: HostFacts) -> None:
    """All requirements must hold (AND), checked in the given order like the CLI's
    ``--require`` list; more than :data:`MAX_REQUIREMENTS` is an error as in the CLI."""
    if len(requirements) > MAX_REQUIREMENTS:
        raise RequirementError(
            f"too many requirements: {len(requirements)} NVIDIA_REQUIRE_* values (nvidia-container-cli "
            f"accepts at most {MAX_REQUIREMENTS}); merge or drop some of them"
        )
    for index, requirement in enumerate(requirements):
        size = len(requirement.encode("utf-8", "surrogatepass"))
        if size >= MAX_REQUIREMENT_BYTES:
            error = RequirementError(
                f"an NVIDIA_REQUIRE_* value of {size} bytes is longer than Linux "
                f"accepts for one argument or environment string ({MAX_REQUIREMENT_BYTES - 1} bytes, "
                "MAX_ARG_STRLEN), so neither nvidia-container-cli nor the container could use it; "
                "shorten the requirement"
            )
            error.index = index
            raise error
        try:
            check_requirement(requirement, facts)
        except RequirementError as exc:
            exc.index = index
            exc.unmet = str(exc).startswith("unsatisfied condition")
            raise
