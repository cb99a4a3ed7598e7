//! The code page (`/console/codes/{id}`): a code's whole story (issued,
//! emailed, redeemed, reassigned, revoked, reissued, expiry changes, each
//! with actor and reason), its refused redemption attempts ("my code doesn't
//! work"), and the actions on it for operators: revoke, reissue, reassign,
//! unassign, change expiry.

use axum::{
    Router,
    extract::{Path, State},
    response::{Html, Response},
    routing::{get, post},
};
use chrono::{DateTime, NaiveDate, Utc};
use entitle_jobs::{lifecycle, token::Role};
use minijinja::{Value, context};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    Console, CsrfForm, PageError, StaffMember,
    actions::{self, Confirmed},
    render,
};
use crate::admin::codes::code_view;

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/codes/{id}", get(page))
        .route("/console/codes/{id}/revoke", post(revoke))
        .route("/console/codes/{id}/reissue", post(reissue))
        .route("/console/codes/{id}/reassign", post(reassign))
        .route("/console/codes/{id}/unassign", post(unassign))
        .route("/console/codes/{id}/expiry", post(expiry))
}

/// What `?done=` a page was sent back with.
#[derive(Debug, Deserialize)]
pub struct Done {
    pub done: Option<String>,
}

async fn page(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    axum::extract::Query(done): axum::extract::Query<Done>,
) -> Result<Html<String>, PageError> {
    let code = code_view(&console.ctx.pool, id)
        .await?
        .ok_or_else(|| PageError::not_found("code"))?;
    render(
        "code.html",
        Some(&staff),
        context! {
            active => "search",
            code => Value::from_serialize(&code),
            can_operate => staff.role >= Role::Operator,
            done => done.done,
        },
    )
}

fn code_page(id: Uuid) -> String {
    format!("/console/codes/{id}")
}

/// A checkbox: present when ticked.
fn ticked(value: &Option<String>) -> bool {
    value.is_some()
}

#[derive(Debug, Deserialize, Serialize)]
struct RevokeForm {
    #[serde(flatten)]
    confirmed: Confirmed,
    include_redeemed: Option<String>,
}

async fn revoke(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<RevokeForm>,
) -> Result<Response, PageError> {
    let redeemed_too = ticked(&form.include_redeemed);
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/codes/{id}/revoke"),
        code_page(id),
        "revoked",
        |tx, who| lifecycle::revoke(tx, who, id, redeemed_too)
    )
}

#[derive(Debug, Deserialize, Serialize)]
struct ReissueForm {
    #[serde(flatten)]
    confirmed: Confirmed,
    #[serde(default)]
    email: String,
    force: Option<String>,
}

async fn reissue(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<ReissueForm>,
) -> Result<Response, PageError> {
    staff.require(Role::Operator)?;
    let actor = staff.actor();
    let request = format!("POST /console/codes/{id}/reissue");
    let Some(mut action) =
        actions::begin(&console, &actor, form_key, &form.confirmed, &request, &form).await?
    else {
        return Ok(actions::back(&code_page(id), "already_done"));
    };
    let who = action.who();
    let email = Some(form.email.trim()).filter(|e| !e.is_empty());
    let reissued = lifecycle::reissue(
        &mut action.tx,
        &console.ctx,
        who,
        id,
        email,
        ticked(&form.force),
    )
    .await?;
    let replacement = reissued.code.id;
    actions::finish(action, reissued).await?;
    Ok(actions::back(&code_page(replacement), "reissued"))
}

#[derive(Debug, Deserialize, Serialize)]
struct ReassignForm {
    #[serde(flatten)]
    confirmed: Confirmed,
    #[serde(default)]
    account_id: String,
    #[serde(default)]
    entity_ref: String,
}

async fn reassign(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<ReassignForm>,
) -> Result<Response, PageError> {
    let to = lifecycle::Holder {
        account_id: form.account_id.trim().to_owned(),
        entity_ref: form.entity_ref.trim().to_owned(),
    };
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/codes/{id}/reassign"),
        code_page(id),
        "reassigned",
        |tx, who| lifecycle::reassign(tx, who, id, to)
    )
}

async fn unassign(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<Confirmed>,
) -> Result<Response, PageError> {
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form,
        &form,
        format!("POST /console/codes/{id}/unassign"),
        code_page(id),
        "unassigned",
        |tx, who| lifecycle::unassign(tx, who, id)
    )
}

/// A new expiry from a date field: the end of that day, UTC.
#[derive(Debug, Deserialize, Serialize)]
pub struct ExpiryForm {
    #[serde(flatten)]
    pub confirmed: Confirmed,
    #[serde(default)]
    pub expires_on: String,
}

impl ExpiryForm {
    pub fn expires_at(&self) -> Result<DateTime<Utc>, PageError> {
        let day = NaiveDate::parse_from_str(self.expires_on.trim(), "%Y-%m-%d")
            .map_err(|_| PageError::invalid("Give the new expiry as a date (YYYY-MM-DD)."))?;
        Ok(day.and_hms_opt(23, 59, 59).unwrap_or_default().and_utc())
    }
}

async fn expiry(
    State(console): State<Console>,
    staff: StaffMember,
    Path(id): Path<Uuid>,
    CsrfForm { form, form_key }: CsrfForm<ExpiryForm>,
) -> Result<Response, PageError> {
    let expires_at = form.expires_at()?;
    crate::console_action!(
        console,
        staff,
        Role::Operator,
        form_key,
        &form.confirmed,
        &form,
        format!("POST /console/codes/{id}/expiry"),
        code_page(id),
        "expiry_changed",
        |tx, who| lifecycle::change_expiry(tx, who, id, expires_at)
    )
}
