//! Rendering console pages: the minijinja templates under
//! `gateway/templates/console`, compiled into the binary and auto-escaped
//! (every name ends in `.html`), and the one error type pages answer with.

use std::sync::LazyLock;

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use minijinja::{Environment, Value, context};

use super::StaffMember;

/// Every template, by name. A new page adds its file here.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "base.html",
        include_str!("../../templates/console/base.html"),
    ),
    (
        "forms.html",
        include_str!("../../templates/console/forms.html"),
    ),
    (
        "error.html",
        include_str!("../../templates/console/error.html"),
    ),
    (
        "sign_in.html",
        include_str!("../../templates/console/sign_in.html"),
    ),
    (
        "dashboard.html",
        include_str!("../../templates/console/dashboard.html"),
    ),
    (
        "search.html",
        include_str!("../../templates/console/search.html"),
    ),
    (
        "staff.html",
        include_str!("../../templates/console/staff.html"),
    ),
    (
        "staff_invited.html",
        include_str!("../../templates/console/staff_invited.html"),
    ),
    (
        "redeem.html",
        include_str!("../../templates/console/redeem.html"),
    ),
    (
        "code.html",
        include_str!("../../templates/console/code.html"),
    ),
    (
        "order.html",
        include_str!("../../templates/console/order.html"),
    ),
    (
        "account.html",
        include_str!("../../templates/console/account.html"),
    ),
    (
        "reconciliation.html",
        include_str!("../../templates/console/reconciliation.html"),
    ),
    (
        "failed.html",
        include_str!("../../templates/console/failed.html"),
    ),
    (
        "batches.html",
        include_str!("../../templates/console/batches.html"),
    ),
    (
        "batch.html",
        include_str!("../../templates/console/batch.html"),
    ),
    (
        "codes_report.html",
        include_str!("../../templates/console/codes_report.html"),
    ),
];

const STYLESHEET: &str = include_str!("../../templates/console/console.css");

static ENVIRONMENT: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .unwrap_or_else(|e| panic!("console template {name} does not compile: {e}"));
    }
    // `{{ form_key() }}`: a fresh one-time key each time a form is rendered.
    env.add_function("form_key", || super::form_key().to_string());
    env.add_filter("datetime", datetime);
    // `{{ cents | money }}`: minor units as `40.00`.
    env.add_filter("money", |cents: Option<i64>| match cents {
        Some(c) => format!(
            "{}{}.{:02}",
            if c < 0 { "-" } else { "" },
            c.abs() / 100,
            c.abs() % 100
        ),
        None => "–".to_owned(),
    });
    env
});

/// `{{ t | datetime }}`: a timestamp as `2026-12-02 14:03 UTC`.
fn datetime(value: Value) -> String {
    value
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_else(|| value.to_string())
}

/// Renders `template` for `staff` (the navigation, the signed-in member,
/// the CSRF token forms need) with the page's own `context`.
pub fn render(
    template: &str,
    staff: Option<&StaffMember>,
    context: Value,
) -> Result<Html<String>, PageError> {
    let chrome = match staff {
        Some(staff) => context! {
            staff => context! {
                name => &staff.name,
                email => &staff.email,
                role => staff.role.as_str(),
                is_admin => staff.role >= entitle_jobs::token::Role::Admin,
            },
            csrf_token => staff.csrf_token(),
        },
        None => context! {},
    };
    render_raw(template, context! { ..chrome, ..context })
}

/// Renders with exactly `context` (pages without a signed-in member).
pub fn render_raw(template: &str, context: Value) -> Result<Html<String>, PageError> {
    ENVIRONMENT
        .get_template(template)
        .and_then(|t| t.render(context))
        .map(Html)
        .map_err(PageError::internal)
}

/// `GET /console/static/console.css`
pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// An answer other than the page asked for: an error page with a status, a
/// stable code (shown on the page, and in the `X-Entitle-Code` header for
/// tests and scripts) and a sentence for people; or a trip to sign-in.
#[derive(Debug)]
pub struct PageError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Instead of a page: 303 to this address.
    redirect: Option<String>,
    /// Seconds, for 429.
    retry_after: Option<u64>,
}

impl PageError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            title,
            detail: detail.into(),
            redirect: None,
            retry_after: None,
        }
    }

    /// 403: the member's role is below what the page needs.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail)
    }

    /// 404.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            format!("There is no such {what}."),
        )
    }

    /// 422: a form that cannot be acted on, saying why.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_form",
            "Please check the form",
            detail,
        )
    }

    /// 429, with how long to wait.
    pub fn too_many(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        Self {
            retry_after: Some(retry_after_secs.max(1)),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "Too many attempts",
                detail,
            )
        }
    }

    /// Not signed in: to the sign-in page, coming back to `next` after.
    pub fn sign_in(next: &str) -> Self {
        let target = if next == "/console" || next.is_empty() {
            "/console/sign-in".to_owned()
        } else {
            format!(
                "/console/sign-in?{}",
                serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
            )
        };
        Self {
            redirect: Some(target),
            ..Self::new(
                StatusCode::SEE_OTHER,
                "sign_in_needed",
                "Sign in",
                "Sign in first.",
            )
        }
    }

    /// A failure of ours; the cause is logged, not shown.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "console request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Something went wrong",
            "Something went wrong on our side; it was logged.",
        )
    }
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        PageError::internal(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        if let Some(target) = &self.redirect {
            return Redirect::to(target).into_response();
        }
        let body = render_raw(
            "error.html",
            context! {
                status => self.status.as_u16(),
                code => self.code,
                title => self.title,
                detail => &self.detail,
            },
        )
        // The error page itself failing must still answer something.
        .unwrap_or_else(|_| Html(format!("{} {}", self.status, self.code)));
        let mut response = (self.status, body).into_response();
        response
            .headers_mut()
            .insert("x-entitle-code", HeaderValue::from_static(self.code));
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
