/* Runs the shared mirror conformance cases (conformance/mirror/NNN-name.json, see
 * conformance/README.md): every step's message goes through the library's parser and mirror as
 * if it arrived on the kv topic, then the mirror's rev and live items are compared with the
 * expectation (values as minified JSON text). The test may use stdio, dirent and big static
 * buffers; the library does not. Usage: conformance [DIR] (default: DDP_CONFORMANCE_DIR). */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ddp/ddp.h"
#include "../src/internal.h"

#ifndef DDP_CONFORMANCE_DIR
#define DDP_CONFORMANCE_DIR "conformance/mirror"
#endif
#define MIN_CASES 40

#define CAP 256
#define KMAX 255
#define VMAX 4096
DDP_MIRROR_STORAGE(st, CAP, KMAX, VMAX);
static ddp_mirror mirror;
static ddp_token msg_toks[8192];
static ddp_token file_toks[65536];
static char file_buf[1 << 20];
static char msg_buf[1 << 18];
static char want_buf[VMAX + 1];
static char names[1024][256];

static int failures;

static int cmp_names(const void *a, const void *b) { return strcmp((const char *)a, (const char *)b); }

static const char *tok_text(const ddp_token *t, size_t *len) {
    *len = t->end - t->start;
    return file_buf + t->start;
}

static void fail(const char *file, size_t step, const char *msg, const char *what) {
    failures++;
    fprintf(stderr, "FAIL %s step %zu: %s\n  message: %s\n", file, step, what, msg);
}

static void dump_mirror(void) {
    size_t it = 0;
    ddp_item item;
    fprintf(stderr, "  mirror: rev %llu {", (unsigned long long)ddp_mirror_rev(&mirror));
    while (ddp_mirror_next(&mirror, &it, &item)) fprintf(stderr, " %s=%s", item.key, item.value);
    fprintf(stderr, " }\n");
}

