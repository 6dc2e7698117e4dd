"""The simulator (being split into modules)."""

from batch.simulator.app import *  # noqa: F403
from batch.simulator.app import __all__ as __all__
from batch.simulator.app import changed_config as changed_config
