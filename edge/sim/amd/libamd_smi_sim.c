/*
 * The simulated libamd_smi.so (kgpu, edge/sim/amd): the amdsmi C functions kgpu's AMD backend
 * calls, each with its real prototype (amdsmi.h, ROCm 7.0), forwarding to a function pointer the
 * simulation fills with a ctypes callback through kgpu_sim_register(). A function whose pointer
 * is not set answers as a library without a driver would: amdsmi_init AMDSMI_STATUS_DRIVER_NOT_LOADED,
 * the rest AMDSMI_STATUS_NOT_INIT.
 *
 * Every other amdsmi_* symbol the Python bindings bind at import is a stub answering
 * AMDSMI_STATUS_NOT_SUPPORTED, generated at build time from amdsmi_wrapper.py (edge/sim/amd/build.py).
 *
 * Structures are written by the Python side through the bindings' own ctypes definitions, so
 * their layout here is only `void *`.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef uint32_t amdsmi_status_t;

#define AMDSMI_STATUS_NOT_INIT 32u
#define AMDSMI_STATUS_DRIVER_NOT_LOADED 34u

/* X(name, status when not registered, C parameters, arguments) */
#define KGPU_SYMBOLS(X) \
    X(amdsmi_init, AMDSMI_STATUS_DRIVER_NOT_LOADED, (uint64_t flags), (flags)) \
    X(amdsmi_shut_down, AMDSMI_STATUS_NOT_INIT, (void), ()) \
    X(amdsmi_get_socket_handles, AMDSMI_STATUS_NOT_INIT, (uint32_t *count, void **handles), (count, handles)) \
    X(amdsmi_get_processor_handles, AMDSMI_STATUS_NOT_INIT, \
      (void *socket, uint32_t *count, void **handles), (socket, count, handles)) \
    X(amdsmi_get_processor_type, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t *type), (h, type)) \
    X(amdsmi_get_gpu_device_bdf, AMDSMI_STATUS_NOT_INIT, (void *h, void *bdf), (h, bdf)) \
    X(amdsmi_get_gpu_device_uuid, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t *len, char *uuid), (h, len, uuid)) \
    X(amdsmi_get_gpu_asic_info, AMDSMI_STATUS_NOT_INIT, (void *h, void *info), (h, info)) \
    X(amdsmi_get_gpu_driver_info, AMDSMI_STATUS_NOT_INIT, (void *h, void *info), (h, info)) \
    X(amdsmi_get_gpu_vram_info, AMDSMI_STATUS_NOT_INIT, (void *h, void *info), (h, info)) \
    X(amdsmi_get_gpu_vram_usage, AMDSMI_STATUS_NOT_INIT, (void *h, void *usage), (h, usage)) \
    X(amdsmi_get_power_cap_info, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t sensor, void *info), (h, sensor, info)) \
    X(amdsmi_set_power_cap, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t sensor, uint64_t cap), (h, sensor, cap)) \
    X(amdsmi_get_power_info, AMDSMI_STATUS_NOT_INIT, (void *h, void *info), (h, info)) \
    X(amdsmi_get_energy_count, AMDSMI_STATUS_NOT_INIT, \
      (void *h, uint64_t *energy, float *resolution, uint64_t *timestamp), (h, energy, resolution, timestamp)) \
    X(amdsmi_get_temp_metric, AMDSMI_STATUS_NOT_INIT, \
      (void *h, uint32_t sensor, uint32_t metric, int64_t *value), (h, sensor, metric, value)) \
    X(amdsmi_get_gpu_activity, AMDSMI_STATUS_NOT_INIT, (void *h, void *usage), (h, usage)) \
    X(amdsmi_get_clock_info, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t clk, void *info), (h, clk, info)) \
    X(amdsmi_get_clk_freq, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t clk, void *freq), (h, clk, freq)) \
    X(amdsmi_set_gpu_clk_range, AMDSMI_STATUS_NOT_INIT, \
      (void *h, uint64_t min_mhz, uint64_t max_mhz, uint32_t clk), (h, min_mhz, max_mhz, clk)) \
    X(amdsmi_set_gpu_perf_level, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t level), (h, level)) \
    X(amdsmi_get_gpu_perf_level, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t *level), (h, level)) \
    X(amdsmi_set_gpu_perf_determinism_mode, AMDSMI_STATUS_NOT_INIT, (void *h, uint64_t clk), (h, clk)) \
    X(amdsmi_get_gpu_total_ecc_count, AMDSMI_STATUS_NOT_INIT, (void *h, void *counts), (h, counts)) \
    X(amdsmi_get_gpu_process_list, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t *count, void *list), (h, count, list)) \
    X(amdsmi_get_gpu_pci_replay_counter, AMDSMI_STATUS_NOT_INIT, (void *h, uint64_t *counter), (h, counter)) \
    X(amdsmi_get_xgmi_info, AMDSMI_STATUS_NOT_INIT, (void *h, void *info), (h, info)) \
    X(amdsmi_topo_get_numa_node_number, AMDSMI_STATUS_NOT_INIT, (void *h, uint32_t *node), (h, node)) \
    X(amdsmi_reset_gpu, AMDSMI_STATUS_NOT_INIT, (void *h), (h))

#define KGPU_INDEX(name, unset, params, args) KGPU_##name,
enum { KGPU_SYMBOLS(KGPU_INDEX) KGPU_COUNT };

#define KGPU_NAME(name, unset, params, args) #name,
static const char *const kgpu_names[KGPU_COUNT] = { KGPU_SYMBOLS(KGPU_NAME) };

static void *kgpu_table[KGPU_COUNT];

/* Point `name` at `fn` (NULL: unset). 0 on success, -1 for a name this library does not forward. */
int kgpu_sim_register(const char *name, void *fn)
{
    for (int i = 0; i < KGPU_COUNT; i++) {
        if (strcmp(kgpu_names[i], name) == 0) {
            __atomic_store_n(&kgpu_table[i], fn, __ATOMIC_SEQ_CST);
            return 0;
        }
    }
    return -1;
}

/* How many functions this library forwards, and their names: the build checks them. */
int kgpu_sim_count(void) { return KGPU_COUNT; }
const char *kgpu_sim_name(int i) { return (i >= 0 && i < KGPU_COUNT) ? kgpu_names[i] : NULL; }

#define KGPU_FORWARD(name, unset, params, args) \
    typedef amdsmi_status_t(*name##_fn) params; \
    amdsmi_status_t name params \
    { \
        name##_fn fn = (name##_fn)__atomic_load_n(&kgpu_table[KGPU_##name], __ATOMIC_SEQ_CST); \
        return fn ? fn args : (unset); \
    }
KGPU_SYMBOLS(KGPU_FORWARD)
