"""The ``nvidia-nri-plugin`` command: inspect, info, install, and ``run`` as containerd starts it."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from google.protobuf import json_format

from nri_plugin import cli
from nri_plugin.adjust.pipeline import decide
from nri_plugin.adjust.proto import to_proto
from nri_plugin.request.model import HookConfig
from nri_plugin.wire._gen import api_pb2 as api
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    return build_fake_host(tmp_path_factory.mktemp("clihost") / "root", gpus=make_gpus(2))


def host_args(root: Path | str) -> list[str]:
    r = str(root)
    return [
        "--driver-root",
        r,
        "--dev-root",
        r,
        "--proc-root",
        f"{r}/proc",
        "--sys-root",
        f"{r}/sys",
        "--run-root",
        r,
    ]


def run_cli(argv: Sequence[str], environ: dict[str, str] | None = None) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(list(argv), environ={} if environ is None else environ, out=out)
    return code, out.getvalue()


# ---------------------------------------------------------------------------------------------
# help and usage


@pytest.mark.parametrize("command", [[], ["run"], ["inspect"], ["info"], ["install"]])
def test_help_everywhere_documents_exit_codes(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "exit codes:" in text and "3  info" in text


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["inspect", "--output", "yaml"])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------
# inspect


def test_inspect_text(host: FakeHost) -> None:
    code, out = run_cli(
        [
            "inspect",
            *host_args(host.root),
            "--no-nvml",
            "--env",
            "NVIDIA_VISIBLE_DEVICES=1",
            "--env",
            "NVIDIA_DRIVER_CAPABILITIES=utility",
            "--env",
            "NVIDIA_REQUIRE_DRIVER=driver>=500",  # /proc knows the driver version (not CUDA's)
        ]
    )
    assert code == 0
    assert "devices:       1" in out and "capabilities:  utility" in out and "driver>=500" in out
    assert host.gpus[1].uuid in out and host.gpus[0].uuid not in out
    assert "/dev/nvidia1  c 195:1  mode 0666  uid 0 gid 0" in out
    assert "/usr/bin/nvidia-smi <- " in out and "[bind: ro,nosuid,nodev,rbind,rprivate]" in out


def test_inspect_json_is_the_exact_adjustment(host: FakeHost) -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=compute"]
    code, out = run_cli(
        [
            "inspect",
            *host_args(host.root),
            "--no-nvml",
            "--output",
            "json",
            *[a for e in env for a in ("--env", e)],
        ]
    )
    assert code == 0
    doc = json.loads(out)
    from nri_plugin.host.discover import discover

    snap = discover(host.roots, use_nvml=False)
    expected = decide(env, [], False, HookConfig(), snap)
    want = json_format.MessageToDict(to_proto(expected.adjustment), preserving_proto_field_name=True)
    assert doc["adjustment"] == want
    assert doc["request"]["devices"] == "all"
    assert [g["uuid"] for g in doc["gpus"]] == [g.uuid for g in host.gpus]


def test_inspect_container_json(host: FakeHost, tmp_path: Path) -> None:
    c = api.Container(id="abc", name="trainer", env=["NVIDIA_VISIBLE_DEVICES=0"])
    path = tmp_path / "c.json"
    path.write_text(json_format.MessageToJson(c))
    code, out = run_cli(["inspect", *host_args(host.root), "--no-nvml", "--container-json", str(path)])
    assert code == 0
    assert out.startswith("container trainer: GPU request")
    assert "/dev/nvidia0  c 195:0" in out


def test_inspect_volume_mount_request_via_set(host: FakeHost) -> None:
    args = [
        "inspect",
        *host_args(host.root),
        "--no-nvml",
        "--env",
        "NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices",
        "--mount",
        "/dev/null:/var/run/nvidia-container-devices/1",
    ]
    code, out = run_cli(args)  # volume mounts not accepted: the env value is taken as a device id
    assert code == 1 and "/var/run/nvidia-container-devices: unknown device" in out
    code, out = run_cli([*args, "--set", "accept-nvidia-visible-devices-as-volume-mounts=true"])
    assert code == 0, out
    assert "/dev/nvidia1  c 195:1" in out


def test_inspect_non_gpu(host: FakeHost) -> None:
    code, out = run_cli(["inspect", *host_args(host.root), "--no-nvml", "--env", "PATH=/bin"])
    assert code == 0
    assert "no GPU requested" in out


def test_inspect_error_is_what_the_user_gets(host: FakeHost) -> None:
    code, out = run_cli(["inspect", *host_args(host.root), "--no-nvml", "--env", "NVIDIA_VISIBLE_DEVICES=9"])
    assert code == 1
    assert "would FAIL (DeviceSelectionError)" in out and "9: unknown device" in out
    code, out = run_cli(
        [
            "inspect",
            *host_args(host.root),
            "--no-nvml",
            "--output",
            "json",
            "--env",
            "NVIDIA_VISIBLE_DEVICES=9",
        ]
    )
    assert code == 1
    assert json.loads(out)["reason"] == "DeviceSelectionError"


def test_inspect_without_driver(tmp_path: Path) -> None:
    code, out = run_cli(["inspect", *host_args(tmp_path), "--env", "NVIDIA_VISIBLE_DEVICES=all"])
    assert code == 1
    assert "DriverNotFoundError" in out and "no NVIDIA driver" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "NOEQUALS"], "--env 'NOEQUALS': expected K=V"),
        (["--mount", "/a"], "--mount '/a': expected SRC:DST"),
        (["--container-json", "/nonexistent.json"], "--container-json '/nonexistent.json'"),
        (["--config", "/nonexistent.toml"], "'/nonexistent.toml' (--config) does not exist"),
        (["--set", "nri-plugin.use-nvml=maybe"], "'nri-plugin.use-nvml' must be a boolean"),
        (["--set", "novalue"], "--set 'novalue': expected KEY=VALUE"),
    ],
)
def test_inspect_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run_cli(["inspect", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_config_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[nri-plugin]\nlog-level = 1\n")
    code, _ = run_cli(["info", "--config", str(path)])
    assert code == 2
    assert f"{path}: key 'nri-plugin.log-level' must be a string" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# info


def test_info_text(host: FakeHost) -> None:
    code, out = run_cli(["info", *host_args(host.root), "--no-nvml"])
    assert code == 0
    assert out.startswith("driver 550.54.14, CUDA unknown (no NVML), source proc")
    for g in host.gpus:
        assert g.uuid in out
    assert "nvidia=195" in out and "nvidia-uvm=510" in out
    assert "capability compute (+" in out and "mount /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14" in out
    assert "  NVIDIA_IMEX_CHANNELS: /dev/nvidia-caps-imex-channels/channel0, " in out
    assert "  NVIDIA_GDS=enabled: /dev/nvidia-fs0, /dev/nvidia-fs1, /run/udev, /etc/cufile.json" in out
    assert "missing (" in out


def test_info_json_with_nvml(host: FakeHost) -> None:
    code, out = run_cli(["info", *host_args(host.root), "--output", "json"])
    assert code == 0
    doc = json.loads(out)
    assert (doc["source"], doc["driver_version"], doc["cuda_version"]) == ("nvml", "550.54.14", "12.4")
    assert [g["uuid"] for g in doc["gpus"]] == [g.uuid for g in host.gpus]
    assert doc["gpus"][0]["brand"] == "Tesla" and doc["gpus"][0]["compute_capability"] == "9.0"
    caps = doc["capabilities"]
    assert set(caps) == set(cli.CAPABILITIES)
    assert "/dev/nvidia-uvm" in caps["compute"]["devices"]
    assert "/dev/nvidia-uvm" not in caps["utility"]["devices"]
    assert any(m.endswith("libnvidia-ml.so.1") for m in caps["utility"]["mounts"])
    assert doc["features"]["NVIDIA_NVSWITCH=enabled"][-1] == "/dev/nvidia-nvswitchctl"
    assert isinstance(doc["missing"], list)


def test_info_without_driver_exits_3(tmp_path: Path) -> None:
    code, out = run_cli(["info", *host_args(tmp_path)])
    assert code == 3
    assert "no usable NVIDIA driver" in out and "--driver-root" in out
    code, out = run_cli(["info", *host_args(tmp_path), "--output", "json"])
    assert code == 3 and "error" in json.loads(out)


# ---------------------------------------------------------------------------------------------
# install and run


def install(tmp_path: Path, *extra: str) -> tuple[int, str]:
    return run_cli(
        [
            "install",
            "--plugin-dir",
            str(tmp_path / "plugins"),
            "--config-dir",
            str(tmp_path / "conf.d"),
            "--index",
            "10",
            "--name",
            "nvidia-gpu",
            *extra,
        ]
    )


def test_install_writes_script_and_config_and_uninstalls(tmp_path: Path) -> None:
    conf = tmp_path / "my.toml"
    conf.write_text("[nri-plugin]\nlog-level = 'debug'\n")
    code, out = install(tmp_path, "--config-file", str(conf), "--run-arg=--log-format=json")
    assert code == 0, out
    script = tmp_path / "plugins/10-nvidia-gpu"
    text = script.read_text()
    assert text.startswith(f"#!{os.path.abspath(sys.executable)} -I\n")
    assert "'run', '--log-format=json'" in text
    assert os.stat(script).st_mode & 0o777 == 0o755
    installed_conf = (tmp_path / "conf.d/10-nvidia-gpu.conf").read_text()
    assert installed_conf.endswith("[nri-plugin]\nlog-level = 'debug'\n")
    # Reinstalling over our own files is fine.
    assert install(tmp_path)[0] == 0
    code, out = install(tmp_path, "--uninstall")
    assert code == 0
    assert not script.exists() and not (tmp_path / "conf.d/10-nvidia-gpu.conf").exists()


def test_install_refuses_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    foreign = tmp_path / "plugins/10-nvidia-gpu"
    foreign.write_text("#!/bin/sh\necho someone else's\n")
    code, out = install(tmp_path)
    assert code == 4 and "refusing to overwrite" in out
    code, out = install(tmp_path, "--uninstall")
    assert code == 4 and "refusing to remove" in out
    assert foreign.read_text() == "#!/bin/sh\necho someone else's\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--index", "7"], "--index '7'"), (["--name", "a/b"], "--name 'a/b'")],
)
def test_install_validates_index_and_name(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = run_cli(["install", "--plugin-dir", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_install_validates_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text("[nri-plugin]\ncolour = 'red'\n")
    code, _ = install(tmp_path, "--config-file", str(conf))
    assert code == 2
    assert "unknown key 'nri-plugin.colour'" in capsys.readouterr().err
    assert not (tmp_path / "plugins/10-nvidia-gpu").exists()
    conf.write_text("colour = 'red'\n")  # the toolkit's namespace: a warning, installed anyway
    code, _ = install(tmp_path, "--config-file", str(conf))
    assert code == 0
    assert "warning:" in capsys.readouterr().err
    assert (tmp_path / "plugins/10-nvidia-gpu").exists()


def _wait_for(path: Path, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n{content}")


def test_installed_script_runs_with_an_empty_environment(tmp_path: Path, host: FakeHost) -> None:
    log = tmp_path / "plugin.log"
    missing = tmp_path / "missing.sock"
    code, out = install(
        tmp_path,
        f"--run-arg=--socket={missing}",
        f"--run-arg=--log-file={log}",
        *[f"--run-arg={a}" for a in host_args(host.root)],
        "--run-arg=--no-nvml",
    )
    assert code == 0, out
    proc = subprocess.Popen(
        ["env", "-i", str(tmp_path / "plugins/10-nvidia-gpu")],
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        content = _wait_for(log, "cannot connect to")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    assert code == 0
    assert "host driver discovered" in content and "gpus=" in content
    assert "ready to register" in content and "mode=external" in content
    assert f"cannot connect to {missing}" in content
    assert "msg=stopping signal=SIGTERM" in log.read_text()


def test_runtime_launched_run_registers_and_exits_on_eof(tmp_path: Path, host: FakeHost) -> None:
    """As containerd launches a plugin: empty env + NRI_PLUGIN_*, socket fd, stdio on /dev/null."""
    log = tmp_path / "plugin.log"
    code, out = install(
        tmp_path,
        f"--run-arg=--log-file={log}",
        "--run-arg=--no-nvml",
        *[f"--run-arg={a}" for a in host_args(host.root)],
    )
    assert code == 0, out
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    env = {"NRI_PLUGIN_NAME": "nvidia-gpu", "NRI_PLUGIN_IDX": "10", "NRI_PLUGIN_SOCKET": str(fd)}
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(tmp_path / "plugins/10-nvidia-gpu")],
        env=env,
        pass_fds=(fd,),
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    theirs.close()
    try:
        ours.settimeout(10)
        first = ours.recv(65536)  # the mux handshake / RegisterPlugin request
        elapsed = time.monotonic() - started
        assert first, "the plugin closed the socket without registering"
        assert elapsed < 5.0, f"registration started only after {elapsed:.2f} s (runtime timeout is 5 s)"
    finally:
        ours.close()  # the runtime goes away: EOF
        code = proc.wait(timeout=10)
    assert code == 0
    content = log.read_text()
    assert "mode=runtime-launched" in content and "plugin=10-nvidia-gpu" in content
    assert "msg=stopped exit_code=0" in content


def test_run_with_bad_config_exits_2_and_logs_when_launched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "plugin.log"
    code, _ = run_cli(
        ["run", "--config", str(tmp_path / "none.toml"), "--log-file", str(log)],
        environ={"NRI_PLUGIN_SOCKET": "3"},
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert "configuration error; not starting" in log.read_text()


def test_launched_with_a_socket_fd_that_is_not_a_socket_is_a_configuration_error(
    tmp_path: Path, host: FakeHost
) -> None:
    """Exit 2 ("usage or configuration error", as documented), not 1 with an "unexpected error"
    traceback, when NRI_PLUGIN_SOCKET names a file descriptor that is no socket."""
    log = tmp_path / "plugin.log"
    with open(tmp_path / "not-a-socket", "w") as f:
        fd = f.fileno()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "nri_plugin",
                "run",
                f"--log-file={log}",
                "--no-nvml",
                *host_args(host.root),
            ],
            env={**os.environ, "NRI_PLUGIN_SOCKET": str(fd), "NVIDIA_CTK_CONFIG_FILE_PATH": "/nonexistent"},
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    content = log.read_text()
    assert proc.returncode == 2, content
    assert f"NRI_PLUGIN_SOCKET={fd} is not a usable socket" in content
    assert "configuration error; not starting" in content and "unexpected error" not in content


def test_inspect_new_request_forms(host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_cli(
        [
            "inspect",
            *host_args(host.root),
            "--no-nvml",
            "--env",
            "NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=1,example.com/x=y",
            "--env",
            "NVIDIA_IMEX_CHANNELS=0",
            "--env",
            "NVIDIA_GDS=enabled",
        ]
    )
    assert code == 0, out
    assert "imex channels: 0" in out and "features:      gds" in out
    assert "left to the runtime: example.com/x=y" in out and "/dev/nvidia1  c 195:1" in out
    assert "/dev/nvidia-caps-imex-channels/channel0" in out and "/dev/nvidia-fs0" in out
    lib = "--mount", "/x/libcuda.so.1:/usr/lib64/libcuda.so.1"
    args = ["--env", "NVIDIA_VISIBLE_DEVICES=0", "--device", "/dev/nvidia0", *lib]
    code, out = run_cli(["inspect", *host_args(host.root), "--no-nvml", *args])
    assert code == 0 and "left alone: its spec already has NVIDIA device nodes (/dev/nvidia0)" in out
    code, out = run_cli(["inspect", *host_args(host.root), "--no-nvml", "--annotation", "bad"])
    assert code == 2 and "--annotation 'bad': expected K=V" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# inspect: the generated ld.so.cache


def test_inspect_layers_shows_the_ldcache_path(host: FakeHost, tmp_path: Path) -> None:
    from nri_plugin.host import CacheRecord, write_cache

    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "usr/lib64").mkdir(parents=True)
    (layer / "etc/ld.so.cache").write_bytes(
        write_cache([CacheRecord(b"libc.so.6", b"/usr/lib64/libc.so.6", 0x303)])
    )
    base = ["inspect", *host_args(host.root), "--no-nvml", "--env", "NVIDIA_VISIBLE_DEVICES=0"]
    code, out = run_cli([*base, "--layers", str(layer)])
    assert code == 0
    assert "ld.so.cache: path=image-cache" in out and "lib_dir=/usr/lib64" in out, out
    assert "env TRITON_LIBCUDA_PATH=/usr/lib64" in out
    code, out = run_cli([*base, "--layers", str(layer), "--output", "json"])
    doc = json.loads(out)
    assert doc["ldcache"]["path"] == "image-cache" and doc["ldcache"]["image_entries"] == 1
    (layer / "etc/ld.so.cache").write_bytes(b"glibc-ld.so.cache1.1 truncated")
    code, out = run_cli([*base, "--layers", str(layer)])
    assert (
        code == 0 and "ld.so.cache: path=fallback stage=image reason: the image's /etc/ld.so.cache" in out
    ), out


def test_inspect_container_id_shows_the_daemons_record(tmp_path: Path) -> None:
    from nri_plugin.image import CacheStore

    store = CacheStore(str(tmp_path))
    store.prepare()
    store.write_record("abc", {"path": "fallback", "stage": "containerd", "reason": "no socket"})
    code, out = run_cli(["inspect", "--runtime-dir", str(tmp_path), "--container-id", "abc"])
    assert code == 0 and "path=fallback stage=containerd reason: no socket" in out, out
    code, out = run_cli(["inspect", "--runtime-dir", str(tmp_path), "--container-id", "other"])
    assert code == 1 and "no ld.so.cache record" in out
