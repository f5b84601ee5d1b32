//! The admin API (PROTOCOL.md §5): homes, devices and their keys, project API keys.
//! Admin key only, except `GET /devices/{own id}` for a device, and `GET /homes` and
//! `GET /devices/{id}` for project keys (the homes and devices they see). `GET /devices` with its filters is the fleet's (`fleet`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::header::LOCATION;
use axum::response::{IntoResponse, Response};
use ddp_protocol::{ApiKeyId, DeviceId, HomeId, Timestamp};
use ddp_store::{ApiKeyRecord, DeviceRecord, DeviceSync, DeviceUpdate, HomeRecord, NewApiKey, NewDevice, Permission};
use serde::Serialize;
use serde_json::{Map, Value as Json_};

use super::openapi::{ApiKeyBody, DeviceBody, DeviceChange, Errors, HomeBody};
use super::progress::SyncJson;
use super::{AdminCaller, Body, Caller};
use crate::app::App;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::secret::{self, SecretKind};

/// Longest name of a home, device or API key, in characters.
const MAX_NAME_CHARS: usize = 255;

fn parse_id<T: FromStr<Err = ddp_protocol::IdError>>(what: &str, text: &str) -> Result<T> {
    text.parse().map_err(|e| Error::invalid_parameter(format!("{what} {e}")))
}

/// A JSON object body whose fields are checked one by one.
struct Fields(Map<String, Json_>);

impl Fields {
    /// Parses `body` as an object holding only `allowed` fields (an empty body is `{}`).
    fn parse(body: &[u8], allowed: &[&str]) -> Result<Fields> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Fields(Map::new()));
        }
        let value: Json_ =
            serde_json::from_slice(body).map_err(|e| Error::invalid_json(format!("the body is not JSON: {e}")))?;
        let Json_::Object(map) = value else {
            return Err(Error::invalid_json("the body must be a JSON object"));
        };
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Error::invalid_parameter(format!(
                "unknown field {unknown:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        Ok(Fields(map))
    }

    fn string(&self, field: &str, max_chars: usize) -> Result<Option<String>> {
        match self.0.get(field) {
            None | Some(Json_::Null) => Ok(None),
            Some(Json_::String(s)) if s.chars().count() <= max_chars => Ok(Some(s.clone())),
            Some(Json_::String(_)) => {
                Err(Error::invalid_parameter(format!("{field} is longer than {max_chars} characters")))
            }
            Some(_) => Err(Error::invalid_parameter(format!("{field} must be a string"))),
        }
    }

    fn name(&self, required: bool) -> Result<Option<String>> {
        match self.string("name", MAX_NAME_CHARS)? {
            Some(n) if n.trim().is_empty() => Err(Error::invalid_parameter("name must not be blank")),
            None if required => Err(Error::invalid_parameter("name is required")),
            n => Ok(n),
        }
    }

    /// Absent: `None`; `null`: `Some(None)`; an id: `Some(Some(id))`.
    fn home_id(&self, field: &str) -> Result<Option<Option<HomeId>>> {
        match self.0.get(field) {
            None => Ok(None),
            Some(Json_::Null) => Ok(Some(None)),
            Some(v) => Ok(Some(Some(json_id(field, v)?))),
        }
    }

    fn home_ids(&self, field: &str) -> Result<Option<Vec<HomeId>>> {
        match self.0.get(field) {
            None | Some(Json_::Null) => Ok(None),
            Some(Json_::Array(ids)) if ids.is_empty() => Err(Error::invalid_parameter(format!(
                "{field} must name at least one home; leave it out for every home"
            ))),
            Some(Json_::Array(ids)) => ids.iter().map(|v| json_id(field, v)).collect::<Result<Vec<_>>>().map(Some),
            Some(_) => Err(Error::invalid_parameter(format!("{field} must be an array of home ids"))),
        }
    }
}

/// A JSON field's positive integer id, or `400 INVALID_PARAMETER` naming the field.
pub(crate) fn json_id<T: TryFrom<u64>>(field: &str, v: &Json_) -> Result<T> {
    v.as_u64()
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| Error::invalid_parameter(format!("{field} must hold positive integer ids, got {v}")))
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Home)]
pub(crate) struct HomeJson<'a> {
    #[schema(value_type = u64)]
    id: HomeId,
    name: &'a str,
    #[schema(value_type = String, format = DateTime)]
    creation_time: Timestamp,
}

