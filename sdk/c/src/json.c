/* A strict, bounded, iterative JSON tokenizer and the string/minify helpers. No allocation. */
#include <string.h>

#include "internal.h"

enum {
    ST_VALUE,         /* a value must come */
    ST_VALUE_OR_END,  /* after '[' */
    ST_KEY,           /* after ',' in an object */
    ST_KEY_OR_END,    /* after '{' */
    ST_COLON,
    ST_COMMA_OR_END,
    ST_DONE
};

#define DDP_NO_TOKEN 0xFFFFFFFFu

static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
static bool is_digit(char c) { return c >= '0' && c <= '9'; }
static bool is_hex(char c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

/* Scans a string starting at js[*pos] == '"'; leaves *pos after the closing quote. */
static ddp_result scan_string(const char *js, size_t len, size_t *pos) {
    size_t p = *pos + 1;
    while (p < len) {
        unsigned char c = (unsigned char)js[p];
        if (c == '"') {
            *pos = p + 1;
            return DDP_OK;
        }
        if (c < 0x20) return DDP_ERR_JSON;
        if (c == '\\') {
            if (p + 1 >= len) return DDP_ERR_JSON;
            char e = js[p + 1];
            if (e == 'u') {
                if (p + 5 >= len) return DDP_ERR_JSON;
                for (size_t k = 2; k < 6; k++)
                    if (!is_hex(js[p + k])) return DDP_ERR_JSON;
                p += 6;
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
                       e == 't') {
                p += 2;
            } else {
                return DDP_ERR_JSON;
            }
        } else {
            p++;
        }
    }
    return DDP_ERR_JSON; /* unterminated */
}

static ddp_result scan_number(const char *js, size_t len, size_t *pos) {
    size_t p = *pos;
    if (p < len && js[p] == '-') p++;
    if (p >= len) return DDP_ERR_JSON;
    if (js[p] == '0') {
        p++;
    } else if (js[p] >= '1' && js[p] <= '9') {
        while (p < len && is_digit(js[p])) p++;
    } else {
        return DDP_ERR_JSON;
    }
    if (p < len && js[p] == '.') {
        p++;
        if (p >= len || !is_digit(js[p])) return DDP_ERR_JSON;
        while (p < len && is_digit(js[p])) p++;
    }
    if (p < len && (js[p] == 'e' || js[p] == 'E')) {
        p++;
        if (p < len && (js[p] == '+' || js[p] == '-')) p++;
        if (p >= len || !is_digit(js[p])) return DDP_ERR_JSON;
        while (p < len && is_digit(js[p])) p++;
    }
    *pos = p;
    return DDP_OK;
}

static ddp_result scan_literal(const char *js, size_t len, size_t *pos) {
    static const char *const lits[3] = {"true", "false", "null"};
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(lits[i]);
        if (len - *pos >= n && memcmp(js + *pos, lits[i], n) == 0) {
            *pos += n;
            return DDP_OK;
        }
    }
    return DDP_ERR_JSON;
}

