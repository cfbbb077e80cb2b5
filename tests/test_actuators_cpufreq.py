"""The CPU frequency levers against an emulated cpufreq/intel_pstate sysfs tree."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from qrad_agent.actuators.cpufreq import (
    PSTATE_DIR,
    RECHECK_EVERY,
    CpufreqLever,
    IntelPstateLever,
    LeverError,
    open_frequency_lever,
)
from qrad_agent.actuators.restore import RestoreRecord
from qrad_agent.core.models import Plan
from qrad_agent.sim.cpufreq import EmulatedCpufreqSysfs, make_cpufreq_tree
from qrad_agent.sysfs import Sysfs

REPO = Path(__file__).resolve().parents[1]
CPUFREQ = "devices/system/cpu/cpufreq"
P0 = f"{CPUFREQ}/policy0"


def cap(khz: int) -> Plan:
    return Plan(slots=1, freq_khz=khz, quota=1.0)


def limits(sysfs: Sysfs, policy: str = "policy0") -> tuple[int, int]:
    """(scaling_min_freq, scaling_max_freq) as the files show them."""
    d = f"{CPUFREQ}/{policy}"
    return sysfs.read_int(f"{d}/scaling_min_freq"), sysfs.read_int(f"{d}/scaling_max_freq")


@pytest.fixture
def tree(tmp_path: Path) -> EmulatedCpufreqSysfs:
    return make_cpufreq_tree(tmp_path / "sys")


@pytest.fixture
def record(tmp_path: Path) -> RestoreRecord:
    return RestoreRecord(tmp_path / "state" / "restore.json", boot_id="boot-a")


# -- the emulated kernel ---------------------------------------------------------------------


def test_tree_has_kernel_layout_and_permission_bits(tree: EmulatedCpufreqSysfs) -> None:
    policy = tree.path(P0)
    assert stat.S_IMODE((policy / "scaling_max_freq").stat().st_mode) == 0o644
    assert stat.S_IMODE((policy / "scaling_min_freq").stat().st_mode) == 0o644
    assert stat.S_IMODE((policy / "cpuinfo_max_freq").stat().st_mode) == 0o444
    assert stat.S_IMODE((policy / "scaling_cur_freq").stat().st_mode) == 0o444
    link = tree.path("devices/system/cpu/cpu3/cpufreq")
    assert link.is_symlink() and link.resolve() == tree.path(f"{CPUFREQ}/policy3").resolve()
    table = (policy / "scaling_available_frequencies").read_text()
    assert table.startswith("3000000 2900000 ") and table.endswith("900000 800000 \n")
    assert len(table.split()) == 23


def test_kernel_clamps_and_resolves_max_to_highest_at_or_below(tree: EmulatedCpufreqSysfs) -> None:
    rel = f"{P0}/scaling_max_freq"
    tree.write(rel, 2_550_000)
    assert tree.read_int(rel) == 2_500_000
    assert Sysfs(tree.root).read_int(rel) == 2_500_000  # the file mirrors it for others
    tree.write(rel, 9_999_999)
    assert tree.read_int(rel) == 3_000_000
    tree.write(rel, 1)
    assert tree.read_int(rel) == 800_000


def test_kernel_resolves_min_to_lowest_at_or_above_and_keeps_min_below_max(
    tree: EmulatedCpufreqSysfs,
) -> None:
    tree.write(f"{P0}/scaling_min_freq", 2_550_000)
    assert limits(tree) == (2_600_000, 3_000_000)
    tree.write(f"{P0}/scaling_max_freq", 1_000_000)
    assert limits(tree) == (1_000_000, 1_000_000)  # min lowered to max, never above
    # the min request is kept: raising the max brings it back
    tree.write(f"{P0}/scaling_max_freq", 3_000_000)
    assert limits(tree) == (2_600_000, 3_000_000)


def test_kernel_without_frequency_table_keeps_any_value_in_range(tmp_path: Path) -> None:
    sysfs = make_cpufreq_tree(tmp_path, available_khz=[], driver="intel_cpufreq")
    assert not sysfs.exists(f"{P0}/scaling_available_frequencies")
    sysfs.write(f"{P0}/scaling_max_freq", 2_550_000)
    assert limits(sysfs) == (800_000, 2_550_000)
    assert sysfs.read_int(f"{P0}/scaling_cur_freq") == 2_550_000


@pytest.mark.parametrize("garbage", ["abc", "", "2.5e6", "-5", "25o0", "0x", "0800000"])
def test_kernel_refuses_garbage_with_einval_and_changes_nothing(
    tree: EmulatedCpufreqSysfs, garbage: str
) -> None:
    with pytest.raises(OSError) as exc:
        tree.write(f"{P0}/scaling_max_freq", garbage)
    assert exc.value.errno == errno.EINVAL
    assert limits(tree) == (800_000, 3_000_000)
    assert Sysfs(tree.root).read(f"{P0}/scaling_max_freq") == "3000000"


def test_kernel_parses_like_kstrtoul(tree: EmulatedCpufreqSysfs) -> None:
    tree.write(f"{P0}/scaling_max_freq", "0x1E8480")  # 2 000 000
    assert limits(tree)[1] == 2_000_000
    tree.write(f"{P0}/scaling_max_freq", "+1500000")
    assert limits(tree)[1] == 1_500_000
    with pytest.raises(OSError) as exc:
        tree.write(f"{P0}/scaling_max_freq", 1 << 32)
    assert exc.value.errno == errno.EINVAL


def test_kernel_refuses_read_only_attributes_even_for_root(tree: EmulatedCpufreqSysfs) -> None:
    for name in ("cpuinfo_max_freq", "scaling_cur_freq"):
        with pytest.raises(PermissionError) as exc:
            tree.write(f"{P0}/{name}", 1_000_000)
        assert exc.value.errno == errno.EACCES
    assert tree.read_int(f"{P0}/cpuinfo_max_freq") == 3_000_000


def test_kernel_checks_governor_names(tree: EmulatedCpufreqSysfs) -> None:
    with pytest.raises(OSError) as exc:
        tree.write(f"{P0}/scaling_governor", "turbo-please")
    assert exc.value.errno == errno.EINVAL
    tree.write(f"{P0}/scaling_governor", "performance")
    assert tree.read(f"{P0}/scaling_governor") == "performance"


def test_old_kernels_refuse_max_below_min(tree: EmulatedCpufreqSysfs) -> None:
    tree.refuse_min_above_max = True
    tree.write(f"{P0}/scaling_min_freq", 2_000_000)
    with pytest.raises(OSError) as exc:
        tree.write(f"{P0}/scaling_max_freq", 1_500_000)
    assert exc.value.errno == errno.EINVAL
    assert limits(tree) == (2_000_000, 3_000_000)


def test_effective_max_and_cur_freq_follow_the_lowest_cap(tree: EmulatedCpufreqSysfs) -> None:
    assert tree.effective_max_khz() == 3_000_000
    tree.write(f"{CPUFREQ}/policy2/scaling_max_freq", 1_750_000)
    assert tree.effective_max_khz() == 1_700_000
    assert tree.read_int(f"{CPUFREQ}/policy2/scaling_cur_freq") == 1_700_000
    assert tree.read_int(f"{P0}/scaling_cur_freq") == 3_000_000


def test_second_emulator_attaches_to_an_existing_tree(tree: EmulatedCpufreqSysfs) -> None:
    tree.write(f"{CPUFREQ}/policy1/scaling_max_freq", 2_000_000)
    again = EmulatedCpufreqSysfs(tree.root)
    assert again.effective_max_khz() == 2_000_000
    again.write(f"{CPUFREQ}/policy1/scaling_max_freq", 2_450_000)
    assert limits(again, "policy1") == (800_000, 2_400_000)


def test_tree_builder_refuses_a_table_outside_the_range(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[3100000\] lie outside"):
        make_cpufreq_tree(tmp_path, available_khz=[800_000, 3_100_000])
    with pytest.raises(ValueError, match="min_khz <= max_khz"):
        make_cpufreq_tree(tmp_path, min_khz=3_000_000, max_khz=800_000)


def test_intel_pstate_percentages_are_clamped_like_the_driver(tmp_path: Path) -> None:
    sysfs = make_cpufreq_tree(tmp_path, driver="intel_pstate", intel_pstate=True)
    floor = math.ceil(8 * 100 / 30)  # lowest P-state 8 of turbo 30, rounded up: 27
    assert sysfs.read_int(f"{PSTATE_DIR}/min_perf_pct") == floor
    sysfs.write(f"{PSTATE_DIR}/max_perf_pct", 150)
    assert sysfs.read_int(f"{PSTATE_DIR}/max_perf_pct") == 100
    sysfs.write(f"{PSTATE_DIR}/max_perf_pct", 10)
    assert sysfs.read_int(f"{PSTATE_DIR}/max_perf_pct") == floor  # not below min_perf_pct
    sysfs.write(f"{PSTATE_DIR}/max_perf_pct", 55)
    assert sysfs.effective_max_khz() == 1_700_000  # ceil(30 * 0.55) = 17 P-states
    sysfs.write(f"{PSTATE_DIR}/min_perf_pct", 80)
    assert sysfs.read_int(f"{PSTATE_DIR}/min_perf_pct") == 55  # not above max_perf_pct
    sysfs.write(f"{PSTATE_DIR}/min_perf_pct", 1)
    assert sysfs.read_int(f"{PSTATE_DIR}/min_perf_pct") == floor
    with pytest.raises(OSError) as exc:
        sysfs.write(f"{PSTATE_DIR}/max_perf_pct", "lots")
    assert exc.value.errno == errno.EINVAL
    assert sysfs.read_int(f"{PSTATE_DIR}/max_perf_pct") == 55


# -- discovery ---------------------------------------------------------------------------------


def test_discover_reports_range_table_driver_and_governor(tree: EmulatedCpufreqSysfs) -> None:
    info = CpufreqLever(tree).discover()
    assert info.available, info.why_not
    assert info.range["min_khz"] == 800_000
    assert info.range["max_khz"] == 3_000_000
    assert info.range["available_khz"] == list(range(800_000, 3_000_001, 100_000))
    assert info.range["policies"] == ["policy0", "policy1", "policy2", "policy3"]
    assert info.range["driver"] == "acpi-cpufreq"
    assert info.range["governor"] == "schedutil"


def test_discover_without_available_frequencies(tmp_path: Path) -> None:
    sysfs = make_cpufreq_tree(tmp_path, cpus=2, max_khz=3_400_000, driver="intel_cpufreq",
                              available_khz=[])
    info = CpufreqLever(sysfs).discover()
    assert info.available
    assert info.range["available_khz"] == []
    assert info.range["max_khz"] == 3_400_000
    assert info.range["driver"] == "intel_cpufreq"


def test_discover_without_cpufreq(tmp_path: Path) -> None:
    (tmp_path / "devices/system/cpu/cpu0").mkdir(parents=True)
    info = CpufreqLever(Sysfs(tmp_path)).discover()
    assert not info.available
    assert info.why_not == "no cpufreq driver loaded"


def test_discover_falls_back_to_per_cpu_directories(tmp_path: Path) -> None:
    sysfs = make_cpufreq_tree(tmp_path, cpus=2, per_cpu_dirs=True)
    assert not sysfs.exists(CPUFREQ)
    # a CPU sharing cpu0's policy, as old kernels linked it
    (tmp_path / "devices/system/cpu/cpu2").mkdir()
    (tmp_path / "devices/system/cpu/cpu2/cpufreq").symlink_to("../cpu0/cpufreq")
    lever = CpufreqLever(sysfs)
    assert lever.discover().range["policies"] == ["cpu0", "cpu1"]
    lever.apply(cap(1_450_000))
    assert sysfs.read_int("devices/system/cpu/cpu1/cpufreq/scaling_max_freq") == 1_400_000
    assert lever.read_back()["freq_khz"] == 1_400_000


def test_discover_read_only_limit_is_permission_denied_even_for_root(
    tree: EmulatedCpufreqSysfs,
) -> None:
    os.chmod(tree.path(f"{CPUFREQ}/policy2/scaling_max_freq"), 0o444)
    info = CpufreqLever(tree).discover()
    assert not info.available
    assert info.why_not.startswith("permission denied: run as root or install the udev rule")
    assert "policy2/scaling_max_freq" in info.why_not
    assert info.range["max_khz"] == 3_000_000  # what the board has is still reported


def test_discover_limit_that_is_a_directory_is_not_writable(tmp_path: Path) -> None:
    make_cpufreq_tree(tmp_path, cpus=1)
    target = tmp_path / P0 / "scaling_max_freq"
    target.unlink()
    target.mkdir()
    info = CpufreqLever(Sysfs(tmp_path)).discover()
    assert not info.available
    assert info.why_not.startswith("permission denied")


def test_discover_missing_limit_file(tmp_path: Path) -> None:
    make_cpufreq_tree(tmp_path, cpus=1)
    (tmp_path / P0 / "scaling_min_freq").unlink()
    info = CpufreqLever(Sysfs(tmp_path)).discover()
    assert not info.available
    assert info.why_not == f"{P0}/scaling_min_freq is missing: the driver offers no such limit here"


def _python_for_nobody(tree_root: Path) -> tuple[str, str]:
    """A Python that the user nobody can run with this checkout, and its discover() output."""
    code = textwrap.dedent("""
        import sys
        from qrad_agent.actuators.cpufreq import CpufreqLever
        from qrad_agent.sysfs import Sysfs
        info = CpufreqLever(Sysfs(sys.argv[1])).discover()
        print(info.available)
        print(info.why_not)
    """)
    env = {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}
    failures = []
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        try:
            done = subprocess.run(
                [python, "-c", code, str(tree_root)], user=65534, env=env, cwd="/",
                capture_output=True, text=True, timeout=30,
            )
        except OSError as exc:
            failures.append(f"{python}: {exc}")
            continue
        if done.returncode == 0:
            return python, done.stdout
        failures.append(f"{python}: {done.stderr.strip().splitlines()[-1:]}")
    pytest.skip("no Python runs as user nobody with this checkout: " + "; ".join(failures))


def test_discover_as_unprivileged_user_is_permission_denied() -> None:
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root")
    with tempfile.TemporaryDirectory(prefix="qrad-cpufreq-") as d:
        os.chmod(d, 0o755)  # nobody must reach the tree, but not write it
        make_cpufreq_tree(Path(d), cpus=2)
        _, out = _python_for_nobody(Path(d))
    available, why_not = out.splitlines()[:2]
    assert available == "False"
    assert why_not.startswith("permission denied: run as root or install the udev rule")


# -- apply and read back -----------------------------------------------------------------------


def test_apply_resolves_the_cap_and_read_back_shows_the_effect(
    tree: EmulatedCpufreqSysfs,
) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(2_550_000))
    back = lever.read_back()
    assert back["freq_khz"] == 2_500_000
    assert {p["max_khz"] for p in back["per_policy"].values()} == {2_500_000}
    assert back["per_policy"]["policy3"] == {
        "max_khz": 2_500_000, "min_khz": 800_000, "cur_khz": 2_500_000
    }
    assert tree.effective_max_khz() == 2_500_000


@pytest.mark.parametrize(
    ("asked", "effective"),
    [(10_000_000, 3_000_000), (800_000, 800_000), (1, 800_000), (0, 800_000), (-5, 800_000),
     (799_999, 800_000), (3_000_000, 3_000_000)],
)
def test_apply_clamps_to_the_hardware_range(
    tree: EmulatedCpufreqSysfs, asked: int, effective: int
) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(asked))
    assert lever.read_back()["freq_khz"] == effective
    assert limits(tree, "policy1") == (800_000, effective)
    assert all(int(v) >= 800_000 for _, v in tree.writes)  # clamped before writing


def test_apply_below_min_lowers_min_first_and_raising_brings_the_floor_back(
    tree: EmulatedCpufreqSysfs,
) -> None:
    tree.refuse_min_above_max = True  # an old kernel: the wrong order would fail here
    for n in range(4):
        tree.write(f"{CPUFREQ}/policy{n}/scaling_min_freq", 2_000_000)
    lever = CpufreqLever(tree)
    tree.writes.clear()
    lever.apply(cap(1_250_000))
    assert list(tree.writes)[:2] == [
        (f"{P0}/scaling_min_freq", "1200000"),
        (f"{P0}/scaling_max_freq", "1250000"),
    ]
    assert all(limits(tree, f"policy{n}") == (1_200_000, 1_200_000) for n in range(4))
    tree.writes.clear()
    lever.apply(cap(2_500_000))
    assert list(tree.writes)[:2] == [
        (f"{P0}/scaling_max_freq", "2500000"),
        (f"{P0}/scaling_min_freq", "2000000"),
    ]
    assert limits(tree) == (2_000_000, 2_500_000)
    lever.restore()
    assert all(limits(tree, f"policy{n}") == (2_000_000, 3_000_000) for n in range(4))


def test_apply_of_an_unchanged_cap_does_no_io(tree: EmulatedCpufreqSysfs) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(2_000_000))
    writes, reads = len(tree.writes), tree.reads
    for _ in range(RECHECK_EVERY - 1):
        lever.apply(cap(2_000_000))
    assert (len(tree.writes), tree.reads) == (writes, reads)
    # a different cap that resolves to the same frequency needs no write either
    lever.apply(cap(2_050_000))
    assert len(tree.writes) == writes
    many = 10 * RECHECK_EVERY
    for _ in range(many):
        lever.apply(cap(2_000_000))
    assert len(tree.writes) == writes
    assert tree.reads - reads <= (many // RECHECK_EVERY + 1) * 2 * 4  # max and min, 4 policies


def test_apply_writes_the_cap_again_when_someone_else_changed_it(
    tree: EmulatedCpufreqSysfs,
) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(2_000_000))
    tree.write(f"{CPUFREQ}/policy1/scaling_max_freq", 3_000_000)  # a technician, say
    lever.apply(cap(2_000_000))
    assert limits(tree, "policy1")[1] == 3_000_000  # not re-read on every tick
    for _ in range(RECHECK_EVERY):
        lever.apply(cap(2_000_000))
    assert limits(tree, "policy1")[1] == 2_000_000


def test_apply_failure_names_the_file_and_the_fix(tree: EmulatedCpufreqSysfs) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(2_000_000))
    os.chmod(tree.path(f"{CPUFREQ}/policy2/scaling_max_freq"), 0o444)
    with pytest.raises(LeverError) as exc:
        lever.apply(cap(1_500_000))
    message = str(exc.value)
    assert f"{CPUFREQ}/policy2/scaling_max_freq" in message
    assert "run as root or install the udev rule" in message
    assert isinstance(exc.value.__cause__, PermissionError)


def test_apply_without_cpufreq_raises(tmp_path: Path) -> None:
    with pytest.raises(LeverError, match="no cpufreq driver loaded"):
        CpufreqLever(Sysfs(tmp_path)).apply(cap(1_000_000))


# -- restore -----------------------------------------------------------------------------------


def test_restore_after_normal_exit(tree: EmulatedCpufreqSysfs, record: RestoreRecord) -> None:
    tree.write(f"{CPUFREQ}/policy3/scaling_max_freq", 2_700_000)  # the board's own setting
    lever = CpufreqLever(tree, record)
    lever.apply(cap(1_000_000))
    saved = json.loads(record.path.read_text())["levers"]["cpufreq"]
    assert saved[f"{CPUFREQ}/policy3/scaling_max_freq"] == "2700000"
    assert saved[f"{P0}/scaling_governor"] == "schedutil"
    assert tree.effective_max_khz() == 1_000_000
    lever.restore()
    assert [limits(tree, f"policy{n}") for n in range(4)] == [
        (800_000, 3_000_000), (800_000, 3_000_000), (800_000, 3_000_000), (800_000, 2_700_000)
    ]
    assert record.originals("cpufreq") == {}
    assert not record.path.exists()
    # the lever can be used again, and remembers afresh
    lever.apply(cap(900_000))
    assert record.originals("cpufreq")[f"{P0}/scaling_max_freq"] == "3000000"


def test_restore_without_apply_writes_nothing(tree: EmulatedCpufreqSysfs) -> None:
    lever = CpufreqLever(tree)
    tree.writes.clear()
    lever.restore()
    assert list(tree.writes) == []


def test_restore_puts_back_a_changed_governor(tree: EmulatedCpufreqSysfs) -> None:
    lever = CpufreqLever(tree)
    lever.apply(cap(1_000_000))
    tree.write(f"{P0}/scaling_governor", "powersave")
    lever.restore()
    assert tree.read(f"{P0}/scaling_governor") == "schedutil"


def test_next_start_restores_what_a_crashed_run_left(
    tree: EmulatedCpufreqSysfs, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "restore.json"
    crashed = CpufreqLever(tree, RestoreRecord(path, boot_id="boot-a"))
    crashed.apply(cap(1_300_000))
    del crashed  # no restore: the process died
    assert tree.effective_max_khz() == 1_300_000
    fresh = RestoreRecord(path, boot_id="boot-a")
    CpufreqLever(tree, fresh)
    assert [limits(tree, f"policy{n}") for n in range(4)] == [(800_000, 3_000_000)] * 4
    assert fresh.originals("cpufreq") == {}
    assert not path.exists()


def test_record_from_an_earlier_boot_is_not_restored(
    tree: EmulatedCpufreqSysfs, tmp_path: Path
) -> None:
    path = tmp_path / "restore.json"
    CpufreqLever(tree, RestoreRecord(path, boot_id="boot-a")).apply(cap(1_300_000))
    tree.write(f"{P0}/scaling_max_freq", 2_000_000)  # what this boot's scripts set
    after_reboot = RestoreRecord(path, boot_id="boot-b")
    assert after_reboot.originals("cpufreq") == {}
    CpufreqLever(tree, after_reboot)
    assert limits(tree)[1] == 2_000_000


def test_original_is_saved_before_the_first_write(
    tree: EmulatedCpufreqSysfs, tmp_path: Path
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    lever = CpufreqLever(tree, RestoreRecord(tmp_path / "not-a-dir" / "restore.json"))
    tree.writes.clear()
    with pytest.raises(LeverError, match="cannot save the original settings"):
        lever.apply(cap(1_000_000))
    assert list(tree.writes) == []
    assert tree.effective_max_khz() == 3_000_000


_CHILD = textwrap.dedent("""
    import signal
    import sys
    import time
    from pathlib import Path

    from qrad_agent.actuators.cpufreq import CpufreqLever
    from qrad_agent.actuators.restore import RestoreRecord
    from qrad_agent.core.models import Plan
    from qrad_agent.sim.cpufreq import EmulatedCpufreqSysfs

    root, record, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    lever = CpufreqLever(EmulatedCpufreqSysfs(root), RestoreRecord(record))
    if mode == "term":
        def on_term(signum, frame):
            lever.restore()
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
    lever.apply(Plan(slots=1, freq_khz=1_200_000, quota=1.0))
    print("capped", flush=True)
    while True:
        time.sleep(0.05)