impl<'a> From<&'a HomeRecord> for HomeJson<'a> {
    fn from(h: &'a HomeRecord) -> HomeJson<'a> {
        HomeJson { id: h.id, name: &h.name, creation_time: h.created }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Device)]
pub(crate) struct DeviceJson<'a> {
    #[schema(value_type = u64)]
    id: DeviceId,
    name: &'a str,
    #[schema(value_type = Option<u64>)]
    home_id: Option<HomeId>,
    device_class: &'a str,
    tag: &'a str,
    #[schema(value_type = String, format = DateTime)]
    creation_time: Timestamp,
    /// A live sync or command session on some node.
    is_connected: bool,
    #[schema(value_type = Option<String>, format = DateTime)]
    last_connect_time: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    last_disconnect_time: Option<Timestamp>,
    /// Delivery and acknowledgement (PROTOCOL.md §10).
    sync: SyncJson,
    /// The device's key: only in the answer to `POST /devices`.
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<&'a str>,
}

/// What device objects show of their devices' sessions: which hold a live session on some
/// node, and where each device's sync stands.
pub(super) struct Live {
    connected: std::collections::HashSet<DeviceId>,
    sync: HashMap<DeviceId, DeviceSync>,
}

impl Live {
    pub(super) async fn of(app: &App, devices: &[DeviceRecord]) -> Result<Live> {
        let ids: Vec<DeviceId> = devices.iter().map(|d| d.id).collect();
        let connected = app.store.connected(ids.clone()).await?.into_iter().collect();
        let sync = app.kv.progress_of(ids).await?.into_iter().map(|s| (s.device, s)).collect();
        Ok(Live { connected, sync })
    }

    pub(super) fn json<'a>(&self, d: &'a DeviceRecord) -> DeviceJson<'a> {
        let is_connected = self.connected.contains(&d.id);
        let sync = self.sync.get(&d.id).map_or_else(SyncJson::blank, |s| SyncJson::new(s, is_connected));
        device_json(d, is_connected, sync, None)
    }
}

fn device_json<'a>(
    d: &'a DeviceRecord,
    is_connected: bool,
    sync: SyncJson,
    api_key: Option<&'a str>,
) -> DeviceJson<'a> {
    DeviceJson {
        id: d.id,
        name: &d.name,
        home_id: d.home,
        device_class: &d.device_class,
        tag: &d.tag,
        creation_time: d.created,
        is_connected,
        last_connect_time: d.last_connect,
        last_disconnect_time: d.last_disconnect,
        sync,
        api_key,
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ApiKey)]
pub(crate) struct ApiKeyJson<'a> {
    #[schema(value_type = u64)]
    id: ApiKeyId,
    name: &'a str,
    /// The homes it sees; `null`: every home.
    #[schema(value_type = Option<Vec<u64>>)]
    homes: Option<&'a [HomeId]>,
    /// `read` or `readWrite`.
    permission: &'static str,
    #[schema(value_type = String, format = DateTime)]
    creation_time: Timestamp,
    /// The secret: only in the answer to `POST /apiKeys`.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
}

/// The answer to `POST /devices/{id}/apiKey`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewDeviceKey {
    /// The device's new key (the old one stopped working).
    api_key: String,
}

fn api_key_json<'a>(k: &'a ApiKeyRecord, key: Option<&'a str>) -> ApiKeyJson<'a> {
    ApiKeyJson {
        id: k.id,
        name: &k.name,
        homes: k.homes.as_deref(),
        permission: k.permission.as_str(),
        creation_time: k.created,
        key,
    }
}

fn created(location: String, body: impl Serialize) -> Response {
    (StatusCode::CREATED, [(LOCATION, location)], Json(body)).into_response()
}

// ---- homes ----

/// `POST /homes` `{"name"}`
#[utoipa::path(post, path = "/homes", tag = "admin", security(("ModeCloud" = [])), request_body = HomeBody,
    responses((status = 201, body = HomeJson, headers(("Location" = String))), Errors))]
pub(crate) async fn create_home(State(app): State<Arc<App>>, _: AdminCaller, Body(body): Body) -> Result<Response> {
    let fields = Fields::parse(&body, &["name"])?;
    let name = fields.name(true)?.unwrap_or_default();
    let home = app.store.create_home(name).await?;
    tracing::info!(home = %home.id, "home created");
    Ok(created(format!("/homes/{}", home.id), HomeJson::from(&home)))
}

