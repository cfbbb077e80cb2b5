"""The RAPL power-limit lever against an emulated powercap tree."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qrad_agent.actuators.base import LeverError
from qrad_agent.actuators.rapl import RECHECK_EVERY, RaplLimitLever, find_zones
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.actuators.settings import RaplLimitConfig
from qrad_agent.core.models import Plan
from qrad_agent.core.power import PowerModel
from qrad_agent.sim.rapl import EmulatedRaplSysfs, make_rapl_tree
from qrad_agent.sysfs import Sysfs

REPO = Path(__file__).resolve().parents[1]
PKG0 = "class/powercap/intel-rapl:0"
LIMIT0 = f"{PKG0}/constraint_0_power_limit_uw"
# 10 W idle, 20 W per slot at full speed: 2 slots at full speed = 50 W
MODEL = PowerModel(idle_w=10.0, slot_w=20.0, freq_exponent=2.0, max_freq_khz=2_000_000)
CFG = RaplLimitConfig(enabled=True, headroom=1.2, min_w=5.0, min_change_w=1.0)


def plan(slots: int, khz: int = 2_000_000, quota: float = 1.0) -> Plan:
    return Plan(slots=slots, freq_khz=khz, quota=quota)


@pytest.fixture
def tree(tmp_path: Path) -> EmulatedRaplSysfs:
    return make_rapl_tree(tmp_path / "sys", limit_w=65.0, max_power_w=95.0)


@pytest.fixture
def record(tmp_path: Path) -> RestoreRecord:
    return RestoreRecord(tmp_path / "state" / "restore.json", boot_id="boot-a")


def limit_w(sysfs: Sysfs, zone: str = "intel-rapl:0") -> float:
    return sysfs.read_int(f"class/powercap/{zone}/constraint_0_power_limit_uw") / 1e6


# -- the emulated kernel -----------------------------------------------------------------------


def test_tree_has_the_kernel_layout(tree: EmulatedRaplSysfs) -> None:
    zones = {z.id: z for z in find_zones(tree)}
    assert sorted(zones) == ["intel-rapl:0", "intel-rapl:0:0", "intel-rapl:0:1"]
    assert zones["intel-rapl:0"].label == "package-0" and zones["intel-rapl:0"].long_term == 0
    assert zones["intel-rapl:0:0"].label == "core" and not zones["intel-rapl:0:0"].top_level
    link = tree.path(PKG0)
    assert link.is_symlink()
    assert link.resolve() == tree.path("devices/virtual/powercap/intel-rapl/intel-rapl:0")
    assert stat.S_IMODE(tree.path(f"{PKG0}/energy_uj").stat().st_mode) == 0o400
    assert stat.S_IMODE(tree.path(LIMIT0).stat().st_mode) == 0o644
    assert tree.read(f"{PKG0}/constraint_0_name") == "long_term"


def test_kernel_rounds_the_limit_down_to_power_units(tree: EmulatedRaplSysfs) -> None:
    tree.write(LIMIT0, 40_060_000)
    assert tree.read_int(LIMIT0) == 40_000_000  # 1/8 W units
    with pytest.raises(OSError) as exc:
        tree.write(LIMIT0, "forty")
    assert exc.value.errno == errno.EINVAL
    assert tree.read_int(LIMIT0) == 40_000_000


def test_locked_limit_refuses_writes_with_enodata(tree: EmulatedRaplSysfs) -> None:
    tree.lock()
    with pytest.raises(OSError) as exc:
        tree.write(LIMIT0, 30_000_000)
    assert exc.value.errno == errno.ENODATA
    assert tree.read_int(LIMIT0) == 65_000_000
    assert EmulatedRaplSysfs(tree.root).zones()  # another emulator sees the lock too
    with pytest.raises(OSError):
        EmulatedRaplSysfs(tree.root).write(LIMIT0, 30_000_000)


def test_energy_counter_wraps_at_the_range(tmp_path: Path) -> None:
    tree = make_rapl_tree(tmp_path, max_energy_range_uj=1_000_000)
    tree.set_energy("intel-rapl:0", 999_000)
    tree.add_energy(0.0015)  # 1500 µJ
    assert tree.read_int(f"{PKG0}/energy_uj") == 499  # 999000 + 1500 - (1000000 + 1)
    assert tree.read_int("class/powercap/intel-rapl:0:0/energy_uj") == 1050  # core share


# -- discover ----------------------------------------------------------------------------------


def test_discover_reports_range_and_availability(tree: EmulatedRaplSysfs) -> None:
    info = RaplLimitLever(tree, MODEL, CFG).discover()
    assert info.available, info.why_not
    assert info.range["zones"] == ["intel-rapl:0"]
    assert info.range["limit_w"] == {"intel-rapl:0": 65.0}
    assert info.range["max_w"] == {"intel-rapl:0": 65.0}  # never above the board's own
    assert tree.read_int(LIMIT0) == 65_000_000  # the probe wrote the same value back


def test_discover_reports_a_firmware_lock(tree: EmulatedRaplSysfs) -> None:
    tree.lock()
    info = RaplLimitLever(tree, MODEL, CFG).discover()
    assert not info.available
    assert info.why_not.startswith(f"the firmware locked the power limit {LIMIT0}")
    assert "No data available" in info.why_not


def test_discover_without_rapl_says_why(tmp_path: Path) -> None:
    info = RaplLimitLever(Sysfs(tmp_path), MODEL, CFG).discover()
    assert info.why_not == "no class/powercap in sysfs (kernel without powercap)"
    (tmp_path / "class" / "powercap").mkdir(parents=True)
    info = RaplLimitLever(Sysfs(tmp_path), MODEL, CFG).discover()
    assert info.why_not.startswith("no intel-rapl powercap zones")


def test_discover_reports_a_read_only_limit(tree: EmulatedRaplSysfs) -> None:
    os.chmod(tree.path(LIMIT0).resolve(), 0o444)
    info = RaplLimitLever(tree, MODEL, CFG).discover()
    assert not info.available
    assert info.why_not == f"permission denied: {LIMIT0} is not writable (run as root)"


# -- apply and read back -----------------------------------------------------------------------


def test_apply_sets_the_plans_watts_with_headroom(tree: EmulatedRaplSysfs) -> None:
    lever = RaplLimitLever(tree, MODEL, CFG)
    lever.apply(plan(2))  # 50 W x 1.2
    assert limit_w(tree) == 60.0
    lever.apply(plan(1, quota=0.5))  # (10 + 10) x 1.2 = 24 W
    assert limit_w(tree) == 24.0
    lever.apply(plan(0))  # 10 x 1.2 = 12 W
    assert limit_w(tree) == 12.0
    assert lever.read_back() == {"limit_w": 12.0, "per_zone_w": {"intel-rapl:0": 12.0}}


def test_apply_never_raises_the_limit_above_the_boards_own(tree: EmulatedRaplSysfs) -> None:
    big = PowerModel(idle_w=50.0, slot_w=100.0, freq_exponent=2.0, max_freq_khz=2_000_000)
    lever = RaplLimitLever(tree, big, CFG)
    lever.apply(plan(4))  # 450 W x 1.2 wanted
    assert limit_w(tree) == 65.0


def test_apply_keeps_the_minimum_and_reads_back_what_the_kernel_took(
    tree: EmulatedRaplSysfs,
) -> None:
    tiny = PowerModel(idle_w=1.0, slot_w=3.37, freq_exponent=2.0, max_freq_khz=2_000_000)
    lever = RaplLimitLever(tree, tiny, CFG)
    lever.apply(plan(0))  # 1.2 W wanted
    assert limit_w(tree) == 5.0
    lever.apply(plan(2))  # (1 + 6.74) x 1.2 = 9.288 W, stored in 1/8 W units
    assert limit_w(tree) == 9.25
    assert lever.read_back()["limit_w"] == 9.25


def test_apply_splits_the_watts_over_packages(tmp_path: Path) -> None:
    tree = make_rapl_tree(tmp_path, packages=2, limit_w=65.0)
    lever = RaplLimitLever(tree, MODEL, CFG)
    lever.apply(plan(2))
    assert (limit_w(tree, "intel-rapl:0"), limit_w(tree, "intel-rapl:1")) == (30.0, 30.0)
    assert lever.read_back()["limit_w"] == 60.0


def test_small_moves_are_not_written(tree: EmulatedRaplSysfs) -> None:
    lever = RaplLimitLever(tree, MODEL, CFG)
    lever.apply(plan(2))
    writes = len(tree.writes)
    lever.apply(plan(2, quota=0.98))  # 0.96 W less: below min_change_w
    assert len(tree.writes) == writes
    lever.apply(plan(2, quota=0.9))
    assert len(tree.writes) == writes + 1
    assert limit_w(tree) == pytest.approx(55.125, abs=0.125)


def test_a_limit_changed_behind_the_agents_back_is_written_again(
    tree: EmulatedRaplSysfs,
) -> None:
    lever = RaplLimitLever(tree, MODEL, CFG)
    lever.apply(plan(2))
    tree.write(LIMIT0, 30_000_000)
    for _ in range(RECHECK_EVERY - 1):
        lever.apply(plan(2))
    assert limit_w(tree) == 30.0  # no IO every tick
    lever.apply(plan(2))
    assert limit_w(tree) == 60.0


def test_a_lock_found_at_apply_is_reported_once_then_left_alone(
    tree: EmulatedRaplSysfs, record: RestoreRecord
) -> None:
    lever = RaplLimitLever(tree, MODEL, CFG, record)
    assert lever.discover().available
    tree.lock()  # a firmware update, say
    with pytest.raises(LeverError, match=r"firmware locked .* reported, not fought"):
        lever.apply(plan(2))
    writes = len(tree.writes)
    for n in range(3):
        lever.apply(plan(n))
    assert len(tree.writes) == writes  # not fought
    assert lever.read_back()["locked"] == [LIMIT0]
    lever.restore()  # nothing of ours is in it; nothing fails
    assert limit_w(tree) == 65.0


# -- restore -----------------------------------------------------------------------------------


def test_restore_puts_the_original_back(tree: EmulatedRaplSysfs, record: RestoreRecord) -> None:
    lever = RaplLimitLever(tree, MODEL, CFG, record)
    lever.apply(plan(1))
    assert record.originals("rapl") == {LIMIT0: "65000000"}
    assert limit_w(tree) == 36.0
    lever.restore()
    assert limit_w(tree) == 65.0
    assert not record.path.exists()


def test_next_start_restores_what_a_crashed_run_left(
    tree: EmulatedRaplSysfs, tmp_path: Path
) -> None:
    path = tmp_path / "restore.json"
    RaplLimitLever(tree, MODEL, CFG, RestoreRecord(path, boot_id="b")).apply(plan(0))
    assert limit_w(tree) == 12.0  # the agent died here
    fresh = RestoreRecord(path, boot_id="b")
    RaplLimitLever(tree, MODEL, CFG, fresh)
    assert limit_w(tree) == 65.0
    assert fresh.originals("rapl") == {}


def test_original_is_saved_before_the_first_write(
    tree: EmulatedRaplSysfs, tmp_path: Path
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    lever = RaplLimitLever(tree, MODEL, CFG, RestoreRecord(tmp_path / "not-a-dir" / "r.json"))
    lever.discover()
    tree.writes.clear()
    with pytest.raises(LeverError, match="cannot save the original power limits"):
        lever.apply(plan(1))
    assert tree.writes == []
    assert limit_w(tree) == 65.0


def test_sigterm_restores_the_limit(tmp_path: Path) -> None:
    make_rapl_tree(tmp_path / "sys", limit_w=65.0)
    script = tmp_path / "agent.py"
    script.write_text(textwrap.dedent("""
        import signal, sys, time
        from pathlib import Path
        from qrad_agent.actuators.rapl import RaplLimitLever
        from qrad_agent.actuators.restore import RestoreRecord
        from qrad_agent.actuators.settings import RaplLimitConfig
        from qrad_agent.core.models import Plan
        from qrad_agent.core.power import PowerModel
        from qrad_agent.sim.rapl import EmulatedRaplSysfs

        root, record = Path(sys.argv[1]), Path(sys.argv[2])
        lever = RaplLimitLever(EmulatedRaplSysfs(root), PowerModel(10, 20, 2, 2_000_000),
                               RaplLimitConfig(enabled=True), RestoreRecord(record))
        def on_term(signum, frame):
            lever.restore()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        lever.apply(Plan(1, 2_000_000, 1.0))
        print("capped", flush=True)
        while True:
            time.sleep(0.05)
    """))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "sys"), str(tmp_path / "restore.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "capped\n", proc.stderr
        files = Sysfs(tmp_path / "sys")
        assert limit_w(files) == 36.0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert limit_w(files) == 65.0
    assert not (tmp_path / "restore.json").exists()
