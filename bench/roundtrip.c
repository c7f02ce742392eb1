/* What one wake-up costs on this machine: a 60-byte ping-pong between two
 * processes over a UNIX socketpair, 100,000 round trips, p50 and p99.
 * Run it as is (the scheduler puts the two on different cores when it can)
 * and pinned to one core, to see what crossing cores costs:
 *   gcc -O2 -o /tmp/roundtrip bench/roundtrip.c
 *   /tmp/roundtrip; taskset -c 0 /tmp/roundtrip
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int by_value(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return d < 0 ? -1 : d > 0;
}

int main(void) {
    enum { N = 100000 };
    int sv[2];
    char buffer[64] = {0};
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return 1;
    if (fork() == 0) {
        close(sv[0]);
        while (read(sv[1], buffer, 60) > 0) write(sv[1], buffer, 60);
        return 0;
    }
    close(sv[1]);
    double *took = malloc(sizeof(double) * N);
    for (int i = 0; i < N; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        write(sv[0], buffer, 60);
        read(sv[0], buffer, 60);
        clock_gettime(CLOCK_MONOTONIC, &b);
        took[i] = (b.tv_sec - a.tv_sec) * 1e6 + (b.tv_nsec - a.tv_nsec) / 1e3;
    }
    qsort(took, N, sizeof(double), by_value);
    printf("round trip between two processes: p50 %.1f us, p99 %.1f us\n", took[N / 2],
           took[N * 99 / 100]);
    return 0;
}
