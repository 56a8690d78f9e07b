// Where does each x86 prefetch hint put a line on this CPU? A developer's tool for the kernels'
// prefetch choices (csrc/cpu/kernels.h, prefetch_lines): on Zen 4 and later AMD cores
// prefetcht1/t2 fill L2 only, on Zen 3 and earlier every hint fills L1.
//
//     gcc -O2 -o /tmp/prefetch_levels bench/prefetch_levels.c && /tmp/prefetch_levels
//
// Per trial: 32 lines (every other line of one 4 KB page, so the adjacent-line prefetcher
// brings nothing that is read) are flushed, prefetched with the hint, left ~40 us to arrive,
// then read by a pointer chase in random order. Time-stamp-counter ticks per load are then the
// latency of the level the lines sit in: about 4 for L1, 12-15 for L2, a few hundred for DRAM.
// Medians of 301 trials, each on another page.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <x86intrin.h>

#define LINES 32
#define STRIDE 128
#define TRIALS 301

// kL2: a control, the lines loaded and then pushed out of L1 (not L2) by reading 128 KB of
// other memory, so the tool shows what an L2 hit costs here.
enum Hint { kT0, kT1, kT2, kNta, kNone, kL2, kHints };
static const char* const kNames[kHints] = {"prefetcht0", "prefetcht1", "prefetcht2",
                                           "prefetchnta", "none (DRAM)", "control: L2"};
static volatile char* g_evict;  // 128 KB read to push lines out of L1

static double trial(char* page, int hint, unsigned seed) {
  int perm[LINES];
  for (int i = 0; i < LINES; ++i) perm[i] = i;
  for (int i = LINES - 1; i > 0; --i) {  // a random cycle through the lines
    seed = seed * 1103515245u + 12345u;
    const int j = (int)((seed >> 8) % (unsigned)(i + 1));
    const int t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  for (int i = 0; i < LINES; ++i)
    *(char**)(page + perm[i] * STRIDE) = page + perm[(i + 1) % LINES] * STRIDE;
  for (int i = 0; i < LINES; ++i) _mm_clflush(page + i * STRIDE);
  _mm_mfence();
  for (int i = 0; i < LINES; ++i) {
    const char* p = page + i * STRIDE;
    switch (hint) {
      case kT0: __asm__ volatile("prefetcht0 %0" : : "m"(*p)); break;
      case kT1: __asm__ volatile("prefetcht1 %0" : : "m"(*p)); break;
      case kT2: __asm__ volatile("prefetcht2 %0" : : "m"(*p)); break;
      case kNta: __asm__ volatile("prefetchnta %0" : : "m"(*p)); break;
      case kL2: (void)*(volatile const char*)p; break;
      default: break;
    }
  }
  const uint64_t wait = __rdtsc();
  while (__rdtsc() - wait < 100000) {
  }
  if (hint == kL2)
    for (int i = 0; i < (128 << 10); i += 64) (void)g_evict[i];
  unsigned aux;
  char* p = page + perm[0] * STRIDE;
  const uint64_t t0 = __rdtscp(&aux);
  for (int i = 0; i < LINES; ++i) p = *(char* volatile*)p;
  const uint64_t t1 = __rdtscp(&aux);
  if (p != page + perm[0] * STRIDE) abort();  // the chase is a cycle: back at the start
  return (double)(t1 - t0) / LINES;
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(void) {
  const size_t bytes = (size_t)256 << 20;
  char* buf = aligned_alloc(4096, bytes);
  if (buf == NULL) return 1;
  for (size_t i = 0; i < bytes; i += 64) buf[i] = 1;  // fault every page in first
  const size_t pages = bytes / 4096 - 64;
  g_evict = buf + bytes - (128 << 10);  // the last 128 KB, never a trial's page
  for (int hint = 0; hint < kHints; ++hint) {
    double ticks[TRIALS];
    for (int r = 0; r < TRIALS; ++r)
      ticks[r] = trial(buf + ((size_t)r * 7919 % pages) * 4096, hint, (unsigned)r + 1);
    qsort(ticks, TRIALS, sizeof(double), by_value);
    printf("%-12s %7.1f ticks per load (p10 %.1f, p90 %.1f)\n", kNames[hint],
           ticks[TRIALS / 2], ticks[TRIALS / 10], ticks[TRIALS * 9 / 10]);
  }
  free(buf);
  return 0;
}
