/* A tiny test harness (the tests may use stdio; the library does not). */
#ifndef DDP_HARNESS_H
#define DDP_HARNESS_H
#include <stdio.h>
#include <string.h>

static int h_failures;
static int h_checks;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        h_checks++;                                                                        \
        if (!(cond)) {                                                                     \
            h_failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
        }                                                                                  \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                 \
    do {                                                                                   \
        long long h_a = (long long)(a), h_b = (long long)(b);                              \
        h_checks++;                                                                        \
        if (h_a != h_b) {                                                                  \
            h_failures++;                                                                  \
            fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, h_a, h_b); \
        }                                                                                  \
    } while (0)

#define CHECK_STR(a, b)                                                                    \
    do {                                                                                   \
        const char *h_a = (a), *h_b = (b);                                                 \
        h_checks++;                                                                        \
        if (h_a == NULL || strcmp(h_a, h_b) != 0) {                                        \
            h_failures++;                                                                  \
            fprintf(stderr, "%s:%d: %s == \"%s\", expected \"%s\"\n", __FILE__, __LINE__, #a, \
                    h_a ? h_a : "(null)", h_b);                                            \
        }                                                                                  \
    } while (0)

#define RUN(test)                                                                          \
    do {                                                                                   \
        int h_before = h_failures;                                                         \
        test();                                                                            \
        printf("%s %s\n", h_failures == h_before ? "ok  " : "FAIL", #test);                \
    } while (0)

#define DONE()                                                                             \
    do {                                                                                   \
        printf("%d checks, %d failed\n", h_checks, h_failures);                            \
        return h_failures ? 1 : 0;                                                         \
    } while (0)
#endif
