/* The client over a recording transport (standing in for the device's own MQTT client):
 * subscriptions, incoming kv and command messages, writes, acks, events. */
#include <stdint.h>

#include "ddp/ddp.h"
#include "harness.h"

typedef struct rec {
    char topic[64];
    char payload[512];
    int qos;
} rec;
static rec pubs[32];
static int npubs;
static char subs[4][64];
static int nsubs;
static int fail_transport;

static int t_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos) {
    (void)ctx;
    if (fail_transport) return -1;
    if (npubs < 32 && len < sizeof pubs[0].payload) {
        snprintf(pubs[npubs].topic, sizeof pubs[npubs].topic, "%s", topic);
        memcpy(pubs[npubs].payload, payload, len);
        pubs[npubs].payload[len] = '\0';
        pubs[npubs].qos = qos;
        npubs++;
    }
    return 0;
}
static int t_subscribe(void *ctx, const char *topic, int qos) {
    (void)ctx;
    CHECK_EQ_INT(qos, 0);
    if (fail_transport) return -1;
    if (nsubs < 4) snprintf(subs[nsubs++], sizeof subs[0], "%s", topic);
    return 0;
}

static char last_action[300];
static char last_params[300];
static int commands;
static int persists;
static ddp_result persist_result = DDP_OK;
static ddp_client client;

static void on_command(void *ctx, const char *action, size_t alen, const char *params, size_t plen) {
    (void)ctx;
    CHECK_EQ_INT(strlen(action), alen);
    snprintf(last_action, sizeof last_action, "%s", action);
    snprintf(last_params, sizeof last_params, "%.*s", (int)plen, params);
    commands++;
    if (strcmp(action, "echo") == 0) CHECK_EQ_INT(ddp_set(&client, "echoed", "true"), DDP_OK);
}
static ddp_result persist(void *ctx, const ddp_mirror *m) {
    (void)ctx;
    (void)m;
    persists++;
    return persist_result;
}

DDP_MIRROR_STORAGE(st, 8, 32, 64);
static ddp_token toks[DDP_TOKENS_FOR(8, 64)];
static char tx[256];

static ddp_config config(void) {
    ddp_config c;
    memset(&c, 0, sizeof c);
    c.device_id = 42;
    c.transport.publish = t_publish;
    c.transport.subscribe = t_subscribe;
    c.callbacks.on_command = on_command;
    c.callbacks.persist = persist;
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(st, 8, 32, 64);
    c.storage = s;
    c.tokens = toks;
    c.max_tokens = sizeof toks / sizeof toks[0];
    c.tx_buf = tx;
    c.tx_size = sizeof tx;
    c.write_qos = 1;
    c.auto_ack = true;
    return c;
}

static void reset(void) {
    npubs = 0;
    nsubs = 0;
    commands = 0;
    persists = 0;
    fail_transport = 0;
    persist_result = DDP_OK;
    ddp_config c = config();
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_OK);
}

static ddp_result kv(const char *msg) { return ddp_on_message(&client, "/devices/42/kv", msg, strlen(msg)); }
static ddp_result cmd(const char *msg) { return ddp_on_message(&client, "/devices/42/command", msg, strlen(msg)); }

static void init_validates_config(void) {
    ddp_config c = config();
    c.device_id = 0;
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_ERR_ARG);
    c = config();
    c.transport.publish = NULL;
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_ERR_ARG);
    c = config();
    c.write_qos = 2;
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_ERR_ARG);
    c = config();
    c.tx_size = 10;
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_ERR_ARG);
    c = config();
    c.storage.value_max = 0;
    CHECK_EQ_INT(ddp_init(&client, &c), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_init(NULL, &c), DDP_ERR_ARG);
}

static void subscribes_kv_and_command(void) {
    reset();
    CHECK_EQ_INT(ddp_subscribe(&client), DDP_OK);
    CHECK_EQ_INT(nsubs, 2);
    CHECK_STR(subs[0], "/devices/42/kv");
    CHECK_STR(subs[1], "/devices/42/command");
    fail_transport = 1;
    CHECK_EQ_INT(ddp_subscribe(&client), DDP_ERR_TRANSPORT);
}

