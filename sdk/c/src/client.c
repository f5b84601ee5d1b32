/* The client: topics, incoming messages, and the payloads a device publishes. */
#include <string.h>

#include "internal.h"

bool ddp_is_error(ddp_result r) { return r != DDP_OK && r != DDP_IGNORED && r != DDP_STALE; }

const char *ddp_result_name(ddp_result r) {
    switch (r) {
    case DDP_OK: return "DDP_OK";
    case DDP_IGNORED: return "DDP_IGNORED";
    case DDP_STALE: return "DDP_STALE";
    case DDP_ERR_ARG: return "DDP_ERR_ARG";
    case DDP_ERR_JSON: return "DDP_ERR_JSON";
    case DDP_ERR_TOO_MANY_TOKENS: return "DDP_ERR_TOO_MANY_TOKENS";
    case DDP_ERR_TOO_DEEP: return "DDP_ERR_TOO_DEEP";
    case DDP_ERR_BAD_MESSAGE: return "DDP_ERR_BAD_MESSAGE";
    case DDP_ERR_INVALID_KEY: return "DDP_ERR_INVALID_KEY";
    case DDP_ERR_KEY_TOO_LONG: return "DDP_ERR_KEY_TOO_LONG";
    case DDP_ERR_VALUE_TOO_LARGE: return "DDP_ERR_VALUE_TOO_LARGE";
    case DDP_ERR_MIRROR_FULL: return "DDP_ERR_MIRROR_FULL";
    case DDP_ERR_MESSAGE_TOO_LARGE: return "DDP_ERR_MESSAGE_TOO_LARGE";
    case DDP_ERR_BUFFER_TOO_SMALL: return "DDP_ERR_BUFFER_TOO_SMALL";
    case DDP_ERR_TRANSPORT: return "DDP_ERR_TRANSPORT";
    case DDP_ERR_PERSIST: return "DDP_ERR_PERSIST";
    case DDP_ERR_BAD_BLOB: return "DDP_ERR_BAD_BLOB";
    }
    return "DDP_ERR_UNKNOWN";
}

ddp_result ddp_topic(uint64_t device_id, ddp_topic_kind kind, char *buf, size_t size, size_t *out_len) {
    if (out_len) *out_len = 0;
    if (buf == NULL) return DDP_ERR_ARG;
    const char *tail = kind == DDP_TOPIC_KV ? "/kv" : kind == DDP_TOPIC_COMMAND ? "/command" : kind == DDP_TOPIC_EVENT ? "/event" : NULL;
    if (tail == NULL) return DDP_ERR_ARG;
    ddp__out o = {buf, size, 0, false};
    ddp__out_str(&o, "/devices/");
    ddp__out_u64(&o, device_id);
    ddp__out_str(&o, tail);
    if (o.overflow) {
        if (size > 0) buf[0] = '\0';
        return DDP_ERR_BUFFER_TOO_SMALL;
    }
    if (out_len) *out_len = o.len;
    return DDP_OK;
}

ddp_result ddp_init(ddp_client *c, const ddp_config *cfg) {
    if (c == NULL || cfg == NULL) return DDP_ERR_ARG;
    memset(c, 0, sizeof *c);
    if (cfg->device_id == 0 || cfg->transport.publish == NULL || cfg->tokens == NULL || cfg->max_tokens < 24u ||
        cfg->tx_buf == NULL || cfg->tx_size < 64u || (cfg->write_qos != 0 && cfg->write_qos != 1))
        return DDP_ERR_ARG;
    ddp_result r = ddp_mirror_init(&c->mirror, &cfg->storage);
    if (r != DDP_OK) return r;
    c->transport = cfg->transport;
    c->callbacks = cfg->callbacks;
    c->tokens = cfg->tokens;
    c->max_tokens = cfg->max_tokens;
    c->tx_buf = cfg->tx_buf;
    c->tx_size = cfg->tx_size;
    c->device_id = cfg->device_id;
    c->write_qos = cfg->write_qos;
    c->auto_ack = cfg->auto_ack;
    (void)ddp_topic(c->device_id, DDP_TOPIC_KV, c->topic_kv, sizeof c->topic_kv, NULL);
    (void)ddp_topic(c->device_id, DDP_TOPIC_COMMAND, c->topic_command, sizeof c->topic_command, NULL);
    (void)ddp_topic(c->device_id, DDP_TOPIC_EVENT, c->topic_event, sizeof c->topic_event, NULL);
    return DDP_OK;
}

