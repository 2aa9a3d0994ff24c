// gpu-lavapipe-mm: the evidence for LP_NUM_THREADS=1 in pipeline/gpu_test.go. It multiplies
// random [m x k] by [k x n] f32 matrices on ggml's Vulkan backend (no CPU backend, no Go, one
// copy of ggml-base) `reps` times per n and compares each cell with a float64 product.
//
//   make vulkan
//   I=$(go env GOMODCACHE)/github.com/ollama/ollama@v0.24.0/ml/backend/ggml/ggml/include
//   cc -O1 -o /tmp/mm scripts/gpu-lavapipe-mm.c -I$I -Llib/ollama -Wl,-rpath,$PWD/lib/ollama \
//      -lggml-vulkan -lggml-base -lm
//   GGML_VK_VISIBLE_DEVICES=0 /tmp/mm 32 192 33 100 10                  # lavapipe, its threads
//   LP_NUM_THREADS=1 GGML_VK_VISIBLE_DEVICES=0 /tmp/mm 32 192 33 100 10 # one thread
//
// On Debian bookworm's lavapipe (Mesa 22.3.6, LLVM 15) with 2 threads, about 1 run in 10 with
// n > 32 (two or more workgroups along n) has one whole 32-column output tile wrong by ~10-20
// ("[bad ...]" lines: its cells are written, not left at the sentinel; reading again gives the
// same values; computing again may or may not); with LP_NUM_THREADS=1, none in 680 runs.
// Under valgrind (threads serialised) it reports no invalid access.
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-vulkan.h"

static float frand(void) { return (float)rand() / RAND_MAX * 2 - 1; }

// one mul_mat on vk; returns max abs err vs double reference
static double run(ggml_backend_t be, int m, int n, int k, float *A, float *B, float *out) {
    struct ggml_init_params ip = { 16*ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context *ctx = ggml_init(ip);
    struct ggml_tensor *a = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, m);
    struct ggml_tensor *b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    struct ggml_tensor *c = ggml_mul_mat(ctx, a, b);
    struct ggml_cgraph *g = ggml_new_graph(ctx);
    ggml_build_forward_expand(g, c);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, be);
    ggml_backend_tensor_set(a, A, 0, ggml_nbytes(a));
    ggml_backend_tensor_set(b, B, 0, ggml_nbytes(b));
    { float *sent = malloc(ggml_nbytes(c)); for (int i = 0; i < m*n; i++) sent[i] = 12345.0f; ggml_backend_tensor_set(c, sent, 0, ggml_nbytes(c)); free(sent); }
    ggml_backend_graph_compute(be, g);
    ggml_backend_tensor_get(c, out, 0, ggml_nbytes(c));
    int nsent = 0; for (int i = 0; i < m*n; i++) if (out[i] == 12345.0f) nsent++;
    if (nsent) printf("{%d sentinel cells}", nsent);
    double worst = 0;
    for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
        double s = 0;
        for (int l = 0; l < k; l++) s += (double)A[i*k+l]*B[j*k+l];
        double e = fabs(s - out[j*m+i]);
        if (e > worst || isnan(e)) worst = isnan(e) ? 1e9 : e;
    }
    if (worst > 0.05) {
        // which cells are wrong, and does a second read fix it?
        int bi0=1<<30, bi1=-1, bj0=1<<30, bj1=-1, cnt=0;
        for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
            double s = 0; for (int l = 0; l < k; l++) s += (double)A[i*k+l]*B[j*k+l];
            if (fabs(s - out[j*m+i]) > 0.05) { cnt++; if (i<bi0) bi0=i; if(i>bi1) bi1=i; if(j<bj0) bj0=j; if(j>bj1)bj1=j; }
        }
        ggml_backend_tensor_get(c, out, 0, ggml_nbytes(c));
        double w2 = 0;
        for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
            double s = 0; for (int l = 0; l < k; l++) s += (double)A[i*k+l]*B[j*k+l];
            double e = fabs(s - out[j*m+i]); if (e > w2) w2 = e;
        }
        // recompute same graph
        ggml_backend_graph_compute(be, g);
        ggml_backend_tensor_get(c, out, 0, ggml_nbytes(c));
        double w3 = 0;
        for (int j = 0; j < n; j++) for (int i = 0; i < m; i++) {
            double s = 0; for (int l = 0; l < k; l++) s += (double)A[i*k+l]*B[j*k+l];
            double e = fabs(s - out[j*m+i]); if (e > w3) w3 = e;
        }
        printf("[bad %d cells rows %d-%d cols %d-%d; reread %.3g; recompute %.3g]", cnt, bi0, bi1, bj0, bj1, w2, w3);
    }
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return worst;
}


int main(int argc, char **argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s m k n_from n_to reps\n", argv[0]); return 2; }
    ggml_backend_t be = ggml_backend_vk_init(0);
    if (!be) { fprintf(stderr, "no Vulkan device (GGML_VK_VISIBLE_DEVICES=0 for lavapipe)\n"); return 1; }
    int m = atoi(argv[1]), k = atoi(argv[2]), n0 = atoi(argv[3]), n1 = atoi(argv[4]), reps = atoi(argv[5]);
    for (int n = n0; n <= n1; n++) {
        float *A = malloc(sizeof(float)*m*k), *B = malloc(sizeof(float)*n*k), *O = malloc(sizeof(float)*m*n);
        for (int i = 0; i < m*k; i++) A[i] = frand();
        for (int i = 0; i < n*k; i++) B[i] = frand();
        int bad = 0; double w = 0;
        for (int rep = 0; rep < reps; rep++) { double e = run(be, m, n, k, A, B, O); if (e > 0.05) { bad++; printf(" rep%d", rep); } if (e > w) w = e; }
        printf("n=%d bad %d/%d worst %.3g\n", n, bad, reps, w);
        fflush(stdout);
        free(A); free(B); free(O);
    }
    ggml_backend_free(be);
    return 0;
}
