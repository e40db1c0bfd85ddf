"""A fake NVIDIA host (driver libraries, ld.so.cache, procfs, device nodes, fake NVML) for tests."""

from tests.fakehost.builder import (
    BRAND_GEFORCE,
    BRAND_NVIDIA,
    BRAND_QUADRO,
    BRAND_TESLA,
    FakeGpu,
    FakeHost,
    FakeMig,
    build_fake_host,
    make_gpus,
    mig_cap_minor,
    root_flags,
    upgrade_driver,
)

__all__ = [
    "BRAND_GEFORCE",
    "BRAND_NVIDIA",
    "BRAND_QUADRO",
    "BRAND_TESLA",
    "FakeGpu",
    "FakeHost",
    "FakeMig",
    "build_fake_host",
    "make_gpus",
    "mig_cap_minor",
    "root_flags",
    "upgrade_driver",
]
