/* Mirror semantics: rev order, tombstones, reloads, batches, limits, bad input, persistence. */
#include <stdint.h>
#include <stdlib.h>

#include "ddp/ddp.h"
#include "harness.h"

#if defined(__clang__)
#pragma clang diagnostic ignored "-Wstring-concatenation" /* long messages split over lines */
#endif

#define CAP 4
#define KMAX 16
#define VMAX 32
#define NTOK 128

DDP_MIRROR_STORAGE(st, CAP, KMAX, VMAX);
static ddp_mirror m;
static ddp_token toks[NTOK];

/* what the callbacks heard */
static char heard[2048];
static int reloads;
static void on_change(void *ctx, const ddp_change *c) {
    (void)ctx;
    size_t n = strlen(heard);
    snprintf(heard + n, sizeof heard - n, "%s%s=%s@%llu%s;", c->from_reload ? "R:" : "", c->key,
             c->deleted ? "-" : c->value, (unsigned long long)c->rev, "");
    CHECK(c->deleted ? c->value == NULL : strlen(c->value) == c->value_len);
    CHECK(strlen(c->key) == c->key_len);
}
static void on_reload(void *ctx, uint64_t rev) {
    (void)ctx;
    (void)rev;
    reloads++;
}
static const ddp_callbacks cbs = {NULL, on_change, on_reload, NULL, NULL};

static void fresh(void) {
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(st, CAP, KMAX, VMAX);
    CHECK_EQ_INT(ddp_mirror_init(&m, &s), DDP_OK);
    heard[0] = '\0';
    reloads = 0;
}

static ddp_result ap(const char *msg) { return ddp_mirror_apply(&m, msg, strlen(msg), toks, NTOK, &cbs); }

/* The live content, sorted by key, as "k=v;..." */
static const char *content(void) {
    static char out[1024];
    const char *keys[CAP];
    const char *vals[CAP];
    size_t n = 0, it = 0;
    ddp_item item;
    while (ddp_mirror_next(&m, &it, &item)) {
        keys[n] = item.key;
        vals[n] = item.value;
        n++;
    }
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++)
            if (strcmp(keys[j], keys[i]) < 0) {
                const char *t = keys[i];
                keys[i] = keys[j];
                keys[j] = t;
                t = vals[i];
                vals[i] = vals[j];
                vals[j] = t;
            }
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(out);
        snprintf(out + l, sizeof out - l, "%s=%s;", keys[i], vals[i]);
    }
    return out;
}

/* A byte snapshot of everything the mirror owns. */
typedef struct {
    ddp_mirror m;
    ddp_entry e[CAP];
    char k[sizeof st_keys];
    char v[sizeof st_values];
} snap;
static snap before;
static void take(void) {
    before.m = m;
    memcpy(before.e, st_entries, sizeof st_entries);
    memcpy(before.k, st_keys, sizeof st_keys);
    memcpy(before.v, st_values, sizeof st_values);
}
static int unchanged(void) {
    return memcmp(&before.m, &m, sizeof m) == 0 && memcmp(before.e, st_entries, sizeof st_entries) == 0 &&
           memcmp(before.k, st_keys, sizeof st_keys) == 0 && memcmp(before.v, st_values, sizeof st_values) == 0;
}

static void reload_then_live_changes(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":3,\"numItems\":2,\"items\":[{\"key\":\"a\",\"value\":1,"
                    "\"modificationTime\":\"2026-01-01T00:00:00.000Z\"},{\"key\":\"b\",\"value\":2}]}"),
                 DDP_OK);
    CHECK_STR(heard, "R:a=1@3;R:b=2@3;");
    CHECK_EQ_INT(reloads, 1);
    CHECK(ddp_mirror_synced(&m));
    CHECK_EQ_INT(ddp_mirror_rev(&m), 3);
    heard[0] = '\0';
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":4,\"key\":\"a\",\"value\":5}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":5,\"key\":\"b\"}"), DDP_OK);
    CHECK_STR(heard, "a=5@4;b=-@5;");
    CHECK_STR(content(), "a=5;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 5);
    CHECK_EQ_INT(ddp_mirror_count(&m), 1);
    uint64_t rev = 0;
    size_t len = 0;
    CHECK_STR(ddp_mirror_get(&m, "a", &len, &rev), "5");
    CHECK_EQ_INT(rev, 4);
    CHECK_EQ_INT(len, 1);
    CHECK(ddp_mirror_get(&m, "b", NULL, NULL) == NULL);
    CHECK(ddp_mirror_get(&m, "", NULL, NULL) == NULL);
}

