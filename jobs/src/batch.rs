//! Batches: codes created outside checkout (customer service, partner
//! distribution, test accounts, replacements), optionally emailed at once,
//! and their one-time CSV export. The admin API and the console both call
//! these.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{
    context::Context,
    delivery::{self, CodeSelection, NewDelivery},
    issuance,
    lifecycle::{CodeRef, Refused, Who},
};

/// The most codes one batch may hold.
pub const MAX_QUANTITY: u32 = 10_000;

/// Why a batch was made (`code_batch.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchKind {
    CustomerService,
    PartnerDistribution,
    TestAccount,
    Replacement,
}

impl BatchKind {
    pub const ALL: [BatchKind; 4] = [
        BatchKind::CustomerService,
        BatchKind::PartnerDistribution,
        BatchKind::TestAccount,
        BatchKind::Replacement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchKind::CustomerService => "customer_service",
            BatchKind::PartnerDistribution => "partner_distribution",
            BatchKind::TestAccount => "test_account",
            BatchKind::Replacement => "replacement",
        }
    }

    pub fn parse(text: &str) -> Option<BatchKind> {
        BatchKind::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// For people.
    pub fn label(self) -> &'static str {
        match self {
            BatchKind::CustomerService => "Customer service",
            BatchKind::PartnerDistribution => "Partner distribution",
            BatchKind::TestAccount => "Test account",
            BatchKind::Replacement => "Replacement",
        }
    }
}

/// A batch as asked for.
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub product_sku: &'a str,
    pub quantity: u32,
    pub kind: &'a str,
    pub account_id: Option<&'a str>,
    pub order_id: Option<Uuid>,
    /// Email the codes to this address now.
    pub email: Option<&'a str>,
}

/// What creating a batch did.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub id: Uuid,
    pub quantity: u32,
    pub kind: BatchKind,
    /// The first hundred codes, by their last four symbols.
    pub codes: Vec<CodeRef>,
    pub delivery: Option<Uuid>,
    /// Where the codes can be downloaded, once.
    pub export: String,
}

