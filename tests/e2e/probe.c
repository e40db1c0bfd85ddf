/*
 * gpu-probe: the smallest CUDA driver API client.
 *
 * Loads libcuda.so.1 the way a CUDA application does (dlopen by soname, so the dynamic loader's
 * own search rules decide: no LD_LIBRARY_PATH, no ld.so.cache needed when the library sits in
 * one of the loader's trusted directories), calls cuInit(0) and cuDriverGetVersion(), and
 * prints exactly one line:
 *
 *   PROBE_OK driver_version=<int> path=<file the loader resolved libcuda.so.1 to>   (exit 0)
 *   PROBE_FAIL <reason>                                                             (exit 1)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>

typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_driver_get_version_fn)(int *);

static int fail(const char *what) {
    const char *err = dlerror();
    printf("PROBE_FAIL %s%s%s\n", what, err ? ": " : "", err ? err : "");
    return 1;
}

int main(void) {
    void *handle = dlopen("libcuda.so.1", RTLD_NOW);
    if (handle == NULL) {
        return fail("dlopen libcuda.so.1");
    }
    cu_init_fn cu_init = (cu_init_fn)dlsym(handle, "cuInit");
    if (cu_init == NULL) {
        return fail("dlsym cuInit");
    }
    cu_driver_get_version_fn cu_version = (cu_driver_get_version_fn)dlsym(handle, "cuDriverGetVersion");
    if (cu_version == NULL) {
        return fail("dlsym cuDriverGetVersion");
    }
    int rc = cu_init(0);
    if (rc != 0) {
        printf("PROBE_FAIL cuInit returned %d\n", rc);
        return 1;
    }
    int version = 0;
    rc = cu_version(&version);
    if (rc != 0) {
        printf("PROBE_FAIL cuDriverGetVersion returned %d\n", rc);
        return 1;
    }
    Dl_info info;
    const char *path = "?";
    if (dladdr((void *)cu_init, &info) != 0 && info.dli_fname != NULL) {
        path = info.dli_fname;
    }
    printf("PROBE_OK driver_version=%d path=%s\n", version, path);
    return 0;
}
