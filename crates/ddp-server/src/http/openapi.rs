//! The OpenAPI 3.1 document of the REST API, `GET /openapi.json` (PROTOCOL.md §13).
//!
//! It cannot drift from the code: every API route is registered through utoipa-axum's `routes!`
//! from the `#[utoipa::path]` annotation on its handler (the annotation's path *is* the route, see
//! `http::api`), and the response bodies are the handlers' own serialised types, deriving
//! [`utoipa::ToSchema`]. Outside the document on purpose: the console's static files
//! (`/console/…`) and `…/kv/` with an empty key (the same `INVALID_KEY` as any bad key). The error responses are generated from [`Reason`]: every status an error
//! can have, each with the reasons that give it, so a new reason shows up here by itself.
//!
//! What the document adds by hand: the shapes of the bodies that the admin API, commands and
//! events check field by field (the types below; key writes, batches and jobs document the types
//! they parse into), and the key routes' path: an axum wildcard (`…/kv/{*key}`), renamed
//! `…/kv/{key}` in the document (OpenAPI has no wildcards).
//!
//! `scripts/test-openapi` runs schemathesis against a live server from this document: no `5xx`,
//! every answer inside its schema.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use ddp_protocol::Reason;
use serde::Serialize;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::openapi::{OpenApi, RefOr, Response};
use utoipa::{Modify, ToSchema};

/// The document's frame: what `routes!` adds the paths to.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Device Data Proxy",
        description = "A cloud key-value store per IoT device that is also a two-way channel between apps and \
                       devices. This document covers the REST API; the sync messages of the WebSocket and MQTT \
                       transports are in docs/PROTOCOL.md §4. Send `Authorization: ModeCloud <token>` with the \
                       admin key, a project key, or a device's key.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&Security),
    components(schemas(ErrorBody)),
    tags(
        (name = "stores", description = "Device and home key-value stores (PROTOCOL.md §3, §10, §11)"),
        (name = "admin", description = "Homes, devices and project keys (§5)"),
        (name = "fleet", description = "Fleet queries and jobs (§12)"),
        (name = "devices", description = "Commands, events and sync status of one device (§6, §8, §10)"),
        (name = "streams", description = "WebSocket endpoints, described here only by their upgrade (§4, §6, §8, §9)"),
        (name = "operations", description = "Health, readiness, metrics and this document (§7, §13)"),
    )
)]
pub(crate) struct ApiDoc;

/// The `ModeCloud` token scheme.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "ModeCloud",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`ModeCloud <token>` (or `Bearer <token>`): the admin key, a project key or a device's key. \
                 WebSocket endpoints also take `?authToken=<token>`.",
            ))),
        );
    }
}

/// The final document: the paths `routes!` collected, with wildcard parameters renamed.
pub(crate) fn finish(mut doc: OpenApi) -> OpenApi {
    let paths = std::mem::take(&mut doc.paths.paths);
    doc.paths.paths = paths.into_iter().map(|(path, item)| (path.replace("{*", "{"), item)).collect();
    doc
}

/// Every error answer: `{"reason","message","data"?}` (PROTOCOL.md §2).
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// Machine-readable, `UPPER_SNAKE_CASE`.
    #[schema(schema_with = reason_schema)]
    pub(crate) reason: Reason,
    /// For people.
    pub(crate) message: String,
    /// Details of some errors (`rev`, `index`, `limit`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = any_value)]
    pub(crate) data: Option<serde_json::Value>,
}

/// Any JSON value.
pub(crate) fn any_value() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::AnyValue)
}

fn reason_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(Reason::ALL.iter().map(|r| r.as_str())))
}

/// The error answers every endpoint may give, one per status, each naming its reasons.
pub(crate) struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
        for reason in Reason::ALL {
            by_status.entry(reason.http_status()).or_default().push(reason.as_str());
        }
        by_status
            .into_iter()
            .map(|(status, reasons)| {
                let schema = ObjectBuilder::new()
                    .property(
                        "reason",
                        ObjectBuilder::new().schema_type(Type::String).enum_values(Some(reasons.clone())),
                    )
                    .required("reason")
                    .property("message", ObjectBuilder::new().schema_type(Type::String))
                    .required("message")
                    .property("data", ObjectBuilder::new().schema_type(SchemaType::AnyValue));
                let name = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
                let mut response = ResponseBuilder::new()
                    .description(format!("{name}: {}", reasons.join(", ")))
                    .content("application/json", ContentBuilder::new().schema(Some(schema)).build());
                if status == 429 || status == 503 {
                    response = response.header(
                        "Retry-After",
                        HeaderBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::Integer)))
                            .description(Some("Seconds to wait before trying again"))
                            .build(),
                    );
                }
                (status.to_string(), RefOr::T(response.build()))
            })
            .collect()
    }
}

// ---- request bodies (the handlers parse them from text; these are their shapes) ----

/// `POST /homes`
#[derive(serde::Deserialize, ToSchema)]
#[allow(dead_code)]
#[schema(as = NewHome)]
pub(crate) struct HomeBody {
    /// 1–255 characters, not blank.
    #[schema(min_length = 1, max_length = 255)]
    name: String,
}

/// `POST /devices`
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
#[schema(as = NewDevice)]
pub(crate) struct DeviceBody {
    /// 1–255 characters, not blank.
    #[schema(min_length = 1, max_length = 255)]
    name: String,
    /// The home it joins; absent or `null`: none.
    home_id: Option<u64>,
    /// Up to 255 characters.
    #[schema(max_length = 255)]
    device_class: Option<String>,
    /// Up to 255 characters.
    #[schema(max_length = 255)]
    tag: Option<String>,
}

