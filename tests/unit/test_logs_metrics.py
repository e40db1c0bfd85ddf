"""Structured logs (logfmt, JSON, journal, files), sd_notify, and the Prometheus endpoint."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import struct
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nri_plugin import logs, notify
from nri_plugin.host.model import DriverSnapshot, Gpu, HostRoots
from nri_plugin.metrics import NullMetrics, PrometheusMetrics, StubCounts, create, reason_label

TS = 1700000000.25


def rec(msg: str = "hello", level: logs.Level = logs.Level.INFO, **fields: object) -> logs.Record:
    return logs.Record(TS, level, msg, fields)


# ---------------------------------------------------------------------------------------------
# logfmt / JSON


def test_logfmt_line() -> None:
    line = logs.format_logfmt(
        rec("GPU container adjusted", container="c1", gpus=["GPU-a", "GPU-b"], ms=1.25, ok=True, none=None)
    )
    assert line == (
        'ts=2023-11-14T22:13:20.250Z level=info msg="GPU container adjusted" container=c1 '
        'gpus=GPU-a,GPU-b ms=1.25 ok=true none=""'
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak\ttab\r", '"line\\nbreak\\ttab\\r"'),
        ("bell\x07", '"bell\\u0007"'),
        ("ünïcode", "ünïcode"),
        (3, "3"),
        (0.0, "0"),
    ],
)
def test_logfmt_quoting(value: object, expected: str) -> None:
    assert logs.logfmt_value(value) == expected


def _logfmt_unquote(token: str) -> str:
    assert token.startswith('"') and token.endswith('"')
    decoded = json.loads(token)  # our escapes are a subset of JSON's
    assert isinstance(decoded, str)
    return decoded


@given(st.text())
def test_logfmt_value_is_one_token_and_reversible(value: str) -> None:
    token = logs.logfmt_value(value)
    if token.startswith('"'):
        assert _logfmt_unquote(token) == value
    else:
        assert token == value
        assert not any(c in token for c in ' ="') and token.isprintable()
    assert "\n" not in token


def test_logfmt_keys_are_sanitized() -> None:
    line = logs.format_logfmt(logs.Record(TS, logs.Level.INFO, "m", {"bad key=": 1}))
    assert line.endswith(" bad_key_=1")


def test_json_line() -> None:
    doc = json.loads(
        logs.format_json(
            rec("m", level=logs.Level.ERROR, gpus=("a",), n=2, msg_="x", caps=frozenset({"b", "a"}))
        )
    )
    assert doc == {
        "ts": "2023-11-14T22:13:20.250Z",
        "level": "error",
        "msg": "m",
        "gpus": ["a"],
        "n": 2,
        "msg_": "x",
        "caps": ["a", "b"],
    }


def test_json_does_not_let_fields_clobber_the_envelope() -> None:
    doc = json.loads(logs.format_json(logs.Record(TS, logs.Level.INFO, "real", {"msg": "fake"})))
    assert doc["msg"] == "real"
    assert doc["field.msg"] == "fake"


# ---------------------------------------------------------------------------------------------
# Logger behaviour


def test_logger_levels_bind_and_reconfigure() -> None:
    buf = io.StringIO()
    log = logs.Logger(logs.StreamSink(buf), logs.Level.INFO)
    child = log.bind(component="driver")
    log.debug("hidden")
    child.info("shown", n=1)
    assert buf.getvalue().count("\n") == 1
    assert "component=driver n=1" in buf.getvalue()
    buf2 = io.StringIO()
    log.reconfigure(sink=logs.StreamSink(buf2, "json"), level=logs.Level.DEBUG)
    child.debug("now shown")  # the child follows its parent's new sink and level
    assert json.loads(buf2.getvalue())["component"] == "driver"


def test_logger_exception_has_traceback() -> None:
    buf = io.StringIO()
    log = logs.Logger(logs.StreamSink(buf, "json"))
    try:
        raise ValueError("boom")
    except ValueError as e:
        log.exception("failed", e, where="x")
    doc = json.loads(buf.getvalue())
    assert doc["error"] == "ValueError: boom"
    assert "Traceback" in doc["traceback"] and "raise ValueError" in doc["traceback"]


def test_a_failing_sink_never_raises() -> None:
    class Broken:
        def emit(self, rec: logs.Record) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError("close failed")

    log = logs.Logger(Broken())
    log.error("lost")
    log.info("lost too")
    assert log.dropped == 2
    log.close()


def test_file_sink_appends_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "plugin.log"
    log = logs.Logger(logs.FileSink(str(path)))
    log.info("one")
    os.rename(path, tmp_path / "plugin.log.1")  # logrotate
    log.info("two")
    log.close()
    assert "msg=one" in (tmp_path / "plugin.log.1").read_text()
    assert "msg=two" in path.read_text() and "msg=one" not in path.read_text()


def test_file_sink_to_an_unwritable_place_drops(tmp_path: Path) -> None:
    log = logs.Logger(logs.FileSink(str(tmp_path / "no" / "such" / "dir.log")))
    log.info("x")
    assert log.dropped == 1


def _journal_fields(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    while data:
        nl = data.index(b"\n")
        line = data[:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            out[k.decode()] = v.decode()
            data = data[nl + 1 :]
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            out[line.decode()] = data[nl + 9 : nl + 9 + size].decode()
            assert data[nl + 9 + size : nl + 10 + size] == b"\n"
            data = data[nl + 10 + size :]
    return out


def test_journal_format() -> None:
    data = logs.format_journal(
        rec(
            "adjusted",
            level=logs.Level.WARNING,
            container_id="abc",
            traceback="line1\nline2",
            **{"9weird-name": "v", "message": "m"},
        )
    )
    fields = _journal_fields(data)
    assert fields == {
        "MESSAGE": "adjusted",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "nvidia-nri-plugin",
        "CONTAINER_ID": "abc",
        "TRACEBACK": "line1\nline2",
        "WEIRD_NAME": "v",
        "FIELD_MESSAGE": "m",
    }


def test_journal_sink_sends_datagrams(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        sink = logs.launched_sink("", "logfmt", journal_socket=path)
        assert isinstance(sink, logs.JournalSink)
        log = logs.Logger(sink)
        log.info("to the journal", gpus=2)
        fields = _journal_fields(server.recv(65536))
        log.close()
    assert fields["MESSAGE"] == "to the journal"
    assert fields["PRIORITY"] == "6"
    assert fields["GPUS"] == "2"


def test_launched_sink_choice(tmp_path: Path) -> None:
    f = logs.launched_sink(str(tmp_path / "x.log"), "json", journal_socket=str(tmp_path / "nosock"))
    assert isinstance(f, logs.FileSink) and f.path == str(tmp_path / "x.log")
    d = logs.launched_sink("", "json", journal_socket=str(tmp_path / "nosock"))
    assert isinstance(d, logs.FileSink) and d.path == logs.DEFAULT_LAUNCHED_LOG_FILE
    assert isinstance(logs.default_sink("", "logfmt"), logs.StreamSink)


def test_stdlib_bridge() -> None:
    buf = io.StringIO()
    log = logs.Logger(logs.StreamSink(buf), logs.Level.INFO)
    lg = logs.bridge_stdlib(log, "nri_plugin_test_bridge")
    logging.getLogger("nri_plugin_test_bridge.wire").warning(
        "peer %s closed", "x", extra={"fields": {"n": 1}}
    )
    logging.getLogger("nri_plugin_test_bridge.wire").debug("not shown")
    out = buf.getvalue()
    assert 'level=warning msg="peer x closed" logger=nri_plugin_test_bridge.wire n=1' in out
    assert "not shown" not in out
    log.reconfigure(level=logs.Level.DEBUG)
    logs.sync_bridge_level(log, "nri_plugin_test_bridge")
    logging.getLogger("nri_plugin_test_bridge.wire").debug("now shown")
    assert "now shown" in buf.getvalue()
    lg.handlers.clear()
    lg.propagate = True


def test_parse_level() -> None:
    assert logs.parse_level("WARN") is logs.Level.WARNING
    with pytest.raises(ValueError, match="'loud'"):
        logs.parse_level("loud")


# ---------------------------------------------------------------------------------------------
# sd_notify


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_ready_once(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"nri-plugin-test-{os.getpid()}"
            server.bind(b"\0" + name.encode())
            env = {"NOTIFY_SOCKET": "@" + name}
        else:
            path = str(tmp_path / "notify")
            server.bind(path)
            env = {"NOTIFY_SOCKET": path}
        server.settimeout(2)
        n = notify.Notifier(env)
        assert n.ready("registered")
        first = dict(line.split("=", 1) for line in server.recv(4096).decode().split("\n"))
        assert (
            first["READY"] == "1" and first["STATUS"] == "registered" and first["MAINPID"] == str(os.getpid())
        )
        assert n.ready("registered again")  # second time: STATUS only
        assert server.recv(4096) == b"STATUS=registered again"
        assert n.stopping()
        assert server.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_notify_without_socket_is_a_noop() -> None:
    n = notify.Notifier({})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.ready_sent
    assert not notify.notify({"READY": "1"}, {"NOTIFY_SOCKET": "vsock:2:123"})
    assert not notify.notify({"READY": "1"}, {"NOTIFY_SOCKET": "/nonexistent/socket"})


def test_notify_rejects_newlines() -> None:
    with pytest.raises(ValueError, match="STATUS"):
        notify.format_state({"STATUS": "a\nb"})


# ---------------------------------------------------------------------------------------------
# Metrics


def _snapshot() -> DriverSnapshot:
    return DriverSnapshot(
        roots=HostRoots(),
        driver_version="550.54.14",
        cuda_version="12.4",
        source="nvml",
        gpus=(Gpu(0, "GPU-0", 0, "00000000:01:00.0"), Gpu(1, "GPU-1", 1, "00000000:02:00.0")),
    )


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_prometheus_endpoint() -> None:
    counts = StubCounts(registrations=3, reconnects=2, registered=True)
    m = PrometheusMetrics("127.0.0.1:0", stub_counts=lambda: counts, snapshot=_snapshot)
    _, port = m.start()
    try:
        m.adjusted(0.002)
        m.adjusted(0.003)
        m.failed(reason_label("DeviceSelectionError"), 0.001)
        m.skipped(0.0001)
        m.ldcache("image-cache", "")
        m.ldcache("fallback", "containerd")
        m.ldcache("fallback", "containerd")
        v = _scrape(port)
    finally:
        m.close()
    assert v['nri_gpu_ldcache_total{path="image-cache",stage=""}'] == 1
    assert v['nri_gpu_ldcache_total{path="fallback",stage="containerd"}'] == 2
    assert v["nri_gpu_containers_adjusted_total"] == 2
    assert v['nri_gpu_containers_failed_total{reason="device_selection"}'] == 1
    assert v["nri_gpu_containers_skipped_total"] == 1
    assert v["nri_gpu_create_container_seconds_count"] == 4
    assert v['nri_gpu_create_container_seconds_bucket{le="0.0025"}'] == 3
    assert v["nri_gpu_plugin_registrations_total"] == 3
    assert v["nri_gpu_plugin_reconnects_total"] == 2
    assert v["nri_gpu_plugin_registered"] == 1
    assert v["nri_gpu_driver_gpus"] == 2
    assert v["nri_gpu_driver_available"] == 1
    assert v['nri_gpu_driver_info{cuda_version="12.4",driver_version="550.54.14",source="nvml"}'] == 1
    assert v["process_resident_memory_bytes"] > 1_000_000  # the standard process collector
    assert v["process_cpu_seconds_total"] > 0
    assert not [k for k in v if "_created" in k]


def test_prometheus_without_driver() -> None:
    m = PrometheusMetrics("127.0.0.1:0")
    assert m.listening == ""
    _, port = m.start()
    try:
        # Port 0 asked for a free port: `listening` tells which one (the daemon logs it).
        assert port != 0 and m.listening == f"127.0.0.1:{port}"
        v = _scrape(port)
    finally:
        m.close()
    assert m.listening == ""
    assert v["nri_gpu_driver_available"] == 0
    assert v["nri_gpu_driver_gpus"] == 0
    assert v["nri_gpu_plugin_registered"] == 0
    assert not any(k.startswith("nri_gpu_driver_info{") for k in v)


def test_disabled_metrics_are_a_noop() -> None:
    m = create("")
    assert isinstance(m, NullMetrics)
    assert m.address == "" and m.listening == ""
    m.adjusted(1.0)
    m.failed("x", 1.0)
    m.skipped(1.0)
    m.ldcache("fallback", "image")
    m.close()


# ---------------------------------------------------------------------------------------------
# Metric names: docs == exposition, reason labels, the shipped PrometheusRule


def _error_classes() -> list[type]:
    from nri_plugin import errors
    from nri_plugin.plugin import InternalError

    seen: list[type] = []
    todo: list[type] = [errors.ContainerError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    assert InternalError in seen
    return seen


def test_reason_labels_are_stable_snake_case() -> None:
    assert reason_label("DriverNotFoundError") == "driver_not_found"
    assert reason_label("InternalError") == "internal"
    assert reason_label("NVMLError") == "nvml"
    assert reason_label("CUDAVersionError") == "cuda_version"
    labels = {cls.__name__: reason_label(cls.__name__) for cls in _error_classes()}
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", v) for v in labels.values()), labels
    assert len(set(labels.values())) == len(labels), labels  # no two classes share a label


def exposed_names(text: str) -> set[str]:
    """Metric names as a scrape exposes them (counters with ``_total``, histograms by base name)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(text)}


