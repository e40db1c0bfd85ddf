/*
 * Stand-in for one NVIDIA user-space driver library in a fake driver root. Built once per SONAME by
 * tests/fakehost/builder.py; uses no libc so that the 32-bit variant links without i386 multilib.
 *
 * With -DFAKE_LIBCUDA -DFAKE_CUDA_VERSION=<int> it also provides the two libcuda entry points a probe
 * program calls after dlopen("libcuda.so.1").
 */
int fake_nvidia_driver_library(void) { return 1; }

#ifdef FAKE_LIBCUDA
int cuInit(unsigned int flags)
{
        (void)flags;
        return 0;
}

int cuDriverGetVersion(int *version)
{
        if (version == 0)
                return 1; /* CUDA_ERROR_INVALID_VALUE */
        *version = FAKE_CUDA_VERSION;
        return 0;
}
#endif