static void late_set_after_delete_is_ignored(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":1,\"key\":\"k\",\"value\":1}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":3,\"key\":\"k\"}"), DDP_OK);
    heard[0] = '\0';
    ap("{\"action\":\"set\",\"rev\":2,\"key\":\"k\",\"value\":2}");
    CHECK_STR(heard, "");
    CHECK(ddp_mirror_get(&m, "k", NULL, NULL) == NULL);
    CHECK_EQ_INT(ddp_mirror_rev(&m), 3);
    /* a duplicate now is below the floor */
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":2,\"key\":\"k\",\"value\":2}"), DDP_STALE);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":1,\"key\":\"k\",\"value\":1}"), DDP_STALE);
    CHECK_STR(content(), "");
}

static void tombstone_out_of_order(void) {
    fresh();
    /* delete at 5 arrives before the set at 4 of the same key: the tombstone wins */
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":5,\"key\":\"x\"}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":4,\"key\":\"x\",\"value\":\"late\"}"), DDP_OK); /* rev 4 seen */
    CHECK_STR(content(), "");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 0);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":1,\"key\":\"y\",\"value\":1}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":2,\"key\":\"y\",\"value\":2}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":3,\"key\":\"y\",\"value\":3}"), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_rev(&m), 5);
    CHECK_STR(content(), "y=3;");
}

static void older_reload_does_not_undo_newer(void) {
    fresh();
    const char *r5 = "{\"action\":\"reload\",\"rev\":5,\"items\":[{\"key\":\"a\",\"value\":1},{\"key\":\"b\",\"value\":1}]}";
    CHECK_EQ_INT(ap(r5), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":6,\"key\":\"a\",\"value\":2}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":7,\"key\":\"b\"}"), DDP_OK);
    heard[0] = '\0';
    take();
    CHECK_EQ_INT(ap(r5), DDP_STALE);
    CHECK(unchanged());
    CHECK_STR(heard, "");
    CHECK_STR(content(), "a=2;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 7);
}

static void newer_reload_replaces_and_reports(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":2,\"items\":[{\"key\":\"a\",\"value\":1},{\"key\":\"b\",\"value\":1}]}"),
                 DDP_OK);
    heard[0] = '\0';
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"b\",\"value\":1},{\"key\":\"c\",\"value\":3}]}"),
                 DDP_OK);
    CHECK_STR(heard, "R:a=-@9;R:c=3@9;");
    CHECK_STR(content(), "b=1;c=3;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 9);
    /* a reload keeps what the mirror knows above its rev */
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":11,\"key\":\"d\",\"value\":4}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":10,\"items\":[]}"), DDP_OK);
    CHECK_STR(content(), "d=4;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 11);
    CHECK_EQ_INT(reloads, 3);
    /* a reload with an empty store empties the mirror */
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":20,\"items\":[]}"), DDP_OK);
    CHECK_STR(content(), "");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 20);
}

static void rev_advances_over_complete_sequences(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":1,\"key\":\"a\",\"value\":1}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":3}"), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_rev(&m), 1);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":2,\"key\":\"b\",\"value\":2}"), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_rev(&m), 3);
    CHECK_STR(content(), "a=3;b=2;");
    /* more revs ahead than DDP_AHEAD_MAX: never a crash, the floor stays honest */
    for (int r = 100; r < 100 + 3 * DDP_AHEAD_MAX; r++) {
        char msg[96];
        snprintf(msg, sizeof msg, "{\"action\":\"set\",\"rev\":%d,\"key\":\"a\",\"value\":%d}", r, r);
        CHECK_EQ_INT(ap(msg), DDP_OK);
    }
    CHECK_EQ_INT(ddp_mirror_rev(&m), 3);
}

