"""Plot of a simulated run: temperatures with the comfort band, heat power and slots."""

from __future__ import annotations

from pathlib import Path

from qrad_agent.sim.run import Kpis, Trace


def plot_trace(trace: Trace, kpis: Kpis, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'qrad-agent[plots]'"
        ) from None
    fig, (ax_t, ax_p) = plt.subplots(
        2, 1, figsize=(14, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    days = [h / 24.0 for h in trace.t_h]
    ax_t.fill_between(days, trace.band_lo, trace.band_hi, color="#cde8cd", step="post",
                      label="comfort band")
    ax_t.plot(days, trace.setpoint_c, color="#2a7a2a", lw=0.9, label="setpoint (schedule)")
    ax_t.plot(days, trace.target_c, color="#999999", lw=0.7, ls="--", label="agent target")
    ax_t.plot(days, trace.air_c, color="#c0392b", lw=1.1, label="room air")
    ax_out = ax_t.twinx()
    ax_out.plot(days, trace.outdoor_c, color="#2e86c1", lw=0.8, label="outdoor")
    ax_out.set_ylabel("outdoor °C", color="#2e86c1")
    ax_t.set_ylabel("room °C")
    ax_t.legend(loc="upper left", fontsize=8, ncol=4)
    ax_t.set_title(
        f"{kpis.scenario} — {kpis.controller}: discomfort {kpis.discomfort_kh:.2f} K·h, "
        f"energy {kpis.energy_kwh:.1f} kWh, RMS {kpis.rms_error_k:.3f} K, "
        f"{kpis.worker_starts} worker starts"
    )
    ax_p.plot(days, trace.power_w, color="#d35400", lw=0.8, label="heat (W)")
    ax_p.set_ylabel("W")
    ax_s = ax_p.twinx()
    ax_s.step(days, trace.slots, color="#7d3c98", lw=0.8, where="post", label="slots")
    ax_s.set_ylabel("slots", color="#7d3c98")
    ax_p.set_xlabel("day")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
