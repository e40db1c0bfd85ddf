"""``nvidia-nri-plugin run``: the daemon (external, or launched by the runtime)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from nri_plugin.cli.common import EXIT_OK, EXIT_USAGE, UsageError, add_config_flags, load_layers

if TYPE_CHECKING:
    from nri_plugin.config import Layer, Settings

NAME = "run"
HELP = "run the plugin (external or runtime-launched)"
DESCRIPTION = (
    "Connect to containerd's NRI socket (or use the socket handed over in "
    "$NRI_PLUGIN_SOCKET when the runtime launched us) and serve until SIGTERM/SIGINT."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_flags(p)


# How long start-up waits for the first driver discovery before registering anyway. Registration
# must not wait for a slow or hanging NVML (nvmlInit can take many seconds without persistence
# mode): while the plugin is not registered, containerd creates GPU containers without GPUs (NRI
# fails open), whereas a registered plugin fails them with "driver discovery in progress" until the
# snapshot exists. The short wait only keeps the usual log order (discovered, then registered).
DISCOVERY_WAIT_S = 0.5


def process_age_ms() -> float | None:
    """Milliseconds since this process was started (from /proc; 10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        return max(0.0, (uptime - start_ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, IndexError):
        return None


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    """Serve until stopped; ``out`` is unused (the daemon logs, it prints nothing)."""
    import asyncio

    from nri_plugin import config as cfg
    from nri_plugin import logs
    from nri_plugin.errors import ConfigError

    launched = bool(environ.get("NRI_PLUGIN_SOCKET"))
    try:
        file_layer, flag_layer = load_layers(args, environ)
        settings = cfg.build(file_layer, flag_layer)
    except (ConfigError, UsageError) as e:
        # stderr is /dev/null for a runtime-launched plugin: also log where the operator will look.
        print(f"nvidia-nri-plugin: {e}", file=sys.stderr)
        if launched:
            log_file = str(cfg.flag_values(args).get("nri-plugin.log-file") or "")
            fallback = logs.Logger(logs.launched_sink(log_file, "logfmt"))
            fallback.error("configuration error; not starting", error=str(e))
            fallback.close()
        return EXIT_USAGE

    from nri_plugin.plugin import make_sink

    logger = logs.Logger(make_sink(settings, launched), logs.parse_level(settings.log_level))
    try:
        return asyncio.run(_serve(file_layer, flag_layer, settings, logger, launched, environ))
    except ConfigError as e:  # e.g. a bad NRI_PLUGIN_NAME/IDX/SOCKET from the environment
        logger.error("configuration error; not starting", error=str(e))
        print(f"nvidia-nri-plugin: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        logger.close()


async def _serve(
    file_layer: Layer,
    flag_layer: Layer,
    settings: Settings,
    logger: Any,
    launched: bool,
    environ: Mapping[str, str],
) -> int:
    import asyncio
    import logging
    import signal

    from nri_plugin import logs
    from nri_plugin.errors import ConfigError
    from nri_plugin.metrics import StubCounts
    from nri_plugin.notify import Notifier
    from nri_plugin.plugin import GpuPlugin
    from nri_plugin.wire import Stub

    logs.bridge_stdlib(logger)
    stdlib_logger = logging.getLogger("nri_plugin.wire.stub")
    for warning in file_layer.warnings:  # once per start; an NRI config's in GpuPlugin.configure
        logger.warning("toolkit configuration not applied", detail=warning)
    if file_layer.ignored:
        logger.debug(
            "ignoring toolkit keys this plugin does not use",
            source=file_layer.source,
            keys=list(file_layer.ignored),
        )
    stub_ref: list[Any] = []

    def counts() -> StubCounts:
        if not stub_ref:
            return StubCounts()
        stub = stub_ref[0]
        return StubCounts(stub.registrations, stub.reconnects, stub.registered.is_set())

    plugin = GpuPlugin(
        file_layer=file_layer,
        flag_layer=flag_layer,
        logger=logger,
        launched=launched,
        notifier=Notifier(environ),
        stub_counts=counts,
        state_dir=settings.state_dir,
    )
    health = await _start_health(settings, plugin, logger)
    await plugin.discover(budget=DISCOVERY_WAIT_S)
    stub = Stub.from_environment(
        plugin,
        name=settings.plugin_name,
        index=settings.plugin_index,
        socket_path=settings.socket_path,
        logger=stdlib_logger,
    )
    stub_ref.append(stub)
    plugin.updater = stub.update_containers
    loop = asyncio.get_running_loop()
    stopping: list[int] = []

    def stop(signum: int) -> None:
        if not stopping:
            logger.info("stopping", signal=signal.Signals(signum).name)
            plugin.notifier.stopping()
        stopping.append(signum)
        stub.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    plugin.start_background()
    age = process_age_ms()
    logger.info(
        "ready to register",
        mode="runtime-launched" if launched else "external",
        plugin=f"{settings.plugin_index}-{settings.plugin_name}",
        socket="fd " + environ.get("NRI_PLUGIN_SOCKET", "") if launched else settings.socket_path,
        startup_ms=round(age) if age is not None else "",
        pid=os.getpid(),
    )
    code = EXIT_OK
    try:
        await stub.run()
    except ConfigError:  # e.g. NRI_PLUGIN_SOCKET is no socket: cmd_run reports it, exit 2
        raise
    except Exception as e:
        logger.exception("plugin stopped on an unexpected error", e)
        code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await plugin.close()
        if health is not None:
            await health.close()
    logger.info("stopped", exit_code=code)
    return code


async def _start_health(settings: Settings, plugin: Any, logger: Any) -> Any:
    """The /readyz + /healthz listener when ``health-address`` is set (a bind error is logged)."""
    if not settings.health_address:
        return None
    from nri_plugin.health import HealthServer

    server = HealthServer(settings.health_address, plugin.readiness)
    try:
        listening = await server.start()
    except OSError as e:
        logger.error(
            "health endpoint not started; fix nri-plugin.health-address (probes will fail)",
            health_address=settings.health_address,
            error=str(e),
        )
        return None
    logger.info("health endpoint listening", health_address=settings.health_address, listening=listening)
    return server
