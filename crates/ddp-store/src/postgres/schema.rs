//! The PostgreSQL schema, its migrations (safe when several nodes start at once), and the
//! function that does a key-value write in one round trip.

use deadpool_postgres::Client;

use crate::StoreError;
use crate::fleet::{Dialect, ValueIndex};

/// Key used to hold an advisory lock while migrating, so concurrent starts take turns.
const MIGRATION_LOCK: i64 = 0x0DD9_5C4E_4D41;

/// One migration per entry; `ddp_schema.version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE settings (name TEXT PRIMARY KEY, value BYTEA NOT NULL);
CREATE TABLE homes (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE TABLE devices (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                TEXT NOT NULL,
    home_id             BIGINT,
    device_class        TEXT NOT NULL,
    tag                 TEXT NOT NULL,
    key_hash            BYTEA NOT NULL UNIQUE,
    created_ms          BIGINT NOT NULL,
    last_connect_ms     BIGINT,
    last_disconnect_ms  BIGINT
);
CREATE INDEX devices_by_home ON devices(home_id);
CREATE TABLE api_keys (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT NOT NULL,
    permission  TEXT NOT NULL,
    all_homes   BOOLEAN NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE,
    created_ms  BIGINT NOT NULL
);
CREATE TABLE api_key_homes (key_id BIGINT NOT NULL, home_id BIGINT NOT NULL, PRIMARY KEY (key_id, home_id));
CREATE INDEX api_key_homes_by_home ON api_key_homes(home_id);
-- kind: 0 device store, 1 home store. The row is locked by every write to the store, so revs
-- are assigned in commit order, whichever node writes.
CREATE TABLE stores (
    kind          SMALLINT NOT NULL,
    owner         BIGINT NOT NULL,
    rev           BIGINT NOT NULL,
    num_keys      INT NOT NULL,
    history_from  BIGINT NOT NULL,
    PRIMARY KEY (kind, owner)
);
CREATE TABLE items (
    kind         SMALLINT NOT NULL,
    owner        BIGINT NOT NULL,
    key          TEXT COLLATE "C" NOT NULL,
    value        TEXT NOT NULL,
    rev          BIGINT NOT NULL,
    modified_ms  BIGINT NOT NULL,
    PRIMARY KEY (kind, owner, key)
);
-- The change history, and the feed every node reads (by seq) to learn of changes.
CREATE TABLE changes (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         SMALLINT NOT NULL,
    owner        BIGINT NOT NULL,
    rev          BIGINT NOT NULL,
    key          TEXT NOT NULL,
    value        TEXT,
    modified_ms  BIGINT NOT NULL,
    home_id      BIGINT,
    origin_kind  SMALLINT NOT NULL,
    origin_id    BIGINT NOT NULL,
    UNIQUE (kind, owner, rev)
);
-- Admin changes and events, for the other nodes (kept briefly).
CREATE TABLE admin_log (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT NOT NULL,
    a           BIGINT,
    b           BIGINT,
    c           BIGINT,
    created_ms  BIGINT NOT NULL
);
CREATE TABLE event_log (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    home_id     BIGINT NOT NULL,
    json        TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
-- Live sessions per device and node. A node whose heartbeat (database clock) is older than
-- the liveness window no longer counts; its rows are reaped a while later.
CREATE TABLE nodes (id BIGINT PRIMARY KEY, name TEXT NOT NULL, heartbeat TIMESTAMPTZ NOT NULL);
CREATE TABLE presence (
    device_id  BIGINT NOT NULL,
    node_id    BIGINT NOT NULL,
    sessions   INT NOT NULL,
    PRIMARY KEY (device_id, node_id)
);

-- One key-value write, in one round trip. Locking the store row orders writers to one store, so
-- within a store, change rows get increasing seqs in rev order and become visible in that order. p_value NULL is a delete. p_cond: 0 none,
-- 1 rev in p_revs, 2 exists, 3 absent. Returns the outcome, the new rev, the home at commit
-- and the key's rev before the write.
CREATE FUNCTION ddp_kv_write(
    p_kind SMALLINT, p_owner BIGINT, p_key TEXT, p_value TEXT, p_cond SMALLINT, p_revs BIGINT[],
    p_max_keys INT, p_origin_kind SMALLINT, p_origin_id BIGINT, p_now BIGINT)
RETURNS TABLE (out_status TEXT, out_rev BIGINT, out_home BIGINT, out_current BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    v_rev BIGINT;
    v_num INT;
    v_cur BIGINT;
    v_new BIGINT;
    v_home BIGINT;
BEGIN
    SELECT s.rev, s.num_keys INTO v_rev, v_num FROM stores s WHERE s.kind = p_kind AND s.owner = p_owner FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_store'::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT;
        RETURN;
    END IF;
    SELECT i.rev INTO v_cur FROM items i WHERE i.kind = p_kind AND i.owner = p_owner AND i.key = p_key;
    IF (p_cond = 1 AND (v_cur IS NULL OR NOT (v_cur = ANY(p_revs))))
        OR (p_cond = 2 AND v_cur IS NULL)
        OR (p_cond = 3 AND v_cur IS NOT NULL) THEN
        RETURN QUERY SELECT 'mismatch'::TEXT, NULL::BIGINT, NULL::BIGINT, v_cur;
        RETURN;
    END IF;
    v_new := v_rev + 1;
    IF p_value IS NULL THEN
        IF v_cur IS NULL THEN
            RETURN QUERY SELECT 'no_key'::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT;
            RETURN;
        END IF;
        DELETE FROM items i WHERE i.kind = p_kind AND i.owner = p_owner AND i.key = p_key;
        v_num := v_num - 1;
    ELSE
        IF v_cur IS NULL AND v_num >= p_max_keys THEN
            RETURN QUERY SELECT 'too_many'::TEXT, NULL::BIGINT, NULL::BIGINT, NULL::BIGINT;
            RETURN;
        END IF;
        INSERT INTO items AS i (kind, owner, key, value, rev, modified_ms) VALUES (p_kind, p_owner, p_key, p_value, v_new, p_now)
            ON CONFLICT (kind, owner, key) DO UPDATE SET value = EXCLUDED.value, rev = EXCLUDED.rev, modified_ms = EXCLUDED.modified_ms;
        IF v_cur IS NULL THEN
            v_num := v_num + 1;
        END IF;
    END IF;
    IF p_kind = 0 THEN
        SELECT d.home_id INTO v_home FROM devices d WHERE d.id = p_owner;
    ELSE
        v_home := p_owner;
    END IF;
    INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id)
        VALUES (p_kind, p_owner, v_new, p_key, p_value, p_now, v_home, p_origin_kind, p_origin_id);
    UPDATE stores s SET rev = v_new, num_keys = v_num WHERE s.kind = p_kind AND s.owner = p_owner;
    RETURN QUERY SELECT 'ok'::TEXT, v_new, v_home, v_cur;
END $$;

-- Several writes in one transaction (one round trip, one commit): ddp_kv_write for each, in the
-- order given. Callers order a batch by store, so concurrent batches lock stores in the same
-- order and cannot deadlock. p_revs[i] is the comma-separated rev list of condition 1.
CREATE FUNCTION ddp_kv_write_batch(
    p_kinds SMALLINT[], p_owners BIGINT[], p_keys TEXT[], p_values TEXT[], p_conds SMALLINT[], p_revs TEXT[],
    p_max_keys INT[], p_origin_kinds SMALLINT[], p_origin_ids BIGINT[], p_now BIGINT)
RETURNS TABLE (out_idx INT, out_status TEXT, out_rev BIGINT, out_home BIGINT, out_current BIGINT)
LANGUAGE plpgsql AS $$
DECLARE
    i INT;
    r RECORD;
BEGIN
    FOR i IN 1..COALESCE(array_length(p_kinds, 1), 0) LOOP
        SELECT * INTO r FROM ddp_kv_write(p_kinds[i], p_owners[i], p_keys[i], p_values[i], p_conds[i],
            COALESCE(string_to_array(NULLIF(p_revs[i], ''), ',')::BIGINT[], '{}'::BIGINT[]), p_max_keys[i],
            p_origin_kinds[i], p_origin_ids[i], p_now);
        out_idx := i;
        out_status := r.out_status;
        out_rev := r.out_rev;
        out_home := r.out_home;
        out_current := r.out_current;
        RETURN NEXT;
    END LOOP;
END $$;

-- Admits a session of a device on a node if the device holds fewer than p_max over the live
-- nodes. Returns 'first', 'more', 'refused' or 'no_device'. Presence is soft state: its commits
-- do not wait for the disk.
CREATE FUNCTION ddp_session_open(p_device BIGINT, p_node BIGINT, p_max INT, p_now BIGINT, p_alive_ms BIGINT)
RETURNS TABLE (out_status TEXT, out_home BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    v_total BIGINT;
    v_home BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT d.home_id INTO v_home FROM devices d WHERE d.id = p_device FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_device'::TEXT, NULL::BIGINT;
        RETURN;
    END IF;
    SELECT COALESCE(SUM(p.sessions), 0) INTO v_total FROM presence p JOIN nodes n ON n.id = p.node_id
        WHERE p.device_id = p_device AND n.heartbeat > clock_timestamp() - p_alive_ms * INTERVAL '1 millisecond';
    IF v_total >= p_max THEN
        RETURN QUERY SELECT 'refused'::TEXT, NULL::BIGINT;
        RETURN;
    END IF;
    INSERT INTO presence AS p (device_id, node_id, sessions) VALUES (p_device, p_node, 1)
        ON CONFLICT (device_id, node_id) DO UPDATE SET sessions = p.sessions + 1;
    IF v_total = 0 THEN
        UPDATE devices d SET last_connect_ms = p_now WHERE d.id = p_device;
        RETURN QUERY SELECT 'first'::TEXT, v_home;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'more'::TEXT, NULL::BIGINT;
END $$;

-- Ends a session of a device on a node. out_last is true when it was the device's last on the
-- live nodes (and then the time is recorded and out_home is the device's home).
CREATE FUNCTION ddp_session_close(p_device BIGINT, p_node BIGINT, p_now BIGINT, p_alive_ms BIGINT)
RETURNS TABLE (out_last BOOLEAN, out_home BIGINT) LANGUAGE plpgsql AS $$
DECLARE
    v_total BIGINT;
    v_home BIGINT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT d.home_id INTO v_home FROM devices d WHERE d.id = p_device FOR UPDATE;
    UPDATE presence p SET sessions = p.sessions - 1 WHERE p.device_id = p_device AND p.node_id = p_node AND p.sessions > 0;
    IF NOT FOUND THEN
        RETURN QUERY SELECT FALSE, NULL::BIGINT;
        RETURN;
    END IF;
    DELETE FROM presence p WHERE p.device_id = p_device AND p.node_id = p_node AND p.sessions <= 0;
    SELECT COALESCE(SUM(p.sessions), 0) INTO v_total FROM presence p JOIN nodes n ON n.id = p.node_id
        WHERE p.device_id = p_device AND n.heartbeat > clock_timestamp() - p_alive_ms * INTERVAL '1 millisecond';
    IF v_total = 0 THEN
        UPDATE devices d SET last_disconnect_ms = p_now WHERE d.id = p_device;
        RETURN QUERY SELECT TRUE, v_home;
        RETURN;
    END IF;
    RETURN QUERY SELECT FALSE, NULL::BIGINT;
END $$;

-- Drops the presence of nodes silent for longer than p_dead_ms; a device left with no session on a
-- live node gets the silent node's last heartbeat as its lastDisconnectTime. Returns the nodes
-- dropped.
CREATE FUNCTION ddp_reap_nodes(p_dead_ms BIGINT)
RETURNS INT LANGUAGE plpgsql AS $$
DECLARE
    v_nodes INT;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    WITH dead AS (
        SELECT id, heartbeat FROM nodes WHERE heartbeat < clock_timestamp() - p_dead_ms * INTERVAL '1 millisecond'
    ), gone AS (
        DELETE FROM presence p USING dead WHERE p.node_id = dead.id RETURNING p.device_id, dead.heartbeat
    )
    UPDATE devices d SET last_disconnect_ms = (EXTRACT(EPOCH FROM g.at) * 1000)::BIGINT
        FROM (SELECT device_id, MAX(heartbeat) AS at FROM gone GROUP BY device_id) g
        WHERE d.id = g.device_id
          AND NOT EXISTS (SELECT 1 FROM presence p WHERE p.device_id = g.device_id AND p.sessions > 0
                          AND p.node_id NOT IN (SELECT id FROM dead));
    DELETE FROM nodes WHERE heartbeat < clock_timestamp() - p_dead_ms * INTERVAL '1 millisecond';
    GET DIAGNOSTICS v_nodes = ROW_COUNT;
    RETURN v_nodes;
END $$;

-- Hands an event to every node (not kept: trimmed after a few minutes, not made durable).
CREATE FUNCTION ddp_event(p_home BIGINT, p_json TEXT, p_now BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO event_log (home_id, json, created_ms) VALUES (p_home, p_json, p_now);
END $$;
"#,
    r#"
-- Commands travel the event log too: a row names a home (an event) or a device (a command).
ALTER TABLE event_log ALTER COLUMN home_id DROP NOT NULL, ADD COLUMN device_id BIGINT;
CREATE FUNCTION ddp_command(p_device BIGINT, p_json TEXT, p_now BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO event_log (device_id, json, created_ms) VALUES (p_device, p_json, p_now);
END $$;
"#,
    r#"
-- Delivery and acknowledgement (PROTOCOL.md §10), per device: the highest rev handed to its own
-- sessions and the highest it acknowledged, with when. Each node records its own about once a
-- second; nothing is ever lowered.
CREATE TABLE device_sync (
    device_id      BIGINT PRIMARY KEY,
    delivered_rev  BIGINT NOT NULL,
    applied_rev    BIGINT NOT NULL,
    applied_ms     BIGINT
);
-- p_devices holds each device once, in order (so nodes lock rows in the same order).
CREATE FUNCTION ddp_record_sync(p_devices BIGINT[], p_delivered BIGINT[], p_applied BIGINT[], p_applied_ms BIGINT[])
RETURNS VOID LANGUAGE sql AS $$
    INSERT INTO device_sync AS s (device_id, delivered_rev, applied_rev, applied_ms)
    SELECT u.d, u.delivered, u.applied, u.at
    FROM unnest(p_devices, p_delivered, p_applied, p_applied_ms) AS u(d, delivered, applied, at)
    WHERE EXISTS (SELECT 1 FROM devices WHERE id = u.d)
    ORDER BY u.d
    ON CONFLICT (device_id) DO UPDATE SET
        delivered_rev = GREATEST(s.delivered_rev, EXCLUDED.delivered_rev),
        applied_ms = CASE WHEN EXCLUDED.applied_rev > s.applied_rev
                            OR (EXCLUDED.applied_rev = s.applied_rev AND s.applied_ms IS NULL)
                          THEN EXCLUDED.applied_ms ELSE s.applied_ms END,
        applied_rev = GREATEST(s.applied_rev, EXCLUDED.applied_rev);
$$;
-- Progress travels the event log to the other nodes: kind 0 is an event or a command (by the id
-- set), kind 1 a batch of progress (JSON, see postgres/progress.rs). Nodes that predate this
-- read kind 1 rows as neither and skip them.
ALTER TABLE event_log ADD COLUMN kind SMALLINT NOT NULL DEFAULT 0;
CREATE FUNCTION ddp_sync(p_json TEXT, p_now BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    INSERT INTO event_log (kind, json, created_ms) VALUES (1, p_json, p_now);
END $$;
"#,
    r#"
-- Atomic batches (PROTOCOL.md §11). A change made by a batch of two or more ops carries the rev
-- of the batch's last change, so that sessions that take batches get them whole.
ALTER TABLE changes ADD COLUMN batch_last BIGINT;
-- RFC 7396 JSON merge patch on exact JSON texts (the same as the embedded store's, in Rust): the
-- target's members keep their place and their text, new ones are appended in the patch's order,
-- members set to null are removed; an absent or non-object target counts as {}.
-- The members of a JSON object's text, names and values (exact text) in order; a name given
-- twice counts once, at its first place with its last value (as JSON parsers read it).
CREATE FUNCTION ddp_json_members(p_object TEXT, OUT o_keys TEXT[], OUT o_vals TEXT[])
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    r RECORD;
    v_pos INT;
BEGIN
    o_keys := '{}';
    o_vals := '{}';
    FOR r IN SELECT e.key, e.value::TEXT AS value FROM json_each(p_object::JSON) e LOOP
        v_pos := array_position(o_keys, r.key);
        IF v_pos IS NULL THEN
            o_keys := o_keys || r.key;
            o_vals := o_vals || r.value;
        ELSE
            o_vals[v_pos] := r.value;
        END IF;
    END LOOP;
END $$;
CREATE FUNCTION ddp_merge_patch(p_target TEXT, p_patch TEXT)
RETURNS TEXT LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_keys TEXT[] := '{}';
    v_vals TEXT[] := '{}';
    v_pkeys TEXT[];
    v_pvals TEXT[];
    v_pos INT;
    v_type TEXT;
    v_out TEXT := '';
    i INT;
BEGIN
    IF json_typeof(p_patch::JSON) <> 'object' THEN
        RETURN p_patch;
    END IF;
    IF p_target IS NOT NULL AND json_typeof(p_target::JSON) = 'object' THEN
        SELECT m.o_keys, m.o_vals INTO v_keys, v_vals FROM ddp_json_members(p_target) m;
    END IF;
    SELECT m.o_keys, m.o_vals INTO v_pkeys, v_pvals FROM ddp_json_members(p_patch) m;
    FOR i IN 1..COALESCE(array_length(v_pkeys, 1), 0) LOOP
        v_pos := array_position(v_keys, v_pkeys[i]);
        v_type := json_typeof(v_pvals[i]::JSON);
        IF v_type = 'null' THEN
            IF v_pos IS NOT NULL THEN
                v_keys := v_keys[:v_pos - 1] || v_keys[v_pos + 1:];
                v_vals := v_vals[:v_pos - 1] || v_vals[v_pos + 1:];
            END IF;
        ELSIF v_pos IS NULL THEN
            v_keys := v_keys || v_pkeys[i];
            v_vals := v_vals || CASE WHEN v_type = 'object' THEN ddp_merge_patch(NULL, v_pvals[i]) ELSE v_pvals[i] END;
        ELSE
            v_vals[v_pos] := CASE WHEN v_type = 'object' THEN ddp_merge_patch(v_vals[v_pos], v_pvals[i]) ELSE v_pvals[i] END;
        END IF;
    END LOOP;
    FOR i IN 1..COALESCE(array_length(v_keys, 1), 0) LOOP
        IF i > 1 THEN
            v_out := v_out || ',';
        END IF;
        v_out := v_out || to_json(v_keys[i])::TEXT || ':' || v_vals[i];
    END LOOP;
    RETURN '{' || v_out || '}';
END $$;
-- Every key-value write: units of ops (a unit is one batch on one store; its ops are contiguous
-- and share p_units, p_kinds, p_owners, p_store_revs), each applied all or nothing, in one round
-- trip and one commit. Callers order units by store, so concurrent calls lock stores in the same
-- order and cannot deadlock. A unit is worked out in full under its store's row lock before
-- anything is written (so a failing op leaves nothing and no savepoint is needed), then written
-- with consecutive revs. p_ops[i]: 0 set p_values[i], 1 delete, 2 merge patch p_values[i] (a merged
-- value is refused beyond p_max_bytes[i]); p_conds[i]: 0 none, 1 rev in p_revs[i] (comma
-- separated), 2 exists, 3 absent; p_store_revs[i] >= 0: the store's rev the unit requires.
-- Answers one row per op of a unit that applied ('ok', its rev, the home at commit, and for a
-- merge its value) or one row for a unit that did not (out_idx the op at fault or -1, out_current
-- the key's or store's rev, or the merged size): 'no_store', 'store_mismatch', 'mismatch',
-- 'no_key', 'too_many', 'too_large' or 'bad_merge'.
CREATE FUNCTION ddp_kv_apply(
    p_units INT[], p_kinds SMALLINT[], p_owners BIGINT[], p_keys TEXT[], p_ops SMALLINT[], p_values TEXT[],
    p_conds SMALLINT[], p_revs TEXT[], p_store_revs BIGINT[], p_max_keys INT[], p_max_bytes INT[],
    p_origin_kinds SMALLINT[], p_origin_ids BIGINT[], p_now BIGINT)
RETURNS TABLE (out_unit INT, out_idx INT, out_status TEXT, out_rev BIGINT, out_home BIGINT, out_current BIGINT,
               out_value TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    n INT := COALESCE(array_length(p_units, 1), 0);
    lo INT := 1;
    hi INT;
    i INT;
    v_rev BIGINT;
    v_num INT;
    v_cur BIGINT;
    v_curval TEXT;
    v_at INT;
    v_home BIGINT;
    v_last BIGINT;
    v_batch_last BIGINT;
    v_seen JSONB;
    v_new TEXT[];
    v_status TEXT;
    v_fail INT;
BEGIN
    WHILE lo <= n LOOP
        hi := lo;
        WHILE hi < n AND p_units[hi + 1] = p_units[lo] LOOP
            hi := hi + 1;
        END LOOP;
        v_status := NULL;
        v_fail := -1;
        v_cur := NULL;
        v_new := '{}';
        SELECT s.rev, s.num_keys INTO v_rev, v_num FROM stores s
            WHERE s.kind = p_kinds[lo] AND s.owner = p_owners[lo] FOR UPDATE;
        IF NOT FOUND THEN
            v_status := 'no_store';
        ELSIF p_store_revs[lo] >= 0 AND v_rev <> p_store_revs[lo] THEN
            v_status := 'store_mismatch';
            v_cur := v_rev;
        ELSE
            -- v_seen: each key an earlier op of the unit wrote -> that op's position (0: deleted).
            v_seen := '{}'::JSONB;
            FOR i IN lo..hi LOOP
                IF v_seen ? p_keys[i] THEN
                    v_at := (v_seen->>p_keys[i])::INT;
                    v_cur := CASE WHEN v_at > 0 THEN v_rev + (v_at - lo) + 1 END;
                    v_curval := CASE WHEN v_at > 0 THEN v_new[v_at - lo + 1] END;
                ELSIF p_ops[i] = 2 THEN
                    v_cur := NULL;
                    v_curval := NULL;
                    SELECT it.rev, it.value INTO v_cur, v_curval FROM items it
                        WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                ELSE
                    v_cur := NULL;
                    SELECT it.rev INTO v_cur FROM items it
                        WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                END IF;
                IF (p_conds[i] = 1 AND (v_cur IS NULL OR NOT (v_cur = ANY(
                        COALESCE(string_to_array(NULLIF(p_revs[i], ''), ',')::BIGINT[], '{}'::BIGINT[])))))
                    OR (p_conds[i] = 2 AND v_cur IS NULL)
                    OR (p_conds[i] = 3 AND v_cur IS NOT NULL) THEN
                    v_status := 'mismatch';
                    v_fail := i - lo;
                    EXIT;
                END IF;
                IF p_ops[i] = 1 THEN
                    IF v_cur IS NULL THEN
                        v_status := 'no_key';
                        v_fail := i - lo;
                        EXIT;
                    END IF;
                    v_num := v_num - 1;
                    v_new := v_new || NULL::TEXT;
                    v_seen := v_seen || jsonb_build_object(p_keys[i], 0);
                ELSE
                    IF p_ops[i] = 2 THEN
                        -- A name json_each cannot read (U+0000, a lone surrogate) refuses this
                        -- unit only; the block writes nothing, so its savepoint costs no xid.
                        BEGIN
                            v_new := v_new || ddp_merge_patch(v_curval, p_values[i]);
                        EXCEPTION WHEN OTHERS THEN
                            v_status := 'bad_merge';
                            v_fail := i - lo;
                            EXIT;
                        END;
                        IF octet_length(v_new[i - lo + 1]) > p_max_bytes[i] THEN
                            v_status := 'too_large';
                            v_fail := i - lo;
                            v_cur := octet_length(v_new[i - lo + 1]);
                            EXIT;
                        END IF;
                    ELSE
                        v_new := v_new || p_values[i];
                    END IF;
                    IF v_cur IS NULL THEN
                        IF v_num >= p_max_keys[i] THEN
                            v_status := 'too_many';
                            v_fail := i - lo;
                            EXIT;
                        END IF;
                        v_num := v_num + 1;
                    END IF;
                    v_seen := v_seen || jsonb_build_object(p_keys[i], i);
                END IF;
            END LOOP;
        END IF;
        IF v_status IS NOT NULL THEN
            RETURN QUERY SELECT p_units[lo], v_fail, v_status, NULL::BIGINT, NULL::BIGINT, v_cur, NULL::TEXT;
        ELSE
            IF p_kinds[lo] = 0 THEN
                SELECT d.home_id INTO v_home FROM devices d WHERE d.id = p_owners[lo];
            ELSE
                v_home := p_owners[lo];
            END IF;
            v_last := v_rev + (hi - lo) + 1;
            v_batch_last := CASE WHEN hi > lo THEN v_last END;
            FOR i IN lo..hi LOOP
                IF p_ops[i] = 1 THEN
                    DELETE FROM items it WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                ELSE
                    INSERT INTO items AS it (kind, owner, key, value, rev, modified_ms)
                        VALUES (p_kinds[i], p_owners[i], p_keys[i], v_new[i - lo + 1], v_rev + (i - lo) + 1, p_now)
                        ON CONFLICT (kind, owner, key) DO UPDATE SET value = EXCLUDED.value, rev = EXCLUDED.rev,
                            modified_ms = EXCLUDED.modified_ms;
                END IF;
                INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id, batch_last)
                    VALUES (p_kinds[i], p_owners[i], v_rev + (i - lo) + 1, p_keys[i], v_new[i - lo + 1], p_now, v_home,
                            p_origin_kinds[i], p_origin_ids[i], v_batch_last);
                RETURN QUERY SELECT p_units[lo], i - lo, 'ok'::TEXT, v_rev + (i - lo) + 1, v_home, NULL::BIGINT,
                    CASE WHEN p_ops[i] = 2 THEN v_new[i - lo + 1] END;
            END LOOP;
            UPDATE stores s SET rev = v_last, num_keys = v_num WHERE s.kind = p_kinds[lo] AND s.owner = p_owners[lo];
        END IF;
        lo := hi + 1;
    END LOOP;
END $$;
"#,
    r#"
-- Fleet queries (PROTOCOL.md §12): the number or the string a value holds (numbers up to 100 bytes
-- with exponents below 1000, strings up to 1024 bytes of JSON text, as SQLite indexes them). The
-- partial index over them, items_by_value, follows the operator's --index-keys and is made at
-- start-up (postgres::fleet::reconcile_value_index).
CREATE FUNCTION ddp_num(v TEXT) RETURNS NUMERIC LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(v, 1) IN ('-','0','1','2','3','4','5','6','7','8','9') AND length(v) <= 100
                     AND v !~ '[eE][-+]?0*[0-9]{4}' THEN v::NUMERIC END
$$;
CREATE FUNCTION ddp_str(v TEXT) RETURNS TEXT LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN left(v, 1) = '"' AND octet_length(v) <= 1024 AND strpos(v, '\u0000') = 0
                THEN v::JSONB #>> '{}' END
$$;
-- Jobs: state 0 running, 1 done, 2 cancelled; next_ms: when a rated job may claim again.
CREATE TABLE jobs (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state        SMALLINT NOT NULL,
    select_json  TEXT NOT NULL,
    ops_json     TEXT NOT NULL,
    rate         DOUBLE PRECISION,
    api_key_id   BIGINT,
    next_ms      BIGINT NOT NULL,
    created_ms   BIGINT NOT NULL,
    ended_ms     BIGINT
);
-- The devices a job selected: state 0 to write, 1 written (rev: the write's last rev, set by
-- ddp_kv_apply in the write's own transaction), 2 failed (reason). claim_until_ms: a claim's lease.
CREATE TABLE job_devices (
    job_id          BIGINT NOT NULL,
    device_id       BIGINT NOT NULL,
    state           SMALLINT NOT NULL,
    rev             BIGINT,
    claim_until_ms  BIGINT NOT NULL,
    reason          TEXT,
    PRIMARY KEY (job_id, device_id)
);
CREATE INDEX job_devices_to_write ON job_devices (job_id, device_id) WHERE state = 0;
-- ddp_kv_apply as before, with p_jobs[i] > 0: the unit is that job's write to the device, which
-- fails with 'job_gone' when the job is not running or wrote (or failed) the device already. The
-- old signature stays for nodes of the previous version during a rolling upgrade.
CREATE FUNCTION ddp_kv_apply(
    p_units INT[], p_kinds SMALLINT[], p_owners BIGINT[], p_keys TEXT[], p_ops SMALLINT[], p_values TEXT[],
    p_conds SMALLINT[], p_revs TEXT[], p_store_revs BIGINT[], p_max_keys INT[], p_max_bytes INT[],
    p_origin_kinds SMALLINT[], p_origin_ids BIGINT[], p_jobs BIGINT[], p_now BIGINT)
RETURNS TABLE (out_unit INT, out_idx INT, out_status TEXT, out_rev BIGINT, out_home BIGINT, out_current BIGINT,
               out_value TEXT)
LANGUAGE plpgsql AS $$
DECLARE
    n INT := COALESCE(array_length(p_units, 1), 0);
    lo INT := 1;
    hi INT;
    i INT;
    v_rev BIGINT;
    v_num INT;
    v_cur BIGINT;
    v_curval TEXT;
    v_at INT;
    v_home BIGINT;
    v_last BIGINT;
    v_batch_last BIGINT;
    v_seen JSONB;
    v_new TEXT[];
    v_status TEXT;
    v_fail INT;
BEGIN
    WHILE lo <= n LOOP
        hi := lo;
        WHILE hi < n AND p_units[hi + 1] = p_units[lo] LOOP
            hi := hi + 1;
        END LOOP;
        v_status := NULL;
        v_fail := -1;
        v_cur := NULL;
        v_new := '{}';
        SELECT s.rev, s.num_keys INTO v_rev, v_num FROM stores s
            WHERE s.kind = p_kinds[lo] AND s.owner = p_owners[lo] FOR UPDATE;
        IF NOT FOUND THEN
            v_status := 'no_store';
        ELSIF p_store_revs[lo] >= 0 AND v_rev <> p_store_revs[lo] THEN
            v_status := 'store_mismatch';
            v_cur := v_rev;
        ELSE
            -- v_seen: each key an earlier op of the unit wrote -> that op's position (0: deleted).
            v_seen := '{}'::JSONB;
            FOR i IN lo..hi LOOP
                IF v_seen ? p_keys[i] THEN
                    v_at := (v_seen->>p_keys[i])::INT;
                    v_cur := CASE WHEN v_at > 0 THEN v_rev + (v_at - lo) + 1 END;
                    v_curval := CASE WHEN v_at > 0 THEN v_new[v_at - lo + 1] END;
                ELSIF p_ops[i] = 2 THEN
                    v_cur := NULL;
                    v_curval := NULL;
                    SELECT it.rev, it.value INTO v_cur, v_curval FROM items it
                        WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                ELSE
                    v_cur := NULL;
                    SELECT it.rev INTO v_cur FROM items it
                        WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                END IF;
                IF (p_conds[i] = 1 AND (v_cur IS NULL OR NOT (v_cur = ANY(
                        COALESCE(string_to_array(NULLIF(p_revs[i], ''), ',')::BIGINT[], '{}'::BIGINT[])))))
                    OR (p_conds[i] = 2 AND v_cur IS NULL)
                    OR (p_conds[i] = 3 AND v_cur IS NOT NULL) THEN
                    v_status := 'mismatch';
                    v_fail := i - lo;
                    EXIT;
                END IF;
                IF p_ops[i] = 1 THEN
                    IF v_cur IS NULL THEN
                        v_status := 'no_key';
                        v_fail := i - lo;
                        EXIT;
                    END IF;
                    v_num := v_num - 1;
                    v_new := v_new || NULL::TEXT;
                    v_seen := v_seen || jsonb_build_object(p_keys[i], 0);
                ELSE
                    IF p_ops[i] = 2 THEN
                        -- A name json_each cannot read (U+0000, a lone surrogate) refuses this
                        -- unit only; the block writes nothing, so its savepoint costs no xid.
                        BEGIN
                            v_new := v_new || ddp_merge_patch(v_curval, p_values[i]);
                        EXCEPTION WHEN OTHERS THEN
                            v_status := 'bad_merge';
                            v_fail := i - lo;
                            EXIT;
                        END;
                        IF octet_length(v_new[i - lo + 1]) > p_max_bytes[i] THEN
                            v_status := 'too_large';
                            v_fail := i - lo;
                            v_cur := octet_length(v_new[i - lo + 1]);
                            EXIT;
                        END IF;
                    ELSE
                        v_new := v_new || p_values[i];
                    END IF;
                    IF v_cur IS NULL THEN
                        IF v_num >= p_max_keys[i] THEN
                            v_status := 'too_many';
                            v_fail := i - lo;
                            EXIT;
                        END IF;
                        v_num := v_num + 1;
                    END IF;
                    v_seen := v_seen || jsonb_build_object(p_keys[i], i);
                END IF;
            END LOOP;
        END IF;
        IF v_status IS NULL AND p_jobs[lo] > 0 THEN
            -- A job's write (PROTOCOL.md §12): only while the job runs and has not yet written
            -- this device; recorded as the job's in this same transaction.
            UPDATE job_devices jd SET state = 1, rev = v_rev + (hi - lo) + 1
                WHERE jd.job_id = p_jobs[lo] AND jd.device_id = p_owners[lo] AND jd.state = 0
                  AND (SELECT j.state FROM jobs j WHERE j.id = p_jobs[lo]) = 0;
            IF NOT FOUND THEN
                v_status := 'job_gone';
            END IF;
        END IF;
        IF v_status IS NOT NULL THEN
            RETURN QUERY SELECT p_units[lo], v_fail, v_status, NULL::BIGINT, NULL::BIGINT, v_cur, NULL::TEXT;
        ELSE
            IF p_kinds[lo] = 0 THEN
                SELECT d.home_id INTO v_home FROM devices d WHERE d.id = p_owners[lo];
            ELSE
                v_home := p_owners[lo];
            END IF;
            v_last := v_rev + (hi - lo) + 1;
            v_batch_last := CASE WHEN hi > lo THEN v_last END;
            FOR i IN lo..hi LOOP
                IF p_ops[i] = 1 THEN
                    DELETE FROM items it WHERE it.kind = p_kinds[i] AND it.owner = p_owners[i] AND it.key = p_keys[i];
                ELSE
                    INSERT INTO items AS it (kind, owner, key, value, rev, modified_ms)
                        VALUES (p_kinds[i], p_owners[i], p_keys[i], v_new[i - lo + 1], v_rev + (i - lo) + 1, p_now)
                        ON CONFLICT (kind, owner, key) DO UPDATE SET value = EXCLUDED.value, rev = EXCLUDED.rev,
                            modified_ms = EXCLUDED.modified_ms;
                END IF;
                INSERT INTO changes (kind, owner, rev, key, value, modified_ms, home_id, origin_kind, origin_id, batch_last)
                    VALUES (p_kinds[i], p_owners[i], v_rev + (i - lo) + 1, p_keys[i], v_new[i - lo + 1], p_now, v_home,
                            p_origin_kinds[i], p_origin_ids[i], v_batch_last);
                RETURN QUERY SELECT p_units[lo], i - lo, 'ok'::TEXT, v_rev + (i - lo) + 1, v_home, NULL::BIGINT,
                    CASE WHEN p_ops[i] = 2 THEN v_new[i - lo + 1] END;
            END LOOP;
            UPDATE stores s SET rev = v_last, num_keys = v_num WHERE s.kind = p_kinds[lo] AND s.owner = p_owners[lo];
        END IF;
        lo := hi + 1;
    END LOOP;
END $$;
"#,
];

fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Makes the fleet value index (`items_by_value`) what `index` asks for, under the migration
/// lock: the index it built last is remembered in `settings`, and rebuilt when the keys differ.
/// Every node should be given the same keys; the last to start decides. True when it changed.
pub(super) async fn reconcile_value_index(client: &mut Client, index: &ValueIndex) -> Result<bool, StoreError> {
    let wanted: Vec<(String, String)> = index.indexes(Dialect::Postgres);
    let text = wanted.iter().map(|(_, sql)| sql.as_str()).collect::<Vec<_>>().join(";\n");
    let tx = client.transaction().await.map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(backend)?;
    let current: Option<Vec<u8>> = tx
        .query_opt("SELECT value FROM settings WHERE name = 'value_index'", &[])
        .await
        .map_err(backend)?
        .map(|r| r.get(0));
    let exists = tx
        .query_opt("SELECT 1 FROM pg_indexes WHERE tablename = 'items' AND indexname = 'items_by_value'", &[])
        .await
        .map_err(backend)?
        .is_some();
    if current.as_deref() == Some(text.as_bytes()) && exists != wanted.is_empty() {
        return Ok(false);
    }
    tx.batch_execute("DROP INDEX IF EXISTS items_by_value").await.map_err(backend)?;
    for (_, sql) in &wanted {
        tx.batch_execute(sql).await.map_err(backend)?;
    }
    tx.execute(
        "INSERT INTO settings (name, value) VALUES ('value_index', $1)
         ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
        &[&text.as_bytes()],
    )
    .await
    .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    Ok(true)
}

/// Creates or migrates the schema. Holds an advisory lock for the duration, so nodes starting
/// together take turns and later ones find the work done.
pub(super) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await.map_err(backend)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS ddp_schema (version INT NOT NULL)").await.map_err(backend)?;
    let version: i32 = match tx.query_opt("SELECT version FROM ddp_schema", &[]).await.map_err(backend)? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO ddp_schema (version) VALUES (0)", &[]).await.map_err(backend)?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this ddp knows ({known}); use a newer ddp"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        tx.batch_execute(sql).await.map_err(backend)?;
        tx.execute("UPDATE ddp_schema SET version = $1", &[&(i as i32 + 1)]).await.map_err(backend)?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    tx.commit().await.map_err(backend)
}
