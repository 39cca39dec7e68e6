"""The former name of ``advface_engine.backends.modules``: its names, importable from here as before."""

from .modules import *  # noqa: F403
