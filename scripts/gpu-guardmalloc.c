// gpu-guardmalloc: the guard-page allocator that found the lavapipe heap corruption (README,
// GPUs). An LD_PRELOAD malloc that puts every block of at least GUARD_MIN bytes (default 1024;
// 1 for all) at the end of its own pages, after a read-only header page and before an
// inaccessible guard page, and never reuses it: on free its pages become inaccessible. A write
// past a block's end, before its start, or into a freed block faults at the writing
// instruction (Debian's electric-fence runs out of mappings on a Vulkan process long before).
// Blocks allocated or freed from libvulkan_lvp.so or libggml-vulkan.so keep a backtrace, and
// guard_lookup(addr) / guard_around(addr, n), called from gdb, print the block at an address
// with who allocated and freed it, in which thread and order. Smaller blocks go to glibc; a
// block's slack up to its 16-byte alignment is checked on free.
//
//   cc -O1 -g -shared -fPIC -o /tmp/guardmalloc.so scripts/gpu-guardmalloc.c -lpthread -ldl
//   echo 2097152 > /proc/sys/vm/max_map_count    # every live block is three mappings
//   GUARD_MIN=1 gdb -ex 'set environment LD_PRELOAD=/tmp/guardmalloc.so' --args PROGRAM ...
//   (gdb) run ... then, at the fault: call ((void(*)(unsigned long))guard_lookup)($rbp)
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <pthread.h>
#include <dlfcn.h>
size_t malloc_usable_size(void *);

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);

#define PAGE 4096UL
#define REGION (256UL << 30)

struct rec { uint64_t size, align, first, npages; void *caller; uint64_t aseq, fseq; int atid, ftid; int nabt, nfbt; void *abt[14]; void *fbt[14]; };
#include <execinfo.h>
#include <link.h>
static __thread int in_bt;
static uintptr_t lo[2], hi[2];
static unsigned long probes;
static int phdr_cb(struct dl_phdr_info *info, size_t sz, void *data) {
    const char *names[2] = {"libvulkan_lvp.so", "libggml-vulkan.so"};
    for (int k = 0; k < 2; k++) {
        if (!info->dlpi_name || !strstr(info->dlpi_name, names[k])) continue;
        for (int i = 0; i < info->dlpi_phnum; i++) {
            const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
            if (ph->p_type != PT_LOAD || !(ph->p_flags & PF_X)) continue;
            lo[k] = info->dlpi_addr + ph->p_vaddr; hi[k] = lo[k] + ph->p_memsz;
        }
    }
    return 0;
}
static int interesting(void *caller) {
    if ((!lo[0] || !lo[1]) && (probes++ % 512) == 0) dl_iterate_phdr(phdr_cb, NULL);
    uintptr_t c = (uintptr_t)caller;
    return (c >= lo[0] && c < hi[0]) || (c >= lo[1] && c < hi[1]);
}
static int trace(void **bt, void *caller) {
    if (in_bt || !interesting(caller)) return 0;
    in_bt = 1;
    int n = backtrace(bt, 14);
    in_bt = 0;
    return n;
}

static char *region;
static uint64_t seq;
#include <sys/syscall.h>
static int tid(void) { return (int)syscall(SYS_gettid); }
static size_t bump;
static size_t min_size = 1024;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int inited;
static struct rec *recs; // by page index of the user pointer's page

