"""The fleet link: MQTT 5 to the fleet (telemetry, state, signed commands), store-and-forward.

Kept import-light on purpose: ``config.py`` imports ``link.settings``, so nothing here may
import paho or the agent.
"""