ddp_mirror *ddp_client_mirror(ddp_client *c) { return c ? &c->mirror : NULL; }

size_t ddp_max_message_size(const ddp_client *c) {
    return c ? ddp_mirror_max_message_size(&c->mirror, c->max_tokens) : 0;
}

size_t ddp_max_packet_size(const ddp_client *c) {
    if (c == NULL) return 0;
    /* fixed header (1 + up to 4 length bytes), topic (2 + len), packet id (2), MQTT 5 properties */
    return ddp_max_message_size(c) + 5u + 2u + strlen(c->topic_command) + 2u + 16u;
}

ddp_result ddp_subscribe(ddp_client *c) {
    if (c == NULL || c->transport.subscribe == NULL) return DDP_ERR_ARG;
    if (c->transport.subscribe(c->transport.ctx, c->topic_kv, 0) != 0) return DDP_ERR_TRANSPORT;
    if (c->transport.subscribe(c->transport.ctx, c->topic_command, 0) != 0) return DDP_ERR_TRANSPORT;
    return DDP_OK;
}

static ddp_result publish(ddp_client *c, const char *topic, const ddp__out *o) {
    if (o->overflow) return DDP_ERR_BUFFER_TOO_SMALL;
    if (c->transport.publish(c->transport.ctx, topic, (const uint8_t *)o->buf, o->len, c->write_qos) != 0)
        return DDP_ERR_TRANSPORT;
    return DDP_OK;
}

static ddp_result ack_rev(ddp_client *c, uint64_t rev) {
    ddp__out o = {c->tx_buf, c->tx_size, 0, false};
    ddp__out_str(&o, "{\"action\":\"ack\",\"rev\":");
    ddp__out_u64(&o, rev);
    ddp__out_str(&o, "}");
    ddp_result r = publish(c, c->topic_kv, &o);
    if (r == DDP_OK) c->acked_rev = rev;
    return r;
}

ddp_result ddp_ack(ddp_client *c) {
    if (c == NULL) return DDP_ERR_ARG;
    uint64_t rev = ddp_mirror_rev(&c->mirror);
    if (rev == 0 || rev <= c->acked_rev) return DDP_IGNORED;
    return ack_rev(c, rev);
}

static ddp_result on_command(ddp_client *c, const char *js, size_t len) {
    ddp_token stack[32];
    const ddp_token *t = stack;
    size_t n = 0;
    ddp_result r = ddp_json_tokenize(js, len, stack, sizeof stack / sizeof stack[0], 1, &n);
    if (r == DDP_ERR_TOO_MANY_TOKENS) { /* more members than the stack scratch holds */
        r = ddp_json_tokenize(js, len, c->tokens, c->max_tokens, 1, &n);
        t = c->tokens;
    }
    if (r != DDP_OK) return r;
    if (js[t[0].start] != '{') return DDP_ERR_BAD_MESSAGE;
    size_t a = ddp__obj_get(js, t, n, 0, "action");
    if (a >= n || js[t[a].start] != '"') return DDP_ERR_BAD_MESSAGE;
    const char *raw = js + t[a].start + 1;
    size_t raw_len = t[a].end - t[a].start - 2u;
    bool nul = false;
    size_t alen = ddp__str_decoded_len(raw, raw_len, &nul);
    if (alen == 0 || nul) return DDP_ERR_BAD_MESSAGE;
    if (alen > DDP_ACTION_MAX) return DDP_ERR_BUFFER_TOO_SMALL;
    const char *params = "{}";
    size_t plen = 2;
    size_t p = ddp__obj_get(js, t, n, 0, "parameters");
    if (p < n && js[t[p].start] != 'n') {
        if (js[t[p].start] != '{') return DDP_ERR_BAD_MESSAGE;
        params = js + t[p].start;
        plen = t[p].end - t[p].start;
    }
    ddp__str_decode(raw, raw_len, c->action);
    c->action[alen] = '\0';
    if (c->callbacks.on_command) c->callbacks.on_command(c->callbacks.ctx, c->action, alen, params, plen);
    return DDP_OK;
}

