/* specshard: a stage's eval callback in C (cluster/llama/capture.py loads it).
 *
 * llama.cpp's scheduler asks the eval callback about every graph node of a decode
 * (549 asks on the demo target's 14-layer first stage; docs/architecture.md, "Stages"
 * technique, point 9). In C an ask is a strcmp, and llama_decode keeps running
 * without the GIL. ggml's functions come in as pointers, so this file needs neither
 * ggml's headers nor linking against llama.cpp.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef const char *(*get_name_fn)(const void *tensor);
typedef size_t (*nbytes_fn)(const void *tensor);
typedef void (*tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

/* Mirrored field for field by CaptureState in capture.py. */
struct specshard_capture {
    get_name_fn get_name;
    nbytes_fn nbytes;
    tensor_get_fn tensor_get;
    const char *name;  /* the node to copy: l_out-{n_layer-1} */
    char *buffer;      /* owned by Python (a numpy array) */
    size_t capacity;   /* bytes */
    size_t offset;     /* bytes copied since the last reset */
    int32_t overflow;  /* set instead of writing past capacity */
    int32_t timing;    /* nonzero: accumulate nanos (bench/overhead.py only) */
    int64_t calls;     /* asks and copies since the last reset */
    int64_t nanos;     /* time in on_eval since the last reset, if timing */
    int64_t name_at;   /* where a tensor's name sits in its struct; -1: not known yet */
};

/* ggml_get_name returns a field of the tensor's struct: its offset, found on the first
 * call, saves an indirect call per ask after that. */
static const char *tensor_name(void *tensor, struct specshard_capture *c) {
    if (c->name_at >= 0) {
        return (const char *)tensor + c->name_at;
    }
    const char *name = c->get_name(tensor);
    ptrdiff_t at = name - (const char *)tensor;
    if (at >= 0 && at < 4096) {
        c->name_at = at;
    }
    return name;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static bool on_eval(void *tensor, bool ask, struct specshard_capture *c) {
    const char *name = tensor_name(tensor, c);
    /* the first byte settles most asks without a call */
    bool match = name[0] == c->name[0] && strcmp(name, c->name) == 0;
    if (ask || !match) {
        return ask ? match : true;
    }
    size_t n = c->nbytes(tensor);
    if (n > c->capacity - c->offset) { /* offset <= capacity always holds */
        c->overflow = 1;
    } else {
        c->tensor_get(tensor, c->buffer + c->offset, 0, n);
        c->offset += n;
    }
    return false; /* skip the rest of the split: the final norm and the dummy head */
}

bool specshard_capture_eval(void *tensor, bool ask, void *user_data) {
    struct specshard_capture *c = user_data;
    c->calls++;
    if (!c->timing) {
        return on_eval(tensor, ask, c);
    }
    /* A clock read (~25 ns on this VM's tsc clock) costs as much as an ask: subtract
     * an empty interval measured right after, so the clock's own cost cancels out. */
    int64_t t0 = now_ns();
    bool result = on_eval(tensor, ask, c);
    int64_t t1 = now_ns();
    c->nanos += 2 * t1 - t0 - now_ns();
    return result;
}
