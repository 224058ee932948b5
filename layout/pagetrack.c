/*
 * pagetrack: an LD_PRELOAD library that records which functions of a process's main
 * executable run, for layout/generate.sh.
 *
 * In a process whose command line contains $PAGETRACK_MATCH (default " server start"),
 * it makes the executable's code unreadable before any of it runs, and every
 * $PAGETRACK_US microseconds (default 1000) again. Each instruction fetch that hits a
 * protected page faults; the handler makes that page executable again and appends the
 * faulting address (as an offset into the executable, in hex, once per address) to
 * $PAGETRACK_DIR/<pid>.addrs. Re-protecting often means most functions are caught at their
 * own entry, not only the first one to run in each page.
 *
 * A profiling tool, never linked into mpreg: the process runs several times slower.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <link.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long code_lo, code_hi, load_base;
static int out_fd = -1;
static struct sigaction previous;

/* Addresses already written (open addressing; a racing duplicate line is harmless). */
#define SLOTS (1u << 20)
static unsigned long seen[SLOTS];

static int first_time(unsigned long offset) {
    unsigned long key = offset + 1;
    unsigned h = (unsigned)((key * 0x9E3779B97F4A7C15ULL) >> 44) & (SLOTS - 1);
    for (unsigned probes = 0; probes < SLOTS; probes++, h = (h + 1) & (SLOTS - 1)) {
        unsigned long current = __atomic_load_n(&seen[h], __ATOMIC_RELAXED);
        if (current == key) return 0;
        if (current == 0) {
            unsigned long empty = 0;
            if (__atomic_compare_exchange_n(&seen[h], &empty, key, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return 1;
            if (empty == key) return 0;
        }
    }
    return 0;
}

/* Async-signal-safe: mprotect and write only. */
static void on_fault(int sig, siginfo_t *info, void *context) {
    unsigned long at = (unsigned long)info->si_addr;
    (void)sig;
    (void)context;
    if (at < code_lo || at >= code_hi) {
        sigaction(SIGSEGV, &previous, NULL);
        raise(SIGSEGV);
        return;
    }
    mprotect((void *)(at & ~4095UL), 4096, PROT_READ | PROT_EXEC);
    unsigned long offset = at - load_base;
    if (!first_time(offset) || out_fd < 0) return;
    char line[24], digits[20];
    int n = 0, k = 0;
    do {
        digits[k++] = "0123456789abcdef"[offset & 15];
        offset >>= 4;
    } while (offset);
    while (k) line[n++] = digits[--k];
    line[n++] = '\n';
    if (write(out_fd, line, n) < 0) out_fd = -1;
}

static void *reprotect(void *arg) {
    const char *every = getenv("PAGETRACK_US");
    useconds_t pause = every ? (useconds_t)atoi(every) : 1000;
    (void)arg;
    for (;;) {
        usleep(pause);
        mprotect((void *)code_lo, code_hi - code_lo, PROT_NONE);
    }
    return NULL;
}

static int find_code(struct dl_phdr_info *object, size_t size, void *data) {
    (void)size;
    (void)data;
    if (!object->dlpi_name || object->dlpi_name[0] != 0) return 0; /* not the executable */
    load_base = object->dlpi_addr;
    for (int i = 0; i < object->dlpi_phnum; i++) {
        const ElfW(Phdr) *segment = &object->dlpi_phdr[i];
        if (segment->p_type == PT_LOAD && (segment->p_flags & PF_X)) {
            code_lo = (load_base + segment->p_vaddr) & ~4095UL;
            code_hi = (load_base + segment->p_vaddr + segment->p_memsz + 4095) & ~4095UL;
        }
    }
    return 1;
}

__attribute__((constructor)) static void start(void) {
    char command[4096] = {0};
    int fd = open("/proc/self/cmdline", O_RDONLY);
    if (fd < 0) return;
    ssize_t n = read(fd, command, sizeof command - 1);
    close(fd);
    for (ssize_t i = 0; i < n; i++)
        if (command[i] == 0) command[i] = ' ';
    const char *match = getenv("PAGETRACK_MATCH");
    if (!strstr(command, match ? match : " server start")) return;
    dl_iterate_phdr(find_code, NULL);
    if (!code_lo) return;
    const char *dir = getenv("PAGETRACK_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/%d.addrs", dir ? dir : ".", (int)getpid());
    out_fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &action, &previous);
    mprotect((void *)code_lo, code_hi - code_lo, PROT_NONE);
    pthread_t thread;
    pthread_create(&thread, NULL, reprotect, NULL);
}
