/* The mirror: a fixed table of entries applying sync messages with the Rust SDK's rules
 * (crates/ddp-device/src/mirror.rs), every message validated whole before anything changes. */
#include <string.h>

#include "internal.h"

#define NONE ((size_t)-1)
#define LIVE 1u

static char *key_at(const ddp_mirror *m, size_t i) { return m->keys + i * (m->key_max + 1u); }
static char *value_at(const ddp_mirror *m, size_t i) { return m->values + i * (m->value_max + 1u); }
static bool used(const ddp_mirror *m, size_t i) { return m->entries[i].key_len != 0; }
static bool live(const ddp_mirror *m, size_t i) { return (m->entries[i].flags & LIVE) != 0; }

static void free_slot(ddp_mirror *m, size_t i) {
    memset(&m->entries[i], 0, sizeof m->entries[i]);
    key_at(m, i)[0] = '\0';
    value_at(m, i)[0] = '\0';
}

ddp_result ddp_mirror_init(ddp_mirror *m, const ddp_mirror_storage *s) {
    if (m == NULL || s == NULL || s->entries == NULL || s->keys == NULL || s->values == NULL) return DDP_ERR_ARG;
    if (s->capacity == 0 || s->capacity > 65535u || s->key_max == 0 || s->key_max > 65535u || s->value_max == 0 ||
        s->value_max >= (size_t)UINT32_MAX)
        return DDP_ERR_ARG;
    memset(m, 0, sizeof *m);
    m->entries = s->entries;
    m->keys = s->keys;
    m->values = s->values;
    m->capacity = s->capacity;
    m->key_max = s->key_max;
    m->value_max = s->value_max;
    ddp_mirror_clear(m);
    return DDP_OK;
}

void ddp_mirror_clear(ddp_mirror *m) {
    if (m == NULL) return;
    for (size_t i = 0; i < m->capacity; i++) free_slot(m, i);
    m->rev = 0;
    m->ahead_count = 0;
    memset(m->ahead, 0, sizeof m->ahead);
    m->synced = false;
}

uint64_t ddp_mirror_rev(const ddp_mirror *m) { return m ? m->rev : 0; }
bool ddp_mirror_synced(const ddp_mirror *m) { return m ? m->synced : false; }

size_t ddp_mirror_count(const ddp_mirror *m) {
    size_t n = 0;
    if (m == NULL) return 0;
    for (size_t i = 0; i < m->capacity; i++)
        if (used(m, i) && live(m, i)) n++;
    return n;
}

static size_t find_bytes(const ddp_mirror *m, const char *key, size_t len) {
    for (size_t i = 0; i < m->capacity; i++)
        if (m->entries[i].key_len == len && memcmp(key_at(m, i), key, len) == 0) return i;
    return NONE;
}

/* The entry of a key given as a string token's raw content. */
static size_t find_raw(const ddp_mirror *m, const char *raw, size_t raw_len) {
    for (size_t i = 0; i < m->capacity; i++)
        if (used(m, i) && ddp__str_eq_bytes(raw, raw_len, key_at(m, i), m->entries[i].key_len)) return i;
    return NONE;
}

static size_t alloc_slot(const ddp_mirror *m) {
    for (size_t i = 0; i < m->capacity; i++)
        if (!used(m, i)) return i;
    return NONE;
}

static size_t free_slots(const ddp_mirror *m) {
    size_t n = 0;
    for (size_t i = 0; i < m->capacity; i++)
        if (!used(m, i)) n++;
    return n;
}

const char *ddp_mirror_get(const ddp_mirror *m, const char *key, size_t *value_len, uint64_t *rev) {
    if (m == NULL || key == NULL) return NULL;
    size_t len = strlen(key);
    size_t i = len ? find_bytes(m, key, len) : NONE;
    if (i == NONE || !live(m, i)) return NULL;
    if (value_len) *value_len = m->entries[i].value_len;
    if (rev) *rev = m->entries[i].rev;
    return value_at(m, i);
}

bool ddp_mirror_next(const ddp_mirror *m, size_t *iter, ddp_item *out) {
    if (m == NULL || iter == NULL || out == NULL) return false;
    while (*iter < m->capacity) {
        size_t i = (*iter)++;
        if (used(m, i) && live(m, i)) {
            out->key = key_at(m, i);
            out->key_len = m->entries[i].key_len;
            out->value = value_at(m, i);
            out->value_len = m->entries[i].value_len;
            out->rev = m->entries[i].rev;
            return true;
        }
    }
    return false;
}

