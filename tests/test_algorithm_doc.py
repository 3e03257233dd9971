"""docs/ALGORITHM.md's appendix stays equal to the header it describes: every floating-point
constant of kernels/initserve_math.h appears there as a hex float of the same value, each named
constant under its name, the AS241 coefficients in the header's order, and the Philox
known-answer vectors as in tests/reference."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADER = (REPO / "service/initserve/kernels/initserve_math.h").read_text()
CODE = re.sub(r"/\*.*?\*/", "", HEADER, flags=re.S)  # literals in comments are not constants
DOC = (REPO / "docs/ALGORITHM.md").read_text()
APPENDIX = DOC[DOC.index("## Appendix A.") :]

HEX_FLOAT = r"-?0x[0-9a-f]\.[0-9a-f]+p[+-]\d+"
AS241_MACROS = tuple(
    f"IS_AS241_{part}_{side}" for part in ("CENTRAL", "TAIL", "FAR") for side in "AB"
)


def named_constants() -> dict[str, float]:
    named: dict[str, float] = {}
    for declaration in re.findall(r"const double (\w+\s*=[^;]+);", CODE):
        for part in declaration.split(","):
            name, value = part.split("=")
            named.setdefault(name.strip(), float(value))
    return named


def as241_coefficients() -> list[float]:
    """The coefficients as the header writes them: the A and B macros of the central, tail and
    far-tail approximations, in that order (the scalar, vector and CUDA kernels all expand them)."""
    coefficients = []
    for macro in AS241_MACROS:
        start = CODE.index(f"#define {macro}(")
        body = CODE[start : _macro_end(start)]
        coefficients += [float(x) for x in re.findall(r"\d+\.\d+e[+-]\d+", body)]
    return coefficients


def _macro_end(start: int) -> int:
    """Where the #define starting at ``start`` ends: its first line without a continuation."""
    end = CODE.index("\n", start)
    while CODE[end - 1] == "\\":
        end = CODE.index("\n", end + 1)
    return end


def appendix_rows() -> dict[str, float]:
    """The appendix's `| `name` | `decimal` | `hex` |` rows, by name."""
    rows = re.findall(rf"^\| `(\w+)` \| `[^`]+` \| `({HEX_FLOAT})` \|$", APPENDIX, flags=re.M)
    return {name: float.fromhex(hex_value) for name, hex_value in rows}


def test_every_named_constant_is_in_the_appendix_with_its_value() -> None:
    rows = appendix_rows()
    named = named_constants()
    assert len(named) >= 29  # ln2, Lg1..7, P1..5, S1..6, C1..6, half_pi, inv_ln2, inv_sqrt_2pi
    for name, value in named.items():
        assert rows.get(name) == value, (name, value.hex(), rows.get(name))


def test_the_as241_coefficients_are_in_the_appendix_in_the_header_order() -> None:
    rows = appendix_rows()
    letters = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 0), ("f", 1)]
    written = [rows[f"{letter}{i}"] for letter, lowest in letters for i in range(7, lowest - 1, -1)]
    assert written == as241_coefficients()


def test_every_literal_of_the_header_appears_in_the_appendix_as_a_hex_float() -> None:
    literals = {abs(float(x)) for x in re.findall(r"(?<![\w.])(\d+\.\d*(?:e[+-]?\d+)?)", CODE)}
    in_appendix = {abs(float.fromhex(x)) for x in re.findall(HEX_FLOAT, APPENDIX)}
    in_appendix |= {0.0} if "`0x0.0p+0`" in APPENDIX else set()
    assert literals - in_appendix == set()


def test_the_philox_known_answers_are_written_in_the_document() -> None:
    reference = REPO / "tests/reference/philox4x32-10.kat"
    vectors = [
        line.split() for line in reference.read_text().splitlines() if line and line[0] != "#"
    ]
    assert len(vectors) == 3
    for vector in vectors:
        assert " ".join(vector) in " ".join(APPENDIX.split()), vector
