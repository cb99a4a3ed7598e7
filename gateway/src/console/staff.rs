//! The Staff page (admins only): list staff, invite a member (with a
//! one-time password shown once), disable or enable one, change a role.
//! Every action takes a reason and is audited with the admin's name.

use axum::{
    Router,
    extract::{Path, State},
    http::header,
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use entitle_jobs::token::Role;
use minijinja::context;
use serde::Deserialize;
use tower_sessions::Session;
use uuid::Uuid;

use super::{
    Console, CsrfForm, PageError, StaffMember,
    members::{self, MemberError, NewMember},
    password, render,
};

/// The session key of a one-line notice shown once on the next page.
const NOTICE_KEY: &str = "notice";

pub fn router() -> Router<Console> {
    Router::new()
        .route("/console/staff", get(list).post(invite))
        .route("/console/staff/{id}/enabled", post(set_enabled))
        .route("/console/staff/{id}/role", post(set_role))
}

fn member_error(e: MemberError) -> PageError {
    match e {
        MemberError::NameTaken(_) | MemberError::EmailTaken(_) | MemberError::Invalid(_) => {
            PageError::invalid(e.to_string())
        }
        MemberError::NotFound => PageError::not_found("staff member"),
        MemberError::Database(e) => PageError::internal(e),
        MemberError::Other(e) => PageError::internal(e),
    }
}

fn reason(text: &str) -> Result<&str, PageError> {
    let text = text.trim();
    if text.is_empty() || text.len() > 1000 {
        return Err(PageError::invalid(
            "Every action needs a reason (1 to 1000 characters).",
        ));
    }
    Ok(text)
}

fn role(text: &str) -> Result<Role, PageError> {
    Role::parse(text).ok_or_else(|| PageError::invalid("The role is support, operator or admin."))
}

/// `GET /console/staff`
async fn list(
    State(console): State<Console>,
    staff: StaffMember,
    session: Session,
) -> Result<Response, PageError> {
    staff.require(Role::Admin)?;
    let members = members::list(&console.ctx.pool).await?;
    let notice: Option<String> = session
        .remove(NOTICE_KEY)
        .await
        .map_err(PageError::internal)?;
    Ok(render(
        "staff.html",
        Some(&staff),
        context! {
            active => "staff",
            members,
            notice,
            roles => ["support", "operator", "admin"],
            me => staff.id,
        },
    )?
    .into_response())
}

#[derive(Deserialize, serde::Serialize)]
struct Invite {
    name: String,
    email: String,
    role: String,
    reason: String,
}

/// `POST /console/staff`: creates the member and shows their one-time
/// password, this once (the page is not cached).
async fn invite(
    State(console): State<Console>,
    staff: StaffMember,
    CsrfForm { form, form_key }: CsrfForm<Invite>,
) -> Result<Response, PageError> {
    staff.require(Role::Admin)?;
    let why = reason(&form.reason)?;
    let role = role(&form.role)?;
    let one_time = password::generate();
    // The form's one-time key: a double-submitted invite creates the member
    // once (the one-time password is never stored, so it is not shown again).
    let actor = staff.actor();
    let key = form_key.map(|k| format!("console:{k}"));
    let mut action = match crate::admin::Action::begin_keyed(
        &console.ctx,
        &actor,
        key,
        why,
        "POST /console/staff",
        &form,
    )
    .await?
    {
        crate::admin::Begun::Fresh(action) => action,
        crate::admin::Begun::Replayed(_) => {
            return Err(PageError::new(
                axum::http::StatusCode::CONFLICT,
                "already_invited",
                "Already invited",
                "This invitation was sent before, and its one-time password was shown then. \
                 If it was lost, disable the member and invite them again.",
            ));
        }
    };
    let member = members::create_in(
        &mut action.tx,
        NewMember {
            name: &form.name,
            email: &form.email,
            role,
            password: &one_time,
        },
        &actor.name,
        why,
    )
    .await
    .map_err(member_error)?;
    let _stored = action
        .finish((
            axum::http::StatusCode::OK,
            axum::Json(serde_json::json!({ "member": member.id })),
        ))
        .await?;
    let html = render(
        "staff_invited.html",
        Some(&staff),
        context! { active => "staff", member, password => one_time },
    )?;
    Ok(([(header::CACHE_CONTROL, "no-store")], html).into_response())
}

#[derive(Deserialize)]
struct Enabled {
    /// `true` to enable, `false` to disable.
    enabled: bool,
    reason: String,
}

/// `POST /console/staff/{id}/enabled`
async fn set_enabled(
    State(console): State<Console>,
    staff: StaffMember,
    session: Session,
    Path(id): Path<Uuid>,
    CsrfForm { form, .. }: CsrfForm<Enabled>,
) -> Result<Response, PageError> {
    staff.require(Role::Admin)?;
    let why = reason(&form.reason)?;
    if id == staff.id && !form.enabled {
        return Err(PageError::invalid(
            "You cannot disable yourself; ask another admin.",
        ));
    }
    let member = members::set_enabled(&console.ctx.pool, id, form.enabled, &staff.name, why)
        .await
        .map_err(member_error)?;
    let notice = if form.enabled {
        format!("{} is enabled.", member.name)
    } else {
        format!("{} is disabled and signed out.", member.name)
    };
    back_to_list(&session, notice).await
}

#[derive(Deserialize)]
struct RoleChange {
    role: String,
    reason: String,
}

/// `POST /console/staff/{id}/role`
async fn set_role(
    State(console): State<Console>,
    staff: StaffMember,
    session: Session,
    Path(id): Path<Uuid>,
    CsrfForm { form, .. }: CsrfForm<RoleChange>,
) -> Result<Response, PageError> {
    staff.require(Role::Admin)?;
    let why = reason(&form.reason)?;
    let role = role(&form.role)?;
    if id == staff.id {
        return Err(PageError::invalid(
            "You cannot change your own role; ask another admin.",
        ));
    }
    let member = members::set_role(&console.ctx.pool, id, role, &staff.name, why)
        .await
        .map_err(member_error)?;
    back_to_list(
        &session,
        format!("{} now has the {} role.", member.name, role.as_str()),
    )
    .await
}

async fn back_to_list(session: &Session, notice: String) -> Result<Response, PageError> {
    session
        .insert(NOTICE_KEY, notice)
        .await
        .map_err(PageError::internal)?;
    Ok(Redirect::to("/console/staff").into_response())
}
