/*
 * ddp.h - the Device Data Proxy device library for microcontrollers (C99).
 *
 * A device keeps a live local mirror of its cloud key-value store (docs/PROTOCOL.md §4) over the
 * MQTT client it already has. This library:
 *   - parses the sync messages (reload, set, delete, resume, batch) with its own bounded JSON
 *     tokenizer and applies them to a fixed-size mirror table with the rules of the Rust SDK's
 *     mirror (per-key revs, tombstones, reload replaces, batches all or nothing);
 *   - builds the topics and the payloads the device sends (writes, acks, events);
 *   - delivers commands (§8).
 *
 * Principles: no heap (every byte is a caller buffer or inside the structs below), no threads, no
 * global state, no dependency beyond <stddef.h> <stdint.h> <stdbool.h> <string.h>. Not thread
 * safe: call every function of one client from one thread (or under one lock).
 *
 * Errors: every fallible function returns a ddp_result. DDP_OK, DDP_IGNORED and DDP_STALE are
 * not errors (ddp_is_error() is false); on any error the mirror is unchanged.
 */
#ifndef DDP_DDP_H
#define DDP_DDP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------------------------ */
/* Compile-time knobs (define them the same for the library and the application, e.g. through  */
/* CMake's target_compile_definitions(ddp PUBLIC ...)).                                        */

/** Revs that arrived ahead of a gap, remembered until the gap fills (see ddp_mirror_rev()). */
#ifndef DDP_AHEAD_MAX
#define DDP_AHEAD_MAX 8
#endif

/** Longest command action the client decodes (PROTOCOL.md §8 allows 255). */
#ifndef DDP_ACTION_MAX
#define DDP_ACTION_MAX 255
#endif

/** Deepest JSON nesting accepted (values may nest 32 levels, §2; messages add 3). */
#define DDP_JSON_MAX_DEPTH 64

/** Size of a topic buffer that holds any topic: "/devices/" + 20 digits + "/command" + NUL. */
#define DDP_TOPIC_MAX 40

/** Defaults documented in README.md: a 32-key mirror of keys up to 64 bytes, values up to 256. */
#define DDP_DEFAULT_CAPACITY 32
#define DDP_DEFAULT_KEY_MAX 64
#define DDP_DEFAULT_VALUE_MAX 256

/* ------------------------------------------------------------------------------------------ */
/* Results                                                                                      */

typedef enum ddp_result {
    DDP_OK = 0,                /**< done (a message applied, a payload published, ...) */
    DDP_IGNORED = 1,           /**< a well-formed message with nothing to apply: "resume",
                                    "error", "command" on the kv topic, an unknown action, a
                                    message on another topic, an ack with nothing new */
    DDP_STALE = 2,             /**< a well-formed message older than what the mirror knows */
    DDP_ERR_ARG = 3,           /**< a NULL pointer or an unusable argument / configuration */
    DDP_ERR_JSON = 4,          /**< not well-formed JSON (also: truncated) */
    DDP_ERR_TOO_MANY_TOKENS = 5, /**< the token array is too small for this message */
    DDP_ERR_TOO_DEEP = 6,      /**< nested deeper than DDP_JSON_MAX_DEPTH */
    DDP_ERR_BAD_MESSAGE = 7,   /**< JSON, but not a sync message: a missing field, a wrong type,
                                    a rev that is not an unsigned 64-bit integer, a null value */
    DDP_ERR_INVALID_KEY = 8,   /**< a key breaking §3's rule: 1-255 bytes of A-Z a-z 0-9 _ - : . */
    DDP_ERR_KEY_TOO_LONG = 9,  /**< longer than the mirror's key_max */
    DDP_ERR_VALUE_TOO_LARGE = 10, /**< minified value longer than the mirror's value_max */
    DDP_ERR_MIRROR_FULL = 11,  /**< the message needs more entries than the mirror has */
    DDP_ERR_MESSAGE_TOO_LARGE = 12, /**< longer than ddp_max_message_size() */
    DDP_ERR_BUFFER_TOO_SMALL = 13,  /**< an output buffer (topic, tx, blob) is too small */
    DDP_ERR_TRANSPORT = 14,    /**< the transport's publish or subscribe returned non-zero */
    DDP_ERR_PERSIST = 15,      /**< the persist callback failed (the mirror is applied in RAM) */
    DDP_ERR_BAD_BLOB = 16      /**< a persisted blob that is truncated, corrupt or does not fit */
} ddp_result;

/** Whether r is an error (anything but DDP_OK, DDP_IGNORED, DDP_STALE). */
bool ddp_is_error(ddp_result r);
/** A constant name for r ("DDP_ERR_JSON"), for logs. */
const char *ddp_result_name(ddp_result r);