static void values_are_stored_minified_and_exact(void) {
    fresh();
    CHECK_EQ_INT(ap("{ \"action\" : \"set\", \"rev\" : 1, \"key\" : \"v\", \"value\" : { \"x\" : [ 1.10 , \"a  b\" ] } }"),
                 DDP_OK);
    CHECK_STR(ddp_mirror_get(&m, "v", NULL, NULL), "{\"x\":[1.10,\"a  b\"]}");
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":2,\"key\":\"n\",\"value\":12345678901234567890}"), DDP_OK);
    CHECK_STR(ddp_mirror_get(&m, "n", NULL, NULL), "12345678901234567890");
    /* the same value again: applied (rev) but nobody is told */
    heard[0] = '\0';
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":3,\"key\":\"v\",\"value\":{\"x\":[1.10,\"a  b\"]}}"), DDP_OK);
    CHECK_STR(heard, "");
    uint64_t rev;
    ddp_mirror_get(&m, "v", NULL, &rev);
    CHECK_EQ_INT(rev, 3);
    /* escaped keys are the same key */
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":4,\"key\":\"\\u0076\"}"), DDP_OK);
    CHECK(ddp_mirror_get(&m, "v", NULL, NULL) == NULL);
    /* duplicate members: the last one counts */
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":5,\"key\":\"d\",\"value\":1,\"value\":2}"), DDP_OK);
    CHECK_STR(ddp_mirror_get(&m, "d", NULL, NULL), "2");
    /* extra fields are ignored, also "value":null on delete */
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":6,\"key\":\"d\",\"value\":null,\"extra\":[1]}"), DDP_OK);
    CHECK_STR(content(), "n=12345678901234567890;");
}

static void batches_are_all_or_nothing(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":10,\"items\":[{\"key\":\"a\",\"value\":1}]}"), DDP_OK);
    heard[0] = '\0';
    CHECK_EQ_INT(ap("{\"action\":\"batch\",\"rev\":13,\"changes\":[{\"action\":\"set\",\"rev\":11,\"key\":\"b\",\"value\":2},"
                    "{\"action\":\"delete\",\"rev\":12,\"key\":\"a\"},{\"action\":\"set\",\"rev\":13,\"key\":\"b\",\"value\":3}]}"),
                 DDP_OK);
    CHECK_STR(heard, "b=2@11;a=-@12;b=3@13;");
    CHECK_STR(content(), "b=3;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 13);

    /* one bad change anywhere: nothing is applied */
    const char *bad[] = {
        "{\"action\":\"batch\",\"rev\":15,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},"
        "{\"action\":\"set\",\"rev\":15,\"key\":\"d\",\"value\":\"0123456789012345678901234567890123456789\"}]}",
        "{\"action\":\"batch\",\"rev\":15,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},"
        "{\"action\":\"set\",\"rev\":15,\"key\":\"d\"}]}",
        "{\"action\":\"batch\",\"rev\":15,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},"
        "{\"action\":\"frob\",\"rev\":15,\"key\":\"d\"}]}",
        "{\"action\":\"batch\",\"rev\":15,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},7]}",
        "{\"action\":\"batch\",\"rev\":15,\"changes\":{}}",
        "{\"action\":\"batch\",\"rev\":15}",
        /* more new keys than the mirror has room for */
        "{\"action\":\"batch\",\"rev\":17,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},"
        "{\"action\":\"set\",\"rev\":15,\"key\":\"d\",\"value\":1},{\"action\":\"set\",\"rev\":16,\"key\":\"e\",\"value\":1},"
        "{\"action\":\"set\",\"rev\":17,\"key\":\"f\",\"value\":1}]}",
    };
    ddp_result want[] = {DDP_ERR_VALUE_TOO_LARGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE,
                         DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_MIRROR_FULL};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        take();
        heard[0] = '\0';
        CHECK_EQ_INT(ap(bad[i]), want[i]);
        CHECK(unchanged());
        CHECK_STR(heard, "");
    }
    /* exactly filling the mirror is fine; a set then a delete of a new key needs no room at the end */
    CHECK_EQ_INT(ap("{\"action\":\"batch\",\"rev\":18,\"changes\":[{\"action\":\"set\",\"rev\":14,\"key\":\"c\",\"value\":1},"
                    "{\"action\":\"set\",\"rev\":15,\"key\":\"d\",\"value\":1},{\"action\":\"set\",\"rev\":16,\"key\":\"e\",\"value\":1},"
                    "{\"action\":\"delete\",\"rev\":17,\"key\":\"x\"},{\"action\":\"delete\",\"rev\":18,\"key\":\"c\"}]}"),
                 DDP_OK);
    CHECK_STR(content(), "b=3;d=1;e=1;");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 18);
    /* an empty batch changes nothing */
    CHECK_EQ_INT(ap("{\"action\":\"batch\",\"rev\":18,\"changes\":[]}"), DDP_STALE);
}

