"""The files in systemd/ and scripts/install.sh: the unit passes `systemd-analyze verify`,
its exposure score is the one recorded in docs/operations.md, every sandboxing exception
says why, sysusers and tmpfiles do what they claim (applied under a scratch root), and the
installer is idempotent and keeps an existing config.

scripts/test installs systemd-analyze (Debian package systemd) where it is missing."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from qrad_agent.ops.settings import OpsConfig

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "qrad-agent.service"
EXEC = "/opt/qrad-agent/bin/qrad-agent"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/test installs it: apt-get install "
                    "systemd)")
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def stub_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a stub: verify checks that the binary exists,
    and /opt/qrad-agent is only there on an installed board."""
    stub = tmp_path / "qrad-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "qrad-agent.service"
    text = UNIT.read_text()
    assert EXEC in text
    unit.write_text(text.replace(EXEC, str(stub)))
    return unit


def test_unit_verifies_clean(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    res = subprocess.run([tool, "verify", "--man=no", str(stub_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_security_exposure_is_low_and_recorded_in_the_docs(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    res = subprocess.run([tool, "security", "--offline=true", str(stub_unit(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for qrad-agent\.service: (\d+\.\d)", res.stdout)
    assert m, res.stdout + res.stderr
    score = float(m.group(1))
    assert score <= 2.5, f"exposure {score}: something was loosened\n{res.stdout}"
    docs = (REPO / "docs" / "operations.md").read_text()
    recorded = re.search(r"exposure level (\d+\.\d)", docs)
    assert recorded, "docs/operations.md must record the measured exposure level"
    assert float(recorded.group(1)) == score, "update the score in docs/operations.md"


def test_unit_has_the_life_cycle_the_agent_implements() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"] and d["KillMode"] == ["mixed"]
    assert int(d["StartLimitBurst"][0]) > 1 and int(d["StartLimitIntervalSec"][0]) > 0
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"][0].startswith(EXEC + " run -c /etc/qrad-agent/")
    for key in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert d[key] == ["qrad-agent"], key
    assert d["User"] == ["qrad-agent"] and d["Group"] == ["qrad-agent"]
    assert "i2c" in d["SupplementaryGroups"][0].split()
    assert d["Delegate"] == ["yes"]
    # the agent restores within its own bound, inside systemd's
    ops = OpsConfig()
    assert int(d["TimeoutStopSec"][0]) > ops.stop_timeout_s
    # keep-alives every loop turn (<= 0.5 s): any WatchdogSec of seconds leaves margin
    assert 10 <= int(d["WatchdogSec"][0]) <= 120


def test_hardening_is_on_and_every_exception_says_why() -> None:
    text = UNIT.read_text()
    d = directives(text)
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("RestrictNamespaces", "yes"), ("LockPersonality", "yes"),
                       ("RestrictSUIDSGID", "yes"), ("DevicePolicy", "closed"),
                       ("CapabilityBoundingSet", "")):
        assert d.get(key) == [value], (key, d.get(key))
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in d["SystemCallFilter"]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^(Protect\w+|Private\w+|MemoryDenyWriteExecute|ProcSubset)=(no|all)$",
                    line):
            comment = lines[i - 1]
            while comment.startswith("#") and not comment.startswith("# Exception"):
                i -= 1
                comment = lines[i - 1]
            assert comment.startswith("# Exception"), f"{line}: no reason given above it"


def test_sysusers_makes_the_user_and_its_groups(tmp_path: Path) -> None:
    tool = need("systemd-sysusers")
    etc = tmp_path / "etc"
    etc.mkdir()
    for f in ("passwd", "group", "shadow", "gshadow"):
        (etc / f).touch()
    res = subprocess.run([tool, f"--root={tmp_path}",
                          str(REPO / "systemd" / "qrad-agent.sysusers")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    user = next(line for line in (etc / "passwd").read_text().splitlines()
                if line.startswith("qrad-agent:"))
    assert user.endswith(":/var/lib/qrad-agent:/usr/sbin/nologin")
    groups = {line.split(":")[0]: line.split(":")[3] for line in
              (etc / "group").read_text().splitlines()}
    assert "qrad-agent" in groups["i2c"].split(",") and "qrad-agent" in groups["dialout"]
    job = next(line for line in (etc / "passwd").read_text().splitlines()
               if line.startswith("qrad-job:"))
    assert job.endswith(":/usr/sbin/nologin") and "qrad-job" not in groups["i2c"]


def test_tmpfiles_hands_the_levers_to_the_group_and_nothing_else(tmp_path: Path) -> None:
    tool = need("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nqrad-agent:x:990:\n")
    cpu = tmp_path / "sys/devices/system/cpu/cpufreq/policy0"
    rapl = tmp_path / "sys/devices/virtual/powercap/intel-rapl/intel-rapl:0"
    for d in (cpu, rapl):
        d.mkdir(parents=True)
    files = {cpu / "scaling_max_freq": 0o644, cpu / "scaling_min_freq": 0o644,
             cpu / "scaling_governor": 0o644, rapl / "constraint_0_power_limit_uw": 0o644,
             rapl / "energy_uj": 0o400}
    for f, mode in files.items():
        f.touch()
        f.chmod(mode)
    res = subprocess.run([tool, f"--root={tmp_path}", "--create",
                          str(REPO / "systemd" / "qrad-agent.tmpfiles")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr

    def mode_gid(f: Path) -> tuple[int, int]:
        st = f.stat()
        return stat.S_IMODE(st.st_mode), st.st_gid

    for f in (cpu / "scaling_max_freq", cpu / "scaling_min_freq",
              rapl / "constraint_0_power_limit_uw"):
        assert mode_gid(f) == (0o664, 990), f
    assert mode_gid(cpu / "scaling_governor") == (0o644, 0), "only the limits are handed over"
    assert mode_gid(rapl / "energy_uj") == (0o400, 0), "energy readings stay root's"


def test_udev_rule_is_well_formed() -> None:
    text = (REPO / "systemd" / "99-qrad-agent.rules").read_text()
    rules = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert rules
    pair = re.compile(r'^[A-Z_{}a-z]+(==|!=|=|\+=|:=)"[^"]*"$')
    for rule in rules:
        for part in rule.split(", "):
            assert pair.match(part), f"{part!r} in {rule!r}"
        for run in re.findall(r'RUN\+="(\S+)', rule):
            assert os.path.isabs(run), "udev runs programs by absolute path"
    assert any('GROUP="i2c"' in r for r in rules)


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), *args],
                          capture_output=True, text=True, timeout=120)


def test_install_under_a_prefix_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    need("systemd-sysusers")
    root = tmp_path / "root"
    first = install("--prefix", str(root), "--no-python")
    assert first.returncode == 0, first.stderr
    expected = {
        "etc/systemd/system/qrad-agent.service": UNIT,
        "usr/lib/tmpfiles.d/qrad-agent.conf": REPO / "systemd/qrad-agent.tmpfiles",
        "usr/lib/sysusers.d/qrad-agent.conf": REPO / "systemd/qrad-agent.sysusers",
        "etc/udev/rules.d/99-qrad-agent.rules": REPO / "systemd/99-qrad-agent.rules",
        "etc/qrad-agent/qrad-agent.toml": REPO / "configs/qrad-agent.toml",
    }
    for rel, src in expected.items():
        assert (root / rel).read_bytes() == src.read_bytes(), rel
    assert "i2c-dev" in (root / "etc/modules-load.d/qrad-agent.conf").read_text()
    conf = root / "etc/qrad-agent/qrad-agent.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert "qrad-agent:" in (root / "etc/passwd").read_text()
    # the technician edits the config; a second run changes nothing
    conf.write_text('[node]\nid = "qrad-0042"\n')
    second = install("--prefix", str(root), "--no-python")
    assert second.returncode == 0, second.stderr
    assert "installed:" not in second.stdout and "kept:" in second.stdout, second.stdout
    assert conf.read_text() == '[node]\nid = "qrad-0042"\n'
    users = [u for u in (root / "etc/passwd").read_text().splitlines()
             if u.startswith("qrad-agent:")]
    assert len(users) == 1, users


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = install("--prefix", str(root), "--dry-run", "--no-python")
    assert res.returncode == 0, res.stderr
    assert "would install:" in res.stdout and "qrad-agent.service" in res.stdout
    assert not root.exists() or not any(root.rglob("*")), "dry run wrote files"
    bad = install("--frobnicate")
    assert bad.returncode == 2 and "allowed:" in bad.stderr