/* ---- the floor: the rev up to which every change has been seen ---- */

typedef struct floor_state {
    uint64_t rev;
    uint64_t ahead[DDP_AHEAD_MAX];
    uint8_t count;
} floor_state;

static void floor_get(const ddp_mirror *m, floor_state *f) {
    f->rev = m->rev;
    memcpy(f->ahead, m->ahead, sizeof f->ahead);
    f->count = m->ahead_count;
}

static void floor_put(ddp_mirror *m, const floor_state *f) {
    m->rev = f->rev;
    memcpy(m->ahead, f->ahead, sizeof m->ahead);
    m->ahead_count = f->count;
}

static void floor_drain(floor_state *f) {
    bool moved = true;
    while (moved && f->rev != UINT64_MAX) {
        moved = false;
        for (uint8_t i = 0; i < f->count; i++) {
            if (f->ahead[i] == f->rev + 1u) {
                f->rev++;
                f->ahead[i] = f->ahead[--f->count];
                moved = true;
                break;
            }
        }
    }
}

static void floor_advance(floor_state *f, uint64_t rev) {
    if (f->rev != UINT64_MAX && rev == f->rev + 1u) {
        f->rev = rev;
        floor_drain(f);
        return;
    }
    if (rev <= f->rev) return;
    uint8_t max_i = 0;
    for (uint8_t i = 0; i < f->count; i++) {
        if (f->ahead[i] == rev) return;
        if (f->ahead[i] > f->ahead[max_i]) max_i = i;
    }
    if (f->count < DDP_AHEAD_MAX) {
        f->ahead[f->count++] = rev;
    } else if (rev < f->ahead[max_i]) {
        f->ahead[max_i] = rev; /* full: keep the nearest revs; the farthest waits for a reload */
    }
}

static void floor_reload(floor_state *f, uint64_t rev) {
    if (rev <= f->rev) return;
    f->rev = rev;
    uint8_t i = 0;
    while (i < f->count) {
        if (f->ahead[i] <= rev) {
            f->ahead[i] = f->ahead[--f->count];
        } else {
            i++;
        }
    }
    floor_drain(f);
}

/* Tombstones at or below the floor are no longer needed: every change up to it has been seen. */
static void gc(ddp_mirror *m) {
    for (size_t i = 0; i < m->capacity; i++)
        if (used(m, i) && !live(m, i) && m->entries[i].rev <= m->rev) free_slot(m, i);
}

/* ---- writing entries ---- */

static void write_key(ddp_mirror *m, size_t i, const char *raw, size_t raw_len) {
    size_t n = ddp__str_decoded_len(raw, raw_len, NULL);
    ddp__str_decode(raw, raw_len, key_at(m, i));
    key_at(m, i)[n] = '\0';
    m->entries[i].key_len = (uint16_t)n;
}

static void write_value(ddp_mirror *m, size_t i, const char *js, const ddp_token *v) {
    size_t n = ddp__minify_len(js + v->start, v->end - v->start);
    ddp__minify_copy(js + v->start, v->end - v->start, value_at(m, i));
    value_at(m, i)[n] = '\0';
    m->entries[i].value_len = (uint32_t)n;
    m->entries[i].flags |= LIVE;
}

static void make_tombstone(ddp_mirror *m, size_t i) {
    m->entries[i].flags = (uint8_t)(m->entries[i].flags & ~LIVE);
    m->entries[i].value_len = 0;
    value_at(m, i)[0] = '\0';
}

static void tell(const ddp_callbacks *cb, const ddp_mirror *m, size_t i, bool from_reload) {
    if (cb == NULL || cb->on_change == NULL) return;
    ddp_change c;
    c.key = key_at(m, i);
    c.key_len = m->entries[i].key_len;
    c.deleted = !live(m, i);
    c.value = c.deleted ? NULL : value_at(m, i);
    c.value_len = c.deleted ? 0 : m->entries[i].value_len;
    c.rev = m->entries[i].rev;
    c.from_reload = from_reload;
    cb->on_change(cb->ctx, &c);
}

/* ---- parsing ---- */

typedef struct msg {
    const char *js;
    const ddp_token *t;
    size_t n;
} msg;