static void full_mirror(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":4,\"items\":[{\"key\":\"a\",\"value\":1},{\"key\":\"b\",\"value\":1},"
                    "{\"key\":\"c\",\"value\":1},{\"key\":\"d\",\"value\":1}]}"),
                 DDP_OK);
    take();
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":5,\"key\":\"e\",\"value\":1}"), DDP_ERR_MIRROR_FULL);
    CHECK(unchanged());
    /* a delete of a key the mirror does not hold needs no room when in order */
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":5,\"key\":\"zz\"}"), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_rev(&m), 5);
    /* out of order it needs a tombstone: no room, refused */
    take();
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":7,\"key\":\"zz\"}"), DDP_ERR_MIRROR_FULL);
    CHECK(unchanged());
    /* replacing keys is fine */
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":6,\"key\":\"a\",\"value\":2}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":7,\"key\":\"b\"}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":8,\"key\":\"e\",\"value\":3}"), DDP_OK);
    CHECK_STR(content(), "a=2;c=1;d=1;e=3;");
}

static void reload_too_big_leaves_mirror_unchanged(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":2,\"items\":[{\"key\":\"a\",\"value\":1}]}"), DDP_OK);
    const char *bad[] = {
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a\",\"value\":1},{\"key\":\"b\",\"value\":1},"
        "{\"key\":\"c\",\"value\":1},{\"key\":\"d\",\"value\":1},{\"key\":\"e\",\"value\":1}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a\",\"value\":\"0123456789012345678901234567890123456789\"}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a23456789012345678\",\"value\":1}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a\",\"value\":null}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a\"}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"value\":1}]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[[\"a\",1]]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":{}}",
        "{\"action\":\"reload\",\"items\":[]}",
        "{\"action\":\"reload\",\"rev\":\"9\",\"items\":[]}",
        "{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"\",\"value\":1}]}",
    };
    ddp_result want[] = {DDP_ERR_MIRROR_FULL, DDP_ERR_VALUE_TOO_LARGE, DDP_ERR_KEY_TOO_LONG, DDP_ERR_BAD_MESSAGE,
                         DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE,
                         DDP_ERR_BAD_MESSAGE, DDP_ERR_BAD_MESSAGE, DDP_ERR_INVALID_KEY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        take();
        heard[0] = '\0';
        reloads = 0;
        ddp_result r = ap(bad[i]);
        if (r != want[i]) fprintf(stderr, "case %zu: %s\n", i, ddp_result_name(r));
        CHECK_EQ_INT(r, want[i]);
        CHECK(unchanged());
        CHECK_STR(heard, "");
        CHECK_EQ_INT(reloads, 0);
    }
    /* "items":null is an empty store (Go servers); an escaped key is the same key */
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":3,\"items\":[{\"key\":\"\\u0061\",\"value\":1}]}"), DDP_OK);
    CHECK_STR(content(), "a=1;");
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":4,\"numItems\":0,\"items\":null}"), DDP_OK);
    CHECK_STR(content(), "");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 4);
    /* duplicates in a reload count once; the last value wins */
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":9,\"items\":[{\"key\":\"a\",\"value\":1},{\"key\":\"b\",\"value\":1},"
                    "{\"key\":\"c\",\"value\":1},{\"key\":\"d\",\"value\":1},{\"key\":\"a\",\"value\":5}]}"),
                 DDP_OK);
    CHECK_STR(content(), "a=5;b=1;c=1;d=1;");
}

