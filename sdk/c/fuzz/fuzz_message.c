/* libFuzzer target: arbitrary bytes as a sequence of messages (split at '\n'; a message's first
 * byte picks the topic: even kv, odd command) fed to ddp_on_message(). After each message:
 * - the result is a known ddp_result;
 * - an error leaves the mirror byte for byte as it was;
 * - the mirror's invariants hold (keys valid and unique, values minified JSON within bounds,
 *   tombstones only above the floor);
 * - the persisted blob loads back into an identical mirror;
 * - whatever the client published is valid JSON. ASan/UBSan watch every buffer. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ddp/ddp.h"
#include "../src/internal.h"

#define CAP 8
#define KMAX 32
#define VMAX 64

DDP_MIRROR_STORAGE(st, CAP, KMAX, VMAX);
DDP_MIRROR_STORAGE(st2, CAP, KMAX, VMAX);
static ddp_token toks[DDP_TOKENS_FOR(CAP, VMAX)];
static char tx[512];
static uint8_t blob[CAP * (KMAX + VMAX + 32) + 256];
static ddp_client client;
static ddp_mirror copy;

#define REQUIRE(c)                                                                                 \
    do {                                                                                           \
        if (!(c)) abort();                                                                         \
    } while (0)

static int publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos) {
    (void)ctx;
    (void)qos;
    ddp_token t;
    size_t n;
    REQUIRE(topic != NULL && strncmp(topic, "/devices/7/", 11) == 0);
    REQUIRE(ddp_json_tokenize((const char *)payload, len, &t, 1, 0, &n) == DDP_OK);
    return 0;
}

static ddp_result persist(void *ctx, const ddp_mirror *m) {
    (void)ctx;
    size_t len = 0;
    REQUIRE(ddp_mirror_save(m, blob, sizeof blob, &len) == DDP_OK);
    REQUIRE(len == ddp_mirror_blob_size(m));
    REQUIRE(ddp_mirror_load(&copy, blob, len) == DDP_OK);
    REQUIRE(copy.rev == m->rev && ddp_mirror_count(&copy) == ddp_mirror_count(m));
    size_t it = 0;
    ddp_item a;
    while (ddp_mirror_next(m, &it, &a)) {
        size_t vl;
        uint64_t rev;
        const char *v = ddp_mirror_get(&copy, a.key, &vl, &rev);
        REQUIRE(v != NULL && vl == a.value_len && memcmp(v, a.value, vl) == 0 && rev == a.rev);
    }
    return DDP_OK;
}

static void on_change(void *ctx, const ddp_change *c) {
    (void)ctx;
    REQUIRE(c->key != NULL && strlen(c->key) == c->key_len);
    REQUIRE(c->deleted ? c->value == NULL : (c->value != NULL && strlen(c->value) == c->value_len));
}

static void on_command(void *ctx, const char *action, size_t alen, const char *params, size_t plen) {
    (void)ctx;
    ddp_token t;
    size_t n;
    REQUIRE(strlen(action) == alen && alen > 0 && alen <= DDP_ACTION_MAX);
    REQUIRE(ddp_json_tokenize(params, plen, &t, 1, 0, &n) == DDP_OK && params[0] == '{');
}

static void check_invariants(const ddp_mirror *m) {
    size_t live = 0;
    for (size_t i = 0; i < m->capacity; i++) {
        const ddp_entry *e = &m->entries[i];
        const char *k = m->keys + i * (m->key_max + 1);
        const char *v = m->values + i * (m->value_max + 1);
        if (e->key_len == 0) continue;
        REQUIRE(e->key_len <= m->key_max && k[e->key_len] == '\0');
        for (size_t j = 0; j < e->key_len; j++) REQUIRE(ddp__key_char(k[j]));
        for (size_t j = i + 1; j < m->capacity; j++)
            REQUIRE(!(m->entries[j].key_len == e->key_len && memcmp(m->keys + j * (m->key_max + 1), k, e->key_len) == 0));
        if (e->flags & 1u) {
            ddp_token t;
            size_t n;
            live++;
            REQUIRE(e->value_len >= 1 && e->value_len <= m->value_max && v[e->value_len] == '\0');
            REQUIRE(ddp_json_tokenize(v, e->value_len, &t, 1, 0, &n) == DDP_OK && v[0] != 'n');
            REQUIRE(ddp__minify_len(v, e->value_len) == e->value_len);
        } else {
            REQUIRE(e->value_len == 0 && e->rev > m->rev);
        }
    }
    REQUIRE(live == ddp_mirror_count(m));
    REQUIRE(m->ahead_count <= DDP_AHEAD_MAX);
    for (uint8_t a = 0; a < m->ahead_count; a++) REQUIRE(m->ahead[a] > m->rev + 1 || m->rev == UINT64_MAX);
}

static ddp_mirror snap_m;
static ddp_entry snap_e[CAP];
static char snap_k[sizeof st_keys];
static char snap_v[sizeof st_values];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    c.device_id = 7;
    c.transport.publish = publish;
    c.callbacks.on_change = on_change;
    c.callbacks.on_command = on_command;
    c.callbacks.persist = persist;
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(st, CAP, KMAX, VMAX);
    ddp_mirror_storage s2 = DDP_MIRROR_STORAGE_INIT(st2, CAP, KMAX, VMAX);
    c.storage = s;
    c.tokens = toks;
    c.max_tokens = sizeof toks / sizeof toks[0];
    c.tx_buf = tx;
    c.tx_size = sizeof tx;
    c.auto_ack = true;
    REQUIRE(ddp_init(&client, &c) == DDP_OK);
    REQUIRE(ddp_mirror_init(&copy, &s2) == DDP_OK);
    ddp_mirror *m = ddp_client_mirror(&client);
    size_t pos = 0;
    while (pos < size) {
        size_t end = pos;
        while (end < size && data[end] != '\n') end++;
        if (end > pos) {
            bool kv = (data[pos] & 1u) == 0;
            const char *payload = (const char *)data + pos + 1;
            size_t len = end - pos - 1;
            snap_m = *m;
            memcpy(snap_e, st_entries, sizeof snap_e);
            memcpy(snap_k, st_keys, sizeof snap_k);
            memcpy(snap_v, st_values, sizeof snap_v);
            ddp_result r = ddp_on_message(&client, kv ? "/devices/7/kv" : "/devices/7/command", payload, len);
            REQUIRE((int)r >= DDP_OK && (int)r <= DDP_ERR_BAD_BLOB);
            if (ddp_is_error(r) || !kv) {
                REQUIRE(memcmp(&snap_m, m, sizeof *m) == 0);
                REQUIRE(memcmp(snap_e, st_entries, sizeof snap_e) == 0);
                REQUIRE(memcmp(snap_k, st_keys, sizeof snap_k) == 0);
                REQUIRE(memcmp(snap_v, st_values, sizeof snap_v) == 0);
            }
            check_invariants(m);
        }
        pos = end + 1;
    }
    /* the raw input as a persisted blob: refused with the mirror unchanged, or a valid mirror */
    memcpy(&snap_m, &copy, sizeof copy);
    memcpy(snap_e, st2_entries, sizeof snap_e);
    memcpy(snap_k, st2_keys, sizeof snap_k);
    memcpy(snap_v, st2_values, sizeof snap_v);
    if (ddp_mirror_load(&copy, data, size) == DDP_OK) {
        check_invariants(&copy);
    } else {
        REQUIRE(memcmp(&snap_m, &copy, sizeof copy) == 0 && memcmp(snap_e, st2_entries, sizeof snap_e) == 0 &&
                memcmp(snap_k, st2_keys, sizeof snap_k) == 0 && memcmp(snap_v, st2_values, sizeof snap_v) == 0);
    }
    /* the tokenizer on the raw input, with every depth */
    for (unsigned d = 0; d <= 7; d++) {
        size_t n;
        (void)ddp_json_tokenize((const char *)data, size, toks, sizeof toks / sizeof toks[0], d, &n);
    }
    return 0;
}