static void init(void) {
    if (inited) return;
    pthread_mutex_lock(&mu);
    if (!inited) {
        region = mmap(NULL, REGION, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        recs = mmap(NULL, (REGION / PAGE) * sizeof(struct rec), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        const char *e = getenv("GUARD_MIN");
        if (e) min_size = strtoul(e, NULL, 0);
        if (region == MAP_FAILED || recs == MAP_FAILED) { write(2, "guardmalloc: mmap failed\n", 25); abort(); }
        __atomic_store_n(&inited, 1, __ATOMIC_RELEASE);
        char msg[80];
        int n = snprintf(msg, sizeof msg, "guardmalloc: blocks >= %zu bytes guarded\n", min_size);
        write(2, msg, n);
    }
    pthread_mutex_unlock(&mu);
}

static int ours(const void *p) { return region && (const char *)p >= region && (const char *)p < region + REGION; }

static void *galloc(size_t size, size_t align, void *caller) {
    if (align < 16) align = 16;
    size_t rsize = (size + align - 1) & ~(align - 1);
    if (rsize == 0) rsize = align;
    size_t npages = (rsize + PAGE - 1) / PAGE;
    if (align > PAGE) npages += align / PAGE; // room to align
    pthread_mutex_lock(&mu);
    size_t off = bump;
    bump += (npages + 2) * PAGE; // header page, data, guard page
    pthread_mutex_unlock(&mu);
    if (bump > REGION) { write(2, "guardmalloc: region exhausted\n", 30); abort(); }
    char *hdr = region + off, *data = hdr + PAGE, *end = data + npages * PAGE;
    if (mprotect(hdr, (npages + 1) * PAGE, PROT_READ | PROT_WRITE) != 0) { write(2, "guardmalloc: mprotect failed\n", 29); abort(); }
    char *user = (char *)(((uintptr_t)(end - rsize)) & ~(uintptr_t)(align - 1));
    if (user < data) { write(2, "guardmalloc: align bug\n", 23); abort(); }
    memset(user + size, 0xAB, end - (user + size));
    struct rec *r = &recs[((uintptr_t)user - (uintptr_t)region) / PAGE];
    r->size = size; r->align = align; r->first = off / PAGE; r->npages = npages; r->caller = caller;
    r->nfbt = 0; r->nabt = trace(r->abt, caller);
    r->aseq = __atomic_add_fetch(&seq, 1, __ATOMIC_SEQ_CST); r->atid = tid(); r->fseq = 0; r->ftid = 0;
    memcpy(hdr, r, sizeof *r);
    mprotect(hdr, PAGE, PROT_READ);
    return user;
}

static struct rec *rec_of(const void *p) { return &recs[((uintptr_t)p - (uintptr_t)region) / PAGE]; }

static void gfree(void *p, void *caller) {
    struct rec *r = rec_of(p);
    char *hdr = region + r->first * PAGE, *data = hdr + PAGE, *end = data + r->npages * PAGE;
    if (r->size == (uint64_t)-1) {
        char msg[120];
        int n = snprintf(msg, sizeof msg, "guardmalloc: double free of %p\n", p);
        write(2, msg, n); abort();
    }
    for (char *c = (char *)p + r->size; c < end; c++) {
        if ((unsigned char)*c != 0xAB) {
            char msg[160];
            int n = snprintf(msg, sizeof msg, "guardmalloc: slack after block %p (size %lu, caller %p) overwritten at +%ld\n", p, (unsigned long)r->size, r->caller, (long)(c - (char *)p));
            write(2, msg, n); abort();
        }
    }
    r->size = (uint64_t)-1;
    r->nfbt = trace(r->fbt, caller);
    r->fseq = __atomic_add_fetch(&seq, 1, __ATOMIC_SEQ_CST); r->ftid = tid();
    madvise(hdr, (r->npages + 1) * PAGE, MADV_DONTNEED);
    mprotect(hdr, (r->npages + 1) * PAGE, PROT_NONE);
}

// For gdb: the block that holds or borders addr.
void guard_lookup(uintptr_t addr) {
    if (!ours((void *)addr)) { fprintf(stderr, "guard_lookup: %#lx not a guarded block\n", addr); return; }
    size_t pg = (addr - (uintptr_t)region) / PAGE;
    for (size_t i = pg + 1; i-- > 0 && pg - i < 100000;) {
        struct rec *r = &recs[i];
        if (r->npages == 0) continue;
        char *hdr = region + r->first * PAGE;
        if (addr >= (uintptr_t)hdr && addr < (uintptr_t)(hdr + (r->npages + 2) * PAGE)) {
            uintptr_t user = (uintptr_t)region + i * PAGE; // page of user ptr; find exact from end
            char *end = hdr + PAGE + r->npages * PAGE;
            size_t rs = (r->size == (uint64_t)-1) ? 0 : ((r->size + r->align - 1) & ~(r->align - 1));
            fprintf(stderr, "guard_lookup: %#lx in block pages [%p,%p) user page %#lx size %lld align %lu caller %p freed %d end+%ld\n",
                    addr, hdr, end + PAGE, user, (long long)r->size, (unsigned long)r->align, r->caller, r->size == (uint64_t)-1, (long)(addr - (uintptr_t)end) + (long)rs - (long)rs);
            fprintf(stderr, "  alloc seq %lu tid %d; free seq %lu tid %d (now %lu)\n", (unsigned long)r->aseq, r->atid, (unsigned long)r->fseq, r->ftid, (unsigned long)seq);
            if (r->nabt) backtrace_symbols_fd(r->abt, r->nabt, 2);
            if (r->nfbt) backtrace_symbols_fd(r->fbt, r->nfbt, 2);
            return;
        }
    }
    fprintf(stderr, "guard_lookup: %#lx: no record found\n", addr);
}

void *malloc(size_t n) {
    init();
    if (n < min_size) return __libc_malloc(n);
    return galloc(n, 16, __builtin_return_address(0));
}
void *calloc(size_t a, size_t b) {
    size_t n = a * b;
    if (!inited && n < 4096) return __libc_calloc(a, b); // dlsym and friends during init
    init();
    if (n < min_size) return __libc_calloc(a, b);
    return galloc(n, 16, __builtin_return_address(0)); // fresh pages are zero
}
void free(void *p) {
    if (!p) return;
    if (ours(p)) { gfree(p, __builtin_return_address(0)); return; }
    __libc_free(p);
}
void *realloc(void *p, size_t n) {
    if (!p) return malloc(n);
    if (!ours(p)) {
        return __libc_realloc(p, n);
    }
    struct rec *r = rec_of(p);
    size_t old = r->size;
    void *q = n < min_size ? __libc_malloc(n) : galloc(n, 16, __builtin_return_address(0));
    if (!q) return NULL;
    memcpy(q, p, old < n ? old : n);
    gfree(p, __builtin_return_address(0));
    return q;
}
void *memalign(size_t al, size_t n) {
    init();
    if (n < min_size) return __libc_memalign(al, n);
    return galloc(n, al, __builtin_return_address(0));
}
int posix_memalign(void **out, size_t al, size_t n) {
    init();
    void *p = n < min_size ? __libc_memalign(al, n) : galloc(n, al, __builtin_return_address(0));
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
void *aligned_alloc(size_t al, size_t n) { return memalign(al, n); }
void *valloc(size_t n) { return memalign(PAGE, n); }
void *pvalloc(size_t n) { return memalign(PAGE, (n + PAGE - 1) & ~(PAGE - 1)); }
size_t malloc_usable_size(void *p) {
    if (p && ours(p)) return rec_of(p)->size;
    static size_t (*next)(void *);
    if (!next) next = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
    return next ? next(p) : 0;
}

// For gdb: the n guarded blocks before and after the one holding addr, with their traces.
void guard_around(uintptr_t addr, int n) {
    size_t pg = (addr - (uintptr_t)region) / PAGE;
    struct rec *found[64]; int nf = 0;
    // walk down
    for (size_t i = pg + 1; i-- > 0 && nf < n + 1 && pg - i < 200000;) if (recs[i].npages) { if (nf < 64) found[nf++] = &recs[i]; }
    for (int k = nf - 1; k >= 0; k--) {
        struct rec *r = found[k];
        fprintf(stderr, "== block user page %p size %lld caller %p alloc seq %lu tid %d free seq %lu tid %d\n", region + (r - recs) * PAGE, (long long)r->size, r->caller, (unsigned long)r->aseq, r->atid, (unsigned long)r->fseq, r->ftid);
        if (r->nabt) { fprintf(stderr, " alloc:\n"); backtrace_symbols_fd(r->abt, r->nabt, 2); }
        if (r->nfbt) { fprintf(stderr, " free:\n"); backtrace_symbols_fd(r->fbt, r->nfbt, 2); }
    }
    int m = 0;
    for (size_t i = pg + 1; m < n && i - pg < 200000; i++) if (recs[i].npages) {
        struct rec *r = &recs[i]; m++;
        fprintf(stderr, "== after: block user page %p size %lld caller %p alloc seq %lu tid %d free seq %lu tid %d\n", region + (r - recs) * PAGE, (long long)r->size, r->caller, (unsigned long)r->aseq, r->atid, (unsigned long)r->fseq, r->ftid);
        if (r->nabt) { fprintf(stderr, " alloc:\n"); backtrace_symbols_fd(r->abt, r->nabt, 2); }
        if (r->nfbt) { fprintf(stderr, " free:\n"); backtrace_symbols_fd(r->fbt, r->nfbt, 2); }
    }
}