static void bad_input_never_changes_anything(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":2,\"items\":[{\"key\":\"a\",\"value\":1}]}"), DDP_OK);
    struct {
        const char *msg;
        ddp_result want;
    } cases[] = {
        {"", DDP_ERR_JSON},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":", DDP_ERR_JSON},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":2", DDP_ERR_JSON},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":2}}", DDP_ERR_JSON},
        {"garbage", DDP_ERR_JSON},
        {"[\"set\",\"a\",1]", DDP_ERR_BAD_MESSAGE},
        {"\"set\"", DDP_ERR_BAD_MESSAGE},
        {"{}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":5}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":-3,\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3.0,\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3e0,\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":\"3\",\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":18446744073709551616,\"key\":\"a\",\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"key\":7,\"value\":2}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\\u0000b\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"abcdefghijklmnopq\",\"value\":2}", DDP_ERR_KEY_TOO_LONG},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":null}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\"}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\",\"value\":\"012345678901234567890123456789012\"}",
         DDP_ERR_VALUE_TOO_LARGE},
        {"{\"action\":\"delete\",\"rev\":3}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a b\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a/b\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"\u00e9\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"\xc3\xa9\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"set\",\"rev\":3,\"key\":\"a\\nb\",\"value\":2}", DDP_ERR_INVALID_KEY},
        {"{\"action\":\"batch\",\"rev\":\"3\",\"changes\":[{\"action\":\"set\",\"rev\":3,\"key\":\"b\",\"value\":2}]}",
         DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"batch\",\"changes\":[{\"action\":\"set\",\"rev\":3,\"key\":\"b\",\"value\":2}]}",
         DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"reload\",\"rev\":3,\"items\":5}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"reload\",\"rev\":3,\"items\":\"x\"}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"error\",\"reason\":\"INVALID_KEY\",\"message\":\"x\",\"key\":\"k\"}", DDP_IGNORED},
        {"{\"action\":\"command\",\"command\":{\"action\":\"reboot\",\"parameters\":{}}}", DDP_IGNORED},
        {"{\"action\":\"frobnicate\",\"rev\":99}", DDP_IGNORED},
        {"{\"action\":\"resume\",\"rev\":2}", DDP_IGNORED},
        {"{\"action\":\"resume\"}", DDP_ERR_BAD_MESSAGE},
        {"{\"action\":\"set\",\"rev\":2,\"key\":\"a\",\"value\":9}", DDP_STALE},
        {"{\"action\":\"set\",\"rev\":1,\"key\":\"a\",\"value\":9}", DDP_STALE},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        take();
        heard[0] = '\0';
        ddp_result r = ap(cases[i].msg);
        if (r != cases[i].want) fprintf(stderr, "case %zu (%s): %s\n", i, cases[i].msg, ddp_result_name(r));
        CHECK_EQ_INT(r, cases[i].want);
        CHECK(unchanged());
        CHECK_STR(heard, "");
    }
    /* truncated at every byte */
    const char *full = "{\"action\":\"batch\",\"rev\":4,\"changes\":[{\"action\":\"set\",\"rev\":3,\"key\":\"b\",\"value\":[1,{\"x\":\"y\"}]},"
                       "{\"action\":\"delete\",\"rev\":4,\"key\":\"a\"}]}";
    for (size_t cut = 0; cut < strlen(full); cut++) {
        take();
        CHECK(ddp_is_error(ddp_mirror_apply(&m, full, cut, toks, NTOK, &cbs)));
        CHECK(unchanged());
    }
    /* too few tokens, too large */
    take();
    CHECK_EQ_INT(ddp_mirror_apply(&m, full, strlen(full), toks, 8, &cbs), DDP_ERR_MESSAGE_TOO_LARGE);
    const char *many = "{\"action\":\"set\",\"rev\":3,\"key\":\"b\",\"value\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]}";
    CHECK_EQ_INT(ddp_mirror_apply(&m, many, strlen(many), toks, 20, &cbs), DDP_ERR_TOO_MANY_TOKENS);
    char big[2048];
    memset(big, ' ', sizeof big);
    memcpy(big, "{\"action\":\"resume\",\"rev\":1}", 27);
    CHECK_EQ_INT(ddp_mirror_apply(&m, big, sizeof big, toks, NTOK, &cbs), DDP_ERR_MESSAGE_TOO_LARGE);
    CHECK(unchanged());
    CHECK_EQ_INT(ddp_mirror_apply(NULL, full, 3, toks, NTOK, &cbs), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_mirror_apply(&m, NULL, 3, toks, NTOK, &cbs), DDP_ERR_ARG);
    /* and then the good message applies */
    CHECK_EQ_INT(ddp_mirror_apply(&m, full, strlen(full), toks, NTOK, &cbs), DDP_OK);
    CHECK_STR(content(), "b=[1,{\"x\":\"y\"}];");
}