ddp_result ddp_json_tokenize(const char *js, size_t len, ddp_token *toks, size_t max_tokens, unsigned max_depth,
                             size_t *count) {
    if (count) *count = 0;
    if (js == NULL || (toks == NULL && max_tokens > 0) || max_depth > 7) return DDP_ERR_ARG;
    if (len >= (size_t)UINT32_MAX) return DDP_ERR_MESSAGE_TOO_LARGE;
    uint64_t objbits = 0; /* bit d set: the container at nesting d+1 is an object */
    uint32_t open[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* token of the open container per element depth */
    unsigned depth = 0;   /* containers open */
    size_t n = 0;
    size_t pos = 0;
    int st = ST_VALUE;
    for (;;) {
        while (pos < len && is_ws(js[pos])) pos++;
        if (pos >= len) {
            if (st != ST_DONE) return DDP_ERR_JSON;
            break;
        }
        char c = js[pos];
        if (st == ST_DONE) return DDP_ERR_JSON;
        if (st == ST_COLON) {
            if (c != ':') return DDP_ERR_JSON;
            pos++;
            st = ST_VALUE;
            continue;
        }
        bool in_obj = depth > 0 && ((objbits >> (depth - 1)) & 1u);
        bool close = false;
        if (st == ST_COMMA_OR_END) {
            if (c == ',') {
                pos++;
                st = in_obj ? ST_KEY : ST_VALUE;
                continue;
            }
            if ((c == '}' && in_obj) || (c == ']' && !in_obj)) {
                close = true;
            } else {
                return DDP_ERR_JSON;
            }
        } else if ((st == ST_KEY_OR_END && c == '}') || (st == ST_VALUE_OR_END && c == ']')) {
            close = true;
        }
        if (close) {
            depth--;
            if (depth <= max_depth && open[depth] != DDP_NO_TOKEN) toks[open[depth]].end = (uint32_t)(pos + 1);
            pos++;
            st = depth == 0 ? ST_DONE : ST_COMMA_OR_END;
            continue;
        }
        /* An element at element depth `depth` starts here. */
        bool keep = depth <= max_depth;
        size_t start = pos;
        if (keep && n >= max_tokens) return DDP_ERR_TOO_MANY_TOKENS;
        if (st == ST_KEY || st == ST_KEY_OR_END) {
            if (c != '"') return DDP_ERR_JSON;
            ddp_result r = scan_string(js, len, &pos);
            if (r != DDP_OK) return r;
            st = ST_COLON;
        } else if (c == '{' || c == '[') {
            if (depth >= DDP_JSON_MAX_DEPTH) return DDP_ERR_TOO_DEEP;
            if (depth <= max_depth) open[depth] = keep ? (uint32_t)n : DDP_NO_TOKEN;
            if (c == '{') {
                objbits |= (uint64_t)1u << depth;
            } else {
                objbits &= ~((uint64_t)1u << depth);
            }
            if (keep) {
                toks[n].start = (uint32_t)start;
                toks[n].end = 0;
                n++;
            }
            depth++;
            pos++;
            st = c == '{' ? ST_KEY_OR_END : ST_VALUE_OR_END;
            continue;
        } else {
            ddp_result r;
            if (c == '"') {
                r = scan_string(js, len, &pos);
            } else if (c == '-' || is_digit(c)) {
                r = scan_number(js, len, &pos);
            } else {
                r = scan_literal(js, len, &pos);
            }
            if (r != DDP_OK) return r;
            st = depth == 0 ? ST_DONE : ST_COMMA_OR_END;
        }
        if (keep) {
            toks[n].start = (uint32_t)start;
            toks[n].end = (uint32_t)pos;
            n++;
        }
    }
    if (count) *count = n;
    return DDP_OK;
}

/* ---- strings ---- */

static unsigned hexval(char c) {
    if (c >= '0' && c <= '9') return (unsigned)(c - '0');
    if (c >= 'a' && c <= 'f') return (unsigned)(c - 'a' + 10);
    return (unsigned)(c - 'A' + 10);
}

static unsigned hex4(const char *s) {
    return (hexval(s[0]) << 12) | (hexval(s[1]) << 8) | (hexval(s[2]) << 4) | hexval(s[3]);
}

/* Decodes the next character of a validated raw string into out (1-4 bytes); returns how many. */
static size_t str_next(const char *raw, size_t raw_len, size_t *pos, char out[4]) {
    size_t p = *pos;
    if (raw[p] != '\\') {
        out[0] = raw[p];
        *pos = p + 1;
        return 1;
    }
    char e = raw[p + 1];
    if (e != 'u') {
        char d;
        switch (e) {
        case 'b': d = '\b'; break;
        case 'f': d = '\f'; break;
        case 'n': d = '\n'; break;
        case 'r': d = '\r'; break;
        case 't': d = '\t'; break;
        default: d = e; break; /* " \ / */
        }
        out[0] = d;
        *pos = p + 2;
        return 1;
    }
    uint32_t cp = hex4(raw + p + 2);
    p += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF && p + 6 <= raw_len && raw[p] == '\\' && raw[p + 1] == 'u') {
        uint32_t lo = hex4(raw + p + 2);
        if (lo >= 0xDC00 && lo <= 0xDFFF) {
            cp = 0x10000u + ((cp - 0xD800u) << 10) + (lo - 0xDC00u);
            p += 6;
        }
    }
    *pos = p;
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0u | (cp >> 6));
        out[1] = (char)(0x80u | (cp & 0x3Fu));
        return 2;
    }
    if (cp < 0x10000) { /* a lone surrogate is kept as its 3-byte form */
        out[0] = (char)(0xE0u | (cp >> 12));
        out[1] = (char)(0x80u | ((cp >> 6) & 0x3Fu));
        out[2] = (char)(0x80u | (cp & 0x3Fu));
        return 3;
    }
    out[0] = (char)(0xF0u | (cp >> 18));
    out[1] = (char)(0x80u | ((cp >> 12) & 0x3Fu));
    out[2] = (char)(0x80u | ((cp >> 6) & 0x3Fu));
    out[3] = (char)(0x80u | (cp & 0x3Fu));
    return 4;
}