static const char *raw_of(const msg *g, size_t i, size_t *len) {
    *len = g->t[i].end - g->t[i].start - 2u;
    return g->js + g->t[i].start + 1;
}

static bool is_string(const msg *g, size_t i) { return i < g->n && ddp__tok_type(g->js, &g->t[i]) == '"'; }

static bool string_is(const msg *g, size_t i, const char *s) {
    size_t len;
    const char *raw = raw_of(g, i, &len);
    return ddp__str_eq_bytes(raw, len, s, strlen(s));
}

static ddp_result check_key(const ddp_mirror *m, const msg *g, size_t i) {
    if (!is_string(g, i)) return DDP_ERR_BAD_MESSAGE;
    size_t len;
    const char *raw = raw_of(g, i, &len);
    /* The key rule (§3): 1-255 bytes of A-Z a-z 0-9 _ - : . (an escape may spell them). */
    size_t n = 0;
    for (size_t p = 0; p < len; n++) {
        char ch = raw[p];
        if (ch == '\\') {
            if (raw[p + 1] != 'u' || raw[p + 2] != '0' || raw[p + 3] != '0') return DDP_ERR_INVALID_KEY;
            unsigned hi = (unsigned)(raw[p + 4] >= 'a' ? raw[p + 4] - 'a' + 10 : raw[p + 4] >= 'A' ? raw[p + 4] - 'A' + 10 : raw[p + 4] - '0');
            unsigned lo = (unsigned)(raw[p + 5] >= 'a' ? raw[p + 5] - 'a' + 10 : raw[p + 5] >= 'A' ? raw[p + 5] - 'A' + 10 : raw[p + 5] - '0');
            ch = (char)(hi * 16u + lo);
            p += 6;
        } else {
            p++;
        }
        if (!ddp__key_char(ch)) return DDP_ERR_INVALID_KEY;
    }
    if (n == 0 || n > 255u) return DDP_ERR_INVALID_KEY;
    if (n > m->key_max) return DDP_ERR_KEY_TOO_LONG;
    return DDP_OK;
}

static ddp_result check_value(const ddp_mirror *m, const msg *g, size_t i) {
    if (i >= g->n || ddp__tok_type(g->js, &g->t[i]) == 'n') return DDP_ERR_BAD_MESSAGE;
    if (ddp__minify_len(g->js + g->t[i].start, g->t[i].end - g->t[i].start) > m->value_max)
        return DDP_ERR_VALUE_TOO_LARGE;
    return DDP_OK;
}

static bool get_rev(const msg *g, size_t obj, uint64_t *rev) {
    size_t i = ddp__obj_get(g->js, g->t, g->n, obj, "rev");
    if (i >= g->n) return false;
    char ty = ddp__tok_type(g->js, &g->t[i]);
    if (ty < '0' || ty > '9') return false;
    return ddp__tok_u64(g->js, &g->t[i], rev);
}

typedef struct change {
    size_t key;   /* token of the key */
    size_t value; /* token of the value (set) */
    uint64_t rev;
    bool del;
} change;

static ddp_result parse_change(const ddp_mirror *m, const msg *g, size_t obj, change *c) {
    if (obj >= g->n || ddp__tok_type(g->js, &g->t[obj]) != '{') return DDP_ERR_BAD_MESSAGE;
    size_t a = ddp__obj_get(g->js, g->t, g->n, obj, "action");
    if (!is_string(g, a)) return DDP_ERR_BAD_MESSAGE;
    if (string_is(g, a, "set")) {
        c->del = false;
    } else if (string_is(g, a, "delete")) {
        c->del = true;
    } else {
        return DDP_ERR_BAD_MESSAGE;
    }
    if (!get_rev(g, obj, &c->rev)) return DDP_ERR_BAD_MESSAGE;
    c->key = ddp__obj_get(g->js, g->t, g->n, obj, "key");
    ddp_result r = check_key(m, g, c->key);
    if (r != DDP_OK) return r;
    c->value = g->n;
    if (!c->del) {
        c->value = ddp__obj_get(g->js, g->t, g->n, obj, "value");
        r = check_value(m, g, c->value);
        if (r != DDP_OK) return r;
    }
    return DDP_OK;
}

static bool same_key(const msg *g, size_t a, size_t b) {
    size_t la;
    size_t lb;
    const char *ra = raw_of(g, a, &la);
    const char *rb = raw_of(g, b, &lb);
    return ddp__str_eq_raw(ra, la, rb, lb);
}

