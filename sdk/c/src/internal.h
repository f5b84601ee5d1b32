/* Internal helpers shared by the library's sources. Not part of the API. */
#ifndef DDP_INTERNAL_H
#define DDP_INTERNAL_H

#include "ddp/ddp.h"

/* JSON strings: raw is the text between the quotes of a string token already validated by the
 * tokenizer (so every escape is well-formed). */
size_t ddp__str_decoded_len(const char *raw, size_t raw_len, bool *has_nul);
void ddp__str_decode(const char *raw, size_t raw_len, char *out);
bool ddp__str_eq_bytes(const char *raw, size_t raw_len, const char *bytes, size_t n);
bool ddp__str_eq_raw(const char *a, size_t a_len, const char *b, size_t b_len);

/* Minifying validated JSON text. */
size_t ddp__minify_len(const char *src, size_t len);
void ddp__minify_copy(const char *src, size_t len, char *dst);
bool ddp__minify_eq(const char *src, size_t len, const char *stored, size_t n);

/* A bounded output buffer. */
typedef struct ddp__out {
    char *buf;
    size_t size;
    size_t len;
    bool overflow;
} ddp__out;
void ddp__out_bytes(ddp__out *o, const char *s, size_t n);
void ddp__out_str(ddp__out *o, const char *s);
void ddp__out_u64(ddp__out *o, uint64_t v);
void ddp__out_json_string(ddp__out *o, const char *s, size_t n);

/* The key rule of PROTOCOL.md §3: A-Z a-z 0-9 _ - : . */
static inline bool ddp__key_char(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
           c == ':' || c == '.';
}

/* Tokens. */
static inline char ddp__tok_type(const char *js, const ddp_token *t) { return js[t->start]; }
/* Index of the token after t's subtree. */
size_t ddp__tok_skip(const ddp_token *toks, size_t count, size_t i);
/* The value token of member name in the object at index obj (the last one if repeated);
 * returns count when absent. */
size_t ddp__obj_get(const char *js, const ddp_token *toks, size_t count, size_t obj, const char *name);
/* Parses an unsigned 64-bit integer number token. */
bool ddp__tok_u64(const char *js, const ddp_token *t, uint64_t *out);

#endif