size_t ddp__str_decoded_len(const char *raw, size_t raw_len, bool *has_nul) {
    size_t n = 0;
    size_t p = 0;
    char ch[4];
    if (has_nul) *has_nul = false;
    while (p < raw_len) {
        size_t k = str_next(raw, raw_len, &p, ch);
        if (k == 1 && ch[0] == '\0' && has_nul) *has_nul = true;
        n += k;
    }
    return n;
}

void ddp__str_decode(const char *raw, size_t raw_len, char *out) {
    size_t p = 0;
    size_t o = 0;
    char ch[4];
    while (p < raw_len) {
        size_t k = str_next(raw, raw_len, &p, ch);
        memcpy(out + o, ch, k);
        o += k;
    }
}

bool ddp__str_eq_bytes(const char *raw, size_t raw_len, const char *bytes, size_t n) {
    if (memchr(raw, '\\', raw_len) == NULL) return raw_len == n && memcmp(raw, bytes, n) == 0;
    size_t p = 0;
    size_t o = 0;
    char ch[4];
    while (p < raw_len) {
        size_t k = str_next(raw, raw_len, &p, ch);
        if (o + k > n || memcmp(bytes + o, ch, k) != 0) return false;
        o += k;
    }
    return o == n;
}

bool ddp__str_eq_raw(const char *a, size_t a_len, const char *b, size_t b_len) {
    if (memchr(a, '\\', a_len) == NULL) return ddp__str_eq_bytes(b, b_len, a, a_len);
    size_t pa = 0;
    size_t pb = 0;
    char ca[4];
    char cb[4];
    size_t ka = 0;
    size_t kb = 0;
    size_t ia = 0;
    size_t ib = 0;
    for (;;) {
        if (ia == ka) {
            if (pa >= a_len) break;
            ka = str_next(a, a_len, &pa, ca);
            ia = 0;
        }
        if (ib == kb) {
            if (pb >= b_len) return false;
            kb = str_next(b, b_len, &pb, cb);
            ib = 0;
        }
        if (ca[ia++] != cb[ib++]) return false;
    }
    return ib == kb && pb >= b_len;
}

/* ---- minify ---- */

/* Walks validated JSON text, calling nothing: returns the next significant byte index. */
typedef struct {
    size_t pos;
    bool in_str;
    bool esc;
} mini_iter;

static bool mini_next(const char *src, size_t len, mini_iter *it, char *out) {
    while (it->pos < len) {
        char c = src[it->pos++];
        if (it->in_str) {
            if (it->esc) {
                it->esc = false;
            } else if (c == '\\') {
                it->esc = true;
            } else if (c == '"') {
                it->in_str = false;
            }
            *out = c;
            return true;
        }
        if (is_ws(c)) continue;
        if (c == '"') it->in_str = true;
        *out = c;
        return true;
    }
    return false;
}

size_t ddp__minify_len(const char *src, size_t len) {
    mini_iter it = {0, false, false};
    size_t n = 0;
    char c;
    while (mini_next(src, len, &it, &c)) n++;
    return n;
}

