"""A Batch Processing API V2 simulator: develop, demo and load-test without spending PUs.

See docs/simulator.md. The simulator imports nothing of the daemon.
"""

from worker.simulator.config import SimulatorConfig, build_parser_arguments, config_from_args
from worker.simulator.running import Running, serve, start_background

__all__ = [
    "Running",
    "SimulatorConfig",
    "build_parser_arguments",
    "config_from_args",
    "serve",
    "start_background",
]
