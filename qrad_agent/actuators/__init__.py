"""Levers: the ways the agent changes how much heat the board makes.

``open_levers`` finds the ones this board has and says why the others are missing. Every
lever is created even where it is missing or switched off, because creating one puts back
what a crashed run left changed (from the ``RestoreRecord`` in the state directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    # only for types: config.py imports actuators.settings, which runs this file first
    from qrad_agent.actuators.base import Lever, LeverInfo
    from qrad_agent.actuators.settings import (
        CgroupConfig,
        DutyCycleConfig,
        RaplLimitConfig,
        WorkersConfig,
    )
    from qrad_agent.config import CpufreqConfig
    from qrad_agent.core.power import PowerModel
    from qrad_agent.sysfs import Sysfs

RESTORE_FILE = "restore.json"


class LeverConfig(Protocol):
    """What ``open_levers`` reads: the ``[actuators]`` section (``config.ActuatorsConfig``)."""

    @property
    def cpufreq(self) -> CpufreqConfig: ...
    @property
    def workers(self) -> WorkersConfig: ...
    @property
    def cgroups(self) -> CgroupConfig: ...
    @property
    def duty_cycle(self) -> DutyCycleConfig: ...
    @property
    def rapl(self) -> RaplLimitConfig: ...


def open_levers(
    cfg: LeverConfig,
    sysfs_root: Path | str,
    state_dir: Path | None,
    *,
    model: PowerModel | None = None,
    sysfs: Sysfs | None = None,
) -> tuple[list[Lever], list[LeverInfo]]:
    """The levers this board has, in the order they should be applied and restored, and
    the inventory of every lever (available or not, and why) for ``meta``.

    ``state_dir`` None opens them without a restore record: for looking only (``actuators
    show``), since a lever with a record puts back a crashed run's originals on creation,
    and with a live agent those are the agent's own changes. ``model`` turns a plan into
    the watts the RAPL limit is set from; without one the RAPL lever is left out.
    ``sysfs`` replaces the plain ``Sysfs(sysfs_root)`` (an emulator, for the simulator and
    tests); cgroups are still found under ``sysfs_root`` unless the config names a root.

    Order: the duty cycle stops signalling before the workers stop; the workers start
    before (and stop before) the quota lever makes (and removes) their cgroup; the
    frequency and power caps last, as they need no processes.
    """
    from qrad_agent.actuators.base import LeverInfo
    from qrad_agent.actuators.cgroups import QuotaLever, WorkerCgroup
    from qrad_agent.actuators.cpufreq import open_frequency_lever
    from qrad_agent.actuators.rapl import RaplLimitLever
    from qrad_agent.actuators.restore import RestoreRecord
    from qrad_agent.actuators.workers import DutyCycle, WorkerSlots
    from qrad_agent.core.power import PowerModel
    from qrad_agent.sysfs import Sysfs

    sysfs = sysfs if sysfs is not None else Sysfs(sysfs_root)
    record = RestoreRecord(Path(state_dir) / RESTORE_FILE) if state_dir is not None else None
    levers: list[Lever] = []
    inventory: list[LeverInfo] = []

    freq_info = LeverInfo("cpufreq", False, "disabled in config (actuators.cpufreq.enabled)")
    freq = open_frequency_lever(sysfs, record)  # created anyway: it restores on creation
    if cfg.cpufreq.enabled:
        freq_info = freq.discover()

    cgroup_root = cfg.cgroups.root or Path(sysfs_root) / "fs" / "cgroup"
    cgroup = WorkerCgroup(cfg.cgroups, cgroup_root, record)
    quota = QuotaLever(cgroup)
    quota_info = quota.discover()
    freeze_info = cgroup.freeze_info()
    usable = quota_info.available or freeze_info.available
    workers = WorkerSlots(cfg.workers, record, cgroup if usable else None)
    workers_info = workers.discover()

    duty_cfg = cfg.duty_cycle
    finer = freq_info.available or quota_info.available
    if duty_cfg.mode == "off":
        duty_info = LeverInfo("duty_cycle", False, "disabled in config (duty_cycle.mode = off)")
    elif duty_cfg.mode == "auto" and finer:
        duty_info = LeverInfo(
            "duty_cycle", False,
            "not needed: a frequency cap or a cgroup quota throttles the workers "
            "(duty_cycle.mode = on forces it)",
        )
    elif not workers_info.available:
        duty_info = LeverInfo("duty_cycle", False, f"no workers to cycle: {workers_info.why_not}")
    else:
        duty = DutyCycle(workers, duty_cfg)
        duty_info = duty.discover()
        levers.append(duty)

    if workers_info.available:
        levers.append(workers)
    if quota_info.available:
        levers.append(quota)
    if freq_info.available:
        levers.append(freq)

    rapl_cfg = cfg.rapl
    rapl_model = model or PowerModel(0.0, 1.0, 1.0, 1)  # only to restore; never applied
    rapl = RaplLimitLever(sysfs, rapl_model, rapl_cfg, record)
    if not rapl_cfg.enabled:
        rapl_info = LeverInfo("rapl", False, "disabled in config (actuators.rapl.enabled)")
    elif model is None:
        rapl_info = LeverInfo("rapl", False, "no power model to set the limit from")
    else:
        rapl_info = rapl.discover()
        if rapl_info.available:
            levers.append(rapl)

    inventory += [workers_info, duty_info, quota_info, freeze_info, freq_info, rapl_info]
    return levers, inventory