void ddp__minify_copy(const char *src, size_t len, char *dst) {
    mini_iter it = {0, false, false};
    size_t n = 0;
    char c;
    while (mini_next(src, len, &it, &c)) dst[n++] = c;
}

bool ddp__minify_eq(const char *src, size_t len, const char *stored, size_t n) {
    mini_iter it = {0, false, false};
    size_t i = 0;
    char c;
    while (mini_next(src, len, &it, &c)) {
        if (i >= n || stored[i] != c) return false;
        i++;
    }
    return i == n;
}

ddp_result ddp_json_minify(const char *src, size_t len, char *dst, size_t dst_size, size_t *out_len) {
    if (out_len) *out_len = 0;
    if (src == NULL || (dst == NULL && dst_size > 0)) return DDP_ERR_ARG;
    ddp_token t;
    size_t count = 0;
    ddp_result r = ddp_json_tokenize(src, len, &t, 1, 0, &count);
    if (r != DDP_OK) return r;
    size_t n = ddp__minify_len(src, len);
    if (out_len) *out_len = n;
    if (n + 1 > dst_size) {
        if (dst_size > 0) dst[0] = '\0';
        return DDP_ERR_BUFFER_TOO_SMALL;
    }
    ddp__minify_copy(src, len, dst);
    dst[n] = '\0';
    return DDP_OK;
}

/* ---- tokens ---- */

size_t ddp__tok_skip(const ddp_token *toks, size_t count, size_t i) {
    size_t j = i + 1;
    while (j < count && toks[j].start < toks[i].end) j++;
    return j;
}

size_t ddp__obj_get(const char *js, const ddp_token *toks, size_t count, size_t obj, const char *name) {
    size_t found = count;
    size_t name_len = strlen(name);
    size_t j = obj + 1;
    while (j + 1 < count && toks[j].start < toks[obj].end) {
        const ddp_token *k = &toks[j];
        if (ddp__str_eq_bytes(js + k->start + 1, k->end - k->start - 2, name, name_len)) found = j + 1;
        j = ddp__tok_skip(toks, count, j + 1);
    }
    return found;
}

bool ddp__tok_u64(const char *js, const ddp_token *t, uint64_t *out) {
    uint64_t v = 0;
    if (t->end <= t->start) return false;
    for (uint32_t i = t->start; i < t->end; i++) {
        char c = js[i];
        if (!is_digit(c)) return false;
        uint64_t d = (uint64_t)(c - '0');
        if (v > (UINT64_MAX - d) / 10u) return false;
        v = v * 10u + d;
    }
    *out = v;
    return true;
}

/* ---- output ---- */

void ddp__out_bytes(ddp__out *o, const char *s, size_t n) {
    if (o->overflow || o->size - o->len < n + 1) {
        o->overflow = true;
        return;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
    o->buf[o->len] = '\0';
}

void ddp__out_str(ddp__out *o, const char *s) { ddp__out_bytes(o, s, strlen(s)); }

void ddp__out_u64(ddp__out *o, uint64_t v) {
    char tmp[20];
    size_t n = 0;
    do {
        tmp[sizeof tmp - 1 - n] = (char)('0' + (int)(v % 10u));
        v /= 10u;
        n++;
    } while (v != 0);
    ddp__out_bytes(o, tmp + sizeof tmp - n, n);
}

void ddp__out_json_string(ddp__out *o, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    ddp__out_bytes(o, "\"", 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[6];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            ddp__out_bytes(o, esc, 2);
        } else if (c < 0x20) {
            const char *named = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t" : c == '\b' ? "\\b"
                                : c == '\f' ? "\\f" : NULL;
            if (named) {
                ddp__out_bytes(o, named, 2);
            } else {
                esc[0] = '\\';
                esc[1] = 'u';
                esc[2] = '0';
                esc[3] = '0';
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 15u];
                ddp__out_bytes(o, esc, 6);
            }
        } else {
            ddp__out_bytes(o, (const char *)&s[i], 1);
        }
    }
    ddp__out_bytes(o, "\"", 1);
}
