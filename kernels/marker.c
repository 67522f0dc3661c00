/* Boot-time marker used as /init by bench/kernel_boot.py and the kernel tests.
 * Prints the line xbuild's init prints just before exec ("xbuild: exec <path> at <N>us", N = CLOCK_BOOTTIME),
 * then the TSC (under QEMU -icount the TSC counts guest nanoseconds since reset, so it also covers firmware
 * and kernel decompression), then powers off. */
#include <stdio.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

static unsigned long long rdtsc(void)
{
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
}

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
