"""The NVIDIA_REQUIRE_* language.  Expected outcomes follow libnvidia-container's dsl.c; the
implementation was also compared with dsl.c compiled from source on ~90k random predicates."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.errors import RequirementError
from nri_plugin.request.requirements import (
    MAX_REQUIREMENTS,
    HostFacts,
    check_requirement,
    check_requirements,
    parse_requirement,
)

HINT = ", please update your driver to a newer version, or use an earlier cuda container"

# The value of NVIDIA_REQUIRE_CUDA in nvidia/cuda:12.4.1 images.
CUDA_12_4 = (
    "cuda>=12.4 brand=tesla,driver>=470,driver<471 brand=unknown,driver>=470,driver<471 "
    "brand=nvidia,driver>=470,driver<471 brand=nvidiartx,driver>=470,driver<471 "
    "brand=geforce,driver>=470,driver<471 brand=geforcertx,driver>=470,driver<471 "
    "brand=quadro,driver>=470,driver<471 brand=quadrortx,driver>=470,driver<471 "
    "brand=titan,driver>=470,driver<471 brand=titanrtx,driver>=470,driver<471 "
    "brand=tesla,driver>=525,driver<526 brand=unknown,driver>=525,driver<526 "
    "brand=nvidia,driver>=525,driver<526 brand=nvidiartx,driver>=525,driver<526 "
    "brand=geforce,driver>=525,driver<526 brand=geforcertx,driver>=525,driver<526 "
    "brand=quadro,driver>=525,driver<526 brand=quadrortx,driver>=525,driver<526 "
    "brand=titan,driver>=525,driver<526 brand=titanrtx,driver>=525,driver<526 "
    "brand=tesla,driver>=535,driver<536 brand=unknown,driver>=535,driver<536 "
    "brand=nvidia,driver>=535,driver<536 brand=nvidiartx,driver>=535,driver<536 "
    "brand=geforce,driver>=535,driver<536 brand=geforcertx,driver>=535,driver<536 "
    "brand=quadro,driver>=535,driver<536 brand=quadrortx,driver>=535,driver<536 "
    "brand=titan,driver>=535,driver<536 brand=titanrtx,driver>=535,driver<536"
)
CUDA_11_8 = (
    "cuda>=11.8 brand=tesla,driver>=450,driver<451 brand=tesla,driver>=470,driver<471 "
    "brand=unknown,driver>=470,driver<471 brand=nvidia,driver>=470,driver<471 "
    "brand=nvidiartx,driver>=470,driver<471 brand=geforce,driver>=470,driver<471 "
    "brand=geforcertx,driver>=470,driver<471 brand=quadro,driver>=470,driver<471 "
    "brand=quadrortx,driver>=470,driver<471 brand=titan,driver>=470,driver<471 "
    "brand=titanrtx,driver>=470,driver<471 brand=tesla,driver>=510,driver<511 "
    "brand=unknown,driver>=510,driver<511"
)


def facts(
    cuda: str | None = None, driver: str | None = None, arch: str | None = None, brand: str | None = None
) -> HostFacts:
    return HostFacts(cuda=cuda, driver=driver, arch=arch, brand=brand)


def holds(expr: str, f: HostFacts) -> bool:
    try:
        check_requirement(expr, f)
    except RequirementError as exc:
        assert str(exc).startswith("unsatisfied condition: "), str(exc)
        return False
    return True


# ------------------------------------------------------------------------------------------
# CUDA image strings
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        (facts("12.4", "550.54.14", "9.0", "Tesla"), True),  # new enough CUDA
        (facts("12.6", "560.28.03", "8.9", "GeForce"), True),
        (facts("12.2", "535.104.05", "8.0", "Tesla"), True),  # forward compat, 535 branch
        (facts("12.0", "525.60.13", "7.5", "GeForce"), True),  # forward compat, 525 branch
        (facts("11.4", "470.57.02", "8.6", "Quadro"), True),  # forward compat, 470 branch
        (facts("11.4", "470.57.02", "8.6", "NVS"), False),  # brand not listed
        (facts("12.2", "536.0", "8.0", "Tesla"), False),  # driver<536 fails
        (facts("12.1", "530.30.02", "8.0", "Tesla"), False),  # no branch for 530
        (facts("12.2", "535.104.05", None, None), True),  # no device: brand terms are true
        (facts(None, None, None, None), True),
    ],
)
def test_cuda_12_4_image_requirement(host: HostFacts, ok: bool) -> None:
    if ok:
        check_requirement(CUDA_12_4, host)
    else:
        with pytest.raises(RequirementError) as info:
            check_requirement(CUDA_12_4, host)
        assert str(info.value) == "unsatisfied condition: cuda>=12.4" + HINT


def test_cuda_11_8_image_requirement() -> None:
    check_requirement(CUDA_11_8, facts("11.8", "520.61.05", "8.0", "Tesla"))
    check_requirement(CUDA_11_8, facts("11.0", "450.80.02", "7.0", "TESLA"))
    with pytest.raises(RequirementError, match=r"^unsatisfied condition: cuda>=11\.8, please update"):
        check_requirement(CUDA_11_8, facts("11.0", "450.80.02", "7.0", "GeForce"))


def test_cuda_image_string_parses_strictly() -> None:
    requirement = parse_requirement(CUDA_12_4)
    assert len(requirement.alternatives) == 31
    assert [t.text for t in requirement.alternatives[1]] == ["brand=tesla", "driver>=470", "driver<471"]
    assert requirement.reported == "cuda>=12.4"
    assert parse_requirement(CUDA_12_4) is requirement  # parsed once, cached


# ------------------------------------------------------------------------------------------
# Operators and version comparison
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "op", "wanted", "expected"),
    [
        ("12.4", "=", "12.4", True),
        ("12.4", "=", "12.4.0", True),
        ("12.4", "=", "12.04", True),
        ("12.4", "=", "12.5", False),
        ("12", "=", "12.0.0", True),
        ("12.0.1", "=", "12", False),
        ("12.4", "!=", "12.4", False),
        ("12.4", "!=", "12.40", True),
        ("12", "!=", "12.0", False),
        ("12.4", "<", "12.5", True),
        ("12.4", "<", "12.4", False),
        ("12.4", "<", "12.4.1", True),
        ("12.10", "<", "12.9", False),
        ("12.4.0", "<", "12.4", False),
        ("12.4", "<=", "12.4", True),
        ("12.4", "<=", "12.3", False),
        ("12.4", "<=", "12.4.0.0", True),
        ("12.4", ">", "12.3", True),
        ("12.4", ">", "12.4", False),
        ("12.4.1", ">", "12.4", True),
        ("12.10", ">", "12.9", True),
        ("470.57.02", ">", "470.57.1", True),
        ("12.4", ">=", "12.4", True),
        ("12.4", ">=", "12.5", False),
        ("550.54.14", ">=", "470", True),
        ("12.0.10", ">=", "12", True),
        ("", "=", "0", True),
        ("1..2", "=", "1.2", True),
    ],
)
def test_version_operators(host: str, op: str, wanted: str, expected: bool) -> None:
    for key in ("cuda", "driver", "arch"):
        assert holds(f"{key}{op}{wanted}", facts(**{key: host})) is expected


@pytest.mark.parametrize(
    ("expr", "brand", "expected"),
    [
        ("brand=tesla", "Tesla", True),
        ("brand=TESLA", "tesla", True),
        ("brand=tesla", "GeForce", False),
        ("brand!=tesla", "Tesla", False),
        ("brand!=tesla", "GeForce", True),
        ("BRAND=Quadro", "quadro", True),
        ("brand=é", "É", False),  # ASCII case folding only
    ],
)
def test_brand_operators(expr: str, brand: str, expected: bool) -> None:
    assert holds(expr, facts(brand=brand)) is expected


def test_lone_bang_means_not_equal() -> None:
    # dsl.c matches the operator run with strncmp over its own length: "!" selects "!=".
    assert holds("brand!tesla", facts(brand="GeForce")) is True
    assert holds("cuda!12.4", facts(cuda="12.4")) is False


def test_keys_are_case_insensitive() -> None:
    assert holds("CUDA>=12", facts(cuda="12.4")) is True
    assert holds("Driver<400", facts(driver="550.1")) is False


# ------------------------------------------------------------------------------------------
# Grammar
# ------------------------------------------------------------------------------------------


def test_space_is_or_comma_is_and() -> None:
    f = facts(cuda="11.0", driver="450.80", brand="Tesla")
    assert holds("cuda>=12 brand=tesla,driver>=450", f) is True
    assert holds("cuda>=12 brand=tesla,driver>=460", f) is False
    assert holds("cuda>=11,driver>=450", f) is True
    assert holds("cuda>=11,driver>=451", f) is False


def test_empty_tokens_are_ignored() -> None:
    f = facts(cuda="11.0")
    assert holds("", f) is True
    assert holds("   ", f) is True
    assert holds("  cuda>=11  ", f) is True
    assert holds(",,cuda>=11,,", f) is True
    assert holds("cuda>=12  cuda>=11", f) is True


def test_comma_only_alternative_ends_the_or_without_resetting_the_result() -> None:
    # dsl.c: an alternative made only of commas breaks the OR loop with the previous result.
    f = facts(cuda="11.0")
    assert holds(",", f) is True
    assert holds("cuda>=12 ,", f) is False
    assert holds("cuda>=12 , cuda>=11", f) is False  # never reaches the satisfiable alternative
    assert holds("cuda>=11 ,", f) is True


def test_separate_requirements_are_anded() -> None:
    f = facts(cuda="12.4", driver="550.54.14", arch="8.0", brand="Tesla")
    check_requirements(["cuda>=12", "arch>=8.0", "brand=tesla"], f)
    with pytest.raises(RequirementError, match=r"^unsatisfied condition: arch>=9\.0$"):
        check_requirements(["cuda>=12", "arch>=9.0", "brand=geforce"], f)
    check_requirements([], f)


def test_too_many_requirements() -> None:
    check_requirements(["cuda>=1"] * MAX_REQUIREMENTS, facts())
    with pytest.raises(RequirementError, match=r"^too many requirements: 33 "):
        check_requirements(["cuda>=1"] * (MAX_REQUIREMENTS + 1), facts())


# ------------------------------------------------------------------------------------------
# Unknown facts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["cuda>=99", "driver<1", "arch=1.0", "brand=nvs", "cuda>=abc", "brand<x"])
def test_unknown_fact_makes_term_true_without_checking_value(expr: str) -> None:
    check_requirement(expr, facts())


def test_known_fact_checks_value() -> None:
    with pytest.raises(RequirementError, match=r"^invalid expression: 'cuda>=abc'"):
        check_requirement("cuda>=abc", facts(cuda="12.0"))
    with pytest.raises(RequirementError, match=r"^invalid expression: 'brand<x'"):
        check_requirement("brand<x", facts(brand="Tesla"))


# ------------------------------------------------------------------------------------------
# Invalid expressions
# ------------------------------------------------------------------------------------------

INVALID = [
    "gpu>=1",
    "cud>=1",
    "cuda",
    ">=1",
    "=tesla",
    "cuda>=",
    "cuda==12",
    "cuda=>12",
    "cuda<>12",
    "cuda!==1",
    "cuda>=1a",
    "cuda>=.5",
    "cuda>=-1",
    "driver>=18446744073709551615",
    "brand>tesla",
    "arch>=8,0x",
]


@pytest.mark.parametrize("expr", INVALID)
def test_invalid_expression(expr: str) -> None:
    f = facts(cuda="12.4", driver="550.54.14", arch="8.0", brand="Tesla")
    with pytest.raises(RequirementError) as info:
        check_requirement(expr, f)
    message = str(info.value)
    assert message.startswith("invalid expression: ")
    assert expr in message  # names the requirement at fault
    with pytest.raises(RequirementError, match=r"^invalid expression: "):
        parse_requirement(expr)


def test_invalid_terms_are_only_found_when_evaluated() -> None:
    f = facts(cuda="12.4", brand="Tesla")
    assert holds("cuda>=12 bogus", f) is True  # OR already decided
    assert holds("brand=geforce,bogus", f) is False  # AND already decided
    with pytest.raises(RequirementError, match="invalid expression"):
        check_requirement("cuda>=13 bogus", f)
    with pytest.raises(RequirementError, match="invalid expression"):
        parse_requirement("cuda>=12 bogus")  # the strict parser looks at everything


def test_false_term_too_long_to_report_is_invalid() -> None:
    # dsl.c formats "<key> <op> <value>" into 128 bytes; a false term that does not fit fails.
    fits = "driver>=" + "9" * 15 + "." * 102  # "driver >= " + 117 = 127 bytes + NUL = 128
    too_long = "driver>=" + "9" * 15 + "." * 103  # 128 bytes + NUL does not fit
    f = facts(driver="1")
    assert holds(fits, f) is False
    with pytest.raises(RequirementError, match="invalid expression"):
        check_requirement(too_long, f)
    assert holds(too_long.replace(">=", "<="), f) is True  # a true term is never formatted


def test_nul_character_is_invalid() -> None:
    with pytest.raises(RequirementError, match="NUL"):
        check_requirement("cuda>=1\x00", facts())
    with pytest.raises(RequirementError, match="NUL"):
        parse_requirement("cuda>=1\x00")


# ------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("cuda>=13", "unsatisfied condition: cuda>=13" + HINT),
        ("cuda>=13,driver>=1", "unsatisfied condition: cuda>=13,driver>=1" + HINT),
        ("driver>=999 cuda>=13", "unsatisfied condition: driver>=999"),
        # the first alternative is quoted even when a later one failed last
        ("cuda>=1,arch>=9 brand=geforce", "unsatisfied condition: cuda>=1,arch>=9" + HINT),
        ("cuda>13", "unsatisfied condition: cuda>13"),
        ("CUDA>=13", "unsatisfied condition: CUDA>=13"),
        (" cuda>=13", "unsatisfied condition: "),
    ],
)
def test_unsatisfied_message(expr: str, message: str) -> None:
    with pytest.raises(RequirementError) as info:
        check_requirement(expr, facts(cuda="12.4", driver="550.54.14", arch="8.0", brand="Tesla"))
    assert str(info.value) == message


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

COMPONENTS = st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=4)


def _numeric(parts: list[int]) -> tuple[int, ...]:
    trimmed = list(parts)
    while trimmed and trimmed[-1] == 0:
        trimmed.pop()
    return tuple(trimmed)


@settings(max_examples=300, deadline=None)
@given(host=COMPONENTS, wanted=COMPONENTS, op=st.sampled_from(["=", "!=", "<", "<=", ">", ">="]))
def test_version_comparison_is_numeric(host: list[int], wanted: list[int], op: str) -> None:
    a, b = _numeric(host), _numeric(wanted)
    # pad to the same length for Python's tuple comparison
    width = max(len(a), len(b))
    a += (0,) * (width - len(a))
    b += (0,) * (width - len(b))
    expected = {"=": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    expr = f"driver{op}{'.'.join(map(str, wanted))}"
    assert holds(expr, facts(driver=".".join(map(str, host)))) is expected


TOKENS = st.sampled_from(
    [
        "cuda",
        "driver",
        "arch",
        "brand",
        "CUDA",
        "x",
        "=",
        "!=",
        "<",
        "<=",
        ">",
        ">=",
        "!",
        "12",
        "12.4",
        ".",
        "470",
        "tesla",
        ",",
        " ",
        "  ",
        "0",
        "é",
        "-",
    ]
)


@settings(max_examples=500, deadline=None)
@given(
    expr=st.lists(TOKENS, max_size=12).map("".join) | st.text(max_size=20),
    cuda=st.sampled_from([None, "12.4", "11.0"]),
    brand=st.sampled_from([None, "Tesla", "GeForce"]),
)
def test_only_requirement_errors_escape(expr: str, cuda: str | None, brand: str | None) -> None:
    try:
        check_requirement(expr, facts(cuda=cuda, driver="550.54.14", arch="8.0", brand=brand))
    except RequirementError as exc:
        assert str(exc).startswith(("unsatisfied condition: ", "invalid expression: "))
    try:
        parse_requirement(expr)
    except RequirementError as exc:
        assert str(exc).startswith("invalid expression: ")


def test_every_operator_in_cuda_image_alternatives() -> None:
    ops = ["=", "!=", "<", "<=", ">", ">="]
    for op1, op2 in itertools.product(ops, ops):
        expr = f"cuda{op1}12.4 brand=tesla,driver{op2}470"
        requirement = parse_requirement(expr)
        assert [t.operator for alt in requirement.alternatives for t in alt] == [op1, "=", op2]


def test_huge_version_components_are_strtoumax_not_python_int() -> None:
    """strtoumax takes any number of leading zeros and saturates (-> invalid expression) on
    overflow; Python's int() refuses strings over 4300 digits with ValueError instead."""
    zeros = "0" * 5000
    host = facts(cuda="12.4", driver="550.54.14")
    check_requirement(f"cuda>={zeros}12.{zeros}4", host)
    parse_requirement(f"cuda>={zeros}12.{zeros}4")
    with pytest.raises(RequirementError, match=r"^invalid expression: "):
        check_requirement(f"cuda>={zeros}12.{zeros}5", host)  # false, and too long to report
    huge = "1" * 5000
    for expr in (f"cuda>={huge}", f"driver<12.{huge}", f"cuda>=12.4,driver={huge}.1"):
        with pytest.raises(RequirementError, match=r"^invalid expression: "):
            check_requirement(expr, host)
        with pytest.raises(RequirementError, match=r"^invalid expression: "):
            parse_requirement(expr)
    # Never evaluated (the first alternative holds), so never invalid -- as in dsl.c.
    check_requirement(f"cuda>=12 cuda>={huge}", host)


