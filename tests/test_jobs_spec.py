"""Job spec and status models: what is refused, and that the refusal says why."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from qrad_agent.jobs.settings import JobsConfig
from qrad_agent.jobs.spec import (
    MAX_ARGV,
    MAX_ENV,
    MAX_INPUT_BYTES,
    MAX_INPUTS,
    MAX_OUTPUTS,
    JobSpec,
    JobState,
    JobStatus,
    Priority,
    SpecError,
    WorkAssignment,
    WorkRequestMessage,
    parse_spec,
    salvage_key,
)


def spec(**kw: Any) -> dict[str, Any]:
    return {"job": "j-1", "argv": ["python3", "-c", "print(1)"], **kw}


def refused(why: str, **kw: Any) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(spec(**kw))
    assert why in str(exc.value), str(exc.value)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_minimal_spec_gets_safe_defaults() -> None:
    s = parse_spec(spec())
    assert (s.attempt, s.priority, s.cores, s.idempotent) == (1, Priority.LOW, 1, False)
    assert s.env == {} and s.inputs == [] and s.outputs == []
    assert s.key == ("j-1", 1)


def test_round_trip_through_json_is_exact() -> None:
    s = parse_spec(spec(priority="high", env={"SEED": "7"}, cores=2, memory_mb=128,
                        timeout_s=60, lease_s=30, outputs=["out/result.txt"], idempotent=True,
                        inputs=[{"path": "in/data.bin", "data": b64(b"\x00\x01"),
                                 "executable": True}]))
    again = parse_spec(s.to_json())
    assert again == s and again.inputs[0].content() == b"\x00\x01"


def test_argv_is_a_list_never_a_shell_string() -> None:
    refused("argv: Input should be a valid array", argv="rm -rf /")
    refused("argv: List should have at least 1 item", argv=[])
    refused("argv[0] must name the program", argv=["  "])
    refused("argv[1] holds a NUL byte", argv=["x", "a\0b"])
    refused(f"at most {MAX_ARGV} items", argv=["x"] * (MAX_ARGV + 1))
    refused("argv is longer than", argv=["x"] + ["y" * 4000] * 20)


def test_environment_names_and_bounds() -> None:
    refused("environment name '1X'", env={"1X": "v"})
    refused("environment name 'A-B'", env={"A-B": "v"})
    refused("NUL byte", env={"A": "a\0"})
    refused(f"at most {MAX_ENV} items", env={f"V{i}": "" for i in range(MAX_ENV + 1)})
    refused("env.A: Input should be a valid string", env={"A": 1})


def test_resources_are_bounded_and_typed_strictly() -> None:
    refused("cores: Input should be greater than or equal to 1", cores=0)
    refused("memory_mb: Input should be greater than or equal to 16", memory_mb=8)
    refused("timeout_s: Input should be greater than 0", timeout_s=0)
    refused("lease_s: Input should be greater than or equal to 5", lease_s=1)
    refused("cores: Input should be a valid integer", cores="2")  # no silent coercion
    refused("priority: Input should be 'high', 'low' or 'background'", priority="urgent")
    refused("shell: unknown field", shell=True)
    refused("job: String should match pattern", job="../etc")
    refused("attempt: Input should be greater than or equal to 1", attempt=0)


def test_inline_inputs_are_bounded_in_count_and_bytes() -> None:
    refused("not base64", inputs=[{"path": "a", "data": "!!"}])
    refused(f"at most {MAX_INPUTS} items",
            inputs=[{"path": f"f{i}", "data": ""} for i in range(MAX_INPUTS + 1)])
    half = b64(b"x" * (MAX_INPUT_BYTES // 2 + 1))
    refused(f"at most {MAX_INPUT_BYTES} are allowed",
            inputs=[{"path": "a", "data": half}, {"path": "b", "data": half}])
    refused("input paths must be unique", inputs=[{"path": "a", "data": ""}] * 2)
    refused("'a' is a file but 'a/b' needs it as a directory",
            inputs=[{"path": "a", "data": ""}, {"path": "a/b", "data": ""}])


@pytest.mark.parametrize("path,why", [
    ("/etc/passwd", "is absolute"),
    ("../up", "must be normalised"),
    ("a/../../b", "must be normalised"),
    ("a//b", "must be normalised"),
    ("./a", "must be normalised"),
    ("dir/", "must be normalised"),
    ("a\\b", "backslash"),
    ("-rf", "starting with '-'"),
    ("/".join("d" * 9), "deeper than"),
])
def test_paths_stay_inside_the_work_directory(path: str, why: str) -> None:
    refused(why, outputs=[path])
    refused(why, inputs=[{"path": path, "data": ""}])


def test_outputs_are_bounded_and_unique() -> None:
    refused(f"at most {MAX_OUTPUTS} items", outputs=[f"o{i}" for i in range(MAX_OUTPUTS + 1)])
    refused("output paths must be unique", outputs=["o", "o"])


def test_not_json_is_refused_with_a_reason() -> None:
    with pytest.raises(SpecError, match="Invalid JSON"):
        parse_spec(b"{not json")
    with pytest.raises(SpecError, match="Input should be an object"):
        parse_spec(b"[1, 2]")


def test_the_key_of_a_broken_spec_can_still_be_read_to_refuse_it() -> None:
    assert salvage_key({"job": "x", "attempt": 3, "argv": "sh -c evil"}) == ("x", 3)
    assert salvage_key(json.dumps({"job": "x"})) == ("x", 1)
    assert salvage_key({"job": "../x"}) is None
    assert salvage_key(b"garbage") is None
    assert salvage_key({"job": "x", "attempt": "2"}) is None


def test_status_rules() -> None:
    base: dict[str, Any] = {"node": "n1", "job": "j", "attempt": 1, "at": 1.0}
    with pytest.raises(ValueError, match="a failed status needs a reason"):
        JobStatus(state=JobState.FAILED, **base)
    with pytest.raises(ValueError, match="only 0 is success"):
        JobStatus(state=JobState.SUCCEEDED, exit_code=3, **base)
    with pytest.raises(ValueError, match="should have at most 8192 characters"):
        JobStatus.model_validate_json(json.dumps({
            **base, "state": "succeeded",
            "output": {"bytes": 1, "sha256": "0" * 64, "tail": "x" * 9000, "truncated": True}}))
    ok = JobStatus(state=JobState.RETURNED, reason="no_heat", **base)
    assert JobStatus.model_validate_json(ok.to_json()) == ok
    assert JobState.RETURNED.terminal and not JobState.SUSPENDED.terminal


def test_work_messages() -> None:
    req = WorkRequestMessage(node="n1", id="n1:1", at=10.0, expires_at=70.0, free_slots=2,
                             heat_budget_w=240.0, horizon_s=3600.0, max_cores=2,
                             max_memory_mb=2048, max_timeout_s=3600.0)
    assert WorkRequestMessage.model_validate_json(req.to_json()) == req
    with pytest.raises(ValueError, match="must be after"):
        WorkRequestMessage(**{**req.model_dump(), "expires_at": 5.0})
    assign = WorkAssignment.model_validate_json(json.dumps(
        {"request": "n1:1", "jobs": [spec()], "retry_after_s": None}))
    assert assign.jobs[0] == parse_spec(spec())
    with pytest.raises(ValueError, match="argv"):
        WorkAssignment.model_validate_json(json.dumps({"jobs": [spec(argv="ls")]}))


def test_config_allowlists_must_be_absolute_and_never_root() -> None:
    with pytest.raises(ValueError, match="must be an absolute path pattern"):
        JobsConfig(allow=["python3"])
    with pytest.raises(ValueError, match=r"without '\.\.'"):
        JobsConfig(allow=["/opt/../bin/sh"])
    with pytest.raises(ValueError, match="never root"):
        JobsConfig(user="root")
    with pytest.raises(ValueError, match="set by the sandbox itself"):
        JobsConfig(env_allow=["PATH"])
    with pytest.raises(ValueError, match="filler_command"):
        JobsConfig(filler="command")
    assert JobsConfig().allow == []  # nothing runs until the operator says what may


def test_spec_type_is_frozen() -> None:
    s = parse_spec(spec())
    with pytest.raises(ValueError):
        s.cores = 4
    assert isinstance(s, JobSpec)
