/* The parts of one tinygrad CPU kernel, run at once on several threads (exo_node/cpu_threads.py).
   tinygrad's compute queue calls fork_kernel(kernel, parts, n, buffer 0, ..., buffer n - 1) in place of the
   kernel's parts one after another: the queue's worker and the helper threads each take the next part not yet taken, until none is left,
   and the worker returns once every part has run. A helper that finds no kernel spins for spin_ns, then sleeps
   until the next one; the worker never waits for a helper to wake, it takes the parts itself meanwhile. */
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ __volatile__("yield")
#else
#define PAUSE() ((void)0)
#endif

/* A kernel takes its buffers, then its part: at most MAX_ARGS in all. Called with more than it declares, as
   tinygrad's own worker calls every kernel with all the words of its queue entry (the callee ignores the rest). */
#define MAX_ARGS 61
#define L8(p) long p##0, long p##1, long p##2, long p##3, long p##4, long p##5, long p##6, long p##7
#define V8(p) p##0, p##1, p##2, p##3, p##4, p##5, p##6, p##7
#define A8(i) a[i], a[i + 1], a[i + 2], a[i + 3], a[i + 4], a[i + 5], a[i + 6], a[i + 7]
typedef void (*kernel_fn)(L8(p), L8(q), L8(r), L8(s), L8(t), L8(u), L8(v), long w0, long w1, long w2, long w3, long w4);

static struct {
  _Atomic long seq;                 /* bumped for each kernel */
  _Atomic long fn, n;               /* the kernel and how many buffers it takes */
  _Atomic long args[MAX_ARGS];      /* its buffers */
  _Atomic long ticket;              /* the kernel's parts << 32 | the next part to take: one word, so a take is
                                       always of one kernel */
  _Atomic int finished;             /* parts run */
  _Atomic int sleeping;             /* helpers that may be waiting on sem */
  sem_t sem;
  long spin_ns;
} job;
_Atomic long helper_parts;          /* parts the helpers have run: what they took off the worker */

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* A take that lands on the next kernel's ticket takes a part of that kernel, whose fields were written before its
   ticket; a take past the last part changes nothing that is read again. */
static int take_parts(void) {
  int taken = 0;
  for (;;) {
    long t = atomic_fetch_add(&job.ticket, 1), a[MAX_ARGS] = {0};
    int i = (int)(t & 0xffffffffL), parts = (int)(t >> 32), n = (int)atomic_load_explicit(&job.n, memory_order_relaxed);
    if (i >= parts) return taken;
    for (int k = 0; k < n; k++) a[k] = atomic_load_explicit(&job.args[k], memory_order_relaxed);
    a[n] = i;
    ((kernel_fn)atomic_load_explicit(&job.fn, memory_order_relaxed))(A8(0), A8(8), A8(16), A8(24), A8(32), A8(40), A8(48),
                                                                      a[56], a[57], a[58], a[59], a[60]);
    atomic_fetch_add(&job.finished, 1);
    taken++;
  }
}

static void *helper(void *unused) {
  (void)unused;
  long seen = 0;
  pthread_setname_np(pthread_self(), "exo-cpu-helper");
  for (;;) {
    for (long since = now_ns(); atomic_load(&job.seq) == seen; PAUSE()) {
      if (now_ns() - since < job.spin_ns) continue;
      atomic_fetch_add(&job.sleeping, 1);  /* the worker posts once per sleeper it counts; a spare post is a spare wake */
      if (atomic_load(&job.seq) == seen) sem_wait(&job.sem);
      since = now_ns();
    }
    seen = atomic_load(&job.seq);
    atomic_fetch_add(&helper_parts, take_parts());
  }
  return 0;
}

static atomic_flag forking = ATOMIC_FLAG_INIT;  /* one kernel at a time, should two queues ever call in at once */

/* The queue's entry: this function, the kernel, its parts, its buffers' count n (at most MAX_ARGS - 1), the buffers. */
void fork_kernel(long fn, long parts, long n, L8(a), L8(b), L8(c), L8(d), L8(e), L8(f), L8(g), long h0, long h1,
                 long h2, long h3) {
  long given[] = {V8(a), V8(b), V8(c), V8(d), V8(e), V8(f), V8(g), h0, h1, h2, h3};
  while (atomic_flag_test_and_set(&forking)) PAUSE();
  atomic_store_explicit(&job.fn, fn, memory_order_relaxed);
  atomic_store_explicit(&job.n, n, memory_order_relaxed);
  for (long k = 0; k < n; k++) atomic_store_explicit(&job.args[k], given[k], memory_order_relaxed);
  atomic_store(&job.finished, 0);
  atomic_store(&job.ticket, parts << 32);
  atomic_fetch_add(&job.seq, 1);
  for (int sleepers = atomic_exchange(&job.sleeping, 0); sleepers > 0; sleepers--) sem_post(&job.sem);
  take_parts();
  while (atomic_load(&job.finished) < parts) PAUSE();
  atomic_flag_clear(&forking);
}

/* Starts threads - 1 helpers; 0 on success. */
int start(int threads, long spin_ns) {
  job.spin_ns = spin_ns;
  if (sem_init(&job.sem, 0, 0)) return -1;
  for (int i = 1; i < threads; i++) {
    pthread_t t;
    if (pthread_create(&t, 0, helper, 0)) return -1;
    pthread_detach(t);
  }
  return 0;
}
