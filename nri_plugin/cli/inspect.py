"""``nvidia-nri-plugin inspect``: dry-run one container as the plugin would decide it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from nri_plugin.cli.common import (
    EXIT_CONTAINER_ERROR,
    EXIT_OK,
    UsageError,
    add_config_flags,
    gpu_dict,
    host_snapshot,
    load_layers,
    render_adjustment,
    vars_of,
)

NAME = "inspect"
HELP = "dry-run one container: its request and the exact adjustment"
DESCRIPTION = (
    "Decide as the plugin would, without containerd. The container comes from "
    "--env/--mount/--privileged or from --container-json (an NRI Container in "
    "protobuf JSON)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="container env entry (repeatable)"
    )
    p.add_argument(
        "--mount", action="append", default=[], metavar="SRC:DST", help="container bind mount (repeatable)"
    )
    p.add_argument("--privileged", action="store_true", help="treat the container as privileged")
    p.add_argument(
        "--annotation",
        action="append",
        default=[],
        metavar="K=V",
        help="container annotation (repeatable), e.g. cdi.k8s.io/x=nvidia.com/gpu=0",
    )
    p.add_argument(
        "--device", action="append", default=[], metavar="PATH", help="device node already in the spec"
    )
    p.add_argument("--container-json", metavar="FILE", help="NRI Container as protobuf JSON ('-' = stdin)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    add_config_flags(p, host_only=True)


def _context(args: argparse.Namespace, container: Any | None) -> tuple[dict[str, str], tuple[str, ...]]:
    """(annotations, device paths already in the spec) from the container and the flags."""
    from nri_plugin.request import container_annotations, device_paths

    annotations = container_annotations(container) if container is not None else {}
    for entry in args.annotation:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise UsageError(
                f"--annotation {entry!r}: expected K=V, e.g. --annotation cdi.k8s.io/x=nvidia.com/gpu=0"
            )
        annotations[key] = value
    present = device_paths(container) if container is not None else ()
    return annotations, (*present, *args.device)


def _load_container(args: argparse.Namespace) -> Any | None:
    if not args.container_json:
        return None
    from google.protobuf import json_format

    from nri_plugin.wire import api

    try:
        if args.container_json == "-":
            text = sys.stdin.read()
        else:
            with open(args.container_json, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise UsageError(f"--container-json {args.container_json!r}: {e.strerror}") from None
    try:
        return json_format.Parse(text, api.Container())
    except json_format.ParseError as e:
        raise UsageError(
            f"--container-json {args.container_json!r} is not an NRI Container in protobuf JSON: {e}"
        ) from None


def _container_inputs(
    args: argparse.Namespace, container: Any | None
) -> tuple[list[str], list[Any], bool, str]:
    """(env, mounts, privileged, label) from the --container-json container or the flags."""
    from nri_plugin.request import Mount

    if container is not None:
        from nri_plugin.request import request_inputs

        env, mounts, privileged = request_inputs(container)
        return list(env), list(mounts), privileged or args.privileged, container.name or container.id
    for entry in args.env:
        if "=" not in entry:
            raise UsageError(f"--env {entry!r}: expected K=V, e.g. --env NVIDIA_VISIBLE_DEVICES=all")
    mounts = []
    for m in args.mount:
        src, sep, dst = m.partition(":")
        if not sep or not dst.startswith("/"):
            raise UsageError(
                f"--mount {m!r}: expected SRC:DST with an absolute DST, e.g. "
                f"--mount /dev/null:/var/run/nvidia-container-devices/0"
            )
        mounts.append(Mount(source=src, destination=dst))
    return list(args.env), mounts, bool(args.privileged), "inspect"


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import json

    from nri_plugin import config as cfg
    from nri_plugin.adjust import EMPTY_SELECTION, decide
    from nri_plugin.errors import ContainerError

    file_layer, flag_layer = load_layers(args, environ)
    settings = cfg.build(file_layer, flag_layer)
    container = _load_container(args)
    env, mounts, privileged, label = _container_inputs(args, container)
    annotations, present = _context(args, container)
    snapshot, why = host_snapshot(settings)
    try:
        decision = decide(
            env, mounts, privileged, settings.hook, snapshot, annotations=annotations, device_paths=present
        )
    except ContainerError as e:
        if args.output == "json":
            json.dump({"container": label, "error": str(e), "reason": type(e).__name__}, out, indent=2)
            out.write("\n")
        else:
            out.write(f"container {label}: would FAIL ({type(e).__name__}):\n  {e}\n")
            if snapshot is None and why:
                out.write(f"  (host driver: {why})\n")
        return EXIT_CONTAINER_ERROR
    req, adj = decision.request, decision.adjustment
    selection = decision.selection or EMPTY_SELECTION
    if args.output == "json":
        from google.protobuf import json_format

        from nri_plugin.adjust import to_proto

        doc: dict[str, object] = {
            "container": label,
            "request": None if req is None else vars_of(req),
            "gpus": [] if req is None else [gpu_dict(g) for g in selection.gpus],
            "mig_devices": [] if req is None else [m.uuid for m in selection.mig_devices],
            "adjustment": json_format.MessageToDict(to_proto(adj), preserving_proto_field_name=True),
            "warnings": list(decision.warnings),
            "left_alone": decision.left_alone,
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return EXIT_OK
    for warning in decision.warnings:
        out.write(f"warning: {warning}\n")
    if req is None:
        out.write(f"container {label}: no GPU requested; the plugin returns an empty adjustment\n")
        return EXIT_OK
    if decision.left_alone:
        out.write(f"container {label}: GPU request left alone: {decision.left_alone}\n")
        return EXIT_OK
    out.write(f"container {label}: GPU request\n")
    out.write(
        f"  devices:       {req.devices or '(none: GPU container without GPUs)'}"
        f" (from {req.devices_source})\n"
    )
    if req.management:
        out.write("  management:    every NVIDIA device node (management.nvidia.com/gpu=all)\n")
    if req.imex_ids:
        out.write(f"  imex channels: {','.join(req.imex_ids)}\n")
    if req.features:
        out.write(f"  features:      {','.join(sorted(req.features))}\n")
    if req.foreign_devices:
        out.write(f"  left to the runtime: {','.join(req.foreign_devices)}\n")
    out.write(f"  capabilities:  {req.driver_capabilities}\n")
    out.write(
        f"  requirements:  {' ; '.join(req.requirements) or '(none)'}"
        f"{' (disabled by NVIDIA_DISABLE_REQUIRE/disable-require)' if req.disable_require else ''}\n"
    )
    if req.mig_config_devices or req.mig_monitor_devices:
        out.write(f"  mig config:    {req.mig_config_devices}\n  mig monitor:   {req.mig_monitor_devices}\n")
    out.write("resolved GPUs:\n")
    for g in selection.gpus:
        out.write(f"  {g.index}  {g.uuid}  /dev/nvidia{g.minor}  {g.bus_id}  {g.model}\n")
    for m in selection.mig_devices:
        out.write(f"  {m.parent_index}:{m.index}  {m.uuid}\n")
    out.write("adjustment:\n")
    render_adjustment(adj, out)
    return EXIT_OK
