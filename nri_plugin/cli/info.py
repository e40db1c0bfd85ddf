"""``nvidia-nri-plugin info``: what the host driver offers, per driver capability."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from nri_plugin.cli.common import (
    CAPABILITIES,
    EXIT_NO_DRIVER,
    EXIT_OK,
    add_config_flags,
    gpu_dict,
    host_snapshot,
    items,
    load_layers,
    vars_of,
)

if TYPE_CHECKING:
    from nri_plugin.config import Settings
    from nri_plugin.host import DriverSnapshot

NAME = "info"
HELP = "show what the host driver offers"
DESCRIPTION = (
    "Discover the host driver as the plugin does and show GPUs, versions, and per "
    "driver capability what would be injected, and what is missing."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=("text", "json"), default="text")
    add_config_flags(p, host_only=True)


def capability_report(snapshot: DriverSnapshot, settings: Settings) -> dict[str, dict[str, object]]:
    """Per capability, what a privileged ``NVIDIA_VISIBLE_DEVICES=all`` container would get."""
    import dataclasses

    from nri_plugin.adjust import decide
    from nri_plugin.errors import ContainerError

    hook = dataclasses.replace(settings.hook, supported_driver_capabilities=",".join(CAPABILITIES))
    report: dict[str, dict[str, object]] = {}
    for cap in CAPABILITIES:
        env = [
            "NVIDIA_VISIBLE_DEVICES=all",
            f"NVIDIA_DRIVER_CAPABILITIES={cap}",
            "NVIDIA_DISABLE_REQUIRE=true",
        ]
        try:
            adj = decide(env, [], True, hook, snapshot).adjustment
        except ContainerError as e:
            report[cap] = {"error": str(e)}
            continue
        report[cap] = {
            "devices": [d.path for d in adj.devices],
            "mounts": [m.destination for m in adj.mounts],
            "hooks": [h.path for h in adj.create_container_hooks],
        }
    return report


FEATURES = (
    ("NVIDIA_IMEX_CHANNELS", "imex-channels"),
    ("NVIDIA_GDS=enabled", "gds"),
    ("NVIDIA_MOFED=enabled", "mofed"),
    ("NVIDIA_GDRCOPY=enabled", "gdrcopy"),
    ("NVIDIA_NVSWITCH=enabled", "nvswitch"),
)


def feature_report(snapshot: DriverSnapshot) -> dict[str, list[str]]:
    """What each request-gated feature adds on this node (device nodes and files, by path)."""
    from nri_plugin.host import DeviceNode

    report: dict[str, list[str]] = {}
    for variable, artefact in FEATURES:
        report[variable] = [
            item.path if isinstance(item, DeviceNode) else item.container_path
            for item in snapshot.artefacts.get(artefact, ())
        ]
    return report


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import json

    from nri_plugin import config as cfg

    file_layer, flag_layer = load_layers(args, environ)
    settings = cfg.build(file_layer, flag_layer)
    snap, why = host_snapshot(settings)
    if snap is None:
        msg = (
            f"no usable NVIDIA driver under {settings.roots}: {why or 'not found'}; check the driver is "
            f"loaded (/proc/driver/nvidia/version) or point --driver-root/--proc-root/--dev-root at it"
        )
        if args.output == "json":
            json.dump({"error": msg}, out, indent=2)
            out.write("\n")
        else:
            out.write(msg + "\n")
        return EXIT_NO_DRIVER
    caps = capability_report(snap, settings)
    features = feature_report(snap)
    if args.output == "json":
        doc = {
            "source": snap.source,
            "driver_version": snap.driver_version,
            "cuda_version": snap.cuda_version,
            "roots": vars_of(snap.roots),
            "gpus": [gpu_dict(g) for g in snap.gpus],
            "char_majors": dict(snap.char_majors),
            "mig_minors": dict(snap.mig_minors),
            "capabilities": caps,
            "features": features,
            "missing": list(snap.missing),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(
        f"driver {snap.driver_version}, CUDA {snap.cuda_version or 'unknown (no NVML)'}, "
        f"source {snap.source}\n"
    )
    out.write(f"roots: {snap.roots}\n")
    out.write(f"GPUs ({len(snap.gpus)}):\n")
    for g in snap.gpus:
        out.write(
            f"  {g.index}  {g.uuid}  minor {g.minor}  {g.bus_id}  {g.model or '?'}  brand "
            f"{g.brand or '?'}  cc {g.compute_capability or '?'}"
            + ("  MIG enabled" if g.mig_enabled else "")
            + "\n"
        )
        for m in g.mig_devices:
            out.write(
                f"     {g.index}:{m.index}  {m.uuid}  gi {m.gpu_instance_id} ci {m.compute_instance_id}\n"
            )
    out.write("char majors: " + ", ".join(f"{k}={v}" for k, v in sorted(snap.char_majors.items())) + "\n")
    ok = [c for c in CAPABILITIES if "error" not in caps[c]]
    common: set[str] = set()
    if ok:
        common = set.intersection(*(set(items(caps[c])) for c in ok))
    out.write(f"injected for every capability ({len(common)}):\n")
    for item in sorted(common):
        out.write(f"  {item}\n")
    for cap in CAPABILITIES:
        entry = caps[cap]
        if "error" in entry:
            out.write(f"capability {cap}: ERROR {entry['error']}\n")
            continue
        extra = [i for i in items(entry) if i not in common]
        out.write(f"capability {cap} (+{len(extra)}):\n")
        for item in extra:
            out.write(f"  {item}\n")
    out.write("on request (what each variable adds here):\n")
    for name, paths in features.items():
        out.write(f"  {name}: {', '.join(paths) if paths else 'nothing on this node'}\n")
    out.write(f"missing ({len(snap.missing)}):\n")
    for note in snap.missing:
        out.write(f"  {note}\n")
    return EXIT_OK
