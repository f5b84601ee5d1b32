/* The tokenizer, minifier, string helpers and topics. */
#include <stdint.h>

#include "ddp/ddp.h"
#include "harness.h"
#include "internal.h"

static ddp_result tok(const char *s, size_t *n) {
    ddp_token t[64];
    return ddp_json_tokenize(s, strlen(s), t, 64, 7, n);
}

static void valid_documents(void) {
    const char *ok[] = {"{}", "[]", "0", "-0", "1.5e+10", "-12.25E-3", "\"\"", "true", "false", "null",
                        " {\"a\" : [1, 2, {\"b\":null}], \"c\":\"\\u00e9\\n\\\"\"} ", "[[[[]]]]",
                        "12345678901234567890", "\"\\ud83d\\ude00\"", "\t\r\n[1]\n"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        size_t n = 0;
        ddp_result r = tok(ok[i], &n);
        if (r != DDP_OK) fprintf(stderr, "rejected: %s (%s)\n", ok[i], ddp_result_name(r));
        CHECK_EQ_INT(r, DDP_OK);
        CHECK(n >= 1);
    }
}

static void invalid_documents(void) {
    const char *bad[] = {"", " ", "{", "}", "[1,]", "[,1]", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "{a:1}",
                         "01", "1.", ".5", "-", "1e", "+1", "tru", "nulll", "\"abc", "\"\\x\"", "\"\\u12\"",
                         "\"a\nb\"", "[1 2]", "{} {}", "[}", "{]", "\"\\", "[1]]", "{\"a\":1 \"b\":2}",
                         "'a'", "NaN", "[-]", "{\"a\"::1}", "[\"\\u00zz\"]"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = 99;
        ddp_result r = tok(bad[i], &n);
        if (r != DDP_ERR_JSON) fprintf(stderr, "accepted or wrong code: '%s' (%s)\n", bad[i], ddp_result_name(r));
        CHECK_EQ_INT(r, DDP_ERR_JSON);
        CHECK_EQ_INT(n, 0);
    }
}

static void tokens_and_depth(void) {
    const char *s = "{\"a\":[1,{\"b\":[2,3]}],\"c\":true}";
    ddp_token t[16];
    size_t n = 0;
    CHECK_EQ_INT(ddp_json_tokenize(s, strlen(s), t, 16, 7, &n), DDP_OK);
    CHECK_EQ_INT(n, 11); /* { "a" [ 1 { "b" [ 2 3 "c" true */
    CHECK_EQ_INT(t[0].start, 0);
    CHECK_EQ_INT(t[0].end, strlen(s));
    CHECK_EQ_INT(s[t[2].start], '[');
    CHECK_EQ_INT(s[t[2].end - 1], ']');
    /* depth 1: only the top object's members get tokens */
    CHECK_EQ_INT(ddp_json_tokenize(s, strlen(s), t, 16, 1, &n), DDP_OK);
    CHECK_EQ_INT(n, 5);
    CHECK_EQ_INT(ddp__obj_get(s, t, n, 0, "c"), 4);
    CHECK_EQ_INT(ddp__obj_get(s, t, n, 0, "zz"), n);
    CHECK_EQ_INT(ddp_json_tokenize(s, strlen(s), t, 16, 0, &n), DDP_OK);
    CHECK_EQ_INT(n, 1);
    /* too few tokens */
    CHECK_EQ_INT(ddp_json_tokenize(s, strlen(s), t, 3, 7, &n), DDP_ERR_TOO_MANY_TOKENS);
    CHECK_EQ_INT(ddp_json_tokenize(s, strlen(s), t, 16, 8, &n), DDP_ERR_ARG);
}

static void nesting_limit(void) {
    char deep[200];
    for (int d = 63; d <= 65; d++) {
        size_t i = 0;
        for (int k = 0; k < d; k++) deep[i++] = '[';
        for (int k = 0; k < d; k++) deep[i++] = ']';
        deep[i] = '\0';
        size_t n;
        CHECK_EQ_INT(tok(deep, &n), d <= DDP_JSON_MAX_DEPTH ? DDP_OK : DDP_ERR_TOO_DEEP);
    }
}

static void truncation_everywhere(void) {
    const char *s = "{\"action\":\"set\",\"rev\":12,\"key\":\"k\",\"value\":{\"x\":[1,2.5,\"s\\\"\"],\"t\":true}}";
    size_t len = strlen(s);
    ddp_token t[32];
    for (size_t cut = 0; cut < len; cut++) {
        size_t n;
        CHECK(ddp_json_tokenize(s, cut, t, 32, 7, &n) != DDP_OK);
    }
}

