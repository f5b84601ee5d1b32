//! Fleet queries and jobs (PROTOCOL.md §12) over REST: `GET /devices` filters, pages and
//! `Link`, project keys listing what they see, and jobs that write every selected device once,
//! at a rate, durably across a restart, counting what the devices confirm.

use std::time::Duration;

use ddp_testkit::{ADMIN_KEY, TestServer, expect_error, expect_json};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A device of `class` in `home`, its store holding `items`.
async fn device(s: &TestServer, home: Option<u64>, class: &str, tag: &str, items: Value) -> (u64, String) {
    let body = expect_json(
        s.admin(Method::POST, "/devices")
            .json(&json!({ "name": "d", "homeId": home, "deviceClass": class, "tag": tag }))
            .send()
            .await,
        StatusCode::CREATED,
    )
    .await;
    let id = body["id"].as_u64().expect("id");
    let ops: Vec<Value> = items
        .as_object()
        .map(|m| m.iter().map(|(k, v)| json!({"op": "set", "key": k, "value": v})).collect())
        .unwrap_or_default();
    if !ops.is_empty() {
        expect_json(
            s.admin(Method::PATCH, &format!("/devices/{id}/kv")).json(&json!({ "ops": ops })).send().await,
            StatusCode::OK,
        )
        .await;
    }
    (id, body["apiKey"].as_str().expect("key").to_owned())
}

fn ids(list: &Value) -> Vec<u64> {
    list.as_array().expect("a list").iter().map(|d| d["id"].as_u64().expect("id")).collect()
}

async fn list(s: &TestServer, token: &str, query: &str) -> Vec<u64> {
    ids(&expect_json(s.req(Method::GET, &format!("/devices?{query}"), Some(token)).send().await, StatusCode::OK).await)
}

/// Polls a job until `check` holds (10 s at most).
async fn job_until(s: &TestServer, token: &str, id: u64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Value::Null;
    for _ in 0..500 {
        seen = expect_json(s.req(Method::GET, &format!("/jobs/{id}"), Some(token)).send().await, StatusCode::OK).await;
        if check(&seen) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}; last seen {seen}");
}

async fn create_job(s: &TestServer, token: &str, body: Value) -> Value {
    expect_json(s.req(Method::POST, "/jobs", Some(token)).json(&body).send().await, StatusCode::CREATED).await
}

#[tokio::test]
async fn devices_are_found_by_their_state_and_paged_with_link() {
    found_by_state("").await;
}

#[tokio::test]
async fn devices_are_found_alike_through_the_value_index() {
    found_by_state("fw,mode,on").await;
}

