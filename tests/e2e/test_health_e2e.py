"""``/readyz`` and ``/healthz`` of the real daemon, polled as kubelet polls them, through a containerd
restart (both containerd versions).

The daemon runs with ``--health-address`` and *no* metrics endpoint (the probes must not depend on
it). A poller thread GETs both paths every 50 ms with kubelet's 1 s timeout for the whole test and
records (time, path, status). The test then checks the sequence:

* before containerd goes away: ``/readyz`` 200 (registered, fake driver discovered);
* after containerd is stopped: ``/readyz`` 503 with a "not registered ... reconnecting" body, while
  ``/healthz`` keeps answering 200 (the event loop is alive; a liveness probe must not kill a
  plugin that is only waiting for containerd);
* after containerd is back and the daemon logged its second registration: ``/readyz`` 200 again.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .containerd import Containerd
from .gpu_plugin_runner import GpuPluginProcess, build_e2e_host
from .test_robustness_e2e import free_tcp_port


@dataclass(frozen=True)
class Probe:
    t: float
    path: str
    status: int  # 0: no answer (connection refused / timeout)
    body: str


def probe(port: int, path: str) -> Probe:
    t = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1.0) as r:
            return Probe(t, path, r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Probe(t, path, e.code, e.read().decode())
    except OSError:
        return Probe(t, path, 0, "")


class Poller(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.seen: list[Probe] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for path in ("/readyz", "/healthz"):
                self.seen.append(probe(self.port, path))
            time.sleep(0.05)

    def between(self, path: str, t0: float, t1: float) -> list[Probe]:
        return [p for p in self.seen if p.path == path and t0 <= p.t <= t1]


def wait_status(port: int, path: str, status: int, timeout: float = 15.0) -> Probe:
    deadline = time.monotonic() + timeout
    last = probe(port, path)
    while last.status != status:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never answered {status} within {timeout}s; last: {last}")
        time.sleep(0.05)
        last = probe(port, path)
    return last


def test_readiness_through_containerd_restart(containerd: Containerd, e2e_base: Path, tmp_path: Path) -> None:
    containerd.ensure_running()
    host = build_e2e_host(e2e_base, 1)
    port = free_tcp_port()
    plugin = GpuPluginProcess(
        host,
        containerd.nri_socket,
        tmp_path / "plugin",
        extra_args=["--health-address", f"127.0.0.1:{port}"],
    )
    poller = Poller(port)
    with plugin:
        ready = wait_status(port, "/readyz", 200)
        assert ready.body.startswith("ready"), ready
        poller.start()
        time.sleep(0.3)
        t_stop = time.monotonic()
        containerd.stop()
        down = wait_status(port, "/readyz", 503, timeout=10.0)
        assert "not registered" in down.body and "reconnecting" in down.body, down
        time.sleep(0.5)  # a few probes while containerd is away
        t_start = time.monotonic()
        containerd.start()
        plugin.wait_for("registered", count=2, timeout=20.0)
        back = wait_status(port, "/readyz", 200, timeout=10.0)
        time.sleep(0.3)
        poller.halt.set()
        poller.join(5)
        assert probe(port, "/metrics").status == 404  # metrics are off: only the probes are served
    before = poller.between("/readyz", 0, t_stop)
    assert before and all(p.status == 200 for p in before), before
    outage = poller.between("/readyz", down.t, t_start)
    assert outage and all(p.status == 503 for p in outage), outage
    health = poller.between("/healthz", 0, back.t + 0.3)
    assert len(health) >= 10 and all(p.status == 200 for p in health), [p for p in health if p.status != 200]
    after = poller.between("/readyz", back.t, time.monotonic())
    assert after and all(p.status == 200 for p in after), after