/* ------------------------------------------------------------------------------------------ */
/* JSON: a strict (RFC 8259), bounded, jsmn-style tokenizer                                    */

/**
 * A token: the byte range [start, end) of one JSON element in the text. Strings include their
 * quotes. The type is the first byte: '{' object, '[' array, '"' string, 't'/'f' boolean,
 * 'n' null, anything else a number. Tokens come in document order (a parent before its
 * children); the children of a token are the tokens after it that start before its end.
 */
typedef struct ddp_token {
    uint32_t start;
    uint32_t end;
} ddp_token;

/**
 * Validates the whole text as one JSON value and records a token for every element nested at
 * most max_depth deep (the top-level value is depth 0, its members/elements depth 1, ...).
 * Deeper elements are validated but get no token, so a value's inside costs nothing.
 * max_depth <= 7. On success *count is the number of tokens written.
 */
ddp_result ddp_json_tokenize(const char *json, size_t len, ddp_token *tokens, size_t max_tokens,
                             unsigned max_depth, size_t *count);

/** Copies well-formed JSON text without insignificant white space into dst (NUL-terminated
 *  when it fits). *out_len is the minified length. DDP_ERR_JSON if src is not one JSON value. */
ddp_result ddp_json_minify(const char *src, size_t len, char *dst, size_t dst_size, size_t *out_len);

/* ------------------------------------------------------------------------------------------ */
/* Topics                                                                                       */

typedef enum ddp_topic_kind { DDP_TOPIC_KV, DDP_TOPIC_COMMAND, DDP_TOPIC_EVENT } ddp_topic_kind;

/** Writes "/devices/{id}/kv" (or /command, /event) into buf, NUL-terminated;
 *  DDP_ERR_BUFFER_TOO_SMALL (buf left empty if size > 0) when it does not fit. */
ddp_result ddp_topic(uint64_t device_id, ddp_topic_kind kind, char *buf, size_t size, size_t *out_len);

/* ------------------------------------------------------------------------------------------ */
/* The mirror                                                                                   */

/** One slot of the mirror table (16 bytes). Treat as opaque. */
typedef struct ddp_entry {
    uint64_t rev;       /**< the rev the key was learnt at */
    uint32_t value_len; /**< length of the value text */
    uint16_t key_len;   /**< 0: a free slot */
    uint8_t flags;      /**< bit 0: live (holds a value); clear: a tombstone */
    uint8_t reserved;
} ddp_entry;

/** The caller's memory for a mirror: capacity entries, capacity * (key_max + 1) key bytes and
 *  capacity * (value_max + 1) value bytes (texts are stored NUL-terminated). */
typedef struct ddp_mirror_storage {
    ddp_entry *entries;
    char *keys;
    char *values;
    size_t capacity;  /**< entries (live keys plus tombstones still needed); 1..65535 */
    size_t key_max;   /**< longest key in bytes, 1..65535 (the protocol's keys are <= 255, so
                           more than 255 is wasted) */
    size_t value_max; /**< longest minified value text in bytes, 1..(UINT32_MAX - 1) */
} ddp_mirror_storage;

/** Declares (static) storage for a mirror; pass DDP_MIRROR_STORAGE_INIT(name, ...) to init. */
#define DDP_MIRROR_STORAGE(name, capacity, key_max, value_max)                                 \
    static ddp_entry name##_entries[(capacity)];                                                \
    static char name##_keys[(size_t)(capacity) * ((size_t)(key_max) + 1u)];                    \
    static char name##_values[(size_t)(capacity) * ((size_t)(value_max) + 1u)]
