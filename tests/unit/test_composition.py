"""The extension point of issue 8: a new kind of host artefact is one discoverer plus one rule.

The test adds both from outside (as a later change would, in ``host.discover.DISCOVERERS`` and
``adjust.build.RULES``) and checks that nothing else is needed: the artefact's file is pinned like
every mount source, its device node and mount reach the adjustment only when the rule wants them,
and a swap of the file is refused on the hot path.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.adjust import build
from nri_plugin.adjust.build import Need, artefact_rule, plan
from nri_plugin.adjust.pipeline import decide
from nri_plugin.errors import DriverChangedError
from nri_plugin.host import DeviceNode, DriverSnapshot, HostFile
from nri_plugin.host.discover import DISCOVERERS, Context, discover, first_valid
from nri_plugin.request import GpuRequest, HookConfig
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus


def _widget(ctx: Context) -> Mapping[str, Any]:
    """A made-up artefact: /dev/nvidia-widget (char 195:200) and /etc/widget.json."""
    dev = os.path.join(ctx.roots.dev_root, "dev/nvidia-widget")
    conf = os.path.join(ctx.roots.driver_root, "etc/widget.json")
    items: list[DeviceNode | HostFile] = []
    if os.path.exists(dev):
        st = os.stat(dev)
        items.append(DeviceNode("/dev/nvidia-widget", dev, "c", 195, 200, st.st_mode & 0o7777, 0, 0))
    if os.path.isfile(conf):
        items.append(HostFile("/etc/widget.json", conf, ctx.roots.driver_root))
    return {"artefacts": {"widget": tuple(items)}}


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    h = build_fake_host(tmp_path / "root", gpus=make_gpus(1))
    os.mknod(h.path("/dev/nvidia-widget"), stat.S_IFCHR | 0o666, os.makedev(195, 200))
    h.path("/etc/widget.json").write_text('{"widget": 1}')
    return h


@pytest.fixture
def widget_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = artefact_rule("widget", lambda need: "graphics" in need.caps)
    monkeypatch.setattr(build, "RULES", (*build.RULES, ("widget", wanted)))


def _snap(host: FakeHost) -> DriverSnapshot:
    snap = discover(host.roots, use_nvml=False, discoverers=(*DISCOVERERS, ("widget", _widget)))
    assert snap is not None
    return snap


def test_one_discoverer_and_one_rule_add_an_artefact(host: FakeHost, widget_rule: None) -> None:
    snap = _snap(host)
    conf = str(host.path("/etc/widget.json"))
    assert [type(i).__name__ for i in snap.artefacts["widget"]] == ["DeviceNode", "HostFile"]
    assert conf in snap.pins  # pinned like every mount source, without a word from the discoverer
    with_it = plan(GpuRequest("0", "", "", "graphics,utility", (), False), snap)
    assert "/dev/nvidia-widget" in [d.path for d in with_it.adjustment.devices]
    assert {m.destination: m.source for m in with_it.adjustment.mounts}["/etc/widget.json"] == conf
    assert with_it.unpinned == ()
    without = plan(GpuRequest("0", "", "", "utility", (), False), snap)
    assert "/dev/nvidia-widget" not in [d.path for d in without.adjustment.devices]
    assert "/etc/widget.json" not in {m.destination for m in without.adjustment.mounts}


def test_an_artefact_file_swapped_after_discovery_is_refused(host: FakeHost, widget_rule: None) -> None:
    snap = _snap(host)
    conf = host.path("/etc/widget.json")
    conf.unlink()
    conf.symlink_to("/etc/shadow")
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=graphics,utility"]
    with pytest.raises(DriverChangedError):
        decide(env, [], False, HookConfig(), snap)


def test_first_valid_takes_the_first_that_finds_something() -> None:
    seen: list[str] = []

    def nothing(ctx: Context) -> None:
        seen.append("nothing")
        return None

    def something(ctx: Context) -> Mapping[str, Any]:
        seen.append("something")
        return {"x": 1}

    def never(ctx: Context) -> Mapping[str, Any]:
        raise AssertionError("not reached")

    assert first_valid(nothing, something, never)(None) == {"x": 1}  # type: ignore[arg-type]
    assert seen == ["nothing", "something"]


def test_rules_see_typed_request_values(host: FakeHost) -> None:
    """The builder reads the request's parsed values; it never splits the strings again."""
    seen: list[Need] = []

    def spy(need: Need) -> list[DeviceNode]:
        seen.append(need)
        return []

    snap = discover(host.roots, use_nvml=False)
    assert snap is not None
    rules = (*build.RULES, ("spy", spy))
    original = build.RULES
    build.RULES = rules
    try:
        plan(GpuRequest(" 0 ,", "", "", "utility, compute", (), False), snap)
    finally:
        build.RULES = original
    (need,) = seen
    assert need.caps == frozenset({"utility", "compute"}) and [g.index for g in need.selection.gpus] == [0]
