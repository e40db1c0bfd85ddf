"""``nvidia-nri-plugin install``: install (or remove) the runtime-launched plugin."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from nri_plugin.cli.common import EXIT_OK, EXIT_REFUSED, UsageError

NAME = "install"
HELP = "install as a runtime-launched plugin (/opt/nri/plugins/NN-NAME)"
DESCRIPTION = (
    "Write an executable NN-NAME into the NRI plugin directory that starts this "
    "plugin with this Python interpreter, independent of the (empty) environment "
    "containerd gives it; optionally install a config as <config-dir>/NN-NAME.conf."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin-dir", default="/opt/nri/plugins", metavar="DIR")
    p.add_argument("--config-dir", default="/etc/nri/conf.d", metavar="DIR")
    p.add_argument("--index", default="10", metavar="NN", help="two digits (default 10)")
    p.add_argument("--name", default="nvidia-gpu", metavar="NAME", help="default nvidia-gpu")
    p.add_argument(
        "--config-file", metavar="FILE", help="TOML to install as <config-dir>/NN-NAME.conf (validated first)"
    )
    p.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `run` baked into the script, e.g. --run-arg=--log-file=/x.log",
    )
    p.add_argument("--uninstall", action="store_true", help="remove what install wrote")


INSTALL_MARKER = (
    "# written by `nvidia-nri-plugin install`; remove with `nvidia-nri-plugin install --uninstall`"
)


def _package_parent() -> str:
    import nri_plugin

    return os.path.dirname(os.path.dirname(os.path.abspath(nri_plugin.__file__)))


def install_script(
    run_args: Sequence[str], executable: str | None = None, package_parent: str | None = None
) -> str:
    """The text of the runtime-launched executable."""
    exe = os.path.abspath(executable or sys.executable)
    parent = package_parent or _package_parent()
    return (
        f"#!{exe} -I\n"
        f"{INSTALL_MARKER}\n"
        "# containerd starts this with an empty environment (only NRI_PLUGIN_*) and stdout/stderr on\n"
        "# /dev/null; -I ignores PYTHON* variables and the user site, the path below finds the package.\n"
        "import sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "from nri_plugin.cli import main\n"
        f"sys.exit(main({['run', *run_args]!r}))\n"
    )


def _ours(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return True  # nothing to protect
    except OSError:
        return False
    return INSTALL_MARKER in head.splitlines()[:3]


def _write_atomic(path: str, data: str, mode: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(OSError)


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import re
    import subprocess

    from nri_plugin import config as cfg

    if not re.fullmatch(r"[0-9][0-9]", args.index):
        raise UsageError(f"--index {args.index!r}: must be two digits 00-99, e.g. --index 10")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        raise UsageError(f"--name {args.name!r}: use only [A-Za-z0-9_.+-], e.g. --name nvidia-gpu")
    base = f"{args.index}-{args.name}"
    script = os.path.join(args.plugin_dir, base)
    conf = os.path.join(args.config_dir, base + ".conf")
    targets = [script, conf]
    for path in targets:
        if not _ours(path):
            out.write(
                f"refusing to {'remove' if args.uninstall else 'overwrite'} {path}: it was not written by "
                f"`nvidia-nri-plugin install`; move it away or pick another --index/--name\n"
            )
            return EXIT_REFUSED
    if args.uninstall:
        for path in targets:
            try:
                os.unlink(path)
                out.write(f"removed {path}\n")
            except FileNotFoundError:
                pass
        return EXIT_OK
    conf_text = None
    if args.config_file:
        try:
            with open(args.config_file, encoding="utf-8") as f:
                body = f.read()
        except OSError as e:
            raise UsageError(f"--config-file {args.config_file!r}: {e.strerror}") from None
        for warning in cfg.parse_toml(body, args.config_file).warnings:  # errors raise ConfigError
            print(f"nvidia-nri-plugin: warning: {warning}", file=sys.stderr)
        conf_text = f"{INSTALL_MARKER}\n{body}"
    # The interpreter must import the package without any environment: check before writing.
    text = install_script(args.run_arg)
    probe = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {_package_parent()!r}); import nri_plugin.cli",
        ],
        env={},
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise UsageError(
            f"{sys.executable} cannot import nri_plugin with an empty environment: "
            f"{probe.stderr.strip().splitlines()[-1:]}; install the package for that interpreter"
        )
    os.makedirs(args.plugin_dir, exist_ok=True)
    _write_atomic(script, text, 0o755)
    out.write(f"installed {script}\n")
    if conf_text is not None:
        os.makedirs(args.config_dir, exist_ok=True)
        _write_atomic(conf, conf_text, 0o644)
        out.write(f"installed {conf}\n")
    return EXIT_OK
