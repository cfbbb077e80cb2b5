"""A room as two thermal nodes (2R2C): the air with the furniture, and the walls and floor.

    heater, gains ──► air (C_air) ──g_air_mass── mass (C_mass) ──g_mass_out── outside
                        └───────────── g_air_out (+ g_window) ──────────────────┘

A share ``heater_to_air`` of the heater power (and of the gains) enters the air; the rest
warms the mass directly (radiant heat falling on walls and floor). The air reacts in tens of
minutes, the mass in days: that lag is what makes a warm-up slow and a night mild.

Inputs are held constant over a step, and the step is integrated exactly: for constant
inputs the state relaxes to the equilibrium ``x*`` as ``x(t + dt) = x* + exp(A dt)(x - x*)``.
``exp(A dt)`` is cached per (dt, window), so a step is a dozen float operations and is exact
for any ``dt``, however large.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Bounds catch unit slips (kJ typed for J, W/m²K for W/K) while allowing any real room.
_Capacity = Annotated[float, Field(ge=1e3, le=1e10)]
_Conductance = Annotated[float, Field(gt=0, le=1e4)]


class RoomParams(BaseModel):
    """Heat capacities in J/K, conductances in W/K (a conductance is 1 / resistance)."""

    model_config = ConfigDict(extra="forbid")

    c_air_j_per_k: _Capacity = Field(
        description="heat capacity of the air node: room air plus furniture and surfaces that "
        "follow the air within minutes (J/K)"
    )
    c_mass_j_per_k: _Capacity = Field(
        description="heat capacity of the mass node: walls, floor, ceiling (J/K)"
    )
    g_air_mass_w_per_k: _Conductance = Field(
        description="conductance between the air and the mass (W/K); must be above 0"
    )
    g_mass_out_w_per_k: _Conductance = Field(
        description="conductance from the mass to the outside, through the walls (W/K)"
    )
    g_air_out_w_per_k: _Conductance = Field(
        description="conductance from the air straight to the outside: infiltration, "
        "glazing, ventilation (W/K)"
    )
    g_window_w_per_k: Annotated[float, Field(ge=0, le=1e4)] = Field(
        description="extra air-to-outside conductance while a window is open (W/K)"
    )
    heater_to_air: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.8, description="share of heater power and gains that enters the air; the rest "
        "enters the mass"
    )
    initial_c: Annotated[float, Field(ge=-30, le=40)] | None = Field(
        default=None,
        description="start temperature of both nodes (°C); unset: the scenario's eco_c",
    )


_Matrix = tuple[float, float, float, float]
_CACHE_LIMIT = 64  # a caller with jittering dt must not grow the cache without bound


class Room2R2C:
    """The room's state (``air_c``, ``mass_c``) and its exact step."""

    def __init__(self, params: RoomParams, air_c: float, mass_c: float | None = None) -> None:
        self.params = params
        self.air_c = float(air_c)
        self.mass_c = float(air_c if mass_c is None else mass_c)
        # Per window state: the equilibrium gains (K per W of input), A's entries.
        self._gain: dict[bool, tuple[float, float]] = {}
        self._a: dict[bool, _Matrix] = {}
        for window in (False, True):
            self._gain[window], self._a[window] = self._network(window)
        self._phi: dict[tuple[float, bool], _Matrix] = {}
        self._last_key: tuple[float, bool] = (math.nan, False)
        self._last_phi: _Matrix = (1.0, 0.0, 0.0, 1.0)

    def _network(self, window: bool) -> tuple[tuple[float, float], _Matrix]:
        p = self.params
        g_am = p.g_air_mass_w_per_k
        g_ao = p.g_air_out_w_per_k + (p.g_window_w_per_k if window else 0.0)
        g_mo = p.g_mass_out_w_per_k
        f = p.heater_to_air
        # Nodal equations G (x - T_out) = [f, 1 - f] Q give the steady rise per watt.
        det = (g_am + g_ao) * (g_am + g_mo) - g_am * g_am
        k_air = ((g_am + g_mo) * f + g_am * (1.0 - f)) / det
        k_mass = (g_am * f + (g_am + g_ao) * (1.0 - f)) / det
        c_a, c_m = p.c_air_j_per_k, p.c_mass_j_per_k
        a = (-(g_am + g_ao) / c_a, g_am / c_a, g_am / c_m, -(g_am + g_mo) / c_m)
        return (k_air, k_mass), a

    def _transition(self, dt: float, window: bool) -> _Matrix:
        a11, a12, a21, a22 = self._a[window]
        # A = -C⁻¹G with G symmetric positive definite and g_am > 0: two distinct negative
        # real eigenvalues, so the spectral form of exp(A dt) is well conditioned.
        half_tr = 0.5 * (a11 + a22)
        s = math.sqrt(0.25 * (a11 - a22) ** 2 + a12 * a21)
        l1, l2 = half_tr + s, half_tr - s
        e1, e2 = math.exp(l1 * dt), math.exp(l2 * dt)
        inv = 1.0 / (2.0 * s)
        # exp(A dt) = (e1 (A - l2 I) - e2 (A - l1 I)) / (l1 - l2)
        return (
            (e1 * (a11 - l2) - e2 * (a11 - l1)) * inv,
            (e1 - e2) * a12 * inv,
            (e1 - e2) * a21 * inv,
            (e1 * (a22 - l2) - e2 * (a22 - l1)) * inv,
        )

    def step(
        self,
        dt: float,
        heat_w: float,
        outdoor_c: float,
        window_open: bool = False,
        gains_w: float = 0.0,
    ) -> None:
        """Advance ``dt`` seconds with the inputs held constant over the step."""
        key = (dt, window_open)
        if key == self._last_key:
            phi = self._last_phi
        else:
            if not dt >= 0.0:
                raise ValueError(f"dt must be a number of seconds >= 0, got {dt!r}")
            found = self._phi.get(key)
            if found is None:
                if len(self._phi) >= _CACHE_LIMIT:
                    self._phi.clear()
                found = self._phi[key] = self._transition(dt, window_open)
            phi = found
            self._last_key, self._last_phi = key, phi
        k_air, k_mass = self._gain[window_open]
        q = heat_w + gains_w
        eq_a = outdoor_c + q * k_air
        eq_m = outdoor_c + q * k_mass
        da = self.air_c - eq_a
        dm = self.mass_c - eq_m
        self.air_c = eq_a + phi[0] * da + phi[1] * dm
        self.mass_c = eq_m + phi[2] * da + phi[3] * dm

    def steady_state_power_w(self, inside_c: float, outdoor_c: float) -> float:
        """Heater power that holds the air at ``inside_c`` for good (window shut, no gains).

        Negative when the outside is warmer than ``inside_c``. It exceeds
        ``ua_w_per_k() * ΔT`` when part of the heat goes into the mass, because some of that
        heat leaks out through the walls without ever warming the air.
        """
        return (inside_c - outdoor_c) / self._gain[False][0]

    def ua_w_per_k(self) -> float:
        """Total loss conductance from the air to the outside, window shut (W/K)."""
        p = self.params
        g_am, g_mo = p.g_air_mass_w_per_k, p.g_mass_out_w_per_k
        return p.g_air_out_w_per_k + g_am * g_mo / (g_am + g_mo)