/* The changes of a message: the top-level object alone, or the elements of a batch's array. */
typedef struct list {
    size_t arr; /* NONE: the single object at token 0 */
} list;

static size_t list_first(const msg *g, const list *l) { return l->arr == NONE ? 0 : (l->arr + 1 < g->n ? l->arr + 1 : g->n); }
static bool list_has(const msg *g, const list *l, size_t j) {
    if (l->arr == NONE) return j == 0;
    return j < g->n && g->t[j].start < g->t[l->arr].end;
}
static size_t list_next(const msg *g, const list *l, size_t j) {
    return l->arr == NONE ? g->n : ddp__tok_skip(g->t, g->n, j);
}

/* Whether change c (at token obj) applies, given the table now and the changes before it. The
 * table holds, for its key, the newest rev of the changes before it that were written, so this
 * gives the same answer before and while the batch is applied. */
static bool applies(const ddp_mirror *m, const msg *g, const list *l, size_t obj, const change *c, uint64_t floor) {
    uint64_t known = floor;
    size_t len;
    const char *raw = raw_of(g, c->key, &len);
    size_t e = find_raw(m, raw, len);
    if (e != NONE && m->entries[e].rev > known) known = m->entries[e].rev;
    for (size_t j = list_first(g, l); list_has(g, l, j) && j != obj; j = list_next(g, l, j)) {
        change d;
        if (parse_change(m, g, j, &d) == DDP_OK && d.rev > known && same_key(g, d.key, c->key)) known = d.rev;
    }
    return c->rev > known;
}

static bool takes_slot(const ddp_mirror *m, const msg *g, const list *l, size_t obj, const change *c,
                       uint64_t floor, uint64_t final_floor) {
    return applies(m, g, l, obj, c, floor) && (!c->del || c->rev > final_floor);
}

static ddp_result apply_changes(ddp_mirror *m, const msg *g, const list *l, const ddp_callbacks *cb) {
    /* Pass 1: validate every change, simulate the floor, count the new entries needed. */
    floor_state f;
    floor_get(m, &f);
    const uint64_t floor = m->rev;
    for (size_t j = list_first(g, l); list_has(g, l, j); j = list_next(g, l, j)) {
        change c;
        ddp_result r = parse_change(m, g, j, &c);
        if (r != DDP_OK) return r;
        floor_advance(&f, c.rev);
    }
    const uint64_t final_floor = f.rev;
    size_t needed = 0;
    for (size_t j = list_first(g, l); list_has(g, l, j); j = list_next(g, l, j)) {
        change c;
        (void)parse_change(m, g, j, &c);
        size_t len;
        const char *raw = raw_of(g, c.key, &len);
        if (find_raw(m, raw, len) != NONE || !takes_slot(m, g, l, j, &c, floor, final_floor)) continue;
        bool first = true;
        for (size_t k = list_first(g, l); list_has(g, l, k) && k != j; k = list_next(g, l, k)) {
            change d;
            (void)parse_change(m, g, k, &d);
            if (same_key(g, d.key, c.key) && takes_slot(m, g, l, k, &d, floor, final_floor)) {
                first = false;
                break;
            }
        }
        if (first) needed++;
    }
    if (needed > free_slots(m)) return DDP_ERR_MIRROR_FULL;

    /* Pass 2: apply (nothing can fail from here on). */
    bool applied = false;
    for (size_t j = list_first(g, l); list_has(g, l, j); j = list_next(g, l, j)) {
        change c;
        (void)parse_change(m, g, j, &c);
        if (!applies(m, g, l, j, &c, floor)) continue;
        applied = true;
        size_t len;
        const char *raw = raw_of(g, c.key, &len);
        size_t e = find_raw(m, raw, len);
        if (!c.del) {
            bool changed;
            if (e == NONE) {
                e = alloc_slot(m);
                if (e == NONE) continue; /* cannot happen: pass 1 counted the room */
                write_key(m, e, raw, len);
                changed = true;
            } else {
                const ddp_token *v = &g->t[c.value];
                changed = !live(m, e) ||
                          !ddp__minify_eq(g->js + v->start, v->end - v->start, value_at(m, e), m->entries[e].value_len);
            }
            write_value(m, e, g->js, &g->t[c.value]);
            m->entries[e].rev = c.rev;
            if (changed) tell(cb, m, e, false);
        } else if (e == NONE) {
            if (c.rev > final_floor) { /* a tombstone, so a late set is recognised */
                e = alloc_slot(m);
                if (e == NONE) continue; /* cannot happen: pass 1 counted the room */
                write_key(m, e, raw, len);
                make_tombstone(m, e);
                m->entries[e].rev = c.rev;
            }
        } else {
            bool was_live = live(m, e);
            make_tombstone(m, e);
            m->entries[e].rev = c.rev;
            if (was_live) tell(cb, m, e, false);
        }
    }
    bool moved = f.rev != m->rev || f.count != m->ahead_count;
    floor_put(m, &f);
    gc(m);
    return applied || moved ? DDP_OK : DDP_STALE;
}