/// `GET /homes`: every home for the admin; the homes it sees for a project key.
#[utoipa::path(get, path = "/homes", tag = "admin", security(("ModeCloud" = [])), responses((status = 200, body = Vec<HomeJson>), Errors))]
pub(crate) async fn list_homes(State(app): State<Arc<App>>, Caller(who): Caller) -> Result<Response> {
    if let Principal::Device(_) = who {
        return Err(Error::denied("this needs the admin key or a project key"));
    }
    let homes = app.store.homes().await?;
    Ok(Json(homes.iter().filter(|h| who.sees_home(h.id)).map(HomeJson::from).collect::<Vec<_>>()).into_response())
}

/// `GET /homes/{id}`
#[utoipa::path(get, path = "/homes/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The home id", minimum = 1)),
    responses((status = 200, body = HomeJson), Errors))]
pub(crate) async fn get_home(State(app): State<Arc<App>>, _: AdminCaller, Path(id): Path<String>) -> Result<Response> {
    let home = app.store.home(parse_id("home", &id)?).await?;
    Ok(Json(HomeJson::from(&home)).into_response())
}

/// `DELETE /homes/{id}`: its devices leave it, its store is deleted.
#[utoipa::path(delete, path = "/homes/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The home id", minimum = 1)),
    responses((status = 204, description = "Deleted; its devices left it"), Errors))]
pub(crate) async fn delete_home(
    State(app): State<Arc<App>>,
    _: AdminCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id: HomeId = parse_id("home", &id)?;
    app.store.delete_home(id).await?;
    tracing::info!(home = %id, "home deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- devices ----

/// `POST /devices` `{"name","homeId"?,"deviceClass"?,"tag"?}`: the answer holds the device's
/// API key, shown this once.
#[utoipa::path(post, path = "/devices", tag = "admin", security(("ModeCloud" = [])), request_body = DeviceBody,
    responses((status = 201, description = "Created; `apiKey` is shown only here", body = DeviceJson,
        headers(("Location" = String))), Errors))]
pub(crate) async fn create_device(State(app): State<Arc<App>>, _: AdminCaller, Body(body): Body) -> Result<Response> {
    let fields = Fields::parse(&body, &["name", "homeId", "deviceClass", "tag"])?;
    let name = fields.name(true)?.unwrap_or_default();
    let home = fields.home_id("homeId")?.flatten();
    let device_class = fields.string("deviceClass", MAX_NAME_CHARS)?.unwrap_or_default();
    let tag = fields.string("tag", MAX_NAME_CHARS)?.unwrap_or_default();
    let api_key = secret::generate(SecretKind::Device);
    let new = NewDevice { name, home, device_class, tag, key_hash: secret::digest(&api_key) };
    let device = app.store.create_device(new).await?;
    tracing::info!(device = %device.id, home = ?device.home.map(HomeId::get), "device created");
    Ok(created(format!("/devices/{}", device.id), device_json(&device, false, SyncJson::blank(), Some(&api_key))))
}

/// `GET /devices/{id}`: the admin, or the device itself.
#[utoipa::path(get, path = "/devices/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The device id", minimum = 1)),
    responses((status = 200, body = DeviceJson), Errors))]
pub(crate) async fn get_device(
    State(app): State<Arc<App>>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Response> {
    let id: DeviceId = parse_id("device", &id)?;
    match who {
        Principal::Admin => {}
        Principal::Device(me) if me == id => app.kv.admit(&who)?,
        Principal::Device(_) => return Err(Error::denied("a device may only read its own record")),
        // As in `GET /devices`: a project key reads the devices it sees (PROTOCOL.md §12).
        Principal::Project(_) => app.kv.may_read_device(&who, id).await?,
    }
    let device = app.store.device(id).await?;
    let live = Live::of(&app, std::slice::from_ref(&device)).await?;
    Ok(Json(live.json(&device)).into_response())
}

/// `PATCH /devices/{id}` `{"name"?,"homeId"?}` (`homeId: null` takes it out of its home).
#[utoipa::path(patch, path = "/devices/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The device id", minimum = 1)),
    request_body = DeviceChange, responses((status = 200, body = DeviceJson), Errors))]