static void kv_messages_apply_persist_and_ack(void) {
    reset();
    CHECK_EQ_INT(kv("{\"action\":\"reload\",\"rev\":3,\"items\":[{\"key\":\"a\",\"value\":1}]}"), DDP_OK);
    CHECK_EQ_INT(persists, 1);
    CHECK_EQ_INT(npubs, 1);
    CHECK_STR(pubs[0].topic, "/devices/42/kv");
    CHECK_STR(pubs[0].payload, "{\"action\":\"ack\",\"rev\":3}");
    CHECK_EQ_INT(pubs[0].qos, 1);
    CHECK_STR(ddp_mirror_get(ddp_client_mirror(&client), "a", NULL, NULL), "1");
    /* stale: no persist, no ack */
    CHECK_EQ_INT(kv("{\"action\":\"set\",\"rev\":2,\"key\":\"a\",\"value\":2}"), DDP_STALE);
    CHECK_EQ_INT(persists, 1);
    CHECK_EQ_INT(npubs, 1);
    /* bad: an error, nothing published */
    CHECK_EQ_INT(kv("{\"action\":\"set\",\"rev\":4"), DDP_ERR_JSON);
    CHECK_EQ_INT(npubs, 1);
    /* a persist that fails: applied in RAM, not acknowledged */
    persist_result = DDP_ERR_PERSIST;
    CHECK_EQ_INT(kv("{\"action\":\"set\",\"rev\":4,\"key\":\"a\",\"value\":4}"), DDP_ERR_PERSIST);
    CHECK_EQ_INT(npubs, 1);
    persist_result = DDP_OK;
    CHECK_EQ_INT(ddp_ack(&client), DDP_OK);
    CHECK_STR(pubs[1].payload, "{\"action\":\"ack\",\"rev\":4}");
    CHECK_EQ_INT(ddp_ack(&client), DDP_IGNORED); /* nothing new */
    /* other topics */
    CHECK_EQ_INT(ddp_on_message(&client, "/devices/42/kvx", "{}", 2), DDP_IGNORED);
    CHECK_EQ_INT(ddp_on_message(&client, "/devices/43/kv", "{}", 2), DDP_IGNORED);
    CHECK_EQ_INT(ddp_on_message(&client, "/devices/42/k", "{}", 2), DDP_IGNORED);
    CHECK_EQ_INT(ddp_on_message_n(&client, "/devices/42/kv////", 14, "{\"action\":\"resume\",\"rev\":4}", 27), DDP_IGNORED);
    CHECK_EQ_INT(ddp_on_message(&client, NULL, "{}", 2), DDP_ERR_ARG);
    /* a transport failing on the ack */
    fail_transport = 1;
    CHECK_EQ_INT(kv("{\"action\":\"set\",\"rev\":5,\"key\":\"a\",\"value\":5}"), DDP_ERR_TRANSPORT);
}

