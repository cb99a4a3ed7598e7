//! The API contract: one OpenAPI 3.1 document for the platform API
//! (`/v1`), the admin API (`/admin/v1`), the channel webhooks and the
//! health checks, served at `GET /openapi.json`.
//!
//! It is derived, not written: every handler carries its operation
//! (`#[utoipa::path]`: parameters, body, answers, the role it needs) and is
//! registered with utoipa-axum's `routes!`, which adds the route and its
//! operation in one call, so the router cannot serve an operation the
//! document lacks. Request and answer schemas come from the Rust types
//! (`ToSchema`). The answers every operation shares because of how it is
//! built (401/403 for a token, 400/413/415/422 for a JSON body, 400 for an
//! unparsable id) are added here from the operation's shape.
//!
//! Each operation names the role it needs twice: as the roles of its
//! security requirement (`bearer: [operator]`, as OpenAPI 3.1 allows for
//! any scheme) and in the extension `x-entitle-role`.

use std::sync::OnceLock;

use axum::{
    http::header,
    response::{IntoResponse, Redirect, Response},
};
use serde_json::{Value, json};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{AppState, admin, error::ErrorBody, openapi_v1};

/// The extension naming the role an operation needs: `support`,
/// `operator` or `admin` (staff tokens, each role including the ones
/// before it), `platform` (platform keys), or `public`.
pub const ROLE_EXTENSION: &str = "x-entitle-role";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Entitle",
        description = "Activation-code fulfillment: sales channels' webhooks in, codes out by email, redemption by the platform, and the admin API that support and operations run it with. Every error answer is `{code, detail}` (the `Error` schema): branch on `code`. Every admin action takes a reason and is audited with the caller's name; actions that take an `Idempotency-Key` do nothing twice.",
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorBody)),
    tags(
        (name = "platform", description = "The platform's API: redeem and check codes, with a platform key."),
        (name = "webhooks", description = "The sales channels' webhooks. Each verifies its channel's signature on the raw body before anything is stored."),
        (name = "orders", description = "Orders and accounts: find and trace them."),
        (name = "codes", description = "One code: look it up, and support's actions on it."),
        (name = "batches", description = "Codes created outside checkout."),
        (name = "deliveries", description = "Emails: send one again."),
        (name = "events", description = "The channels' webhook events as filed."),
        (name = "audit", description = "The audit log."),
        (name = "findings", description = "What reconciliation found."),
        (name = "reconciliations", description = "Reconciliation runs."),
        (name = "tokens", description = "Staff API tokens."),
        (name = "platform_keys", description = "The platform's API keys for /v1."),
        (name = "platform_events", description = "Events for the platform: endpoints, the delivery log, replay."),
        (name = "products", description = "The product catalogue."),
        (name = "health", description = "Liveness and readiness."),
        (name = "contract", description = "This document."),
    ),
)]
struct Contract;

