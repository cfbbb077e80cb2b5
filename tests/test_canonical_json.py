"""JCS strings (RFC 8785, section 3.2.2.2) written by the fast encoder match the rule itself."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qrad_agent.link.security import canonical_json

NAMED = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"',
         "\\": "\\\\"}


def jcs_string(s: str) -> str:
    """The rule, one character at a time: the named escapes, other controls as \\u00xx in
    lowercase hex, everything else (DEL, U+2028, astral characters) as itself."""
    return '"' + "".join(NAMED.get(c) or (f"\\u{ord(c):04x}" if c < " " else c)
                         for c in s) + '"'


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"])))
def test_strings_are_escaped_as_jcs_prescribes(s: str) -> None:
    assert canonical_json(s) == jcs_string(s).encode("utf-8")
    assert canonical_json({s: [s]}) == f"{{{jcs_string(s)}:[{jcs_string(s)}]}}".encode()


def test_every_control_character_and_the_ones_left_alone() -> None:
    every = "".join(chr(c) for c in range(0x20)) + "\x7f\u2028\u2029é😀"
    assert canonical_json(every) == jcs_string(every).encode("utf-8")
    assert canonical_json("\x1f") == b'"\\u001f"'
