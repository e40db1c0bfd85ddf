"""A metrics sink for tests that records every call the plugin makes (the ``Metrics`` protocol of
``nri_plugin.metrics``), in order, as ``(event, detail)`` pairs."""

from __future__ import annotations

from nri_plugin.metrics import NullMetrics


class RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def details(self, event: str) -> list[str]:
        """The details of every ``event`` recorded, in order."""
        return [detail for name, detail in self.events if name == event]

    def adjusted(self, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("adjusted", ""))

    def failed(self, reason: str, seconds: float) -> None:
        self.events.append(("failed", reason))

    def skipped(self, seconds: float) -> None:
        self.events.append(("skipped", ""))

    def unadjusted(self, count: int) -> None:
        self.events.append(("unadjusted", str(count)))

    def ldcache(self, path: str, stage: str) -> None:
        self.events.append(("ldcache", f"{path}:{stage}"))

    def evicted(self, method: str) -> None:
        self.events.append(("evicted", method))
