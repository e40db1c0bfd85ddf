/*
 * A fake libnvidia-ml.so.1 for tests: answers the NVML calls nvidia-ml-py makes for host discovery,
 * from a text description written by tests/fakehost/builder.py.
 *
 * The description is read at nvmlInit time from $FAKE_NVML_CONFIG if set, else from
 * "fake-nvml.conf" in the directory this library was loaded from (found with dladdr).
 *
 * Format, one record per line ('#' starts a comment):
 *   driver <version string>
 *   cuda <integer, e.g. 12040>
 *   init_error <nvmlReturn_t>          make nvmlInit fail with that code
 *   init_sleep <seconds>               sleep in nvmlInit (to test timeouts)
 *   gpu <minor> <uuid> <bus id> <brand> <cc major> <cc minor> <mig current> <mig pending> <name...>
 *   mig <index> <gi> <ci> <uuid>       a MIG device of the preceding gpu at that MIG handle index
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OK 0
#define E_UNINITIALIZED 1
#define E_INVALID_ARGUMENT 2
#define E_NOT_SUPPORTED 3
#define E_NOT_FOUND 6
#define E_INSUFFICIENT_SIZE 7
#define E_DRIVER_NOT_LOADED 9
#define E_UNKNOWN 999

#define MAX_GPUS 64
#define MAX_MIGS 8

struct fake_dev;
struct fake_dev {
        int is_mig;
        int gpu;   /* index of the GPU (parent for a MIG device) */
        int mig;   /* MIG handle index, -1 for a GPU */
};

struct fake_mig {
        struct fake_dev self;
        int present;
        unsigned gi, ci;
        char uuid[96];
};

struct fake_gpu {
        struct fake_dev self;
        unsigned minor;
        char uuid[96];
        char bus[32];
        unsigned domain, bus_no, dev_no;
        int brand, cc_major, cc_minor;
        unsigned mig_current, mig_pending;
        char name[96];
        struct fake_mig migs[MAX_MIGS];
};

typedef struct fake_dev *nvmlDevice_t;

typedef struct {
        char busIdLegacy[16];
        unsigned int domain;
        unsigned int bus;
        unsigned int device;
        unsigned int pciDeviceId;
        unsigned int pciSubSystemId;
        char busId[32];
} nvmlPciInfo_t;

static struct fake_gpu gpus[MAX_GPUS];
static unsigned ngpus;
static char driver_version[80] = "0.0.0";
static int cuda_version;
static int initialized;

static int copy_out(char *dst, unsigned len, const char *src)
{
        if (dst == NULL)
                return E_INVALID_ARGUMENT;
        if (strlen(src) + 1 > len)
                return E_INSUFFICIENT_SIZE;
        strcpy(dst, src);
        return OK;
}

static void config_path(char *buf, size_t size)
{
        const char *env = getenv("FAKE_NVML_CONFIG");
        Dl_info info;

        if (env != NULL && *env != '\0') {
                snprintf(buf, size, "%s", env);
                return;
        }
        buf[0] = '\0';
        if (dladdr((void *)config_path, &info) && info.dli_fname != NULL) {
                const char *slash = strrchr(info.dli_fname, '/');
                int dirlen = slash ? (int)(slash - info.dli_fname) : 1;
                snprintf(buf, size, "%.*s/fake-nvml.conf", dirlen, slash ? info.dli_fname : ".");
        }
}