/// The same answers whichever keys the server indexes (`--index-keys`).
async fn found_by_state(index_keys: &str) {
    let keys = ddp_server::ValueIndex::parse(index_keys).expect("keys");
    let s = TestServer::start_with(|c| c.index_keys = keys).await;
    let home = s.create_home("H").await;
    let (old1, _) = device(&s, Some(home), "thermo", "eu", json!({"fw": 2.0, "mode": "eco"})).await;
    let (old2, key2) = device(&s, Some(home), "thermo", "us", json!({"fw": 1, "mode": "boost"})).await;
    let (new1, _) = device(&s, Some(home), "thermo", "eu", json!({"fw": 2.1})).await;
    let (other, _) = device(&s, None, "lamp", "eu", json!({"fw": "1.0", "on": true})).await;
    let (bare, _) = device(&s, None, "lamp", "", json!({})).await;

    assert_eq!(
        list(&s, ADMIN_KEY, "where=fw<2.1").await,
        vec![old1, old2],
        "numbers only: the string fw never matches"
    );
    assert_eq!(list(&s, ADMIN_KEY, "where=fw<2.1&where=mode=%22eco%22").await, vec![old1]);
    assert_eq!(list(&s, ADMIN_KEY, "where=fw=%221.0%22").await, vec![other]);
    assert_eq!(list(&s, ADMIN_KEY, "where=on=true").await, vec![other]);
    assert_eq!(list(&s, ADMIN_KEY, "where=fw>9").await, Vec::<u64>::new());
    assert_eq!(list(&s, ADMIN_KEY, "where=!fw").await, vec![bare]);
    assert_eq!(list(&s, ADMIN_KEY, "where=mode").await, vec![old1, old2]);
    assert_eq!(list(&s, ADMIN_KEY, "deviceClass=thermo&tag=eu").await, vec![old1, new1]);
    assert_eq!(list(&s, ADMIN_KEY, &format!("homeId={home}&where=fw>=2")).await, vec![old1, new1]);

    // isConnected: only the device with a live session.
    let mut ws = s.ws_open(old2, &key2, "").await;
    assert_eq!(ws.next_json().await["action"], "reload");
    assert_eq!(list(&s, ADMIN_KEY, "isConnected=true").await, vec![old2]);
    assert_eq!(list(&s, ADMIN_KEY, "isConnected=false&deviceClass=thermo").await, vec![old1, new1]);

    // behind: every written device until it acknowledges its store's rev.
    ws.send_json(&json!({"action": "ack", "rev": 2})).await;
    let mut behind = Vec::new();
    for _ in 0..250 {
        behind = list(&s, ADMIN_KEY, "behind=true&deviceClass=thermo").await;
        if behind == vec![old1, new1] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(behind, vec![old1, new1], "the acknowledged device is no longer behind once recorded");
    assert_eq!(list(&s, ADMIN_KEY, "behind=false&deviceClass=thermo").await, vec![old2]);

    // Pages: limit, a Link to the next page that keeps the filters, no Link on the last.
    let first = s.admin(Method::GET, "/devices?where=fw&limit=2").send().await.expect("sent");
    let link = first.headers().get("link").expect("a Link to the next page").to_str().expect("text").to_owned();
    assert_eq!(ids(&first.json::<Value>().await.expect("json")), vec![old1, old2]);
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    let next = link.trim_start_matches('<').split('>').next().expect("a URL");
    assert!(next.contains("where=fw") && next.contains(&format!("after={old2}")), "{next}");
    let second = s.admin(Method::GET, next).send().await.expect("sent");
    assert!(second.headers().get("link").is_none(), "the last page has no Link");
    assert_eq!(ids(&second.json::<Value>().await.expect("json")), vec![new1, other]);
    assert_eq!(list(&s, ADMIN_KEY, &format!("after={new1}")).await, vec![other, bare]);
    // Device objects are the usual ones, with their sync.
    let one = expect_json(s.admin(Method::GET, "/devices?where=mode=%22boost%22").send().await, StatusCode::OK).await;
    assert_eq!(one[0]["isConnected"], true);
    assert_eq!(one[0]["deviceClass"], "thermo");
    assert!(one[0]["sync"].is_object());
    assert!(one[0].get("apiKey").is_none(), "never any key");
}

#[tokio::test]
async fn bad_queries_are_refused_naming_the_part() {
    let s = TestServer::start().await;
    for (query, says) in [
        ("colour=red", "unknown parameter \"colour\""),
        ("where=fw=eco", "where=fw=eco"),
        ("where=on<true", "booleans compare only with = and !="),
        ("where=fw<[1]", "arrays compare only"),
        ("where=f%20w=1", "key holds"),
        ("where=fw=null", "no value is null"),
        ("limit=0", "limit must be"),
        ("limit=1001", "limit must be"),
        ("limit=ten", "limit must be"),
        ("after=x", "after"),
        ("isConnected=yes", "isConnected must be true or false"),
        ("behind=1", "behind must be true or false"),
        ("homeId=1&homeId=2", "homeId is given twice"),
        ("homeId=-1", "homeId"),
    ] {
        let e = expect_error(
            s.admin(Method::GET, &format!("/devices?{query}")).send().await,
            StatusCode::BAD_REQUEST,
            "INVALID_PARAMETER",
        )
        .await;
        let message = e["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{query}: {message}");
    }
    expect_error(s.admin(Method::GET, "/devices?homeId=999999").send().await, StatusCode::NOT_FOUND, "HOME_NOT_FOUND")
        .await;
    assert_eq!(list(&s, ADMIN_KEY, "limit=1000").await, Vec::<u64>::new());
}

#[tokio::test]
async fn project_keys_list_the_devices_and_homes_they_see() {
    let s = TestServer::start().await;
    let a = s.create_home("A").await;
    let b = s.create_home("B").await;
    let (in_a, _) = device(&s, Some(a), "c", "", json!({"fw": 1})).await;
    let (in_b, _) = device(&s, Some(b), "c", "", json!({"fw": 1})).await;
    let (homeless, _) = device(&s, None, "c", "", json!({"fw": 1})).await;
    let (_, scoped) = s.create_api_key(Some(vec![a]), "read").await;
    let (_, every) = s.create_api_key(None, "read").await;
    assert_eq!(list(&s, &scoped, "where=fw=1").await, vec![in_a]);
    assert_eq!(list(&s, &every, "where=fw=1").await, vec![in_a, in_b, homeless]);
    expect_error(
        s.req(Method::GET, &format!("/devices?homeId={b}"), Some(&scoped)).send().await,
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
    )
    .await;
    let homes = expect_json(s.req(Method::GET, "/homes", Some(&scoped)).send().await, StatusCode::OK).await;
    assert_eq!(ids(&homes), vec![a]);
    let homes = expect_json(s.req(Method::GET, "/homes", Some(&every)).send().await, StatusCode::OK).await;
    assert_eq!(ids(&homes), vec![a, b]);
}

#[tokio::test]
async fn a_job_writes_every_selected_device_once_and_counts_what_they_apply() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (old1, key1) = device(&s, Some(home), "t", "", json!({"fw": 2.0})).await;
    let (old2, _) = device(&s, Some(home), "t", "", json!({"fw": 1.5})).await;
    let (current, _) = device(&s, Some(home), "t", "", json!({"fw": 2.1})).await;
    let mut ws = s.ws_open(old1, &key1, "").await;
    assert_eq!(ws.next_json().await["rev"], 1);
    let mut events = s.events_open(ADMIN_KEY, "").await;

    let created = create_job(
        &s,
        ADMIN_KEY,
        json!({"select": {"where": ["fw<2.1"]}, "ops": [{"op": "set", "key": "otaUrl", "value": "https://fw/2.1"}, {"op": "set", "key": "otaAt", "value": 1}]}),
    )
    .await;
    assert_eq!(created["state"], "running");
    assert_eq!(created["selected"], 2);
    assert_eq!(created["select"], json!({"where": ["fw<2.1"]}));
    let id = created["id"].as_u64().expect("job id");
    // The selection is fixed now: a device that matches later is not written.
    let (late, _) = device(&s, Some(home), "t", "", json!({"fw": 1.0})).await;

    let done = job_until(&s, ADMIN_KEY, id, "the job is done", |j| j["state"] == "done").await;
    assert_eq!(
        (done["selected"].clone(), done["written"].clone(), done["failed"].clone()),
        (json!(2), json!(2), json!(0))
    );
    assert!(done["endTime"].is_string());
    // The connected device got the job's batch; every written device's store moved once.
    let first = ws.next_json().await;
    assert_eq!(
        (first["action"].clone(), first["key"].clone(), first["rev"].clone()),
        (json!("set"), json!("otaUrl"), json!(2))
    );
    assert_eq!(ws.next_json().await["rev"], 3);
    for (dev, rev) in [(old1, 3), (old2, 3), (current, 1), (late, 1)] {
        assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, rev, "device {dev}");
    }
    // Writes of a job raise the usual events, to the device's home.
    let saved = events.next_json().await;
    assert_eq!(saved["eventType"], "_deviceKVSaved_");
    // delivered and applied follow what the devices confirm.
    let delivered = job_until(&s, ADMIN_KEY, id, "delivered to the connected device", |j| j["delivered"] == 1).await;
    assert_eq!(delivered["applied"], 0);
    ws.send_json(&json!({"action": "ack", "rev": 3})).await;
    job_until(&s, ADMIN_KEY, id, "applied by the connected device", |j| j["applied"] == 1).await;
    // The job is listed; the metrics count it.
    let jobs = expect_json(s.admin(Method::GET, "/jobs").send().await, StatusCode::OK).await;
    assert_eq!(ids(&jobs), vec![id]);
    let metrics = s.admin(Method::GET, "/metrics").send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("ddp_job_devices_written_total"), "{metrics}");
    assert!(metrics.contains("ddp_jobs_running"), "{metrics}");
}

