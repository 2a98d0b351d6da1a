/* The parts of one tinygrad CPU kernel, run at once on several threads (exo_node/cpu_threads.py).
   tinygrad's compute queue calls fork_kernel(kernel, a0, a1, a2, parts) in place of the kernel's parts one after
   another: the queue's worker and the helper threads each take the next part not yet taken, until none is left,
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

typedef void (*kernel_fn)(long, long, long, long);

static struct {
  _Atomic long seq;                 /* bumped for each kernel */
  _Atomic long fn, a0, a1, a2;      /* the kernel and its three buffers; its last argument is the part */
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
    long t = atomic_fetch_add(&job.ticket, 1);
    int i = (int)(t & 0xffffffffL), parts = (int)(t >> 32);
    if (i >= parts) return taken;
    ((kernel_fn)atomic_load_explicit(&job.fn, memory_order_relaxed))(atomic_load_explicit(&job.a0, memory_order_relaxed),
      atomic_load_explicit(&job.a1, memory_order_relaxed), atomic_load_explicit(&job.a2, memory_order_relaxed), i);
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

void fork_kernel(long fn, long a0, long a1, long a2, long parts) {
  while (atomic_flag_test_and_set(&forking)) PAUSE();
  atomic_store_explicit(&job.fn, fn, memory_order_relaxed);
  atomic_store_explicit(&job.a0, a0, memory_order_relaxed);
  atomic_store_explicit(&job.a1, a1, memory_order_relaxed);
  atomic_store_explicit(&job.a2, a2, memory_order_relaxed);
  atomic_store(&job.finished, 0);
  atomic_store(&job.ticket, parts << 32);
  atomic_fetch_add(&job.seq, 1);
  for (int n = atomic_exchange(&job.sleeping, 0); n > 0; n--) sem_post(&job.sem);
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
