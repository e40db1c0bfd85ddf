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
    p.add_argument(
        "--layers",
        metavar="DIR[:DIR...]",
        help="also generate the container's ld.so.cache from these image layer directories (top "
        "first, as an overlay lowerdir), writing nothing, and show the path taken",
    )
    p.add_argument(
        "--container-id",
        metavar="ID",
        help="show how the running daemon made that container's ld.so.cache (its record under the "
        "state directory) and exit",
    )
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
    if args.container_id:
        return _show_record(settings.runtime_dir, args.container_id, args.output, out)
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
        if args.layers and req is not None and snapshot is not None:
            doc["ldcache"] = _ldcache_preview(settings, args.layers, env, adj.mounts, snapshot).record()
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
    _write_request(req, out)
    out.write("resolved GPUs:\n")
    for g in selection.gpus:
        out.write(f"  {g.index}  {g.uuid}  /dev/nvidia{g.minor}  {g.bus_id}  {g.model}\n")
    for m in selection.mig_devices:
        out.write(f"  {m.parent_index}:{m.index}  {m.uuid}\n")
    out.write("adjustment:\n")
    render_adjustment(adj, out)
    if args.layers and snapshot is not None:
        outcome = _ldcache_preview(settings, args.layers, env, adj.mounts, snapshot)
        out.write(f"ld.so.cache: {_describe(outcome.record())}\n")
        for key, value in outcome.env:
            out.write(f"  env {key}={value}\n")
    return EXIT_OK


def _write_request(req: Any, out: TextIO) -> None:
    """The resolved request, one field a line (the ones beyond the seed's only when set)."""
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


def _ldcache_preview(settings: Any, layers: str, env: list[str], mounts: Any, snapshot: Any) -> Any:
    from nri_plugin.image import LoaderService
    from nri_plugin.plugin import LIBCUDA_ENV_PREFIXES, loader_config

    own = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in env if e.startswith(LIBCUDA_ENV_PREFIXES)}
    dirs = tuple(d for d in layers.split(":") if d)
    return LoaderService(loader_config(settings)).preview(dirs, tuple(mounts), own, snapshot)


def _describe(record: Mapping[str, object]) -> str:
    if record.get("path") == "fallback":
        return f"path=fallback stage={record.get('stage')} reason: {record.get('reason')}"
    shown = (
        "entries",
        "driver_entries",
        "image_entries",
        "old_section",
        "compat",
        "compat_version",
        "lib_dir",
    )
    return f"path={record.get('path')} " + " ".join(f"{k}={record.get(k)}" for k in shown if k in record)


def _show_record(state_dir: str, container_id: str, output: str, out: TextIO) -> int:
    import json

    from nri_plugin.errors import ImageReadError
    from nri_plugin.image import CacheStore

    try:
        record = CacheStore(state_dir).read_record(container_id)
    except ImageReadError as e:
        raise UsageError(f"--container-id {container_id!r}: {e}") from None
    if record is None:
        out.write(
            f"container {container_id}: no ld.so.cache record under {state_dir!r} (not a GPU container, "
            "created with container-ldcache = off, already removed, or another runtime-dir)\n"
        )
        return EXIT_CONTAINER_ERROR
    if output == "json":
        json.dump({"container_id": container_id, "ldcache": record}, out, indent=2)
        out.write("\n")
    else:
        out.write(f"container {container_id}: ld.so.cache {_describe(record)}\n")
    return EXIT_OK