#[tokio::test]
async fn a_job_lists_the_devices_its_ops_failed_on_and_still_ends_done() {
    let s = TestServer::start().await;
    let (with_x, _) = device(&s, None, "f", "", json!({"x": 1})).await;
    let (without, _) = device(&s, None, "f", "", json!({"y": 1})).await;
    let created =
        create_job(&s, ADMIN_KEY, json!({"select": {"deviceClass": "f"}, "ops": [{"op": "delete", "key": "x"}]})).await;
    let id = created["id"].as_u64().expect("id");
    let done = job_until(&s, ADMIN_KEY, id, "done", |j| j["state"] == "done").await;
    assert_eq!((done["written"].clone(), done["failed"].clone()), (json!(1), json!(1)));
    assert_eq!(done["errors"][0]["deviceId"], without);
    assert!(done["errors"][0]["reason"].as_str().unwrap_or_default().starts_with("KEY_NOT_FOUND"), "{done}");
    assert_eq!(s.items(&format!("/devices/{with_x}")).await, Vec::<Value>::new());
}

#[tokio::test]
async fn jobs_refuse_bad_input_and_never_select_everything_by_accident() {
    let s = TestServer::start().await;
    let home = s.create_home("H").await;
    let (dev, dev_key) = device(&s, Some(home), "c", "", json!({})).await;
    let (_, read) = s.create_api_key(None, "read").await;
    let op = json!([{"op": "set", "key": "k", "value": 1}]);
    for (body, status, reason, says) in [
        (json!({"ops": op}), 400, "INVALID_PARAMETER", "no \"select\""),
        (json!({"select": {}, "ops": op}), 400, "INVALID_PARAMETER", "\"all\": true"),
        (json!({"select": {"all": false}, "ops": op}), 400, "INVALID_PARAMETER", "select.all"),
        (json!({"select": {"colour": "red"}, "ops": op}), 400, "INVALID_PARAMETER", "unknown filter \"colour\""),
        (json!({"select": {"where": "fw<2"}, "ops": op}), 400, "INVALID_PARAMETER", "select.where must be an array"),
        (json!({"select": {"where": ["fw=eco"]}, "ops": op}), 400, "INVALID_PARAMETER", "where=fw=eco"),
        (json!({"select": {"ids": []}, "ops": op}), 400, "INVALID_PARAMETER", "at least one device"),
        (json!({"select": {"all": true}}), 400, "INVALID_PARAMETER", "no \"ops\""),
        (json!({"select": {"all": true}, "ops": []}), 400, "INVALID_PARAMETER", "at least one op"),
        (json!({"select": {"all": true}, "ops": [{"op": "nope", "key": "k"}]}), 400, "INVALID_PARAMETER", ""),
        (json!({"select": {"all": true}, "ops": op, "rate": 0}), 400, "INVALID_PARAMETER", "rate"),
        (json!({"select": {"all": true}, "ops": op, "colour": 1}), 400, "INVALID_JSON", "colour"),
    ] {
        let resp = s.admin(Method::POST, "/jobs").json(&body).send().await;
        let status = StatusCode::from_u16(status).expect("status");
        let e = expect_error(resp, status, reason).await;
        assert!(e["message"].as_str().unwrap_or_default().contains(says), "{body}: {e}");
    }
    let body = json!({"select": {"all": true}, "ops": op});
    for token in [read.as_str(), dev_key.as_str()] {
        expect_error(
            s.req(Method::POST, "/jobs", Some(token)).json(&body).send().await,
            StatusCode::FORBIDDEN,
            "PERMISSION_DENIED",
        )
        .await;
    }
    expect_error(s.req(Method::GET, "/jobs", Some(&dev_key)).send().await, StatusCode::FORBIDDEN, "PERMISSION_DENIED")
        .await;
    expect_error(s.admin(Method::GET, "/jobs/999").send().await, StatusCode::NOT_FOUND, "NOT_FOUND").await;
    expect_error(s.admin(Method::GET, "/jobs/x").send().await, StatusCode::BAD_REQUEST, "INVALID_PARAMETER").await;
    // Every device, when asked for in so many words.
    let all = create_job(&s, ADMIN_KEY, body).await;
    assert_eq!(all["selected"], 1);
    job_until(&s, ADMIN_KEY, all["id"].as_u64().expect("id"), "done", |j| j["written"] == 1).await;
    assert_eq!(s.store_rev(&format!("/devices/{dev}")).await, 1);
}