def documented_names() -> set[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)`", section, re.M))


def test_documented_metric_names_are_exactly_the_exported_ones() -> None:
    from prometheus_client import generate_latest

    m = PrometheusMetrics("127.0.0.1:0", snapshot=_snapshot)
    m.failed("internal", 0.001)
    m.evicted("signal")
    names = exposed_names(generate_latest(m.registry).decode())
    assert not [n for n in names if n.endswith("_created")]
    assert {n for n in names if n.startswith("process_")} >= {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    }
    assert documented_names() == names, (
        f"undocumented: {sorted(names - documented_names())}; "
        f"documented, not exported: {sorted(documented_names() - names)}"
    )


def test_prometheus_rule_alerts_on_exported_metrics_only() -> None:
    import yaml  # type: ignore[import-untyped]
    from prometheus_client import generate_latest

    rule = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "prometheusrule.yaml").read_text()
    )
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == "nvidia-nri-plugin"
    m = PrometheusMetrics("127.0.0.1:0", snapshot=_snapshot)
    text = generate_latest(m.registry).decode()
    samples = set(re.findall(r"^([a-z_]+)", text, re.M)) | exposed_names(text)
    alerts = {}
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r
            assert re.fullmatch(r"[0-9]+[smh]", r["for"]), r
            assert r["labels"]["severity"] in ("warning", "critical")
            assert r["annotations"]["summary"] and r["annotations"]["description"]
            used = set(re.findall(r"\b(nri_gpu_[a-z_]+|process_[a-z_]+)\b", r["expr"]))
            assert used and used <= samples, (r["alert"], used - samples)
            assert r["expr"].count("(") == r["expr"].count(")"), r["expr"]
            alerts[r["alert"]] = r
    assert {
        "NvidiaNriPluginNotRegistered",
        "NvidiaNriPluginFailuresRising",
        "NvidiaNriPluginDriverUnavailable",
    } <= set(alerts)
    assert alerts["NvidiaNriPluginNotRegistered"]["for"] == "1m"
