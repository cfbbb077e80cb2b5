"""The workers' cgroup on the real kernel: CPU bandwidth and the freezer.

These tests create cgroups under /sys/fs/cgroup (each test its own parent, removed after)
and measure real processes with psutil. Where the kernel or the permissions do not allow a
variant (cgroup v2 without the cpu controller, say), that variant is skipped and the reason
printed. The file formats of a v2 quota are also checked on a tree in a temp dir, since the
development machines bind the cpu controller to v1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.cgroups import QuotaLever, WorkerCgroup, find_mounts
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import CgroupConfig
from qrad_agent.core.models import Plan
from tests.procs import remove_cgroup

CGROUP_ROOT = Path("/sys/fs/cgroup")
SPIN = [sys.executable, "-c", "while True: pass"]


def skip(reason: str) -> None:
    print(f"SKIPPED: {reason}")  # shown with -s / -rs; pytest also records the reason
    pytest.skip(reason)


@pytest.fixture
def parent() -> Iterator[str]:
    """A parent cgroup name of this test's own; whatever is left under it is removed."""
    name = f"qrad-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    for hierarchy in ("cpu", "freezer", "unified", "."):
        top = CGROUP_ROOT / hierarchy / name
        if not top.exists():
            continue
        for d in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                remove_cgroup(d)
        remove_cgroup(top)




@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(SPIN)
    yield proc
    proc.kill()
    proc.wait()


def cpu_share(proc: psutil.Process, seconds: float) -> float:
    """CPUs' worth of time the process used over ``seconds`` of wall time."""
    t0, w0 = proc.cpu_times(), time.monotonic()
    time.sleep(seconds)
    t1, w1 = proc.cpu_times(), time.monotonic()
    return float(t1.user + t1.system - t0.user - t0.system) / (w1 - w0)


def check_throttled(measure: Callable[[], float], lift: Callable[[], None], cap: float) -> None:
    """``measure`` gives about ``cap`` CPUs, and clearly more once ``lift`` has run.

    Throttling can only be seen if the machine would give more than the quota: when other
    work leaves too little CPU for that, the test is skipped with the figures.
    """
    throttled = measure()
    lift()
    free = measure()
    if free < cap * 1.5:
        skip(f"the machine is too busy to tell a {cap} CPU quota apart: unthrottled got "
             f"{free:.2f} CPUs, throttled {throttled:.2f}")
    assert throttled <= cap * 1.2 + 0.05, f"{throttled:.2f} CPUs under a {cap} CPU quota"
    assert throttled >= cap * 0.6, f"only {throttled:.2f} CPUs under a {cap} CPU quota"


def cgroup_for(parent: str, version: str, tmp_path: Path, **kw: object) -> WorkerCgroup:
    if os.geteuid() != 0:
        skip("creating cgroups needs root")
    record = RestoreRecord(tmp_path / "restore.json", boot_id="b")
    return WorkerCgroup(CgroupConfig(parent=parent, version=version, **kw),  # type: ignore[arg-type]
                        CGROUP_ROOT, record)


# -- quota on the real kernel ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_half_quota_gives_half_a_core(
    version: str, parent: str, spinner: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    cg = cgroup_for(parent, version, tmp_path)
    info = cg.quota_info()
    if not info.available:
        skip(f"cgroup {version} quota unavailable here: {info.why_not}")
    lever = QuotaLever(cg)
    lever.apply(Plan(slots=1, freq_khz=1, quota=0.5))
    cg.add(spinner.pid)
    proc = psutil.Process(spinner.pid)
    time.sleep(0.2)  # let the first periods pass
    back = lever.read_back()
    assert back["cores"] == pytest.approx(0.5)
    assert back["quota"] == pytest.approx(0.5)
    assert back["version"] == int(version[1])
    check_throttled(lambda: cpu_share(proc, 1.5),
                    lambda: lever.apply(Plan(slots=1, freq_khz=1, quota=1.0)), 0.5)


