/* Boot-time marker used as /init by bench/kernel_boot.py and the kernel tests.
 * Prints the line xbuild's init prints just before exec ("xbuild: exec <path> at <N>us", N = CLOCK_BOOTTIME),
 * then the time since reset: on x86 the TSC (under QEMU -icount it counts guest nanoseconds since reset, so it
 * also covers firmware and kernel decompression), on arm64 the architected virtual counter converted to ns
 * (CNTVCT_EL0 / CNTFRQ_EL0; QEMU's counts guest time since reset too), then powers off. */
#include <stdio.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#if defined(__aarch64__)
static unsigned long long rdtsc(void)
{
    unsigned long long count, freq;
    __asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(count));
    __asm__ volatile("mrs %0, cntfrq_el0" : "=r"(freq));
    return (unsigned long long)((unsigned __int128)count * 1000000000u / freq);
}
#else
static unsigned long long rdtsc(void)
{
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

int main(void)
{
    struct timespec ts;
    unsigned long long tsc = rdtsc();
    clock_gettime(CLOCK_BOOTTIME, &ts);
    printf("xbuild: exec /init at %lldus\n", (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000);
    printf("xbuild: tsc %llu\n", tsc);
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}