/// Creates a batch of codes, audited as `batch.created`.
pub async fn create(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    batch: &NewBatch<'_>,
) -> Result<Created, Refused> {
    if !(1..=MAX_QUANTITY).contains(&batch.quantity) {
        return Err(Refused::invalid(
            "invalid_request",
            format!("quantity must be 1 to {MAX_QUANTITY}"),
        ));
    }
    let kind = BatchKind::parse(batch.kind).ok_or_else(|| {
        Refused::invalid(
            "invalid_request",
            "kind must be customer_service, partner_distribution, test_account or replacement",
        )
    })?;
    if kind == BatchKind::Replacement {
        // Replacements come from reissues, linked to the code they replace.
        return Err(Refused::invalid(
            "invalid_request",
            "replacement codes are made by reissuing a code",
        ));
    }
    let account_id = batch.account_id.map(str::trim).filter(|a| !a.is_empty());
    let email = batch.email.map(str::trim).filter(|e| !e.is_empty());
    if let Some(email) = email
        && email.parse::<lettre::Address>().is_err()
    {
        return Err(Refused::invalid("invalid_email", "email is not an address"));
    }
    let product: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM product WHERE sku = $1 AND active")
            .bind(batch.product_sku)
            .fetch_optional(&mut *conn)
            .await?;
    let product = product.ok_or(Refused::NotFound("active product with that sku"))?;
    if let Some(order_id) = batch.order_id {
        let found: Option<Uuid> = sqlx::query_scalar("SELECT id FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_optional(&mut *conn)
            .await?;
        found.ok_or(Refused::NotFound("order"))?;
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO code_batch (id, product_id, kind, quantity, requested_by, reason, account_id, order_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(product)
    .bind(kind.as_str())
    .bind(batch.quantity as i32)
    .bind(who.actor)
    .bind(who.reason)
    .bind(account_id)
    .bind(batch.order_id)
    .execute(&mut *conn)
    .await?;
    let codes =
        issuance::issue_batch_codes(conn, &ctx.keys, product, id, batch.quantity, None).await?;
    let delivery = match email {
        Some(email) => {
            delivery::create(
                conn,
                &NewDelivery {
                    order_id: batch.order_id,
                    kind: "batch_codes",
                    recipient: email,
                    recipient_name: None,
                    send_after: Utc::now(),
                    codes: CodeSelection::These(codes.iter().map(|(id, _)| *id).collect()),
                    requested_by: Some(who.actor),
                },
                &ctx.config.email.message_id_domain,
            )
            .await?
        }
        None => None,
    };
    who.audit(
        conn,
        "batch.created",
        "batch",
        id.to_string(),
        json!({
            "before": null,
            "after": { "product": batch.product_sku, "quantity": batch.quantity, "kind": kind,
                       "account_id": account_id, "order_id": batch.order_id,
                       "emailed_to": email, "delivery": delivery },
        }),
    )
    .await?;
    Ok(Created {
        id,
        quantity: batch.quantity,
        kind,
        codes: codes
            .into_iter()
            .take(100)
            .map(|(id, last4)| CodeRef { id, last4 })
            .collect(),
        delivery,
        export: format!("/admin/v1/batches/{id}/export"),
    })
}

/// The batch's codes as CSV, once: a second export is refused, so a partner
/// file exists in one copy; only the same request again (`key`, a form's
/// one-time key) gets the file again, unchanged. Audited as `batch.exported`.
pub async fn export(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    id: Uuid,
    key: Option<&str>,
) -> Result<String, Refused> {
    let exported: Option<(Option<DateTime<Utc>>, Option<String>)> =
        sqlx::query_as("SELECT exported_at, export_key FROM code_batch WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let replay = match exported {
        None => return Err(Refused::NotFound("batch")),
        Some((Some(_), Some(stored))) if key == Some(stored.as_str()) => true,
        Some((Some(at), _)) => {
            return Err(Refused::conflict(
                "batch_already_exported",
                format!("exported at {at}"),
            ));
        }
        Some((None, _)) => false,
    };
    if !replay {
        sqlx::query("UPDATE code_batch SET exported_at = now(), export_key = $2 WHERE id = $1")
            .bind(id)
            .bind(key)
            .execute(&mut *conn)
            .await?;
    }
    let rows = sqlx::query(
        "SELECT c.code_sealed, c.state, c.expires_at, p.sku FROM activation_code c
         JOIN product p ON p.id = c.product_id WHERE c.batch_id = $1 ORDER BY c.id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut csv = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    let write = |e: csv::Error| sqlx::Error::Protocol(format!("writing the CSV: {e}"));
    csv.write_record(["code", "product", "state", "valid_until"])
        .map_err(write)?;
    for row in &rows {
        let code = ctx
            .keys
            .unseal(&row.get::<Vec<u8>, _>("code_sealed"))
            .map_err(|e| sqlx::Error::Protocol(format!("a sealed code: {e}")))?;
        let expires: DateTime<Utc> = row.get("expires_at");
        csv.write_record([
            code.display().to_string(),
            row.get::<String, _>("sku"),
            row.get::<String, _>("state"),
            expires.format("%Y-%m-%d").to_string(),
        ])
        .map_err(write)?;
    }
    let csv = csv
        .into_inner()
        .map_err(|e| sqlx::Error::Protocol(format!("writing the CSV: {e}")))?;
    if replay {
        return Ok(String::from_utf8(csv).unwrap_or_default());
    }
    who.audit(
        conn,
        "batch.exported",
        "batch",
        id.to_string(),
        json!({ "before": { "exported": false },
                "after": { "exported": true, "codes": rows.len() } }),
    )
    .await?;
    Ok(String::from_utf8(csv).unwrap_or_default())
}