static int run_case(const char *dir, const char *name) {
    char path[1400];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return -1;
    }
    size_t len = fread(file_buf, 1, sizeof file_buf - 1, f);
    fclose(f);
    file_buf[len] = '\0';
    size_t n = 0;
    ddp_result r = ddp_json_tokenize(file_buf, len, file_toks, sizeof file_toks / sizeof file_toks[0], 5, &n);
    if (r != DDP_OK || file_buf[file_toks[0].start] != '{') {
        fprintf(stderr, "FAIL %s: the case file is not a JSON object (%s)\n", name, ddp_result_name(r));
        failures++;
        return -1;
    }
    size_t steps = ddp__obj_get(file_buf, file_toks, n, 0, "steps");
    if (steps >= n || file_buf[file_toks[steps].start] != '[') {
        fprintf(stderr, "FAIL %s: no steps\n", name);
        failures++;
        return -1;
    }
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(st, CAP, KMAX, VMAX);
    ddp_mirror_init(&mirror, &s);
    size_t step = 0;
    int before = failures;
    for (size_t j = steps + 1; j < n && file_toks[j].start < file_toks[steps].end; j = ddp__tok_skip(file_toks, n, j), step++) {
        size_t mt = ddp__obj_get(file_buf, file_toks, n, j, "message");
        size_t et = ddp__obj_get(file_buf, file_toks, n, j, "expect");
        if (mt >= n || et >= n || file_buf[file_toks[mt].start] != '"' || file_buf[file_toks[et].start] != '{') {
            fail(name, step, "?", "step without a message string or an expect object");
            continue;
        }
        const char *raw = file_buf + file_toks[mt].start + 1;
        size_t raw_len = file_toks[mt].end - file_toks[mt].start - 2;
        size_t mlen = ddp__str_decoded_len(raw, raw_len, NULL);
        if (mlen >= sizeof msg_buf) {
            fail(name, step, "?", "message too long for the runner");
            continue;
        }
        ddp__str_decode(raw, raw_len, msg_buf);
        msg_buf[mlen] = '\0';
        r = ddp_mirror_apply(&mirror, msg_buf, mlen, msg_toks, sizeof msg_toks / sizeof msg_toks[0], NULL);
        if (getenv("DDP_CONFORMANCE_PRINT")) {
            printf("%s step %zu: %s\n", name, step, ddp_result_name(r));
        }
        /* rev */
        size_t rt = ddp__obj_get(file_buf, file_toks, n, et, "rev");
        uint64_t want_rev = 0;
        if (rt >= n || !ddp__tok_u64(file_buf, &file_toks[rt], &want_rev)) {
            fail(name, step, msg_buf, "expect.rev is not an integer");
            continue;
        }
        char what[VMAX + 600];
        if (ddp_mirror_rev(&mirror) != want_rev) {
            snprintf(what, sizeof what, "rev %llu, expected %llu (apply: %s)", (unsigned long long)ddp_mirror_rev(&mirror),
                     (unsigned long long)want_rev, ddp_result_name(r));
            fail(name, step, msg_buf, what);
            dump_mirror();
            continue;
        }
        /* items */
        size_t it = ddp__obj_get(file_buf, file_toks, n, et, "items");
        if (it >= n || file_buf[file_toks[it].start] != '{') {
            fail(name, step, msg_buf, "expect.items is not an object");
            continue;
        }
        size_t want_count = 0;
        int bad = 0;
        for (size_t k = it + 1; k + 1 < n && file_toks[k].start < file_toks[it].end; k = ddp__tok_skip(file_toks, n, k + 1)) {
            want_count++;
            char key[KMAX + 8];
            size_t klen_raw = file_toks[k].end - file_toks[k].start - 2;
            size_t klen = ddp__str_decoded_len(file_buf + file_toks[k].start + 1, klen_raw, NULL);
            if (klen > KMAX) {
                bad = 1;
                break;
            }
            ddp__str_decode(file_buf + file_toks[k].start + 1, klen_raw, key);
            key[klen] = '\0';
            size_t vlen;
            const char *vtext = tok_text(&file_toks[k + 1], &vlen);
            size_t wlen = 0;
            if (ddp_json_minify(vtext, vlen, want_buf, sizeof want_buf, &wlen) != DDP_OK) {
                bad = 1;
                break;
            }
            size_t got_len = 0;
            const char *got = ddp_mirror_get(&mirror, key, &got_len, NULL);
            if (got == NULL || got_len != wlen || memcmp(got, want_buf, wlen) != 0) {
                snprintf(what, sizeof what, "key %s is %s, expected %s (apply: %s)", key, got ? got : "(absent)", want_buf,
                         ddp_result_name(r));
                fail(name, step, msg_buf, what);
                dump_mirror();
                bad = 2;
                break;
            }
        }
        if (bad == 1) fail(name, step, msg_buf, "expected items the runner cannot read");
        if (bad == 0 && ddp_mirror_count(&mirror) != want_count) {
            snprintf(what, sizeof what, "%zu live keys, expected %zu (apply: %s)", ddp_mirror_count(&mirror), want_count,
                     ddp_result_name(r));
            fail(name, step, msg_buf, what);
            dump_mirror();
        }
    }
    if (step == 0) {
        fprintf(stderr, "FAIL %s: no steps\n", name);
        failures++;
    }
    printf("%s %s (%zu steps)\n", failures == before ? "ok  " : "FAIL", name, step);
    return 0;
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : DDP_CONFORMANCE_DIR;
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "cannot open the conformance directory %s\n", dir);
        return 1;
    }
    size_t count = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && count < sizeof names / sizeof names[0]) {
        size_t l = strlen(e->d_name);
        if (l > 5 && l < sizeof names[0] && strcmp(e->d_name + l - 5, ".json") == 0) {
            memcpy(names[count], e->d_name, l + 1);
            count++;
        }
    }
    closedir(d);
    qsort(names, count, sizeof names[0], cmp_names);
    for (size_t i = 0; i < count; i++) run_case(dir, names[i]);
    printf("%zu cases, %d failures\n", count, failures);
    if (count < MIN_CASES && !getenv("DDP_CONFORMANCE_ANY")) {
        fprintf(stderr, "only %zu case files in %s (at least %d expected)\n", count, dir, MIN_CASES);
        return 1;
    }
    return failures ? 1 : 0;
}