/// The two bearer schemes: staff tokens and platform keys.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("ent_…")
                    .description(Some(
                        "A staff API token (`Authorization: Bearer ent_…`, the scheme's case \
                         does not matter) of role support, operator or admin; each role \
                         includes the ones before it. An operation's security requirement \
                         lists the least role it needs.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "platform_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A platform API key (`Authorization: Bearer <key>`) of role platform: \
                         what the platform's servers redeem and check codes with. Staff \
                         tokens are not accepted here, nor keys on the admin API.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Everything the document describes, each route registered with its
/// operation. The gateway serves this router (`crate::router`).
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(Contract::openapi())
        .routes(routes!(openapi_document))
        .routes(routes!(openapi_document_alias))
        .merge(crate::routes::health::router())
        .merge(openapi_v1::router())
        .merge(admin::router())
}

/// The OpenAPI document, as served.
pub fn document() -> Value {
    let openapi = api().into_openapi();
    let mut document = serde_json::to_value(&openapi).unwrap_or_else(|_| json!({}));
    add_shared_responses(&mut document);
    if let Some(schemas) = document
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    {
        for (name, schema) in openapi_v1::native_schemas() {
            schemas.insert(name, schema);
        }
    }
    document
}

/// The answers an operation gives because of how it is built, whichever
/// handler it is: named once in `components.responses` and referred to by
/// every operation they apply to.
fn add_shared_responses(document: &mut Value) {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
        })
    };
    let shared = json!({
        "Unauthorized": error("`unauthorized`: no Authorization header, another scheme than Bearer, or an unknown or revoked token or key"),
        "Forbidden": error("`forbidden`: the token's role is below the one this operation needs (its security requirement and `x-entitle-role` name it)"),
        "InvalidJson": error("`invalid_body`: the body is not JSON"),
        "InvalidBody": error("`invalid_body`: the JSON does not fit the request's schema (a field missing, unknown or of the wrong type)"),
        "UnsupportedMediaType": error("`invalid_body`: the body is not sent as `Content-Type: application/json`"),
        "BodyTooLarge": error("`body_too_large`: the body is over `gateway.max_body_bytes`"),
        "BadPathId": error("`bad_request`: an id in the path is not a UUID"),
        "Internal": error("`internal`: a failure of ours; it was logged"),
    });
    let Some(paths) = document.get_mut("paths").and_then(Value::as_object_mut) else {
        return;
    };
    for item in paths.values_mut().filter_map(Value::as_object_mut) {
        for operation in item.values_mut().filter_map(Value::as_object_mut) {
            let secured = operation
                .get("security")
                .and_then(Value::as_array)
                .is_some_and(|s| !s.is_empty());
            let json_body = operation
                .get("requestBody")
                .and_then(|body| body.pointer("/content/application~1json"))
                .is_some();
            // Webhooks read their body as bytes (the signature is over
            // them), so only an over-long one is refused before the handler.
            let raw_body = operation.contains_key("x-entitle-signature");
            let uuid_in_path = operation
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|parameters| {
                    parameters.iter().any(|p| {
                        p["in"] == "path" && p.pointer("/schema/format") == Some(&json!("uuid"))
                    })
                });
            let mut applies = Vec::new();
            if uuid_in_path {
                applies.push(("400", "BadPathId"));
            }
            if secured {
                applies.push(("401", "Unauthorized"));
                applies.push(("403", "Forbidden"));
            }
            if json_body && !raw_body {
                applies.push(("400", "InvalidJson"));
                applies.push(("415", "UnsupportedMediaType"));
                applies.push(("422", "InvalidBody"));
            }
            if json_body {
                applies.push(("413", "BodyTooLarge"));
            }
            if secured || json_body {
                applies.push(("500", "Internal"));
            }
            let Some(responses) = operation
                .get_mut("responses")
                .and_then(Value::as_object_mut)
            else {
                continue;
            };
            for (status, name) in applies {
                match responses.get_mut(status) {
                    None => {
                        responses.insert(
                            status.to_owned(),
                            json!({ "$ref": format!("#/components/responses/{name}") }),
                        );
                    }
                    // The operation says more about this status: add the
                    // shared cause to its description.
                    Some(own) => {
                        let extra = shared[name]["description"].as_str().unwrap_or_default();
                        if let Some(description) = own.get_mut("description") {
                            let text = description.as_str().unwrap_or_default();
                            if !text.contains(extra) {
                                *description = json!(format!("{text}; or {extra}"));
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(components) = document
        .get_mut("components")
        .and_then(Value::as_object_mut)
    {
        components.insert("responses".to_owned(), shared);
    }
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "contract",
    extensions(("x-entitle-role" = json!("public"))),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)),
)]
async fn openapi_document() -> Response {
    // It describes; it reveals no data: no authentication.
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| document().to_string());
    ([(header::CONTENT_TYPE, "application/json")], text.as_str()).into_response()
}

/// This document, where earlier versions served the admin API's.
#[utoipa::path(
    get, path = "/admin/v1/openapi.json", tag = "contract",
    extensions(("x-entitle-role" = json!("public"))),
    responses((status = 308, description = "Moved to `/openapi.json`",
        headers(("Location" = String, description = "`/openapi.json`")))),
)]
async fn openapi_document_alias() -> Redirect {
    Redirect::permanent("/openapi.json")
}