/// `PATCH /devices/{id}`
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct DeviceChange {
    /// A new name (1–255 characters, not blank).
    #[schema(min_length = 1, max_length = 255)]
    name: Option<String>,
    /// Moves the device; `null` removes it from its home.
    home_id: Option<u64>,
}

/// `POST /apiKeys`
#[derive(serde::Deserialize, ToSchema)]
#[allow(dead_code)]
#[schema(as = NewApiKey)]
pub(crate) struct ApiKeyBody {
    /// 1–255 characters, not blank.
    #[schema(min_length = 1, max_length = 255)]
    name: String,
    /// The homes it may see; absent: every home.
    #[schema(min_items = 1)]
    homes: Option<Vec<u64>>,
    /// `read` or `readWrite`.
    #[schema(schema_with = permission_schema)]
    permission: String,
}

fn permission_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["read", "readWrite"]))
}

/// One op of a batch (PROTOCOL.md §11): `set` (with `value`), `delete`, or `merge` (with a
/// `value` object: RFC 7396 merge patch).
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct BatchOp {
    #[schema(schema_with = op_name_schema)]
    op: String,
    /// 1–255 of `A-Z a-z 0-9 _ - : .`
    #[schema(pattern = r"^[A-Za-z0-9_:.\-]{1,255}$")]
    key: String,
    /// The value to set, or the merge patch (an object); not for `delete`.
    #[schema(schema_with = any_value)]
    value: Option<serde_json::Value>,
    /// The item's rev when the op applies (`0`: the key must be absent).
    if_rev: Option<u64>,
}

fn op_name_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["set", "delete", "merge"]))
}

/// `PUT /devices/{id}/command`
#[derive(serde::Deserialize, ToSchema)]
#[allow(dead_code)]
#[schema(as = Command)]
pub(crate) struct CommandBody {
    /// 1–255 characters.
    #[schema(min_length = 1, max_length = 255)]
    action: String,
    /// Sent to the device as given; absent or `null`: `{}`.
    #[schema(value_type = Option<Object>)]
    parameters: Option<serde_json::Value>,
}

/// `PUT /devices/{id}/event`
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
#[schema(as = NewEvent)]
pub(crate) struct EventBody {
    /// Not starting and ending with `_` (those are the system's).
    event_type: String,
    #[schema(schema_with = any_value)]
    event_data: Option<serde_json::Value>,
}

/// Which devices a job writes: the filters of `GET /devices` by their query names, and/or ids;
/// no filter at all needs `"all": true`.
#[derive(serde::Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct JobSelect {
    home_id: Option<u64>,
    device_class: Option<String>,
    tag: Option<String>,
    is_connected: Option<bool>,
    /// `<key><op><JSON literal>`, `<key>` or `!<key>`.
    #[serde(rename = "where")]
    where_: Option<Vec<String>>,
    behind: Option<bool>,
    ids: Option<Vec<u64>>,
    all: Option<bool>,
}

// ---- parameters shared by the key routes ----

/// `{key}` of a key route.
#[derive(utoipa::IntoParams)]
#[into_params(names("key"), parameter_in = Path)]
#[allow(dead_code)]
pub(crate) struct KeyParam(
    /// The key: 1–255 of `A-Z a-z 0-9 _ - : .`
    #[param(pattern = r"^[A-Za-z0-9_:.\-]{1,255}$")]
    String,
);

/// The preconditions of a key write (§3.2).
#[derive(utoipa::IntoParams)]
#[into_params(names("If-Match", "If-None-Match"), parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct Preconditions(
    /// Revs (`"5"`, comma-separated), or `*`: the key must exist
    Option<String>,
    /// `*`: only if the key is absent
    Option<String>,
);

/// The precondition of a delete (§3.2).
#[derive(utoipa::IntoParams)]
#[into_params(names("If-Match"), parameter_in = Header)]
#[allow(dead_code)]
pub(crate) struct IfMatch(
    /// Revs (`"5"`, comma-separated), or `*`: the key must exist
    Option<String>,
);

/// `?wait=` of a write (§10).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub(crate) struct WaitQuery {
    /// `applied` or `delivered`: answer once the device has (or the wait ends)
    wait: Option<String>,
    /// Seconds to wait, 0–60 (default 10)
    #[param(minimum = 0, maximum = 60)]
    wait_timeout: Option<f64>,
}

/// `GET /healthz`, `GET /readyz`
#[derive(Serialize, ToSchema)]
pub(crate) struct Status {
    /// `ok` (healthz) or `ready` (readyz).
    pub(crate) status: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::IntoResponses;

    #[test]
    fn every_reason_has_an_error_response_of_its_status() {
        let responses = Errors::responses();
        for reason in Reason::ALL {
            let status = reason.http_status().to_string();
            let Some(RefOr::T(response)) = responses.get(&status) else {
                panic!("no response for {status}");
            };
            assert!(response.description.contains(reason.as_str()), "{status}: {}", response.description);
        }
    }

    #[test]
    fn wildcards_are_renamed() {
        let mut doc = <ApiDoc as utoipa::OpenApi>::openapi();
        doc.paths.paths.insert("/devices/{id}/kv/{*key}".to_owned(), Default::default());
        let doc = finish(doc);
        assert!(doc.paths.paths.contains_key("/devices/{id}/kv/{key}"));
        assert!(!doc.paths.paths.keys().any(|p| p.contains('*')));
    }
}