""")


def _run_capping_child(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "sys"), str(tmp_path / "restore.json"), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "capped\n":
        proc.kill()
        pytest.fail(f"child did not cap: {line!r} {proc.communicate(timeout=10)[1]}")
    return proc


def test_sigterm_restores_the_tree(tmp_path: Path) -> None:
    make_cpufreq_tree(tmp_path / "sys").write(f"{P0}/scaling_min_freq", 2_000_000)
    files = Sysfs(tmp_path / "sys")  # the child's emulator owns the tree: read the files
    proc = _run_capping_child(tmp_path, "term")
    try:
        assert limits(files) == (1_200_000, 1_200_000)
        assert limits(files, "policy3") == (800_000, 1_200_000)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert limits(files) == (2_000_000, 3_000_000)
    assert [limits(files, f"policy{n}") for n in (1, 2, 3)] == [(800_000, 3_000_000)] * 3
    assert files.read(f"{P0}/scaling_cur_freq") == "3000000"
    assert not (tmp_path / "restore.json").exists()


def test_sigkill_leaves_the_cap_and_the_next_start_restores(tmp_path: Path) -> None:
    make_cpufreq_tree(tmp_path / "sys")
    proc = _run_capping_child(tmp_path, "kill")
    proc.kill()
    proc.communicate(timeout=10)
    files = Sysfs(tmp_path / "sys")
    assert limits(files, "policy2") == (800_000, 1_200_000)
    CpufreqLever(EmulatedCpufreqSysfs(tmp_path / "sys"), RestoreRecord(tmp_path / "restore.json"))
    assert [limits(files, f"policy{n}") for n in range(4)] == [(800_000, 3_000_000)] * 4


# -- the restore record ------------------------------------------------------------------------


def test_record_keeps_the_first_value_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "restore.json"
    rec = RestoreRecord(path, boot_id="b")
    rec.remember("cpufreq", "a/scaling_max_freq", "3000000")
    rec.remember("cpufreq", "a/scaling_max_freq", "1200000")
    rec.remember("other", "x", "1")
    assert rec.originals("cpufreq") == {"a/scaling_max_freq": "3000000"}
    again = RestoreRecord(path, boot_id="b")
    assert again.originals("cpufreq") == {"a/scaling_max_freq": "3000000"}
    again.forget("cpufreq")
    assert RestoreRecord(path, boot_id="b").originals("other") == {"x": "1"}
    assert RestoreRecord(path, boot_id="b").originals("cpufreq") == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["restore.json"]  # no temp files left


def test_corrupt_record_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "restore.json"
    path.write_text('{"format": 1, "levers": {"cpufreq": {"k": 5}}}')
    rec = RestoreRecord(path, boot_id="b")
    assert rec.originals("cpufreq") == {}
    assert not path.exists()
    assert (tmp_path / "restore.json.corrupt").exists()


# -- intel_pstate ------------------------------------------------------------------------------


@pytest.fixture
def pstate(tmp_path: Path) -> EmulatedCpufreqSysfs:
    return make_cpufreq_tree(tmp_path / "sys", driver="intel_pstate", intel_pstate=True)


def pct(sysfs: Sysfs) -> tuple[int, int]:
    lo = sysfs.read_int(f"{PSTATE_DIR}/min_perf_pct")
    return lo, sysfs.read_int(f"{PSTATE_DIR}/max_perf_pct")


def test_intel_pstate_discover_needs_active_mode(
    tmp_path: Path, pstate: EmulatedCpufreqSysfs
) -> None:
    info = IntelPstateLever(pstate).discover()
    assert info.available, info.why_not
    assert (info.range["min_khz"], info.range["max_khz"]) == (800_000, 3_000_000)
    assert info.range["available_khz"] == []
    passive = make_cpufreq_tree(tmp_path / "passive", driver="intel_cpufreq", intel_pstate=True)
    info = IntelPstateLever(passive).discover()
    assert not info.available and "passive mode" in info.why_not
    plain = make_cpufreq_tree(tmp_path / "plain")
    assert IntelPstateLever(plain).discover().why_not == "intel_pstate is not loaded"


@pytest.mark.parametrize(
    ("khz", "max_pct"),
    [(1_500_000, 50), (1_500_001, 51), (1_470_000, 49), (3_000_000, 100), (9_000_000, 100),
     (900_000, 30)],
)
def test_intel_pstate_maps_the_cap_to_a_rounded_up_percentage(
    pstate: EmulatedCpufreqSysfs, khz: int, max_pct: int
) -> None:
    lever = IntelPstateLever(pstate)
    lever.apply(cap(khz))
    assert pct(pstate)[1] == max_pct
    assert lever.read_back()["max_perf_pct"] == max_pct
    assert lever.read_back()["freq_khz"] == math.ceil(3_000_000 * max_pct / 100)


def test_intel_pstate_cap_below_the_hardware_floor_is_clamped(pstate: EmulatedCpufreqSysfs) -> None:
    lever = IntelPstateLever(pstate)
    pstate.writes.clear()
    lever.apply(cap(0))
    assert (f"{PSTATE_DIR}/max_perf_pct", "1") in pstate.writes
    assert pct(pstate) == (27, 27)  # the driver holds both at the lowest P-state
    assert lever.read_back()["max_perf_pct"] == 27


def test_intel_pstate_lowers_min_first_and_restores(pstate: EmulatedCpufreqSysfs) -> None:
    pstate.write(f"{PSTATE_DIR}/min_perf_pct", 60)
    lever = IntelPstateLever(pstate)
    pstate.writes.clear()
    lever.apply(cap(1_200_000))  # 40 %
    assert list(pstate.writes) == [
        (f"{PSTATE_DIR}/min_perf_pct", "40"),
        (f"{PSTATE_DIR}/max_perf_pct", "40"),
    ]
    assert pct(pstate) == (40, 40)
    assert pstate.effective_max_khz() == 1_200_000
    pstate.writes.clear()
    lever.apply(cap(2_700_000))  # 90 %: max first, then the floor back to 60
    assert list(pstate.writes) == [
        (f"{PSTATE_DIR}/max_perf_pct", "90"),
        (f"{PSTATE_DIR}/min_perf_pct", "60"),
    ]
    lever.restore()
    assert pct(pstate) == (60, 100)


def test_intel_pstate_no_turbo_is_left_alone_unless_asked(
    pstate: EmulatedCpufreqSysfs, record: RestoreRecord
) -> None:
    IntelPstateLever(pstate).apply(cap(2_000_000))
    assert pstate.read(f"{PSTATE_DIR}/no_turbo") == "0"
    assert all(not rel.endswith("no_turbo") for rel, _ in pstate.writes)
    lever = IntelPstateLever(pstate, record, no_turbo=True)
    lever.apply(cap(1_000_000))
    assert pstate.read(f"{PSTATE_DIR}/no_turbo") == "1"
    assert record.originals("intel_pstate")[f"{PSTATE_DIR}/no_turbo"] == "0"
    lever.restore()
    assert pstate.read(f"{PSTATE_DIR}/no_turbo") == "0"


def test_intel_pstate_crash_is_restored_on_next_start(
    pstate: EmulatedCpufreqSysfs, tmp_path: Path
) -> None:
    path = tmp_path / "restore.json"
    IntelPstateLever(pstate, RestoreRecord(path, boot_id="b")).apply(cap(1_500_000))
    assert pct(pstate)[1] == 50
    open_frequency_lever(pstate, RestoreRecord(path, boot_id="b"))
    assert pct(pstate) == (27, 100)


def test_open_frequency_lever_picks_by_intel_pstate_mode(tmp_path: Path) -> None:
    active = make_cpufreq_tree(tmp_path / "a", driver="intel_pstate", intel_pstate=True)
    passive = make_cpufreq_tree(tmp_path / "p", driver="intel_cpufreq", intel_pstate=True)
    plain = make_cpufreq_tree(tmp_path / "c")
    assert isinstance(open_frequency_lever(active), IntelPstateLever)
    assert isinstance(open_frequency_lever(passive), CpufreqLever)
    assert isinstance(open_frequency_lever(plain), CpufreqLever)