def test_quota_is_for_the_whole_group(parent: str, tmp_path: Path) -> None:
    cg = cgroup_for(parent, "auto", tmp_path)
    if not cg.quota_info().available:
        skip(f"no cgroup quota here: {cg.quota_info().why_not}")
    procs = [subprocess.Popen(SPIN) for _ in range(2)]
    try:
        lever = QuotaLever(cg)
        lever.apply(Plan(slots=2, freq_khz=1, quota=0.25))  # 2 slots x 25 % = half a CPU
        assert cg.quota() == (50_000, 100_000)
        for p in procs:
            cg.add(p.pid)
        ps = [psutil.Process(p.pid) for p in procs]
        time.sleep(0.2)
        check_throttled(lambda: sum(cpu_share(p, 0.75) for p in ps),
                        lambda: lever.apply(Plan(slots=2, freq_khz=1, quota=1.0)), 0.5)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_full_quota_is_unlimited_and_restore_removes_the_group(
    parent: str, tmp_path: Path
) -> None:
    cg = cgroup_for(parent, "auto", tmp_path)
    if not cg.quota_info().available:
        skip(f"no cgroup quota here: {cg.quota_info().why_not}")
    lever = QuotaLever(cg)
    lever.apply(Plan(slots=3, freq_khz=1, quota=0.4))
    assert cg.quota() == (120_000, 100_000)
    lever.apply(Plan(slots=3, freq_khz=1, quota=1.0))
    assert cg.quota() == (None, 100_000)
    lever.apply(Plan(slots=1, freq_khz=1, quota=0.001))  # below the kernel's 1 ms floor
    assert cg.quota() == (1000, 100_000)
    group = cg.quota_use.group if cg.quota_use else None
    assert group is not None and group.is_dir()
    lever.restore()
    assert not group.exists()
    assert not group.parent.exists()  # the parent was made by the agent too
    assert not (tmp_path / "restore.json").exists()


# -- the freezer on the real kernel ------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_frozen_group_uses_no_cpu(
    version: str, parent: str, spinner: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    cg = cgroup_for(parent, version, tmp_path)
    info = cg.freeze_info()
    if not info.available:
        skip(f"cgroup {version} freezer unavailable here: {info.why_not}")
    cg.add(spinner.pid)
    proc = psutil.Process(spinner.pid)
    cg.freeze()
    assert cg.wait_frozen(2.0), "the freeze did not complete"
    assert cpu_share(proc, 0.6) < 0.02
    cg.thaw()
    assert not cg.frozen()
    assert cpu_share(proc, 0.6) > 0.05  # runs again (on a busy machine, far from a core)
    spinner.kill()
    spinner.wait()
    cg.release()
    assert info.range["group"] and not Path(info.range["group"]).exists()


def test_kill_all_empties_a_frozen_group(parent: str, tmp_path: Path) -> None:
    cg = cgroup_for(parent, "auto", tmp_path)
    if not cg.freeze_info().available:
        skip(f"no cgroup freezer here: {cg.freeze_info().why_not}")
    procs = [subprocess.Popen(SPIN) for _ in range(2)]
    for p in procs:
        cg.add(p.pid)
    cg.freeze()
    assert cg.wait_frozen()
    assert cg.kill_all() == set()
    assert [p.wait(timeout=5) for p in procs] == [-9, -9]
    cg.release()


def test_next_start_cleans_up_after_a_crashed_run(parent: str, tmp_path: Path) -> None:
    cg = cgroup_for(parent, "auto", tmp_path)
    if not cg.uses():
        skip(f"no usable cgroup here: {cg.quota_why}; {cg.freeze_why}")
    groups = [u.group for u in cg.uses()]
    proc = subprocess.Popen(SPIN)
    cg.add(proc.pid)
    if cg.quota_use is not None:
        cg.set_quota(20_000)
    if cg.freeze_use is not None:
        cg.freeze()
    del cg  # the agent died here: no restore
    assert all(g.is_dir() for g in groups)
    record = RestoreRecord(tmp_path / "restore.json", boot_id="b")
    WorkerCgroup(CgroupConfig(parent=parent), CGROUP_ROOT, record)
    assert proc.wait(timeout=5) == -9  # the orphan worker is gone
    assert not any(g.exists() for g in groups)
    assert not any(g.parent.exists() for g in groups)
    assert record.originals("cgroup") == {}


# -- layouts and reasons, on trees in a temp dir -----------------------------------------------


def test_this_machine_layout_is_found() -> None:
    m = find_mounts(CGROUP_ROOT)
    if m.v1_cpu is None and m.v2 is None:
        skip("no cgroup hierarchy mounted under /sys/fs/cgroup")
    if m.v1_cpu is not None:
        assert (m.v1_cpu / "cpu.cfs_quota_us").is_file()
    if m.v2 is not None:
        assert (m.v2 / "cgroup.controllers").is_file()