#define DDP_MIRROR_STORAGE_INIT(name, capacity, key_max, value_max)                            \
    { name##_entries, name##_keys, name##_values, (capacity), (key_max), (value_max) }

/** Tokens enough for a reload of `capacity` items and for a set of a value_max value. */
#define DDP_TOKENS_FOR(capacity, value_max)                                                     \
    ((16u + 7u * (size_t)(capacity)) > (16u + ((size_t)(value_max) + 1u) / 2u)                  \
         ? (16u + 7u * (size_t)(capacity))                                                       \
         : (16u + ((size_t)(value_max) + 1u) / 2u))

/** The mirror. Fields are private; use the functions. */
typedef struct ddp_mirror {
    ddp_entry *entries;
    char *keys;
    char *values;
    size_t capacity;
    size_t key_max;
    size_t value_max;
    uint64_t rev;                 /**< every change up to rev has been seen */
    uint64_t ahead[DDP_AHEAD_MAX]; /**< revs above rev already seen, unsorted */
    uint8_t ahead_count;
    bool synced;                  /**< a reload was applied, or a blob was loaded */
} ddp_mirror;

/** A change the mirror applied, as handed to on_change. Pointers are valid during the call. */
typedef struct ddp_change {
    const char *key;   /**< NUL-terminated */
    size_t key_len;
    const char *value; /**< the value's minified JSON text, NUL-terminated; NULL when deleted */
    size_t value_len;
    uint64_t rev;      /**< the change's rev (a reload's rev for reloaded keys) */
    bool deleted;
    bool from_reload;  /**< came from a reload (else a live set/delete/batch) */
} ddp_change;

/**
 * What the device hears. Every member may be NULL. They run inside ddp_on_message() /
 * ddp_mirror_apply(), after the whole message has been validated (it will be applied
 * completely): do not modify the mirror from them. ddp_set() and friends may be called.
 */
typedef struct ddp_callbacks {
    void *ctx;
    /** A key got a new value or was deleted (keys whose value did not change are not told). */
    void (*on_change)(void *ctx, const ddp_change *change);
    /** A reload at rev was applied (after its on_change calls). */
    void (*on_reload)(void *ctx, uint64_t rev);
    /** A command arrived on /devices/{id}/command. action is NUL-terminated (decoded);
     *  parameters is the object's JSON text exactly as sent ("{}" when absent), not terminated. */
    void (*on_command)(void *ctx, const char *action, size_t action_len, const char *parameters,
                       size_t parameters_len);
    /** Called by ddp_on_message() (not by ddp_mirror_apply()) after every message that changed
     *  the mirror (content or rev), once it is fully applied:
     *  save it (ddp_mirror_save() into your blob, or the keys on_change told you). Return DDP_OK
     *  when it is durable; the client acknowledges (auto_ack) only then. */
    ddp_result (*persist)(void *ctx, const ddp_mirror *mirror);
} ddp_callbacks;

/** Prepares an empty mirror at rev 0 over the caller's storage (which it clears). */
ddp_result ddp_mirror_init(ddp_mirror *m, const ddp_mirror_storage *storage);
/** Empties the mirror (rev 0, not synced). */
void ddp_mirror_clear(ddp_mirror *m);

/**
 * Applies one sync message (the payload of the kv topic): reload, set, delete, resume, batch.
 * tokens/max_tokens: scratch for the tokenizer (DDP_TOKENS_FOR()). Returns DDP_OK when it
 * changed the mirror (a value, a tombstone or the rev; on_change is told only of values that
 * changed), DDP_STALE when it is older than what the mirror knows, DDP_IGNORED for resume and the
 * actions the mirror does not handle, or an error with the mirror unchanged. Calls on_change and
 * on_reload of cb (NULL for none); persist is the client's business (ddp_on_message).
 */
ddp_result ddp_mirror_apply(ddp_mirror *m, const char *payload, size_t len, ddp_token *tokens,
                            size_t max_tokens, const ddp_callbacks *cb);

/** The rev up to which the mirror has seen every change (what it acknowledges). */
uint64_t ddp_mirror_rev(const ddp_mirror *m);
/** Whether a reload was applied (or a persisted mirror loaded) since init/clear. */
bool ddp_mirror_synced(const ddp_mirror *m);
/** How many keys hold a value. */
size_t ddp_mirror_count(const ddp_mirror *m);
/** The value text of key (NUL-terminated), or NULL. *value_len and *rev may be NULL. */
const char *ddp_mirror_get(const ddp_mirror *m, const char *key, size_t *value_len, uint64_t *rev);

/** An item, for iteration. */
typedef struct ddp_item {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
    uint64_t rev;
} ddp_item;
/** Iterates the live keys (table order): start with *iter = 0; false at the end. */
bool ddp_mirror_next(const ddp_mirror *m, size_t *iter, ddp_item *out);

/** Largest sync message the mirror can use: a reload of every entry at key_max/value_max
 *  (bounded by what max_tokens tokens can parse). See README "buffer-size contract". */
size_t ddp_mirror_max_message_size(const ddp_mirror *m, size_t max_tokens);

/* Persistence as one opaque blob (ESP-IDF nvs_set_blob, Zephyr settings_save_one, a file). */
/** Bytes ddp_mirror_save() needs for the current content. */
size_t ddp_mirror_blob_size(const ddp_mirror *m);
/** Writes the mirror (entries, tombstones, rev) into buf; *out_len its length. */
ddp_result ddp_mirror_save(const ddp_mirror *m, uint8_t *buf, size_t size, size_t *out_len);
/** Replaces the mirror by a blob from ddp_mirror_save(); validated first (checksum, sizes,
 *  capacity, JSON of every value): DDP_ERR_BAD_BLOB and the mirror unchanged if it fails. */
ddp_result ddp_mirror_load(ddp_mirror *m, const uint8_t *blob, size_t len);

/* Persistence entry by entry (NVS keys, Zephyr settings subtrees): save what on_change tells you
 * and the rev from persist(); at boot, restore every entry, then the rev. */
/** Puts one live key back (value: its JSON text, validated and minified). */
ddp_result ddp_mirror_restore_entry(ddp_mirror *m, const char *key, size_t key_len, const char *value,
                                    size_t value_len, uint64_t rev);
/** Sets the rev after restoring entries, and marks the mirror synced. */
void ddp_mirror_restore_rev(ddp_mirror *m, uint64_t rev);

/* ------------------------------------------------------------------------------------------ */
/* The client: a mirror plus the device's MQTT connection                                      */

/** The device's own MQTT client. Return 0 on success. Topics are NUL-terminated. */
typedef struct ddp_transport {
    void *ctx;
    int (*publish)(void *ctx, const char *topic, const uint8_t *payload, size_t len, int qos);
    int (*subscribe)(void *ctx, const char *topic, int qos);
} ddp_transport;

typedef struct ddp_config {
    uint64_t device_id;
    ddp_transport transport;
    ddp_callbacks callbacks;
    ddp_mirror_storage storage;
    ddp_token *tokens;      /**< tokenizer scratch: DDP_TOKENS_FOR(capacity, value_max) tokens */
    size_t max_tokens;
    char *tx_buf;           /**< where outgoing payloads are built */
    size_t tx_size;
    int write_qos;          /**< QoS of writes, acks and events: 0 or 1 */
    bool auto_ack;          /**< publish {"action":"ack","rev":N} after each applied message
                                 (and after persist() returned DDP_OK) */
} ddp_config;

/** The client (about 500 bytes plus the mirror's storage). Fields are private. */
typedef struct ddp_client {
    ddp_mirror mirror;
    ddp_transport transport;
    ddp_callbacks callbacks;
    ddp_token *tokens;
    size_t max_tokens;
    char *tx_buf;
    size_t tx_size;
    uint64_t device_id;
    uint64_t acked_rev;
    int write_qos;
    bool auto_ack;
    char topic_kv[DDP_TOPIC_MAX];
    char topic_command[DDP_TOPIC_MAX];
    char topic_event[DDP_TOPIC_MAX];
    char action[DDP_ACTION_MAX + 1];
} ddp_client;

/** Sets the client up (an empty mirror). Check the result: DDP_ERR_ARG names a bad config. */
ddp_result ddp_init(ddp_client *c, const ddp_config *config);
/** Subscribes to /devices/{id}/kv and /devices/{id}/command (QoS 0). Call after every CONNACK. */
ddp_result ddp_subscribe(ddp_client *c);
/** Feeds an incoming PUBLISH (NUL-terminated topic). Kv: ddp_mirror_apply() semantics, then
 *  persist and ack. Command: on_command. Another topic: DDP_IGNORED. */
ddp_result ddp_on_message(ddp_client *c, const char *topic, const void *payload, size_t len);
/** The same with a topic given by length (esp-mqtt, Zephyr). */
ddp_result ddp_on_message_n(ddp_client *c, const char *topic, size_t topic_len, const void *payload,
                            size_t len);

/** Publishes {"action":"set","key":key,"value":value} (value: JSON text, not null; it is
 *  validated and minified). The mirror changes when the server's echo arrives. */
ddp_result ddp_set(ddp_client *c, const char *key, const char *json_value);
/** Publishes {"action":"delete","key":key}. */
ddp_result ddp_delete(ddp_client *c, const char *key);
/** Publishes {"action":"ack","rev":N} for the mirror's rev if it is above the last ack. */
ddp_result ddp_ack(ddp_client *c);
/** Publishes {"eventType":type,"eventData":data} on /devices/{id}/event (data: JSON text,
 *  NULL for {}). */
ddp_result ddp_send_event(ddp_client *c, const char *event_type, const char *json_data);

/** The client's mirror, for reading (ddp_mirror_get/next/rev) and persistence. */
ddp_mirror *ddp_client_mirror(ddp_client *c);
/** Largest kv payload the client can take (ddp_mirror_max_message_size with its tokens). */
size_t ddp_max_message_size(const ddp_client *c);
/** Largest MQTT PUBLISH packet that carries it (fixed header, topic, packet id, and 16 bytes
 *  for MQTT 5 properties): announce it as MQTT 5 Maximum Packet Size. */
size_t ddp_max_packet_size(const ddp_client *c);

#ifdef __cplusplus
}
#endif

#endif /* DDP_DDP_H */