static bool in_items(const msg *g, size_t items, const char *key, size_t key_len) {
    for (size_t j = items + 1; j < g->n && g->t[j].start < g->t[items].end; j = ddp__tok_skip(g->t, g->n, j)) {
        size_t k = ddp__obj_get(g->js, g->t, g->n, j, "key");
        size_t len;
        const char *raw = raw_of(g, k, &len);
        if (ddp__str_eq_bytes(raw, len, key, key_len)) return true;
    }
    return false;
}

static ddp_result apply_reload(ddp_mirror *m, const msg *g, const ddp_callbacks *cb) {
    uint64_t rev;
    if (!get_rev(g, 0, &rev)) return DDP_ERR_BAD_MESSAGE;
    size_t items = ddp__obj_get(g->js, g->t, g->n, 0, "items");
    if (items >= g->n) return DDP_ERR_BAD_MESSAGE;
    char ity = ddp__tok_type(g->js, &g->t[items]);
    if (ity != '[' && ity != 'n') return DDP_ERR_BAD_MESSAGE; /* "items":null: an empty store (Go servers) */
#define EACH_ITEM(j) for (size_t j = items + 1; j < g->n && g->t[j].start < g->t[items].end; j = ddp__tok_skip(g->t, g->n, j))
    EACH_ITEM(j) {
        if (ddp__tok_type(g->js, &g->t[j]) != '{') return DDP_ERR_BAD_MESSAGE;
        ddp_result r = check_key(m, g, ddp__obj_get(g->js, g->t, g->n, j, "key"));
        if (r != DDP_OK) return r;
        r = check_value(m, g, ddp__obj_get(g->js, g->t, g->n, j, "value"));
        if (r != DDP_OK) return r;
    }
    if (rev < m->rev) return DDP_STALE; /* older than what the mirror has seen: nothing new */

    /* The entries it will hold: the reload's keys and the keys known at a rev above it. */
    size_t distinct = 0;
    EACH_ITEM(j) {
        size_t kj = ddp__obj_get(g->js, g->t, g->n, j, "key");
        bool dup = false;
        for (size_t i = items + 1; i < j; i = ddp__tok_skip(g->t, g->n, i))
            if (same_key(g, ddp__obj_get(g->js, g->t, g->n, i, "key"), kj)) {
                dup = true;
                break;
            }
        if (!dup && ++distinct > m->capacity) return DDP_ERR_MIRROR_FULL;
    }
    for (size_t e = 0; e < m->capacity; e++)
        if (used(m, e) && m->entries[e].rev > rev && !in_items(g, items, key_at(m, e), m->entries[e].key_len))
            distinct++;
    if (distinct > m->capacity) return DDP_ERR_MIRROR_FULL;

    /* Keys it does not hold were deleted by its rev, unless the mirror knows newer. */
    for (size_t e = 0; e < m->capacity; e++) {
        if (!used(m, e) || m->entries[e].rev > rev || in_items(g, items, key_at(m, e), m->entries[e].key_len))
            continue;
        if (live(m, e)) {
            make_tombstone(m, e);
            m->entries[e].rev = rev;
            tell(cb, m, e, true);
        }
        free_slot(m, e);
    }
    EACH_ITEM(j) {
        size_t k = ddp__obj_get(g->js, g->t, g->n, j, "key");
        const ddp_token *v = &g->t[ddp__obj_get(g->js, g->t, g->n, j, "value")];
        size_t len;
        const char *raw = raw_of(g, k, &len);
        size_t e = find_raw(m, raw, len);
        bool changed;
        if (e != NONE && m->entries[e].rev > rev) continue;
        if (e == NONE) {
            e = alloc_slot(m);
            if (e == NONE) continue; /* cannot happen: the room was counted */
            write_key(m, e, raw, len);
            changed = true;
        } else {
            changed = !live(m, e) ||
                      !ddp__minify_eq(g->js + v->start, v->end - v->start, value_at(m, e), m->entries[e].value_len);
        }
        write_value(m, e, g->js, v);
        m->entries[e].rev = rev;
        if (changed) tell(cb, m, e, true);
    }
#undef EACH_ITEM
    floor_state f;
    floor_get(m, &f);
    floor_reload(&f, rev);
    floor_put(m, &f);
    gc(m);
    m->synced = true;
    if (cb && cb->on_reload) cb->on_reload(cb->ctx, rev);
    return DDP_OK;
}