def test_long_requirement_values_are_not_cached_and_are_evaluated_lazily() -> None:
    """The caches are keyed by container-controlled strings: a multi-megabyte value parsed and
    kept in a 4096-entry cache costs tens of MB per container.  Long values bypass the caches,
    and, like dsl.c, are parsed only as far as the evaluation goes."""
    from nri_plugin.request import requirements as req

    host = facts(cuda="12.4", driver="550.54.14", arch="9.0", brand="Tesla")
    tail = ",".join(["driver>=1"] * 50_000)
    before = (req._compile.cache_info().currsize, req._outcome.cache_info().currsize)
    check_requirement("cuda>=12 " + tail, host)  # satisfied by the first alternative
    check_requirement("cuda>=99 " + tail, host)  # satisfied by the second
    with pytest.raises(RequirementError) as info:
        check_requirement("cuda>=99 " + tail + ",driver<1", host)
    assert str(info.value) == "unsatisfied condition: cuda>=99" + HINT
    with pytest.raises(RequirementError, match=r"^invalid expression: 'bogus=1'"):
        check_requirement("cuda>=99 " + tail + ",bogus=1", host)
    with pytest.raises(RequirementError, match=r"^invalid expression: 'bogus=1'"):
        parse_requirement(tail + ",bogus=1")
    after = (req._compile.cache_info().currsize, req._outcome.cache_info().currsize)
    assert after == before
    # Short values (every real CUDA image string) are still cached.
    req._outcome.cache_clear()
    check_requirement(CUDA_12_4, host)
    assert req._outcome.cache_info().currsize == 1


def test_requirement_longer_than_max_arg_strlen_is_refused_before_evaluation() -> None:
    """A value the hook could never have passed to nvidia-container-cli (E2BIG) is refused with a
    clear error instead of being evaluated on the event loop."""
    from nri_plugin.request.requirements import MAX_REQUIREMENT_BYTES, check_requirements

    host = facts(cuda="12.4", driver="550.54.14", arch="9.0", brand="Tesla")
    just_fits = "cuda>=12 " + "x" * (MAX_REQUIREMENT_BYTES - 1 - len("cuda>=12 "))
    check_requirements([just_fits], host)  # satisfied by the first alternative, tail never parsed
    too_long = just_fits + "x"
    with pytest.raises(RequirementError, match=rf"value of {MAX_REQUIREMENT_BYTES} bytes .* MAX_ARG_STRLEN"):
        check_requirements([too_long], host)