ddp_result ddp_on_message_n(ddp_client *c, const char *topic, size_t topic_len, const void *payload, size_t len) {
    if (c == NULL || topic == NULL || (payload == NULL && len > 0)) return DDP_ERR_ARG;
    const char *js = (const char *)payload;
    if (topic_len == strlen(c->topic_kv) && memcmp(topic, c->topic_kv, topic_len) == 0) {
        ddp_result r = ddp_mirror_apply(&c->mirror, js, len, c->tokens, c->max_tokens, &c->callbacks);
        if (r != DDP_OK) return r;
        if (c->callbacks.persist && c->callbacks.persist(c->callbacks.ctx, &c->mirror) != DDP_OK)
            return DDP_ERR_PERSIST;
        if (c->auto_ack) {
            ddp_result a = ddp_ack(c);
            if (ddp_is_error(a)) return a;
        }
        return DDP_OK;
    }
    if (topic_len == strlen(c->topic_command) && memcmp(topic, c->topic_command, topic_len) == 0) {
        if (len == 0) return DDP_ERR_JSON;
        return on_command(c, js, len);
    }
    return DDP_IGNORED;
}

ddp_result ddp_on_message(ddp_client *c, const char *topic, const void *payload, size_t len) {
    if (topic == NULL) return DDP_ERR_ARG;
    return ddp_on_message_n(c, topic, strlen(topic), payload, len);
}

/* The key rule of PROTOCOL.md §3: 1-255 bytes of A-Z a-z 0-9 _ - : . */
static ddp_result check_write_key(const char *key) {
    if (key == NULL) return DDP_ERR_ARG;
    size_t n = strlen(key);
    if (n == 0 || n > 255u) return DDP_ERR_INVALID_KEY;
    for (size_t i = 0; i < n; i++)
        if (!ddp__key_char(key[i])) return DDP_ERR_INVALID_KEY;
    return DDP_OK;
}

/* Appends JSON value text minified; DDP_ERR_JSON / DDP_ERR_BAD_MESSAGE (null) when unusable. */
static ddp_result out_value(ddp__out *o, const char *json) {
    size_t len = strlen(json);
    ddp_token t;
    size_t n;
    ddp_result r = ddp_json_tokenize(json, len, &t, 1, 0, &n);
    if (r != DDP_OK) return r;
    if (json[t.start] == 'n') return DDP_ERR_BAD_MESSAGE;
    size_t m = ddp__minify_len(json, len);
    if (o->overflow || o->size - o->len < m + 1u) {
        o->overflow = true;
        return DDP_OK;
    }
    ddp__minify_copy(json, len, o->buf + o->len);
    o->len += m;
    o->buf[o->len] = '\0';
    return DDP_OK;
}

ddp_result ddp_set(ddp_client *c, const char *key, const char *json_value) {
    if (c == NULL || json_value == NULL) return DDP_ERR_ARG;
    ddp_result r = check_write_key(key);
    if (r != DDP_OK) return r;
    ddp__out o = {c->tx_buf, c->tx_size, 0, false};
    ddp__out_str(&o, "{\"action\":\"set\",\"key\":");
    ddp__out_json_string(&o, key, strlen(key));
    ddp__out_str(&o, ",\"value\":");
    r = out_value(&o, json_value);
    if (r != DDP_OK) return r;
    ddp__out_str(&o, "}");
    return publish(c, c->topic_kv, &o);
}

ddp_result ddp_delete(ddp_client *c, const char *key) {
    if (c == NULL) return DDP_ERR_ARG;
    ddp_result r = check_write_key(key);
    if (r != DDP_OK) return r;
    ddp__out o = {c->tx_buf, c->tx_size, 0, false};
    ddp__out_str(&o, "{\"action\":\"delete\",\"key\":");
    ddp__out_json_string(&o, key, strlen(key));
    ddp__out_str(&o, "}");
    return publish(c, c->topic_kv, &o);
}

ddp_result ddp_send_event(ddp_client *c, const char *event_type, const char *json_data) {
    if (c == NULL || event_type == NULL) return DDP_ERR_ARG;
    size_t n = strlen(event_type);
    if (n == 0 || n > 255u) return DDP_ERR_ARG;
    ddp__out o = {c->tx_buf, c->tx_size, 0, false};
    ddp__out_str(&o, "{\"eventType\":");
    ddp__out_json_string(&o, event_type, n);
    ddp__out_str(&o, ",\"eventData\":");
    ddp_result r = out_value(&o, json_data ? json_data : "{}");
    if (r != DDP_OK) return r;
    ddp__out_str(&o, "}");
    return publish(c, c->topic_event, &o);
}
