//! Batches: codes created outside checkout (customer service, partner
//! distribution, test accounts, replacements), optionally emailed at once,
//! and their CSV export (one holder, downloadable again for a short window).
//! The admin API and the console both call these.

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
    /// Where the codes are downloaded (by one actor, again within
    /// `codes.export_window_secs` of the first download).
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

/// A batch's first download, when the window to download it again ends,
/// and whether it is still open (both `None`, and open, before the first).
type ExportState = (Option<DateTime<Utc>>, Option<DateTime<Utc>>, bool);

/// The batch's codes as CSV. The first download takes the file for its
/// actor; that actor may download it again for `codes.export_window_secs`
/// after it, so a dropped connection does not lose the codes, and nobody
/// else ever may (`export_taken_by_another`); after the window, nobody
/// (`export_window_closed`): a partner file exists in one copy, with one
/// holder. Every download is audited as `batch.exported`, numbered.
pub async fn export(
    conn: &mut PgConnection,
    ctx: &Context,
    who: Who<'_>,
    id: Uuid,
) -> Result<String, Refused> {
    let window = ctx.config.codes.export_window_secs as f64;
    // Locked: two downloads at once are numbered one after the other, and
    // the first of two different actors takes the file.
    let batch: Option<ExportState> = sqlx::query_as(
        "SELECT exported_at, exported_at + make_interval(secs => $2),
                coalesce(now() < exported_at + make_interval(secs => $2), true)
         FROM code_batch WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .bind(window)
    .fetch_optional(&mut *conn)
    .await?;
    let (first, until, open) = batch.ok_or(Refused::NotFound("batch"))?;
    // The audit log is the record of who downloaded it, and how often.
    let (holder, downloads): (Option<String>, i64) = sqlx::query_as(
        "SELECT (array_agg(actor ORDER BY id))[1], count(*) FROM audit_event
         WHERE subject_type = 'batch' AND subject_id = $1 AND action = 'batch.exported'",
    )
    .bind(id.to_string())
    .fetch_one(&mut *conn)
    .await?;
    if let Some(at) = first {
        let holder = holder.unwrap_or_default();
        if holder != who.actor {
            return Err(Refused::conflict(
                "export_taken_by_another",
                format!(
                    "{holder} downloaded these codes at {at}; only they may download them again"
                ),
            ));
        }
        if !open {
            return Err(Refused::conflict(
                "export_window_closed",
                format!(
                    "downloaded at {at}; it could be downloaded again until {}",
                    until.unwrap_or(at)
                ),
            ));
        }
    }
    let until: Option<DateTime<Utc>> = match first {
        Some(_) => until,
        None => Some(
            sqlx::query_scalar(
                "UPDATE code_batch SET exported_at = now() WHERE id = $1
                 RETURNING exported_at + make_interval(secs => $2)",
            )
            .bind(id)
            .bind(window)
            .fetch_one(&mut *conn)
            .await?,
        ),
    };
    let rows = sqlx::query(
        "SELECT c.code_sealed, c.state, c.expires_at, p.sku FROM activation_code c
         JOIN product p ON p.id = c.product_id WHERE c.batch_id = $1 ORDER BY c.id",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut sheet = crate::csv_cells::Sheet::new();
    sheet.row(["code", "product", "state", "valid_until"]);
    for row in &rows {
        let code = ctx
            .keys
            .unseal(&row.get::<Vec<u8>, _>("code_sealed"))
            .map_err(|e| sqlx::Error::Protocol(format!("a sealed code: {e}")))?;
        let expires: DateTime<Utc> = row.get("expires_at");
        sheet.row([
            code.display().to_string(),
            row.get::<String, _>("sku"),
            row.get::<String, _>("state"),
            expires.format("%Y-%m-%d").to_string(),
        ]);
    }
    who.audit(
        conn,
        "batch.exported",
        "batch",
        id.to_string(),
        json!({ "before": { "exported": first.is_some(), "downloads": downloads },
                "after": { "exported": true, "downloads": downloads + 1, "codes": rows.len(),
                           "again_until": until } }),
    )
    .await?;
    Ok(String::from_utf8(sheet.into_bytes()).unwrap_or_default())
}
