// gpu-lavapipe-stale-descriptor: the heap corruption of pipeline/gpu_test.go on lavapipe, with
// nothing of Strata in it: ggml's Vulkan backend alone (no Go, no CPU backend, one ggml-base).
//
//   make vulkan
//   I=$(go env GOMODCACHE)/github.com/ollama/ollama@v0.24.0/ml/backend/ggml/ggml/include
//   L=$PWD/lib/ollama
//   cc -O1 -o /tmp/stale scripts/gpu-lavapipe-stale-descriptor.c -I$I -L$L -Wl,-rpath,$L -lggml-vulkan -lggml-base
//   GGML_VK_VISIBLE_DEVICES=0 /tmp/stale 200      # without gpu patch 0002: aborts in glibc's
//                                                  # free on lavapipe's thread in about 1 s
//   GGML_VK_VISIBLE_DEVICES=0 /tmp/stale 200 keep # buffers kept alive: runs clean
//
// Why. ggml-vulkan gives every dispatch a descriptor set whose layout has MAX_PARAMETER_COUNT
// (12) storage-buffer bindings and writes only the pipeline's own (ggml_vk_dispatch_pipeline:
// parameter_count of them, 2 for scale, 4 for rms_norm); the others keep whatever an earlier
// dispatch wrote there, possibly a buffer destroyed since. Vulkan allows that (descriptors a
// pipeline does not statically use need not be valid). Mesa 22.3's lavapipe does not: binding
// a set (lvp_execute.c handle_set_stage) hands every binding of the layout to llvmpipe's
// set_shader_buffers, which takes a reference on each buffer's pipe_resource; for a destroyed
// buffer that is an atomic increment in freed heap memory, and a later rebinding decrements it
// and frees it a second time: "double free or corruption", "corrupted size vs. prev_size",
// always in free() on lavapipe's queue thread. (Mesa 23.x rewrote lavapipe's descriptors.)
//
// The sequence below makes it certain: two dispatches (rms_norm: 4 bindings, then again) fill
// sets 0 and 1 with buffer P; P is freed; then rms_norm (set 0: all 4 bindings to Q, so
// lavapipe drops its last reference to P, which frees it) and scale (set 1: bindings 0-1 to Q,
// 2-3 still P) run. With "keep", no buffer is freed before the end and nothing goes wrong: the
// freed buffers are the cause. Gpu patch 0002 (build/gpu-patches) makes ggml-vulkan write all 12
// bindings of every set, and with it the program runs clean without "keep" (README, GPUs).
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-vulkan.h"

// run computes rms_norm(x) twice then scale, in a fresh buffer, and returns the buffer.
static ggml_backend_buffer_t run(ggml_backend_t be, int with_scale) {
    struct ggml_init_params ip = {16 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true};
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 4);
    struct ggml_tensor *y = ggml_rms_norm(ctx, x, 1e-6f);
    struct ggml_tensor *z = with_scale ? ggml_scale(ctx, y, 0.5f) : ggml_rms_norm(ctx, y, 1e-6f);
    struct ggml_cgraph *g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, z);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    float in[256];
    for (int i = 0; i < 256; i++) in[i] = (float)(i % 7) - 3;
    ggml_backend_tensor_set(x, in, 0, sizeof in);
    if (ggml_backend_graph_compute(be, g) != GGML_STATUS_SUCCESS) {
        fprintf(stderr, "compute failed\n");
        exit(1);
    }
    float out[256];
    ggml_backend_tensor_get(z, out, 0, sizeof out);
    ggml_free(ctx);
    return buf;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 100;
    int keep_alive = argc > 2 && strcmp(argv[2], "keep") == 0;
    ggml_backend_t be = ggml_backend_vk_init(0);
    if (!be) {
        fprintf(stderr, "no Vulkan device 0 (lavapipe: GGML_VK_VISIBLE_DEVICES=0)\n");
        return 1;
    }
    ggml_backend_buffer_t *keep = calloc(2 * reps, sizeof *keep);
    int nkeep = 0;
    for (int r = 0; r < reps; r++) {
        ggml_backend_buffer_t p = run(be, 0); // sets 0 and 1: four bindings each, all P
        if (keep_alive) keep[nkeep++] = p; else ggml_backend_buffer_free(p);
        ggml_backend_buffer_t q = run(be, 1); // set 1's bindings 2-3 still name P
        if (keep_alive) keep[nkeep++] = q; else ggml_backend_buffer_free(q);
    }
    for (int i = 0; i < nkeep; i++) ggml_backend_buffer_free(keep[i]);
    ggml_backend_free(be);
    printf("%d rounds done%s\n", reps, keep_alive ? " (buffers kept until the end)" : "");
    return 0;
}
