//! One module per resource, each ending in `pub fn router()`.

pub mod health;
pub mod redeem_page;
pub mod redemptions;
pub mod webhooks;
