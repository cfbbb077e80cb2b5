"""The config loader against generated input: every document is either a valid config or a
ConfigError whose every line names a key path; nothing else escapes, nothing crashes."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qrad_agent.config import AgentConfig, ConfigError, load_config, parse_config

SECTIONS = sorted(AgentConfig.model_fields)


def section_keys(name: str) -> list[str]:
    annotation = AgentConfig.model_fields[name].annotation
    fields = getattr(annotation, "model_fields", None)
    return sorted(fields) if fields else []


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=5, unique=True)):
        keys = section_keys(name) if name in SECTIONS else []
        chosen = draw(st.lists(st.sampled_from([*keys, "nope"]), max_size=4, unique=True))
        doc[name] = {k: draw(values) for k in chosen} if draw(st.booleans()) else draw(values)
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_document_is_a_config_or_a_named_error(doc: dict[str, Any]) -> None:
    try:
        cfg = parse_config(doc, "fuzz.toml")
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            key, _, why = line.partition(": ")
            assert key and why, line  # "<key path>: <what is wrong>"
    else:
        assert isinstance(cfg, AgentConfig)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
@example(b"\x80")  # not UTF-8: once a traceback
@example(b"\r")  # a lone CR: TOML refuses it, universal newlines make it a line end
@example(b"[pid]\nkp = 1e999\n")
def test_any_bytes_in_the_file_are_refused_cleanly(tmp_path_factory: Any, data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "agent.toml"
    path.write_bytes(data)
    try:
        # read as the loader reads (universal newlines: a lone CR is a line end there)
        text = path.read_text(encoding="utf-8")
        tomllib.loads(text)
        parsed_ok = True
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        parsed_ok = False
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.source == str(path) and exc.problems
    else:
        assert parsed_ok