def test_no_cgroup_filesystem_is_reported(tmp_path: Path) -> None:
    cg = WorkerCgroup(CgroupConfig(), tmp_path / "nothing")
    info = cg.quota_info()
    assert not info.available
    assert info.why_not == f"no cgroup filesystem at {tmp_path / 'nothing'} (not mounted)"
    assert not cg.freeze_info().available
    with pytest.raises(LeverError, match="no cgroup quota here"):
        cg.set_quota(1000)


def test_v2_without_cpu_controller_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory io pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    info = WorkerCgroup(CgroupConfig(version="v2"), tmp_path).quota_info()
    assert not info.available
    assert info.why_not == f"cgroup v2 at {tmp_path} has no cpu controller"
    (tmp_path / "cpu").mkdir()  # an empty mount point: v1 cpu not mounted
    info = WorkerCgroup(CgroupConfig(version="v1"), tmp_path).quota_info()
    assert info.why_not == f"the cgroup v1 cpu controller is not mounted under {tmp_path}"


def test_disabled_in_config_is_reported(tmp_path: Path) -> None:
    cg = WorkerCgroup(CgroupConfig(enabled=False), CGROUP_ROOT)
    assert cg.quota_info().why_not == "disabled in config (actuators.cgroups.enabled = false)"
    assert cg.uses() == []
    cg = WorkerCgroup(CgroupConfig(freeze=False), CGROUP_ROOT)
    assert cg.freeze_info().why_not == "disabled in config (actuators.cgroups.freeze = false)"


def fake_v2(root: Path, group: Path) -> None:
    """A v2 tree whose worker group already exists (the kernel would make its files)."""
    group.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "cgroup.subtree_control").write_text("cpu\n")
    (group.parent / "cgroup.subtree_control").write_text("cpu\n")
    for name, text in (("cpu.max", "max 100000\n"), ("cgroup.procs", ""),
                       ("cgroup.freeze", "0\n"), ("cgroup.events", "populated 0\nfrozen 0\n")):
        (group / name).write_text(text)


def test_v2_quota_file_format_and_a_group_that_existed_is_put_back(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    group = root / "qrad-agent" / "workers"
    fake_v2(root, group)
    (group / "cpu.max").write_text("250000 100000\n")  # set by someone before the agent
    record = RestoreRecord(tmp_path / "restore.json", boot_id="b")
    cg = WorkerCgroup(CgroupConfig(version="v2"), root, record)
    lever = QuotaLever(cg)
    assert lever.discover().range["file"] == "cpu.max"
    lever.apply(Plan(slots=2, freq_khz=1, quota=0.3))
    assert (group / "cpu.max").read_text() == "60000 100000"
    assert cg.quota() == (60_000, 100_000)
    lever.apply(Plan(slots=2, freq_khz=1, quota=1.0))
    assert (group / "cpu.max").read_text() == "max 100000"
    assert record.originals("cgroup") == {f"file:{group / 'cpu.max'}": "250000 100000"}
    lever.restore()
    assert (group / "cpu.max").read_text() == "250000 100000"
    assert group.is_dir()  # not ours to remove
    assert record.originals("cgroup") == {}


def test_quota_recheck_writes_again_after_an_outside_change(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    group = root / "qrad-agent" / "workers"
    fake_v2(root, group)
    lever = QuotaLever(WorkerCgroup(CgroupConfig(version="v2"), root))
    plan = Plan(slots=1, freq_khz=1, quota=0.5)
    lever.apply(plan)
    (group / "cpu.max").write_text("max 100000")  # an administrator, say
    lever.apply(plan)
    assert (group / "cpu.max").read_text() == "max 100000"  # no IO on an unchanged plan
    for _ in range(30):
        lever.apply(plan)
    assert (group / "cpu.max").read_text() == "50000 100000"


def test_config_rejects_paths_that_leave_the_hierarchy() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape("without '.' or '..'")):
        CgroupConfig(parent="../escape")
    with pytest.raises(ValidationError, match="must not sit in the workers' cgroup"):
        CgroupConfig(agent_leaf="workers")
    assert CgroupConfig(parent="/system.slice/qrad-agent.service/").parent == (
        "system.slice/qrad-agent.service"
    )