static void writes_are_encoded(void) {
    reset();
    CHECK_EQ_INT(ddp_set(&client, "temp.c:1", " { \"a\" : [ 1 , \"x y\" ] } "), DDP_OK);
    CHECK_STR(pubs[0].payload, "{\"action\":\"set\",\"key\":\"temp.c:1\",\"value\":{\"a\":[1,\"x y\"]}}");
    CHECK_STR(pubs[0].topic, "/devices/42/kv");
    CHECK_EQ_INT(pubs[0].qos, 1);
    CHECK_EQ_INT(ddp_set(&client, "s", "\"quote\\\" and \\\\\""), DDP_OK);
    CHECK_STR(pubs[1].payload, "{\"action\":\"set\",\"key\":\"s\",\"value\":\"quote\\\" and \\\\\"}");
    CHECK_EQ_INT(ddp_delete(&client, "temp"), DDP_OK);
    CHECK_STR(pubs[2].payload, "{\"action\":\"delete\",\"key\":\"temp\"}");
    CHECK_EQ_INT(npubs, 3);
    /* refused locally, nothing published */
    CHECK_EQ_INT(ddp_set(&client, "a b", "1"), DDP_ERR_INVALID_KEY);
    CHECK_EQ_INT(ddp_set(&client, "", "1"), DDP_ERR_INVALID_KEY);
    CHECK_EQ_INT(ddp_set(&client, "k\"", "1"), DDP_ERR_INVALID_KEY);
    CHECK_EQ_INT(ddp_set(&client, "k", "null"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(ddp_set(&client, "k", "{\"a\":"), DDP_ERR_JSON);
    CHECK_EQ_INT(ddp_set(&client, "k", ""), DDP_ERR_JSON);
    CHECK_EQ_INT(ddp_set(&client, "k", NULL), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_set(&client, NULL, "1"), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_delete(&client, "x/y"), DDP_ERR_INVALID_KEY);
    char longkey[300];
    memset(longkey, 'k', 256);
    longkey[256] = '\0';
    CHECK_EQ_INT(ddp_delete(&client, longkey), DDP_ERR_INVALID_KEY);
    longkey[255] = '\0';
    CHECK_EQ_INT(ddp_delete(&client, longkey), DDP_ERR_BUFFER_TOO_SMALL); /* 255 + 30 > 256 */
    char bigval[400];
    memset(bigval, '1', sizeof bigval - 1);
    bigval[sizeof bigval - 1] = '\0';
    CHECK_EQ_INT(ddp_set(&client, "k", bigval), DDP_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_INT(npubs, 3);
    CHECK(tx[sizeof tx - 1] == '\0' || 1);
    fail_transport = 1;
    CHECK_EQ_INT(ddp_set(&client, "k", "1"), DDP_ERR_TRANSPORT);
}

static void events_are_encoded(void) {
    reset();
    CHECK_EQ_INT(ddp_send_event(&client, "door\"open\n\x01", "{ \"n\" : 1 }"), DDP_OK);
    CHECK_STR(pubs[0].topic, "/devices/42/event");
    CHECK_STR(pubs[0].payload, "{\"eventType\":\"door\\\"open\\n\\u0001\",\"eventData\":{\"n\":1}}");
    CHECK_EQ_INT(ddp_send_event(&client, "boot", NULL), DDP_OK);
    CHECK_STR(pubs[1].payload, "{\"eventType\":\"boot\",\"eventData\":{}}");
    CHECK_EQ_INT(ddp_send_event(&client, "", NULL), DDP_ERR_ARG);
    CHECK_EQ_INT(ddp_send_event(&client, "x", "[1,"), DDP_ERR_JSON);
}

static void commands_are_delivered(void) {
    reset();
    CHECK_EQ_INT(cmd("{\"action\":\"reboot\",\"parameters\":{\"delay\": 5, \"big\":12345678901234567890}}"), DDP_OK);
    CHECK_EQ_INT(commands, 1);
    CHECK_STR(last_action, "reboot");
    CHECK_STR(last_params, "{\"delay\": 5, \"big\":12345678901234567890}");
    CHECK_EQ_INT(cmd("{\"action\":\"re\\u0062oot\"}"), DDP_OK);
    CHECK_STR(last_action, "reboot");
    CHECK_STR(last_params, "{}");
    CHECK_EQ_INT(cmd("{\"action\":\"x\",\"parameters\":null}"), DDP_OK);
    CHECK_STR(last_params, "{}");
    /* a command handler may write */
    CHECK_EQ_INT(cmd("{\"action\":\"echo\",\"parameters\":{}}"), DDP_OK);
    CHECK_STR(pubs[0].payload, "{\"action\":\"set\",\"key\":\"echoed\",\"value\":true}");
    /* many members: more than the stack scratch */
    char many[1024];
    size_t n = (size_t)snprintf(many, sizeof many, "{\"action\":\"wide\"");
    for (int i = 0; i < 30; i++) n += (size_t)snprintf(many + n, sizeof many - n, ",\"f%d\":%d", i, i);
    snprintf(many + n, sizeof many - n, ",\"parameters\":{\"a\":[1]}}");
    CHECK_EQ_INT(cmd(many), DDP_OK);
    CHECK_STR(last_action, "wide");
    CHECK_STR(last_params, "{\"a\":[1]}");
    int before = commands;
    CHECK_EQ_INT(cmd("{\"parameters\":{}}"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(cmd("{\"action\":7}"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(cmd("{\"action\":\"\"}"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(cmd("{\"action\":\"x\",\"parameters\":[1]}"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(cmd("[\"x\"]"), DDP_ERR_BAD_MESSAGE);
    CHECK_EQ_INT(cmd("{\"action\":\"x\""), DDP_ERR_JSON);
    CHECK_EQ_INT(cmd(""), DDP_ERR_JSON);
    char longact[400];
    n = (size_t)snprintf(longact, sizeof longact, "{\"action\":\"");
    memset(longact + n, 'a', 256);
    snprintf(longact + n + 256, sizeof longact - n - 256, "\"}");
    CHECK_EQ_INT(cmd(longact), DDP_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ_INT(commands, before);
}

static void buffer_size_contract(void) {
    reset();
    size_t max = ddp_max_message_size(&client);
    /* 8 items of 32-byte keys and 64-byte values, modificationTime, 20-digit numbers */
    CHECK(max >= 8u * (32u + 64u + 60u) + 60u);
    CHECK_EQ_INT(ddp_max_packet_size(&client), max + 5 + 2 + strlen("/devices/42/command") + 2 + 16);
    char big[4096];
    CHECK(max < sizeof big);
    memset(big, ' ', sizeof big);
    memcpy(big, "{\"action\":\"resume\",\"rev\":1}", 27);
    CHECK_EQ_INT(ddp_on_message(&client, "/devices/42/kv", big, max), DDP_IGNORED);
    CHECK_EQ_INT(ddp_on_message(&client, "/devices/42/kv", big, max + 1), DDP_ERR_MESSAGE_TOO_LARGE);
}

int main(void) {
    RUN(init_validates_config);
    RUN(subscribes_kv_and_command);
    RUN(kv_messages_apply_persist_and_ack);
    RUN(writes_are_encoded);
    RUN(events_are_encoded);
    RUN(commands_are_delivered);
    RUN(buffer_size_contract);
    DONE();
}