pub(crate) async fn update_device(
    State(app): State<Arc<App>>,
    _: AdminCaller,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Response> {
    let id: DeviceId = parse_id("device", &id)?;
    let fields = Fields::parse(&body, &["name", "homeId"])?;
    let update = DeviceUpdate { name: fields.name(false)?, home: fields.home_id("homeId")? };
    let device = app.store.update_device(id, update).await?;
    tracing::info!(device = %id, home = ?device.home.map(HomeId::get), "device updated");
    let live = Live::of(&app, std::slice::from_ref(&device)).await?;
    Ok(Json(live.json(&device)).into_response())
}

/// `POST /devices/{id}/apiKey`: a new key; the old one stops working at once.
#[utoipa::path(post, path = "/devices/{id}/apiKey", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The device id", minimum = 1)),
    responses((status = 200, description = "The new key; the old one and its sessions are gone", body = NewDeviceKey), Errors))]
pub(crate) async fn rotate_device_key(
    State(app): State<Arc<App>>,
    _: AdminCaller,
    Path(id): Path<String>,
) -> Result<Response> {
    let id: DeviceId = parse_id("device", &id)?;
    let api_key = secret::generate(SecretKind::Device);
    app.store.rotate_device_key(id, secret::digest(&api_key)).await?;
    tracing::info!(device = %id, "device key rotated");
    Ok(Json(NewDeviceKey { api_key }).into_response())
}

/// `DELETE /devices/{id}`: its store and live sessions are gone.
#[utoipa::path(delete, path = "/devices/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The device id", minimum = 1)),
    responses((status = 204, description = "Deleted with its store and sessions"), Errors))]
pub(crate) async fn delete_device(
    State(app): State<Arc<App>>,
    _: AdminCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id: DeviceId = parse_id("device", &id)?;
    app.store.delete_device(id).await?;
    tracing::info!(device = %id, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

// ---- project API keys ----

/// `POST /apiKeys` `{"name","homes"?,"permission"}`: the answer holds the key, shown this once.
#[utoipa::path(post, path = "/apiKeys", tag = "admin", security(("ModeCloud" = [])), request_body = ApiKeyBody,
    responses((status = 201, description = "Created; `key` is shown only here", body = ApiKeyJson,
        headers(("Location" = String))), Errors))]
pub(crate) async fn create_api_key(State(app): State<Arc<App>>, _: AdminCaller, Body(body): Body) -> Result<Response> {
    let fields = Fields::parse(&body, &["name", "homes", "permission"])?;
    let name = fields.name(true)?.unwrap_or_default();
    let homes = fields.home_ids("homes")?;
    let permission = match fields.string("permission", 16)? {
        Some(p) => Permission::parse(&p).ok_or_else(|| {
            Error::invalid_parameter(format!("permission must be \"read\" or \"readWrite\", got {p:?}"))
        })?,
        None => return Err(Error::invalid_parameter("permission is required: \"read\" or \"readWrite\"")),
    };
    let key = secret::generate(SecretKind::Project);
    let record =
        app.store.create_api_key(NewApiKey { name, homes, permission, key_hash: secret::digest(&key) }).await?;
    tracing::info!(api_key = %record.id, permission = permission.as_str(), "project API key created");
    Ok(created(format!("/apiKeys/{}", record.id), api_key_json(&record, Some(&key))))
}

/// `GET /apiKeys` (never the secrets)
#[utoipa::path(get, path = "/apiKeys", tag = "admin", security(("ModeCloud" = [])), responses((status = 200, body = Vec<ApiKeyJson>), Errors))]
pub(crate) async fn list_api_keys(State(app): State<Arc<App>>, _: AdminCaller) -> Result<Response> {
    let keys = app.store.api_keys().await?;
    Ok(Json(keys.iter().map(|k| api_key_json(k, None)).collect::<Vec<_>>()).into_response())
}

/// `DELETE /apiKeys/{id}`: effective at once.
#[utoipa::path(delete, path = "/apiKeys/{id}", tag = "admin", security(("ModeCloud" = [])), params(("id" = u64, Path, description = "The API key id", minimum = 1)),
    responses((status = 204, description = "Revoked at once"), Errors))]
pub(crate) async fn delete_api_key(
    State(app): State<Arc<App>>,
    _: AdminCaller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id: ApiKeyId = parse_id("API key", &id)?;
    app.store.delete_api_key(id).await?;
    tracing::info!(api_key = %id, "project API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
