"""The former place of ``advface_engine.speed.report`` (``advface bench-report``): its names, importable
from here as before."""

from .speed.report import *  # noqa: F403