static uint64_t sat_add(uint64_t a, uint64_t b) { return a > UINT64_MAX - b ? UINT64_MAX : a + b; }
static uint64_t sat_mul(uint64_t a, uint64_t b) { return a != 0 && b > UINT64_MAX / a ? UINT64_MAX : a * b; }

size_t ddp_mirror_max_message_size(const ddp_mirror *m, size_t max_tokens) {
    if (m == NULL) return 0;
    size_t cap = max_tokens > 16u ? (max_tokens - 16u) / 7u : 0;
    if (cap > m->capacity) cap = m->capacity;
    /* {"action":"reload","rev":R,"numItems":N,"items":[ ... ]} with 20-digit numbers, and items
     * {"key":"K","value":V,"modificationTime":"<up to 32>"}, separated by commas. */
    uint64_t header = sizeof "{\"action\":\"reload\",\"rev\":,\"numItems\":,\"items\":[]}" - 1u + 40u;
    uint64_t item = sizeof "{\"key\":\"\",\"value\":,\"modificationTime\":\"\"}," - 1u + 32u;
    item = sat_add(item, sat_add((uint64_t)m->key_max, (uint64_t)m->value_max));
    uint64_t reload = sat_add(header, sat_mul(item, (uint64_t)cap));
    uint64_t set = sizeof "{\"action\":\"set\",\"rev\":,\"key\":\"\",\"value\":}" - 1u + 20u;
    set = sat_add(set, sat_add((uint64_t)m->key_max, (uint64_t)m->value_max));
    uint64_t best = reload > set ? reload : set;
    if (best >= (uint64_t)UINT32_MAX) best = (uint64_t)UINT32_MAX - 1u;
    return best > (uint64_t)SIZE_MAX ? SIZE_MAX : (size_t)best;
}

ddp_result ddp_mirror_apply(ddp_mirror *m, const char *payload, size_t len, ddp_token *tokens, size_t max_tokens,
                            const ddp_callbacks *cb) {
    if (m == NULL || m->entries == NULL || (payload == NULL && len > 0) || tokens == NULL || max_tokens == 0)
        return DDP_ERR_ARG;
    if (len > ddp_mirror_max_message_size(m, max_tokens)) return DDP_ERR_MESSAGE_TOO_LARGE;
    if (len == 0) return DDP_ERR_JSON;
    size_t n = 0;
    ddp_result r = ddp_json_tokenize(payload, len, tokens, max_tokens, 3, &n);
    if (r != DDP_OK) return r;
    msg g = {payload, tokens, n};
    if (ddp__tok_type(payload, &tokens[0]) != '{') return DDP_ERR_BAD_MESSAGE;
    size_t a = ddp__obj_get(payload, tokens, n, 0, "action");
    if (!is_string(&g, a)) return DDP_ERR_BAD_MESSAGE;
    if (string_is(&g, a, "reload")) return apply_reload(m, &g, cb);
    if (string_is(&g, a, "set") || string_is(&g, a, "delete")) {
        list l = {NONE};
        return apply_changes(m, &g, &l, cb);
    }
    if (string_is(&g, a, "batch")) {
        uint64_t rev;
        if (!get_rev(&g, 0, &rev)) return DDP_ERR_BAD_MESSAGE;
        size_t ch = ddp__obj_get(payload, tokens, n, 0, "changes");
        if (ch >= n || ddp__tok_type(payload, &tokens[ch]) != '[') return DDP_ERR_BAD_MESSAGE;
        list l = {ch};
        return apply_changes(m, &g, &l, cb);
    }
    if (string_is(&g, a, "resume")) {
        uint64_t rev;
        return get_rev(&g, 0, &rev) ? DDP_IGNORED : DDP_ERR_BAD_MESSAGE; /* nothing to apply */
    }
    return DDP_IGNORED; /* error, command, and actions of the future */
}

