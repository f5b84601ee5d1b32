/* A Linux device on libmosquitto: connects with username = device id and password = device key,
 * subscribes to its kv and command topics, prints the mirror as it changes, and takes commands
 * on stdin:
 *   set KEY JSON      publish a write       delete KEY     publish a delete
 *   ack               publish an ack        print          print the mirror
 *   quit
 * Output lines (stdout, line-buffered): "reload REV", "change KEY VALUE REV" ("-" when deleted),
 * "command ACTION PARAMS", "result WHAT RESULT".
 * Usage: linux_device HOST PORT DEVICE_ID DEVICE_KEY */
#define _POSIX_C_SOURCE 200809L
#include <inttypes.h>
#include <mosquitto.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ddp/ddp.h"

DDP_MIRROR_STORAGE(kv, 32, 64, 256);
static ddp_token tokens[DDP_TOKENS_FOR(32, 256)];
static char tx[1024];
static ddp_client ddp;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int t_publish(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos) {
    return mosquitto_publish((struct mosquitto *)ctx, NULL, topic, (int)len, payload, qos, false) == MOSQ_ERR_SUCCESS ? 0 : -1;
}
static int t_subscribe(void *ctx, const char *topic, int qos) {
    return mosquitto_subscribe((struct mosquitto *)ctx, NULL, topic, qos) == MOSQ_ERR_SUCCESS ? 0 : -1;
}

static void on_change(void *ctx, const ddp_change *c) {
    (void)ctx;
    printf("change %s %s %" PRIu64 "\n", c->key, c->deleted ? "-" : c->value, c->rev);
}
static void on_reload(void *ctx, uint64_t rev) {
    (void)ctx;
    printf("reload %" PRIu64 "\n", rev);
}
static void on_command(void *ctx, const char *action, size_t alen, const char *params, size_t plen) {
    (void)ctx;
    (void)alen;
    printf("command %s %.*s\n", action, (int)plen, params);
}

static void on_connect(struct mosquitto *m, void *obj, int rc) {
    (void)m;
    (void)obj;
    if (rc != 0) {
        fprintf(stderr, "connect refused: %s\n", mosquitto_connack_string(rc));
        exit(2);
    }
    pthread_mutex_lock(&lock);
    printf("result subscribe %s\n", ddp_result_name(ddp_subscribe(&ddp)));
    pthread_mutex_unlock(&lock);
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg) {
    (void)m;
    (void)obj;
    pthread_mutex_lock(&lock);
    ddp_result r = ddp_on_message(&ddp, msg->topic, msg->payload, (size_t)msg->payloadlen);
    if (ddp_is_error(r)) printf("result message %s\n", ddp_result_name(r));
    pthread_mutex_unlock(&lock);
}

static void print_mirror(void) {
    size_t it = 0;
    ddp_item item;
    printf("mirror rev %" PRIu64 "\n", ddp_mirror_rev(ddp_client_mirror(&ddp)));
    while (ddp_mirror_next(ddp_client_mirror(&ddp), &it, &item)) printf("  %s = %s\n", item.key, item.value);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s HOST PORT DEVICE_ID DEVICE_KEY\n", argv[0]);
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(NULL, true, NULL);
    if (!m) return 1;
    ddp_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.device_id = strtoull(argv[3], NULL, 10);
    cfg.transport.ctx = m;
    cfg.transport.publish = t_publish;
    cfg.transport.subscribe = t_subscribe;
    cfg.callbacks.on_change = on_change;
    cfg.callbacks.on_reload = on_reload;
    cfg.callbacks.on_command = on_command;
    ddp_mirror_storage s = DDP_MIRROR_STORAGE_INIT(kv, 32, 64, 256);
    cfg.storage = s;
    cfg.tokens = tokens;
    cfg.max_tokens = sizeof tokens / sizeof tokens[0];
    cfg.tx_buf = tx;
    cfg.tx_size = sizeof tx;
    cfg.write_qos = 1;
    cfg.auto_ack = true;
    ddp_result r = ddp_init(&ddp, &cfg);
    if (r != DDP_OK) {
        fprintf(stderr, "ddp_init: %s\n", ddp_result_name(r));
        return 1;
    }
    mosquitto_username_pw_set(m, argv[3], argv[4]);
    mosquitto_connect_callback_set(m, on_connect);
    mosquitto_message_callback_set(m, on_message);
    if (mosquitto_connect(m, argv[1], atoi(argv[2]), 30) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "cannot connect to %s:%s\n", argv[1], argv[2]);
        return 1;
    }
    mosquitto_loop_start(m);
    char line[1024];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = '\0';
        char *cmd = strtok(line, " ");
        if (!cmd) continue;
        pthread_mutex_lock(&lock);
        if (strcmp(cmd, "set") == 0) {
            char *key = strtok(NULL, " ");
            char *json = strtok(NULL, "");
            printf("result set %s\n", ddp_result_name(ddp_set(&ddp, key ? key : "", json ? json : "")));
        } else if (strcmp(cmd, "delete") == 0) {
            char *key = strtok(NULL, " ");
            printf("result delete %s\n", ddp_result_name(ddp_delete(&ddp, key ? key : "")));
        } else if (strcmp(cmd, "ack") == 0) {
            printf("result ack %s\n", ddp_result_name(ddp_ack(&ddp)));
        } else if (strcmp(cmd, "print") == 0) {
            print_mirror();
        } else if (strcmp(cmd, "quit") == 0) {
            pthread_mutex_unlock(&lock);
            break;
        }
        pthread_mutex_unlock(&lock);
    }
    mosquitto_disconnect(m);
    mosquitto_loop_stop(m, false);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    return 0;
}