static void minify(void) {
    char out[64];
    size_t n;
    CHECK_EQ_INT(ddp_json_minify(" { \"a b\" : [ 1 , \"x  y\" ] } ", 28, out, sizeof out, &n), DDP_OK);
    CHECK_STR(out, "{\"a b\":[1,\"x  y\"]}");
    CHECK_EQ_INT(n, strlen(out));
    CHECK_EQ_INT(ddp_json_minify("[1, 2]", 6, out, 5, &n), DDP_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_INT(n, 5);
    CHECK_EQ_INT(ddp_json_minify("[1, 2]", 6, out, 6, &n), DDP_OK);
    CHECK_EQ_INT(ddp_json_minify("[1, 2", 5, out, sizeof out, &n), DDP_ERR_JSON);
    CHECK_EQ_INT(ddp_json_minify("\"a\\\" b\"", 7, out, sizeof out, &n), DDP_OK);
    CHECK_STR(out, "\"a\\\" b\"");
}

static void strings(void) {
    const char *raw = "a\\u00e9\\n\\ud83d\\ude00\\/";
    bool nul;
    size_t n = ddp__str_decoded_len(raw, strlen(raw), &nul);
    CHECK_EQ_INT(n, 1 + 2 + 1 + 4 + 1);
    CHECK(!nul);
    char out[16];
    ddp__str_decode(raw, strlen(raw), out);
    CHECK(memcmp(out, "a\xc3\xa9\n\xf0\x9f\x98\x80/", n) == 0);
    CHECK(ddp__str_eq_bytes(raw, strlen(raw), "a\xc3\xa9\n\xf0\x9f\x98\x80/", n));
    CHECK(!ddp__str_eq_bytes(raw, strlen(raw), "a\xc3\xa9\n", 4));
    CHECK(ddp__str_eq_raw("\\u0061b", 7, "ab", 2));
    CHECK(ddp__str_eq_raw("ab", 2, "\\u0061b", 7));
    CHECK(!ddp__str_eq_raw("\\u0061", 6, "ab", 2));
    CHECK(!ddp__str_eq_raw("\\u0061b", 7, "a", 1));
    (void)ddp__str_decoded_len("x\\u0000", 7, &nul);
    CHECK(nul);
}

static void topics(void) {
    char buf[DDP_TOPIC_MAX];
    size_t n;
    CHECK_EQ_INT(ddp_topic(42, DDP_TOPIC_KV, buf, sizeof buf, &n), DDP_OK);
    CHECK_STR(buf, "/devices/42/kv");
    CHECK_EQ_INT(n, 14);
    CHECK_EQ_INT(ddp_topic(UINT64_MAX, DDP_TOPIC_COMMAND, buf, sizeof buf, &n), DDP_OK);
    CHECK_STR(buf, "/devices/18446744073709551615/command");
    CHECK_EQ_INT(n + 1, DDP_TOPIC_MAX - 2);
    CHECK_EQ_INT(ddp_topic(7, DDP_TOPIC_EVENT, buf, sizeof buf, &n), DDP_OK);
    CHECK_STR(buf, "/devices/7/event");
    char small[14];
    memset(small, 'x', sizeof small);
    CHECK_EQ_INT(ddp_topic(42, DDP_TOPIC_KV, small, sizeof small, &n), DDP_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_INT(small[0], '\0');
    CHECK_EQ_INT(ddp_topic(42, DDP_TOPIC_KV, small, 15 - 1, &n), DDP_ERR_BUFFER_TOO_SMALL);
    char exact[15];
    CHECK_EQ_INT(ddp_topic(42, DDP_TOPIC_KV, exact, sizeof exact, &n), DDP_OK);
    CHECK_EQ_INT(ddp_topic(42, DDP_TOPIC_KV, NULL, 10, &n), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_topic(42, (ddp_topic_kind)9, buf, sizeof buf, &n), DDP_ERR_ARG);
}

int main(void) {
    RUN(valid_documents);
    RUN(invalid_documents);
    RUN(tokens_and_depth);
    RUN(nesting_limit);
    RUN(truncation_everywhere);
    RUN(minify);
    RUN(strings);
    RUN(topics);
    DONE();
}
