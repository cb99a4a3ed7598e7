//! Search, from the header's box or the search page: orders by buyer or
//! gift recipient email, order id or channel order id; an account by its
//! id; a code by its id, or by its last four symbols narrowed by a product
//! or an email; and a typed activation code, which is sent by POST and
//! never put in a URL.

use axum::{
    Router,
    extract::{Query, State},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use entitle_jobs::code::Code;
use minijinja::context;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Console, CsrfForm, PageError, StaffMember, render};

/// Orders (or codes) listed at most.
const LIMIT: i64 = 50;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/search", get(page).post(header_search))
        .route("/console/search/code", post(typed_code))
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    q: String,
    /// A code's last four symbols, with `narrow` (a product SKU or an email).
    #[serde(default)]
    last4: String,
    #[serde(default)]
    narrow: String,
}

#[derive(Serialize, sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    channel: String,
    channel_order_id: String,
    buyer_email: String,
    gift_recipient_email: Option<String>,
    state: String,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, sqlx::FromRow)]
struct CodeRow {
    id: Uuid,
    last4: String,
    state: String,
    sku: String,
    expires_at: DateTime<Utc>,
    order_id: Option<Uuid>,
    holder: Option<String>,
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Query(search): Query<Search>,
) -> Result<Response, PageError> {
    let pool = &console.ctx.pool;
    let q = search.q.trim();
    // An id that names a code goes straight to its page.
    if let Ok(id) = q.parse::<Uuid>() {
        let code: Option<Uuid> = sqlx::query_scalar("SELECT id FROM activation_code WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
        if code.is_some() {
            return Ok(Redirect::to(&format!("/console/codes/{id}")).into_response());
        }
    }
    let orders: Vec<OrderRow> = if q.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT id, channel, channel_order_id, buyer_email, gift_recipient_email, state,
                    created_at
             FROM orders
             WHERE ($1::uuid IS NOT NULL AND id = $1)
                OR channel_order_id = $2
                OR account_id = $2
                OR ($3 AND (lower(buyer_email) = lower($2)
                            OR (gift_recipient_email IS NOT NULL
                                AND lower(gift_recipient_email) = lower($2))))
             ORDER BY created_at DESC LIMIT $4",
        )
        .bind(q.parse::<Uuid>().ok())
        .bind(q)
        .bind(q.contains('@'))
        .bind(LIMIT)
        .fetch_all(pool)
        .await?
    };
    // An account may hold codes without any order of its own (gifts).
    let account: Option<String> = if q.is_empty() || q.contains('@') {
        None
    } else {
        sqlx::query_scalar(
            "SELECT account_id FROM assignment WHERE account_id = $1
             UNION SELECT account_id FROM orders WHERE account_id = $1 LIMIT 1",
        )
        .bind(q)
        .fetch_optional(pool)
        .await?
    };
    let last4 = search.last4.trim().to_uppercase();
    let narrow = search.narrow.trim();
    let codes: Vec<CodeRow> = if last4.is_empty() {
        Vec::new()
    } else {
        if last4.chars().count() != 4 || narrow.is_empty() {
            return Err(PageError::invalid(
                "Give a code's last four symbols and a product SKU or an email to narrow them.",
            ));
        }
        sqlx::query_as(
            "SELECT c.id, c.last4, c.state, p.sku, c.expires_at, o.id AS order_id,
                    coalesce(o.gift_recipient_email, o.buyer_email) AS holder
             FROM activation_code c
             JOIN product p ON p.id = c.product_id
             LEFT JOIN order_line l ON l.id = c.order_line_id
             LEFT JOIN code_batch b ON b.id = c.batch_id
             LEFT JOIN orders o ON o.id = coalesce(l.order_id, b.order_id)
             WHERE c.last4 = $1
               AND (p.sku = $2 OR lower(o.buyer_email) = lower($2)
                    OR lower(o.gift_recipient_email) = lower($2))
             ORDER BY c.issued_at DESC LIMIT $3",
        )
        .bind(&last4)
        .bind(narrow)
        .bind(LIMIT)
        .fetch_all(pool)
        .await?
    };
    Ok(render(
        "search.html",
        Some(&staff),
        context! {
            active => "search", q, orders, account, limit => LIMIT,
            last4 => search.last4.trim(), narrow, codes,
            searched_codes => !last4.is_empty(),
        },
    )?
    .into_response())
}

#[derive(Deserialize)]
struct HeaderSearch {
    #[serde(default)]
    q: String,
}

/// The header's box posts, so that a code pasted into it never lands in a
/// URL: code-shaped input is looked up as a code, anything else becomes the
/// search page's query.
async fn header_search(
    State(console): State<Console>,
    staff: StaffMember,
    CsrfForm { form, .. }: CsrfForm<HeaderSearch>,
) -> Result<Response, PageError> {
    let q = form.q.trim();
    let symbols: String = q.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
    if symbols.len() == 16 && symbols.chars().all(|c| c.is_ascii_alphanumeric()) {
        return lookup(&console, &staff, q).await;
    }
    let query = serde_urlencoded::to_string([("q", q)]).unwrap_or_default();
    Ok(Redirect::to(&format!("/console/search?{query}")).into_response())
}

#[derive(Deserialize)]
struct TypedCode {
    #[serde(default)]
    code: String,
}

/// A code as the customer typed it: checked, hashed, found, and opened.
async fn typed_code(
    State(console): State<Console>,
    staff: StaffMember,
    CsrfForm { form, .. }: CsrfForm<TypedCode>,
) -> Result<Response, PageError> {
    lookup(&console, &staff, &form.code).await
}

async fn lookup(
    console: &Console,
    _staff: &StaffMember,
    typed: &str,
) -> Result<Response, PageError> {
    let code = Code::parse(typed).map_err(|e| {
        PageError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "code_malformed",
            "Not a code",
            format!("{e}. Check the symbols with the customer."),
        )
    })?;
    let id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM activation_code WHERE code_hash = $1")
            .bind(console.ctx.keys.hash(&code))
            .fetch_optional(&console.ctx.pool)
            .await?;
    match id {
        Some(id) => Ok(Redirect::to(&format!("/console/codes/{id}")).into_response()),
        None => Err(PageError::new(
            axum::http::StatusCode::NOT_FOUND,
            "code_not_found",
            "No such code",
            "The code is well formed but Entitle never issued it.",
        )),
    }
}