static void max_message_size_fits_a_full_reload(void) {
    fresh();
    size_t max = ddp_mirror_max_message_size(&m, NTOK);
    char msg[4096];
    size_t n = (size_t)snprintf(msg, sizeof msg, "{\"action\":\"reload\",\"rev\":18446744073709551615,\"numItems\":4,\"items\":[");
    for (int i = 0; i < CAP; i++)
        n += (size_t)snprintf(msg + n, sizeof msg - n,
                              "%s{\"key\":\"k%015d\",\"value\":\"%030d\",\"modificationTime\":\"2026-11-26T12:07:15.123Z\"}",
                              i ? "," : "", i, i);
    n += (size_t)snprintf(msg + n, sizeof msg - n, "]}");
    CHECK(n <= max);
    CHECK_EQ_INT(ddp_mirror_apply(&m, msg, n, toks, NTOK, &cbs), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_count(&m), CAP);
    /* fewer tokens: a smaller announcement */
    CHECK(ddp_mirror_max_message_size(&m, 16 + 7 * 2) < max);
    CHECK(DDP_TOKENS_FOR(32, 256) == 16 + 7 * 32);
}

static void persistence_blob(void) {
    fresh();
    CHECK_EQ_INT(ap("{\"action\":\"reload\",\"rev\":5,\"items\":[{\"key\":\"a\",\"value\":{\"x\":1}},{\"key\":\"b\",\"value\":\"s\"}]}"),
                 DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"delete\",\"rev\":8,\"key\":\"b\"}"), DDP_OK); /* a tombstone ahead */
    uint8_t blob[512];
    size_t len = 0;
    CHECK_EQ_INT(ddp_mirror_save(&m, blob, 10, &len), DDP_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_INT(ddp_mirror_save(&m, blob, sizeof blob, &len), DDP_OK);
    CHECK_EQ_INT(len, ddp_mirror_blob_size(&m));
    take();
    fresh();
    CHECK_EQ_INT(ddp_mirror_load(&m, blob, len), DDP_OK);
    CHECK(unchanged());
    /* every corruption and every truncation is refused, the mirror unchanged */
    for (size_t i = 0; i < len; i++) {
        blob[i] ^= 0x41;
        CHECK_EQ_INT(ddp_mirror_load(&m, blob, len), DDP_ERR_BAD_BLOB);
        blob[i] ^= 0x41;
        CHECK_EQ_INT(ddp_mirror_load(&m, blob, i), DDP_ERR_BAD_BLOB);
    }
    CHECK(unchanged());
    /* the tombstone still works after the load */
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":7,\"key\":\"b\",\"value\":1}"), DDP_OK);
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":6,\"key\":\"b\",\"value\":1}"), DDP_OK);
    CHECK_STR(content(), "a={\"x\":1};");
    CHECK_EQ_INT(ddp_mirror_rev(&m), 8);
}

static void persistence_by_entry(void) {
    fresh();
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "a", 1, " [ 1 , 2 ] ", 11, 4), DDP_OK);
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "b", 1, "null", 4, 4), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "b", 1, "[1", 2, 4), DDP_ERR_JSON);
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "", 0, "1", 1, 4), DDP_ERR_INVALID_KEY);
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "a b", 3, "1", 1, 4), DDP_ERR_INVALID_KEY);
    CHECK_EQ_INT(ddp_mirror_restore_entry(&m, "abcdefghijklmnopq", 17, "1", 1, 4), DDP_ERR_KEY_TOO_LONG);
    ddp_mirror_restore_rev(&m, 6);
    CHECK(ddp_mirror_synced(&m));
    CHECK_EQ_INT(ddp_mirror_rev(&m), 6);
    CHECK_STR(content(), "a=[1,2];");
    CHECK_EQ_INT(ap("{\"action\":\"set\",\"rev\":7,\"key\":\"a\",\"value\":3}"), DDP_OK);
    CHECK_STR(content(), "a=3;");
}

static void init_checks(void) {
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(st, CAP, KMAX, VMAX);
    s.capacity = 0;
    CHECK_EQ_INT(ddp_mirror_init(&m, &s), DDP_ERR_ARG);
    s.capacity = CAP;
    s.keys = NULL;
    CHECK_EQ_INT(ddp_mirror_init(&m, &s), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_mirror_init(NULL, &s), DDP_ERR_ARG);
    CHECK(!ddp_is_error(DDP_STALE) && !ddp_is_error(DDP_IGNORED) && ddp_is_error(DDP_ERR_JSON));
    CHECK_STR(ddp_result_name(DDP_ERR_MIRROR_FULL), "DDP_ERR_MIRROR_FULL");
    CHECK_EQ_INT(sizeof(ddp_entry), 16);
}

