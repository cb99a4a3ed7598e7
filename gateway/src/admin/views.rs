//! The parts the admin API's views share (a code, a delivery, an audit
//! event, an instant), and [`conform`], which reads a view's JSON as its
//! documented type. Each view's SQL still builds its whole answer in one
//! query; the types are what the OpenAPI document is derived from, and
//! `conform` keeps the two from drifting apart.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use super::outcomes::CodeState;
use crate::error::ApiError;

/// An instant as Postgres renders it (RFC 3339 with its offset). Passed
/// through as text, so answers keep exactly the text they always had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(String);

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339, e.g. `2026-11-24T09:30:00.123456+00:00`"))
            .into()
    }
}

impl ToSchema for Timestamp {}

/// A code as views show it: never the code, only its last four symbols.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeSummary {
    pub id: Uuid,
    pub last4: String,
    /// `••••-••••-••••-` and the last four symbols.
    pub masked: String,
    pub product_sku: String,
    pub state: CodeState,
    /// The unit of its order line; null for a batch's code.
    pub unit_index: Option<i32>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
    pub redeemed_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub expired_at: Option<Timestamp>,
    /// The code this one replaced (it was reissued as this one).
    pub replaces: Option<Uuid>,
    /// The code that replaced this one.
    pub replaced_by: Option<Uuid>,
    /// Who holds it now; null unless redeemed.
    pub assignment: Option<Holding>,
}

/// A code's current holder.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Holding {
    pub account_id: String,
    /// The person or thing the entitlement is for.
    pub entity_ref: String,
    pub assigned_at: Timestamp,
    /// `redemption`, or the staff member who reassigned it.
    pub assigned_by: String,
}

/// An email delivery as views show it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeliverySummary {
    pub id: Uuid,
    /// `order_codes`, `gift_codes`, `gift_receipt`, `batch_codes`,
    /// `resend`, `reissue`, `reminder`.
    pub kind: String,
    pub recipient_email: String,
    /// `pending`, `sending`, `sent`, `failed` or `skipped`.
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Not sent before this (a scheduled gift).
    pub send_after: Timestamp,
    pub sent_at: Option<Timestamp>,
    pub message_id: String,
    /// The staff member who asked for it (a resend), if anyone did.
    pub requested_by: Option<String>,
    /// How many codes it carries.
    pub codes: i64,
}

/// One audit event: who did what to which subject, why, and the data
/// before and after.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Increasing; pages of the audit log continue below the last one seen.
    pub id: i64,
    pub at: Timestamp,
    pub actor: String,
    /// e.g. `code.revoked`, `order.created`, `delivery.sent`.
    pub action: String,
    /// `order`, `code`, `batch`, `delivery`, `webhook_event`, `token`, ...
    pub subject_type: String,
    pub subject_id: String,
    pub reason: Option<String>,
    /// What changed; actions record `before` and `after`.
    #[schema(value_type = Object)]
    pub data: Value,
}

/// Reads `value` (a view's JSON, or a domain action's outcome) as its
/// documented type `T`. In debug builds, so in every test, the value must
/// come back from `T` unchanged: a field the type lacks or renders
/// differently is a 500 naming the difference, rather than a document that
/// quietly describes something else.
pub fn conform<T: Serialize + DeserializeOwned>(what: &str, value: Value) -> Result<T, ApiError> {
    let typed = T::deserialize(&value).map_err(|e| {
        ApiError::internal(format_args!("{what} does not fit its documented type: {e}"))
    })?;
    if cfg!(debug_assertions) {
        let documented = serde_json::to_value(&typed).map_err(ApiError::internal)?;
        if let Some(difference) = difference("", &value, &documented) {
            return Err(ApiError::internal(format_args!(
                "{what} differs from its documented type at {difference}"
            )));
        }
    }
    Ok(typed)
}

/// Where `answered` and `documented` first differ, as a JSON pointer with
/// the documented side (values may hold personal data: only the place is
/// named, and which side lacks it).
fn difference(at: &str, answered: &Value, documented: &Value) -> Option<String> {
    match (answered, documented) {
        (Value::Object(a), Value::Object(d)) => {
            for (key, value) in a {
                let here = format!("{at}/{key}");
                match d.get(key) {
                    None => return Some(format!("{here} (not in the type)")),
                    Some(other) => {
                        if let Some(found) = difference(&here, value, other) {
                            return Some(found);
                        }
                    }
                }
            }
            d.keys()
                .find(|key| !a.contains_key(*key))
                .map(|key| format!("{at}/{key} (only in the type)"))
        }
        (Value::Array(a), Value::Array(d)) if a.len() == d.len() => a
            .iter()
            .zip(d)
            .enumerate()
            .find_map(|(i, (a, d))| difference(&format!("{at}/{i}"), a, d)),
        (a, d) if a == d => None,
        _ => Some(format!("{at} (rendered differently)")),
    }
}
