"""The former place of ``advface_engine.speed.telemetry``: its names, importable from here as before."""

from .speed.telemetry import *  # noqa: F403