#[tokio::test]
async fn a_scoped_key_s_job_touches_only_its_homes_and_only_it_sees_the_job() {
    let s = TestServer::start().await;
    let a = s.create_home("A").await;
    let b = s.create_home("B").await;
    let (in_a, _) = device(&s, Some(a), "c", "", json!({})).await;
    let (in_b, _) = device(&s, Some(b), "c", "", json!({})).await;
    let (homeless, _) = device(&s, None, "c", "", json!({})).await;
    let (_, scoped) = s.create_api_key(Some(vec![a]), "readWrite").await;
    let (_, other) = s.create_api_key(None, "readWrite").await;
    let job =
        create_job(&s, &scoped, json!({"select": {"all": true}, "ops": [{"op": "set", "key": "k", "value": 1}]})).await;
    assert_eq!(job["selected"], 1);
    let id = job["id"].as_u64().expect("id");
    job_until(&s, &scoped, id, "done", |j| j["state"] == "done").await;
    assert_eq!(s.store_rev(&format!("/devices/{in_a}")).await, 1);
    assert_eq!(s.store_rev(&format!("/devices/{in_b}")).await, 0);
    assert_eq!(s.store_rev(&format!("/devices/{homeless}")).await, 0);
    // Asking for a device outside its homes by id selects nothing of it.
    let by_id = create_job(
        &s,
        &scoped,
        json!({"select": {"ids": [in_b, in_a]}, "ops": [{"op": "set", "key": "k", "value": 2}]}),
    )
    .await;
    assert_eq!(by_id["selected"], 1);
    // Another key neither sees nor cancels it; the admin sees both.
    expect_error(
        s.req(Method::GET, &format!("/jobs/{id}"), Some(&other)).send().await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
    expect_error(
        s.req(Method::DELETE, &format!("/jobs/{id}"), Some(&other)).send().await,
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    )
    .await;
    assert_eq!(expect_json(s.req(Method::GET, "/jobs", Some(&other)).send().await, StatusCode::OK).await, json!([]));
    assert_eq!(ids(&expect_json(s.admin(Method::GET, "/jobs").send().await, StatusCode::OK).await).len(), 2);
}

#[tokio::test]
async fn a_rated_job_keeps_its_rate_survives_a_restart_and_can_be_cancelled() {
    let s = TestServer::start().await;
    let mut devices = Vec::new();
    for _ in 0..12 {
        devices.push(device(&s, None, "r", "", json!({})).await.0);
    }
    let job = create_job(
        &s,
        ADMIN_KEY,
        json!({"select": {"deviceClass": "r"}, "ops": [{"op": "set", "key": "k", "value": 1}], "rate": 4}),
    )
    .await;
    let id = job["id"].as_u64().expect("id");
    assert_eq!(job["rate"], 4.0);
    let started = std::time::Instant::now();
    let some = job_until(&s, ADMIN_KEY, id, "a first second's worth", |j| j["written"].as_u64() >= Some(4)).await;
    assert!(some["written"].as_u64() <= Some(8), "4 a second, not all at once: {some}");
    // A restart: the job goes on where it was.
    let kept = s.stop_keep_data().await;
    let config = kept.config();
    let s = kept.start(config).await;
    let done = job_until(&s, ADMIN_KEY, id, "done after the restart", |j| j["state"] == "done").await;
    assert_eq!(done["written"], 12);
    assert!(started.elapsed() >= Duration::from_millis(1900), "12 devices at 4 a second take over 2 s");
    for d in &devices {
        assert_eq!(s.store_rev(&format!("/devices/{d}")).await, 1, "device {d} written exactly once");
    }

    // Cancel: nothing more is written; the job says how far it got.
    let slow = create_job(
        &s,
        ADMIN_KEY,
        json!({"select": {"deviceClass": "r"}, "ops": [{"op": "set", "key": "k", "value": 2}], "rate": 1}),
    )
    .await;
    let slow_id = slow["id"].as_u64().expect("id");
    job_until(&s, ADMIN_KEY, slow_id, "one written", |j| j["written"].as_u64() >= Some(1)).await;
    let cancelled =
        expect_json(s.admin(Method::DELETE, &format!("/jobs/{slow_id}")).send().await, StatusCode::OK).await;
    assert_eq!(cancelled["state"], "cancelled");
    let written = cancelled["written"].as_u64().expect("written");
    assert!(written < 12, "{cancelled}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = expect_json(s.admin(Method::GET, &format!("/jobs/{slow_id}")).send().await, StatusCode::OK).await;
    assert_eq!(later["written"].as_u64(), Some(written), "nothing written after the cancel");
    assert_eq!(later["state"], "cancelled");
}