static int load_config(void)
{
        char path[4096], line[1024];
        FILE *f;
        int init_error = 0;
        unsigned init_sleep = 0;

        config_path(path, sizeof(path));
        f = fopen(path, "r");
        if (f == NULL)
                return E_DRIVER_NOT_LOADED;
        ngpus = 0;
        memset(gpus, 0, sizeof(gpus));
        while (fgets(line, sizeof(line), f) != NULL) {
                char *nl = strchr(line, '\n');
                struct fake_gpu *g;
                int off = 0;

                if (nl != NULL)
                        *nl = '\0';
                if (line[0] == '#' || line[0] == '\0')
                        continue;
                if (sscanf(line, "driver %79s", driver_version) == 1)
                        continue;
                if (sscanf(line, "cuda %d", &cuda_version) == 1)
                        continue;
                if (sscanf(line, "init_error %d", &init_error) == 1)
                        continue;
                if (sscanf(line, "init_sleep %u", &init_sleep) == 1)
                        continue;
                if (strncmp(line, "gpu ", 4) == 0 && ngpus < MAX_GPUS) {
                        g = &gpus[ngpus];
                        if (sscanf(line, "gpu %u %95s %31s %d %d %d %u %u %n", &g->minor, g->uuid, g->bus,
                                   &g->brand, &g->cc_major, &g->cc_minor, &g->mig_current, &g->mig_pending,
                                   &off) < 8 || off == 0) {
                                fclose(f);
                                return E_UNKNOWN;
                        }
                        snprintf(g->name, sizeof(g->name), "%s", line + off);
                        sscanf(g->bus, "%x:%x:%x", &g->domain, &g->bus_no, &g->dev_no);
                        g->self.is_mig = 0;
                        g->self.gpu = (int)ngpus;
                        g->self.mig = -1;
                        ngpus++;
                        continue;
                }
                if (strncmp(line, "mig ", 4) == 0 && ngpus > 0) {
                        unsigned idx, gi, ci;
                        char uuid[96];
                        g = &gpus[ngpus - 1];
                        if (sscanf(line, "mig %u %u %u %95s", &idx, &gi, &ci, uuid) != 4 || idx >= MAX_MIGS) {
                                fclose(f);
                                return E_UNKNOWN;
                        }
                        g->migs[idx].present = 1;
                        g->migs[idx].gi = gi;
                        g->migs[idx].ci = ci;
                        snprintf(g->migs[idx].uuid, sizeof(g->migs[idx].uuid), "%s", uuid);
                        g->migs[idx].self.is_mig = 1;
                        g->migs[idx].self.gpu = (int)(ngpus - 1);
                        g->migs[idx].self.mig = (int)idx;
                        continue;
                }
        }
        fclose(f);
        if (init_sleep > 0)
                sleep(init_sleep);
        return init_error;
}

static struct fake_gpu *gpu_of(nvmlDevice_t d)
{
        if (!initialized || d == NULL || d->gpu < 0 || (unsigned)d->gpu >= ngpus)
                return NULL;
        return &gpus[d->gpu];
}

int nvmlInitWithFlags(unsigned int flags)
{
        int rc;
        (void)flags;
        rc = load_config();
        if (rc == OK)
                initialized++;
        return rc;
}
int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
int nvmlInit(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void)
{
        if (!initialized)
                return E_UNINITIALIZED;
        initialized--;
        return OK;
}

const char *nvmlErrorString(int result)
{
        switch (result) {
        case OK: return "Success";
        case E_UNINITIALIZED: return "Uninitialized";
        case E_INVALID_ARGUMENT: return "Invalid Argument";
        case E_NOT_SUPPORTED: return "Not Supported";
        case E_NOT_FOUND: return "Not Found";
        case E_INSUFFICIENT_SIZE: return "Insufficient Size";
        case E_DRIVER_NOT_LOADED: return "Driver Not Loaded";
        default: return "Unknown Error";
        }
}

int nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
        if (!initialized)
                return E_UNINITIALIZED;
        return copy_out(version, length, driver_version);
}

int nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
        char buf[96];
        if (!initialized)
                return E_UNINITIALIZED;
        snprintf(buf, sizeof(buf), "12.%s", driver_version);
        return copy_out(version, length, buf);
}

int nvmlSystemGetCudaDriverVersion(int *v)
{
        if (!initialized)
                return E_UNINITIALIZED;
        if (v == NULL)
                return E_INVALID_ARGUMENT;
        *v = cuda_version;
        return OK;
}
int nvmlSystemGetCudaDriverVersion_v2(int *v) { return nvmlSystemGetCudaDriverVersion(v); }

int nvmlDeviceGetCount_v2(unsigned int *count)
{
        if (!initialized)
                return E_UNINITIALIZED;
        if (count == NULL)
                return E_INVALID_ARGUMENT;
        *count = ngpus;
        return OK;
}
int nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
        if (!initialized)
                return E_UNINITIALIZED;
        if (device == NULL || index >= ngpus)
                return E_INVALID_ARGUMENT;
        *device = &gpus[index].self;
        return OK;
}
int nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
        return nvmlDeviceGetHandleByIndex_v2(index, device);
}

int nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index)
{
        if (gpu_of(d) == NULL || index == NULL || d->is_mig)
                return E_INVALID_ARGUMENT;
        *index = (unsigned)d->gpu;
        return OK;
}

int nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        return copy_out(uuid, length, d->is_mig ? g->migs[d->mig].uuid : g->uuid);
}

int nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
        if (!initialized)
                return E_UNINITIALIZED;
        if (uuid == NULL || device == NULL)
                return E_INVALID_ARGUMENT;
        for (unsigned i = 0; i < ngpus; i++) {
                if (strcmp(gpus[i].uuid, uuid) == 0) {
                        *device = &gpus[i].self;
                        return OK;
                }
                for (unsigned j = 0; j < MAX_MIGS; j++) {
                        if (gpus[i].migs[j].present && strcmp(gpus[i].migs[j].uuid, uuid) == 0) {
                                *device = &gpus[i].migs[j].self;
                                return OK;
                        }
                }
        }
        return E_NOT_FOUND;
}

int nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || minor == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        if (d->is_mig)
                return E_NOT_SUPPORTED;
        *minor = g->minor;
        return OK;
}

int nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *pci)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || pci == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        memset(pci, 0, sizeof(*pci));
        pci->domain = g->domain;
        pci->bus = g->bus_no;
        pci->device = g->dev_no;
        pci->pciDeviceId = 0x233010de;
        pci->pciSubSystemId = 0x16c110de;
        /* NVML reports "%08X:%02X:%02X.0" in busId and the 4-digit-domain form in busIdLegacy. */
        snprintf(pci->busId, sizeof(pci->busId), "%08X:%02X:%02X.0", g->domain, g->bus_no, g->dev_no);
        snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.0", g->domain & 0xffff,
                 g->bus_no, g->dev_no);
        return OK;
}
int nvmlDeviceGetPciInfo_v2(nvmlDevice_t d, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(d, pci); }

int nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        return copy_out(name, length, g->name);
}

int nvmlDeviceGetBrand(nvmlDevice_t d, int *brand)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || brand == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        *brand = g->brand;
        return OK;
}

int nvmlDeviceGetCudaComputeCapability(nvmlDevice_t d, int *major, int *minor)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || major == NULL || minor == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        *major = g->cc_major;
        *minor = g->cc_minor;
        return OK;
}

int nvmlDeviceGetMigMode(nvmlDevice_t d, unsigned int *current, unsigned int *pending)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || current == NULL || pending == NULL || d->is_mig)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        if (g->cc_major < 8)
                return E_NOT_SUPPORTED;
        *current = g->mig_current;
        *pending = g->mig_pending;
        return OK;
}

int nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t d, unsigned int *count)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || count == NULL || d->is_mig)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        *count = g->mig_current ? 7 : 0;
        return OK;
}

int nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t d, unsigned int index, nvmlDevice_t *mig)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || mig == NULL || d->is_mig)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        if (!g->mig_current)
                return E_INVALID_ARGUMENT;
        if (index >= MAX_MIGS || !g->migs[index].present)
                return E_NOT_FOUND;
        *mig = &g->migs[index].self;
        return OK;
}

int nvmlDeviceIsMigDeviceHandle(nvmlDevice_t d, unsigned int *is_mig)
{
        if (gpu_of(d) == NULL || is_mig == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        *is_mig = (unsigned)d->is_mig;
        return OK;
}

int nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t d, nvmlDevice_t *parent)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || parent == NULL || !d->is_mig)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        *parent = &g->self;
        return OK;
}

int nvmlDeviceGetGpuInstanceId(nvmlDevice_t d, unsigned int *id)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || id == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        if (!d->is_mig)
                return E_NOT_SUPPORTED;
        *id = g->migs[d->mig].gi;
        return OK;
}

int nvmlDeviceGetComputeInstanceId(nvmlDevice_t d, unsigned int *id)
{
        struct fake_gpu *g = gpu_of(d);
        if (g == NULL || id == NULL)
                return initialized ? E_INVALID_ARGUMENT : E_UNINITIALIZED;
        if (!d->is_mig)
                return E_NOT_SUPPORTED;
        *id = g->migs[d->mig].ci;
        return OK;
}
