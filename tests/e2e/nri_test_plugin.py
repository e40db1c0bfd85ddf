"""The NRI test plugin of the wire end-to-end tests, and how to run it.

:class:`RecordingPlugin` records Configure and Synchronize, and answers CreateContainer:

- env ``NRI_TEST_ADJUST=1`` on the container → an adjustment with an env var, a char device node
  (major/minor taken from a host node, e.g. a ``mknod c 1 3`` twin of /dev/null) and a read-only
  bind mount of a host file (all described by :class:`AdjustSpec`);
- env ``NRI_TEST_FAIL=<text>`` → the handler raises, with ``<text>`` in the message;
- anything else → no adjustment.

:class:`PluginThread` runs a :class:`~nri_plugin.wire.stub.Stub` as an *external* plugin in a
background thread with its own event loop, so a test can drive CRI synchronously.
:func:`launched_main` is the entry point of the *runtime-launched* variant (see
``containerd.write_launched_plugin``): its :class:`AdjustSpec` comes from the plugin's config file
(JSON) through Configure, and it logs to a file (stdout/stderr are /dev/null there).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.stub import Plugin, Stub

ADJUST_MARKER = "NRI_TEST_ADJUST"
FAIL_MARKER = "NRI_TEST_FAIL"


@dataclass(frozen=True)
class AdjustSpec:
    """What the test adjustment adds."""

    env_name: str = "NRI_TEST_INJECTED"
    env_value: str = "injected-by-nri"
    device_host_path: str = ""  # a host char device node; its major/minor are used
    device_path: str = "/dev/nri-test0"
    device_mode: int = 0o666
    mount_source: str = ""  # a host file, bind-mounted read-only
    mount_destination: str = "/nri-test/hostfile"

    @classmethod
    def from_json(cls, text: str) -> AdjustSpec:
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def container_env(container: api.Container) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in container.env:
        key, _, value = item.partition("=")
        out[key] = value
    return out


def build_adjustment(spec: AdjustSpec) -> api.ContainerAdjustment:
    adjust = api.ContainerAdjustment(env=[api.KeyValue(key=spec.env_name, value=spec.env_value)])
    if spec.device_host_path:
        st = os.stat(spec.device_host_path)
        if not stat.S_ISCHR(st.st_mode):
            raise ValueError(f"device_host_path {spec.device_host_path!r} is not a character device")
        adjust.linux.devices.append(
            api.LinuxDevice(
                path=spec.device_path,
                type="c",
                major=os.major(st.st_rdev),
                minor=os.minor(st.st_rdev),
                file_mode=api.OptionalFileMode(value=spec.device_mode),
            )
        )
    if spec.mount_source:
        adjust.mounts.append(
            api.Mount(
                destination=spec.mount_destination,
                type="bind",
                source=spec.mount_source,
                options=["rbind", "ro", "nosuid", "nodev"],
            )
        )
    return adjust


@dataclass
class Records:
    """What the plugin saw (appended from the plugin's thread, read by the test)."""

    configures: list[tuple[str, str, str]] = field(default_factory=list)  # (config, name, version)
    syncs: list[tuple[list[api.PodSandbox], list[api.Container]]] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)  # container names
    adjusted: list[str] = field(default_factory=list)


class RecordingPlugin(Plugin):
    def __init__(
        self, spec: AdjustSpec, *, log: logging.Logger | None = None, spec_from_config: bool = False
    ):
        self.spec = spec
        self.spec_from_config = spec_from_config
        self.records = Records()
        self.log = log or logging.getLogger("nri-e2e-plugin")

    async def configure(self, config: str, runtime_name: str, runtime_version: str) -> None:
        self.log.info("configure runtime=%s version=%s config=%r", runtime_name, runtime_version, config)
        self.records.configures.append((config, runtime_name, runtime_version))
        if self.spec_from_config and config:
            self.spec = AdjustSpec.from_json(config)

    async def synchronize(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> list[api.ContainerUpdate]:
        self.log.info("synchronize pods=%d containers=%d", len(pods), len(containers))
        self.records.syncs.append((list(pods), list(containers)))
        return []

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        self.records.creates.append(container.name)
        env = container_env(container)
        if FAIL_MARKER in env:
            raise RuntimeError(f"nri-e2e plugin refuses container {container.name!r}: {env[FAIL_MARKER]}")
        if env.get(ADJUST_MARKER) != "1":
            return api.CreateContainerResponse()
        self.records.adjusted.append(container.name)
        self.log.info("adjusting container %s", container.name)
        return api.CreateContainerResponse(adjust=build_adjustment(self.spec))


class PluginThread:
    """Run ``plugin`` as an external NRI plugin on ``socket_path`` in a background thread."""

    def __init__(self, plugin: Plugin, socket_path: Path, *, name: str = "e2e", index: str = "50") -> None:
        self.plugin = plugin
        self.stub = Stub(plugin, name=name, index=index, socket_path=str(socket_path), reconnect=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=f"nri-plugin-{index}-{name}", daemon=True)
        self.error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.stub.run())
        except BaseException as exc:  # reported to the test by wait_registered / stop
            self.error = exc
        finally:
            self._loop.close()

    def start(self) -> PluginThread:
        self._thread.start()
        return self

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.error is not None:
                raise AssertionError(f"NRI test plugin died while waiting for {what}: {self.error!r}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what} "
                    f"(registrations={self.stub.registrations}, reconnects={self.stub.reconnects})"
                )
            time.sleep(0.01)

    def wait_registered(self, count: int = 1, timeout: float = 15.0) -> None:
        self.wait_for(f"registration #{count}", lambda: self.stub.registrations >= count, timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.stub.stop)
            self._thread.join(10)
        if self._thread.is_alive():
            raise AssertionError("NRI test plugin thread did not stop within 10s")
        if self.error is not None:
            raise AssertionError(f"NRI test plugin failed: {self.error!r}") from self.error

    def __enter__(self) -> PluginThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launched_main(log_file: str, default_name: str = "e2e", default_index: str = "10") -> None:
    """Entry point of the runtime-launched test plugin (no stdout/stderr, empty environment)."""
    logging.basicConfig(
        filename=log_file, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    log = logging.getLogger("nri-e2e-launched")
    log.info("started pid=%d env=%s", os.getpid(), sorted(os.environ))
    plugin = RecordingPlugin(AdjustSpec(), log=log, spec_from_config=True)
    stub = Stub.from_environment(plugin, name=default_name, index=default_index, logger=log)
    try:
        asyncio.run(stub.run())
    except Exception:
        log.exception("plugin failed")
        raise
    log.info("exiting: registrations=%d", stub.registrations)


__all__ = [
    "ADJUST_MARKER",
    "FAIL_MARKER",
    "AdjustSpec",
    "PluginThread",
    "RecordingPlugin",
    "build_adjustment",
    "launched_main",
]
