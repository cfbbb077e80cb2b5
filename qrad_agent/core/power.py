"""The power model: what a compute plan draws, and so how much heat it makes.

    watts = idle_w + slots * slot_w * (freq / max_freq) ** freq_exponent * quota

Dynamic CPU power grows faster than linearly with frequency (voltage rises with it), hence
the exponent. The model is used when nothing measures, by the allocator to turn a heat
demand into a plan, and by the simulator as the radiator's physics.
"""

from __future__ import annotations

from dataclasses import dataclass

from qrad_agent.core.models import Plan


@dataclass(frozen=True, slots=True)
class PowerModel:
    idle_w: float
    slot_w: float
    freq_exponent: float
    max_freq_khz: int

    def slot_share(self, freq_khz: float) -> float:
        """One slot's power at ``freq_khz`` as a share of its power at full frequency."""
        return float((freq_khz / self.max_freq_khz) ** self.freq_exponent)

    def watts(self, plan: Plan) -> float:
        return self.watts_of(plan.slots, plan.freq_khz, plan.quota)

    def watts_of(self, slots: int, freq_khz: float, quota: float) -> float:
        if slots <= 0:
            return self.idle_w
        return self.idle_w + slots * self.slot_w * self.slot_share(freq_khz) * quota

    def max_w(self, slots: int) -> float:
        return self.idle_w + slots * self.slot_w