/* The Rust SDK's property: shuffled, duplicated and delayed delivery of one history (changes and
 * reloads taken along it) ends in the state of in-order delivery. Histories of up to
 * DDP_AHEAD_MAX changes, so no rev is ever forgotten ahead of a gap. */
static uint32_t lcg_state = 12345u;
static uint32_t rnd(uint32_t n) {
    lcg_state = lcg_state * 1103515245u + 12345u;
    return (lcg_state >> 8) % n;
}

static void any_order_converges(void) {
    static char msgs[64][512];
    for (int round = 0; round < 3000; round++) {
        int vals[CAP];
        for (int k = 0; k < CAP; k++) vals[k] = -1;
        int nchanges = 1 + (int)rnd(DDP_AHEAD_MAX);
        int n = 0;
        for (int i = 0; i < nchanges; i++) {
            int k = (int)rnd(CAP);
            int rev = i + 1;
            if (rnd(3) == 0) {
                vals[k] = -1;
                snprintf(msgs[n++], sizeof msgs[0], "{\"action\":\"delete\",\"rev\":%d,\"key\":\"k%d\"}", rev, k);
            } else {
                vals[k] = (int)rnd(100);
                snprintf(msgs[n++], sizeof msgs[0], "{\"action\":\"set\",\"rev\":%d,\"key\":\"k%d\",\"value\":%d}", rev, k,
                         vals[k]);
            }
            if (rnd(4) == 0) { /* a reload at this rev */
                size_t l = (size_t)snprintf(msgs[n], sizeof msgs[0], "{\"action\":\"reload\",\"rev\":%d,\"items\":[", rev);
                int first = 1;
                for (int j = 0; j < CAP; j++)
                    if (vals[j] >= 0) {
                        l += (size_t)snprintf(msgs[n] + l, sizeof msgs[0] - l, "%s{\"key\":\"k%d\",\"value\":%d}", first ? "" : ",",
                                              j, vals[j]);
                        first = 0;
                    }
                snprintf(msgs[n] + l, sizeof msgs[0] - l, "]}");
                n++;
            }
        }
        char expected[256] = "";
        for (int j = 0; j < CAP; j++)
            if (vals[j] >= 0) {
                size_t l = strlen(expected);
                snprintf(expected + l, sizeof expected - l, "k%d=%d;", j, vals[j]);
            }
        /* shuffled, with duplicates */
        int order[80];
        int total = 0;
        for (int i = 0; i < n; i++) order[total++] = i;
        int dupes = (int)rnd(6);
        for (int i = 0; i < dupes; i++) order[total++] = (int)rnd((uint32_t)n);
        for (int i = total - 1; i > 0; i--) {
            int j = (int)rnd((uint32_t)i + 1);
            int t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        fresh();
        for (int i = 0; i < total; i++) CHECK(!ddp_is_error(ap(msgs[order[i]])));
        if (strcmp(content(), expected) != 0 || ddp_mirror_rev(&m) != (uint64_t)nchanges) {
            fprintf(stderr, "round %d: got %s rev %llu, expected %s rev %d\n", round, content(),
                    (unsigned long long)ddp_mirror_rev(&m), expected, nchanges);
            for (int i = 0; i < total; i++) fprintf(stderr, "  %s\n", msgs[order[i]]);
            CHECK(0);
            return;
        }
        h_checks++;
    }
}

int main(void) {
    RUN(reload_then_live_changes);
    RUN(late_set_after_delete_is_ignored);
    RUN(tombstone_out_of_order);
    RUN(older_reload_does_not_undo_newer);
    RUN(newer_reload_replaces_and_reports);
    RUN(rev_advances_over_complete_sequences);
    RUN(values_are_stored_minified_and_exact);
    RUN(batches_are_all_or_nothing);
    RUN(full_mirror);
    RUN(reload_too_big_leaves_mirror_unchanged);
    RUN(bad_input_never_changes_anything);
    RUN(max_message_size_fits_a_full_reload);
    RUN(persistence_blob);
    RUN(persistence_by_entry);
    RUN(init_checks);
    RUN(any_order_converges);
    DONE();
}
