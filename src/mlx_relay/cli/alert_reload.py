"""Reloading the alerting rules of a running coordinator from its configuration file (SIGHUP).

Only the rules change (the rules file, or the stock rules with new thresholds); a rule that
keeps its name and labels keeps its alerts' states, so nothing fires or resolves again
because of a reload. An invalid file is logged and the current rules stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

from mlx_relay.core.config import ClusterConfig
from mlx_relay.core.errors import ConfigError
from mlx_relay.monitoring.alerting import AlertEngine, configured_rules

logger = logging.getLogger(__name__)


def reload_alert_rules(engine: AlertEngine, config_path: str | Path) -> bool:
    """Load the rules ``config_path`` asks for into ``engine``; False (and logged) if invalid."""
    try:
        config = ClusterConfig.from_yaml(config_path)
        rules = configured_rules(config.alerting, config.inference)
    except ConfigError as exc:
        logger.error("alerting rules not reloaded, the current ones stay: %s", exc)
        return False
    engine.reload(rules)
    return True


@contextlib.contextmanager
def reload_on_hangup(
    engine_source: Callable[[], AlertEngine | None], config_path: str | Path
) -> Iterator[None]:
    """While the block runs, SIGHUP reloads the rules of the engine ``engine_source`` returns."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        engine = engine_source()
        if engine is None:
            logger.warning("SIGHUP: alerting is not running, nothing to reload")
            return
        reload_alert_rules(engine, config_path)

    loop.add_signal_handler(signal.SIGHUP, reload)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
