//! Pages the navigation already names but that are not built yet: each
//! says so, behind sign-in like every page. Replace a route here with the
//! real page's module.

use axum::{Router, response::Html, routing::get};
use minijinja::context;

use super::{Console, PageError, StaffMember, render};

pub fn router() -> Router<Console> {
    Router::new()
        .route(
            "/console/reconciliation",
            get(|staff: StaffMember| placeholder(staff, "reconciliation", "Reconciliation")),
        )
        .route(
            "/console/failed",
            get(|staff: StaffMember| placeholder(staff, "failed", "Failed work")),
        )
        .route(
            "/console/batches",
            get(|staff: StaffMember| placeholder(staff, "batches", "Batches")),
        )
        .route(
            "/console/codes-report",
            get(|staff: StaffMember| placeholder(staff, "codes_report", "Codes report")),
        )
}

async fn placeholder(
    staff: StaffMember,
    active: &'static str,
    title: &'static str,
) -> Result<Html<String>, PageError> {
    render("placeholder.html", Some(&staff), context! { active, title })
}