/* ---- persistence ---- */

static uint32_t crc32(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static void put_le(uint8_t *p, uint64_t v, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8u * i));
}

static uint64_t get_le(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v |= (uint64_t)p[i] << (8u * i);
    return v;
}

/* Blob: "DDPM" 1 synced ahead_count 0 | rev(8) count(4) | ahead(8 each) |
 *       per entry: rev(8) flags(1) key_len(2) value_len(4) key value | crc32(4), little endian. */
#define BLOB_HEAD 20u
#define BLOB_ENTRY 15u

size_t ddp_mirror_blob_size(const ddp_mirror *m) {
    if (m == NULL) return 0;
    size_t n = BLOB_HEAD + 8u * m->ahead_count + 4u;
    for (size_t i = 0; i < m->capacity; i++)
        if (used(m, i)) n += BLOB_ENTRY + m->entries[i].key_len + m->entries[i].value_len;
    return n;
}

ddp_result ddp_mirror_save(const ddp_mirror *m, uint8_t *buf, size_t size, size_t *out_len) {
    if (out_len) *out_len = 0;
    if (m == NULL || buf == NULL) return DDP_ERR_ARG;
    size_t need = ddp_mirror_blob_size(m);
    if (need > size) return DDP_ERR_BUFFER_TOO_SMALL;
    size_t count = 0;
    for (size_t i = 0; i < m->capacity; i++)
        if (used(m, i)) count++;
    memcpy(buf, "DDPM", 4);
    buf[4] = 1;
    buf[5] = m->synced ? 1 : 0;
    buf[6] = m->ahead_count;
    buf[7] = 0;
    put_le(buf + 8, m->rev, 8);
    put_le(buf + 16, count, 4);
    size_t p = BLOB_HEAD;
    for (uint8_t a = 0; a < m->ahead_count; a++, p += 8) put_le(buf + p, m->ahead[a], 8);
    for (size_t i = 0; i < m->capacity; i++) {
        if (!used(m, i)) continue;
        const ddp_entry *e = &m->entries[i];
        put_le(buf + p, e->rev, 8);
        buf[p + 8] = e->flags;
        put_le(buf + p + 9, e->key_len, 2);
        put_le(buf + p + 11, e->value_len, 4);
        p += BLOB_ENTRY;
        memcpy(buf + p, key_at(m, i), e->key_len);
        p += e->key_len;
        memcpy(buf + p, value_at(m, i), e->value_len);
        p += e->value_len;
    }
    put_le(buf + p, crc32(buf, p), 4);
    if (out_len) *out_len = p + 4u;
    return DDP_OK;
}

static bool valid_value_text(const char *v, size_t n) {
    ddp_token t;
    size_t count;
    if (ddp_json_tokenize(v, n, &t, 1, 0, &count) != DDP_OK || v[0] == 'n') return false;
    return ddp__minify_len(v, n) == n;
}

