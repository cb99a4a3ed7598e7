//! Batches (`/console/batches`): the form that creates codes outside
//! checkout (purpose, reason, product, quantity, a linked account or order,
//! optionally emailed), the past batches, and each batch's one-time CSV.

use axum::{
    Router,
    extract::{Path, Query, State},
    response::{Html, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use entitle_jobs::{
    batch::{self, BatchKind, NewBatch},
    token::Role,
};
use minijinja::{Value, context};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Console, CsrfForm, PageError, StaffMember,
    actions::{self, Confirmed},
    code::Done,
    render,
};
use crate::admin::batches::csv_attachment;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/batches", get(list).post(create))
        .route("/console/batches/{id}", get(show))
        .route("/console/batches/{id}/export", post(export))
}

#[derive(Serialize, sqlx::FromRow)]
struct BatchRow {
    id: Uuid,
    kind: String,
    sku: String,
    quantity: i32,
    reason: String,
    requested_by: String,
    account_id: Option<String>,
    order_id: Option<Uuid>,
    exported_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

const BATCH_SQL: &str = "SELECT b.id, b.kind, p.sku, b.quantity, b.reason, b.requested_by,
                                b.account_id, b.order_id, b.exported_at, b.created_at
                         FROM code_batch b JOIN product p ON p.id = b.product_id";

fn kinds() -> Vec<Value> {
    // Replacements come from reissues, not from this form.
    BatchKind::ALL
        .into_iter()
        .filter(|k| *k != BatchKind::Replacement)
        .map(|k| Value::from_serialize(context! { value => k.as_str(), label => k.label() }))
        .collect()
}

async fn list(
    State(console): State<Console>,
    staff: StaffMember,
) -> Result<Html<String>, PageError> {
    let pool = &console.ctx.pool;
    let batches: Vec<BatchRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{BATCH_SQL} ORDER BY b.created_at DESC LIMIT 100"
    )))
    .fetch_all(pool)
    .await?;
    let products: Vec<(String, String)> =
        sqlx::query_as("SELECT sku, name FROM product WHERE active ORDER BY sku")
            .fetch_all(pool)
            .await?;
    render(
        "batches.html",
        Some(&staff),
        context! {
            active => "batches", batches, products, kinds => kinds(),
            max => batch::MAX_QUANTITY, can_operate => staff.role >= Role::Operator,
        },
    )
}

#[derive(Debug, Deserialize, Serialize)]
struct BatchForm {
    #[serde(flatten)]
    confirmed: Confirmed,
    #[serde(default)]
    product_sku: String,
    #[serde(default)]
    quantity: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    account_id: String,
    #[serde(default)]
    order_id: String,
    #[serde(default)]
    email: String,
}

async fn create(
    State(console): State<Console>,
    staff: StaffMember,
    CsrfForm { form, form_key }: CsrfForm<BatchForm>,
) -> Result<Response, PageError> {
    staff.require(Role::Operator)?;
    let quantity: u32 = form
        .quantity
        .trim()
        .parse()
        .map_err(|_| PageError::invalid("The quantity must be a whole number."))?;
    let order_id = match form.order_id.trim() {
        "" => None,
        id => Some(
            id.parse::<Uuid>()
                .map_err(|_| PageError::invalid("The order must be an order id."))?,
        ),
    };
    let actor = staff.actor();
    let Some(mut action) = actions::begin(
        &console,
        &actor,
        form_key,
        &form.confirmed,
        "POST /console/batches",
        &form,
    )
    .await?
    else {
        return Ok(actions::back("/console/batches", "already_done"));
    };
    let who = action.who();
    let created = batch::create(
        &mut action.tx,
        &console.ctx,
        who,
        &NewBatch {
            product_sku: form.product_sku.trim(),
            quantity,
            kind: form.kind.trim(),
            account_id: Some(form.account_id.as_str()),
            order_id,
            email: Some(form.email.as_str()),
        },
    )
    .await?;
    let id = created.id;
    actions::finish(action, created).await?;
    Ok(actions::back(&format!("/console/batches/{id}"), "created"))
}

async fn show(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    Query(done): Query<Done>,
) -> Result<Html<String>, PageError> {
    let pool = &console.ctx.pool;
    let batch: BatchRow =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{BATCH_SQL} WHERE b.id = $1")))
            .bind(id)
            .fetch_optional(pool)
            .await?
            .ok_or_else(|| PageError::not_found("batch"))?;
    let codes: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT id, last4, state, expires_at FROM activation_code WHERE batch_id = $1
         ORDER BY id LIMIT 100",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    // The first download's actor holds the file.
    let exported_by: Option<(String, Option<String>)> = sqlx::query_as(
        "SELECT actor, reason FROM audit_event
         WHERE subject_type = 'batch' AND subject_id = $1 AND action = 'batch.exported'
         ORDER BY id LIMIT 1",
    )
    .bind(id.to_string())
    .fetch_optional(pool)
    .await?;
    // The holder may download it again until then (a download that broke
    // off); the domain refuses anyone else, and later.
    let window = chrono::Duration::seconds(
        i64::try_from(console.ctx.config.codes.export_window_secs).unwrap_or(i64::MAX / 1000),
    );
    let again_until = match (&exported_by, batch.exported_at) {
        (Some((holder, _)), Some(at)) if *holder == staff.actor().name => {
            Some(at + window).filter(|until| *until > Utc::now())
        }
        _ => None,
    };
    render(
        "batch.html",
        Some(&staff),
        context! {
            active => "batches", batch, codes, exported_by, again_until,
            can_operate => staff.role >= Role::Operator, done => done.done,
        },
    )
}

/// The codes as CSV: to whoever downloads them first, and to them again
/// within the export window (the domain refuses anyone else, and later).
/// Every download is one, audited: a double click is two.
async fn export(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, .. }: CsrfForm<Confirmed>,
) -> Result<Response, PageError> {
    staff.require(Role::Operator)?;
    form.check()?;
    let actor = staff.actor();
    let mut tx = console.ctx.pool.begin().await?;
    let who = entitle_jobs::lifecycle::Who {
        actor: &actor.name,
        role: actor.role,
        reason: form.reason.trim(),
    };
    let csv = batch::export(&mut tx, &console.ctx, who, id).await?;
    tx.commit().await?;
    Ok(csv_attachment(&format!("batch-{id}.csv"), csv))
}
