//! The admin API's OpenAPI document, built from [`ROUTES`](super::ROUTES) so
//! it lists exactly what the router serves.

use axum::{Json, Router, routing::get};
use serde_json::{Map, Value, json};

use super::ROUTES;
use crate::AppState;

/// OpenAPI 3.1 for `/admin/v1`.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let parameters: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut operation = json!({
            "summary": route.summary,
            "description": format!("Needs the {} role (or higher).", route.role.as_str()),
            "security": [{ "bearer": [] }],
            "parameters": parameters,
            "responses": {
                "200": { "description": "OK" },
                "401": { "$ref": "#/components/responses/Error" },
                "403": { "$ref": "#/components/responses/Error" },
                "404": { "$ref": "#/components/responses/Error" },
                "409": { "$ref": "#/components/responses/Error" },
                "422": { "$ref": "#/components/responses/Error" }
            }
        });
        if let Some(example) = route.example {
            let example: Value = serde_json::from_str(example).expect("route examples are JSON");
            operation["parameters"]
                .as_array_mut()
                .expect("an array")
                .push(json!({ "name": "Idempotency-Key", "in": "header", "required": false,
                              "schema": { "type": "string" },
                              "description": "Retrying with the same key does nothing twice and answers the same." }));
            operation["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": { "type": "object" }, "example": example } }
            });
        }
        paths
            .entry(route.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(route.method.to_lowercase(), operation);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Entitle admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Support and operations: trace orders and codes; create, revoke, reissue, resend, reassign; review findings. Every action takes a reason and is audited with the token's name."
        },
        "paths": paths,
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "responses": {
                "Error": {
                    "description": "A stable error code and a sentence.",
                    "content": { "application/json": { "schema": {
                        "type": "object", "required": ["code", "detail"],
                        "properties": { "code": { "type": "string" }, "detail": { "type": "string" } }
                    } } }
                }
            }
        }
    })
}

async fn serve() -> Json<Value> {
    Json(document())
}

pub fn router() -> Router<AppState> {
    Router::new().route("/admin/v1/openapi.json", get(serve))
}