ddp_result ddp_mirror_load(ddp_mirror *m, const uint8_t *b, size_t len) {
    if (m == NULL || b == NULL) return DDP_ERR_ARG;
    if (len < BLOB_HEAD + 4u || memcmp(b, "DDPM", 4) != 0 || b[4] != 1 || b[6] > DDP_AHEAD_MAX)
        return DDP_ERR_BAD_BLOB;
    if (get_le(b + len - 4u, 4) != crc32(b, len - 4u)) return DDP_ERR_BAD_BLOB;
    uint64_t rev = get_le(b + 8, 8);
    uint64_t count = get_le(b + 16, 4);
    if (count > m->capacity) return DDP_ERR_BAD_BLOB;
    size_t end = len - 4u;
    size_t p = BLOB_HEAD + 8u * b[6];
    if (p > end) return DDP_ERR_BAD_BLOB;
    for (uint8_t a = 0; a < b[6]; a++)
        if (get_le(b + BLOB_HEAD + 8u * a, 8) <= rev) return DDP_ERR_BAD_BLOB;
    for (int pass = 0; pass < 2; pass++) {
        size_t q = p;
        if (pass == 1) {
            ddp_mirror_clear(m);
            m->rev = rev;
            m->synced = b[5] != 0;
            m->ahead_count = b[6];
            for (uint8_t a = 0; a < b[6]; a++) m->ahead[a] = get_le(b + BLOB_HEAD + 8u * a, 8);
        }
        for (uint64_t i = 0; i < count; i++) {
            if (end - q < BLOB_ENTRY) return DDP_ERR_BAD_BLOB;
            uint64_t erev = get_le(b + q, 8);
            uint8_t flags = b[q + 8];
            size_t kl = (size_t)get_le(b + q + 9, 2);
            size_t vl = (size_t)get_le(b + q + 11, 4);
            q += BLOB_ENTRY;
            if (kl == 0 || kl > m->key_max || vl > m->value_max || end - q < kl || end - q - kl < vl ||
                (flags & ~LIVE) != 0 || ((flags & LIVE) == 0 && vl != 0))
                return DDP_ERR_BAD_BLOB;
            const char *key = (const char *)(b + q);
            const char *val = (const char *)(b + q + kl);
            if (pass == 0) {
                for (size_t c = 0; c < kl; c++)
                    if (!ddp__key_char(key[c])) return DDP_ERR_BAD_BLOB;
                if ((flags & LIVE) && !valid_value_text(val, vl)) return DDP_ERR_BAD_BLOB;
                /* no key twice */
                size_t r2 = p;
                for (uint64_t k = 0; k < i; k++) {
                    size_t kl2 = (size_t)get_le(b + r2 + 9, 2);
                    size_t vl2 = (size_t)get_le(b + r2 + 11, 4);
                    if (kl2 == kl && memcmp(b + r2 + BLOB_ENTRY, key, kl) == 0) return DDP_ERR_BAD_BLOB;
                    r2 += BLOB_ENTRY + kl2 + vl2;
                }
            } else {
                size_t e = (size_t)i;
                memcpy(key_at(m, e), key, kl);
                key_at(m, e)[kl] = '\0';
                memcpy(value_at(m, e), val, vl);
                value_at(m, e)[vl] = '\0';
                m->entries[e].rev = erev;
                m->entries[e].flags = flags;
                m->entries[e].key_len = (uint16_t)kl;
                m->entries[e].value_len = (uint32_t)vl;
            }
            q += kl + vl;
        }
        if (q != end) return DDP_ERR_BAD_BLOB;
    }
    floor_state f;
    floor_get(m, &f);
    floor_drain(&f);
    floor_put(m, &f);
    gc(m);
    return DDP_OK;
}

ddp_result ddp_mirror_restore_entry(ddp_mirror *m, const char *key, size_t key_len, const char *value, size_t value_len,
                                    uint64_t rev) {
    if (m == NULL || key == NULL || value == NULL) return DDP_ERR_ARG;
    if (key_len == 0 || key_len > 255u) return DDP_ERR_INVALID_KEY;
    for (size_t c = 0; c < key_len; c++)
        if (!ddp__key_char(key[c])) return DDP_ERR_INVALID_KEY;
    if (key_len > m->key_max) return DDP_ERR_KEY_TOO_LONG;
    ddp_token t;
    size_t count;
    ddp_result r = ddp_json_tokenize(value, value_len, &t, 1, 0, &count);
    if (r != DDP_OK) return r;
    if (value[t.start] == 'n') return DDP_ERR_BAD_MESSAGE;
    if (ddp__minify_len(value, value_len) > m->value_max) return DDP_ERR_VALUE_TOO_LARGE;
    size_t e = find_bytes(m, key, key_len);
    if (e == NONE) {
        e = alloc_slot(m);
        if (e == NONE) return DDP_ERR_MIRROR_FULL;
        memcpy(key_at(m, e), key, key_len);
        key_at(m, e)[key_len] = '\0';
        m->entries[e].key_len = (uint16_t)key_len;
    }
    ddp_token whole = {0, (uint32_t)value_len};
    write_value(m, e, value, &whole);
    m->entries[e].rev = rev;
    return DDP_OK;
}

void ddp_mirror_restore_rev(ddp_mirror *m, uint64_t rev) {
    if (m == NULL) return;
    m->rev = rev;
    m->ahead_count = 0;
    m->synced = true;
    gc(m);
}
