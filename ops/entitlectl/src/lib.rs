//! The operator CLI: every admin API look-up and action, printed as readable
//! tables (or JSON with `--json`). Library and binary, so tests run it
//! in-process against a real gateway.

use std::io::Write;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

/// `entitlectl`: support and operations for Entitle.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The gateway's address.
    #[arg(long, env = "ENTITLE_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// An admin API token (`entitle-gateway create-token` makes the first).
    #[arg(long, env = "ENTITLE_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Make an action safe to repeat: the same key does nothing twice.
    #[arg(long, global = true)]
    pub idempotency_key: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Orders: find, show, change the expiry of their codes.
    #[command(subcommand)]
    Order(OrderCommand),
    /// Codes: show, look up as typed, revoke, reissue, reassign, unassign, expiry.
    #[command(subcommand)]
    Code(CodeCommand),
    /// An account's orders and assigned codes.
    Account { account_id: String },
    /// Codes outside checkout.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Send a delivery's codes again.
    Resend {
        delivery_id: String,
        #[arg(long)]
        reason: String,
        /// A corrected address.
        #[arg(long)]
        email: Option<String>,
    },
    /// Webhook events: what failed and why.
    Events {
        /// pending, processed, ignored or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        channel: Option<String>,
    },
    /// Queue failed webhook events again.
    RetryEvents {
        #[arg(long)]
        reason: String,
        #[arg(long)]
        event: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        error_code: Option<String>,
    },
    /// The audit log.
    Audit(AuditArgs),
    /// Findings for operations.
    #[command(subcommand)]
    Findings(FindingsCommand),
    /// Reconciliation runs: start one, list them, read one's summary.
    #[command(subcommand)]
    Reconcile(ReconcileCommand),
    /// API tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The platform's API keys for /v1 (admin).
    #[command(subcommand)]
    PlatformKey(PlatformKeyCommand),
    /// Where the platform's events go (list: support; changes: admin).
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// The platform events' delivery log (support) and replay (operator).
    #[command(subcommand)]
    Delivery(DeliveryCommand),
    /// Products and their channel references.
    #[command(subcommand)]
    Products(ProductsCommand),
}

#[derive(Debug, Subcommand)]
pub enum OrderCommand {
    Find {
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        channel_order_id: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        account: Option<String>,
    },
    Show {
        id: String,
    },
    Expiry {
        id: String,
        #[arg(long)]
        expires_at: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CodeCommand {
    Show {
        id: String,
    },
    /// Look a code up as the customer typed it.
    Lookup {
        code: String,
    },
    Revoke {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        include_redeemed: bool,
    },
    Reissue {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        email: Option<String>,
    },
    Reassign {
        id: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        account: String,
        #[arg(long)]
        entity: String,
    },
    Unassign {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Expiry {
        id: String,
        #[arg(long)]
        expires_at: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    Create {
        #[arg(long)]
        product: String,
        #[arg(long)]
        quantity: u32,
        /// customer_service, partner_distribution, test_account, replacement.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        order: Option<String>,
        /// Email the codes to this address.
        #[arg(long)]
        email: Option<String>,
    },
    Show {
        id: String,
    },
    /// Write the batch's codes as CSV (once).
    Export {
        id: String,
        #[arg(long)]
        reason: String,
        /// File to write; standard output by default.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[arg(long)]
    subject_type: Option<String>,
    #[arg(long)]
    subject_id: Option<String>,
    #[arg(long)]
    actor: Option<String>,
    #[arg(long)]
    action: Option<String>,
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    before: Option<i64>,
    #[arg(long)]
    limit: Option<i64>,
}

#[derive(Debug, Subcommand)]
pub enum FindingsCommand {
    /// Findings, newest first (at most 1000; `export` writes them all).
    List {
        /// open, resolved or ignored.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// Only those a reconciliation run found.
        #[arg(long)]
        run: Option<String>,
    },
    /// Every matching finding as CSV.
    Export {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        run: Option<String>,
    },
    Resolve {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Ignore {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReconcileCommand {
    /// Compare a channel with Entitle for a window (default: the scheduled
    /// window, the last day).
    Start {
        /// stripe, shopify or native.
        #[arg(long)]
        channel: String,
        /// Window start, RFC 3339.
        #[arg(long)]
        from: Option<String>,
        /// Window end (exclusive), RFC 3339.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        reason: String,
        /// Wait for the run to end and print its summary.
        #[arg(long)]
        wait: bool,
    },
    /// Runs, newest first.
    List {
        #[arg(long)]
        channel: Option<String>,
        /// queued, running, finished or failed.
        #[arg(long)]
        status: Option<String>,
    },
    /// A run's summary: window, duration, counts, memory, findings by kind.
    Show { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        reason: String,
    },
    Revoke {
        name: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PlatformKeyCommand {
    List,
    /// Creates a key and prints it (the only time it is shown).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        reason: String,
    },
    Revoke {
        name: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    List,
    /// Creates an endpoint and prints its signing secret (shown once).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        url: String,
        /// An event type it hears (repeat); none: every type.
        #[arg(long = "event")]
        events: Vec<String>,
        #[arg(long)]
        reason: String,
    },
    /// Prints a new secret; the old one signs beside it for a while.
    Rotate {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Disable {
        id: String,
        #[arg(long)]
        reason: String,
    },
    Enable {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeliveryCommand {
    /// Deliveries, newest event first.
    List {
        /// pending, delivered or failed.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long)]
        code: Option<String>,
        #[arg(long)]
        order: Option<String>,
    },
    /// One delivery with every attempt.
    Show { id: String },
    /// Sends a delivery again now, under the same webhook-id.
    Replay {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProductsCommand {
    List,
    Reload {
        #[arg(long)]
        reason: String,
    },
}

struct Api<'a> {
    http: reqwest::Client,
    cli: &'a Cli,
}

impl Api<'_> {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, Option<String>)],
        body: Option<Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.cli.url.trim_end_matches('/'));
        let query: Vec<(&str, String)> = query
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
            .collect();
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(&self.cli.token)
            .query(&query);
        if let Some(body) = body {
            let key = self
                .cli
                .idempotency_key
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            request = request.header("idempotency-key", key).json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("Failed to reach {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            match serde_json::from_str::<Value>(&text) {
                Ok(e) => bail!(
                    "{status} {}: {}",
                    e["code"].as_str().unwrap_or("?"),
                    e["detail"].as_str().unwrap_or("")
                ),
                Err(_) => bail!("{status}: {text}"),
            }
        }
        Ok(response)
    }

    async fn get(&self, path: &str, query: &[(&str, Option<String>)]) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::GET, path, query, None)
            .await?
            .json()
            .await?)
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        Ok(self
            .send(reqwest::Method::POST, path, &[], Some(body))
            .await?
            .json()
            .await?)
    }
}

/// Runs one command, writing what it prints to `out`.
pub async fn run(cli: Cli, out: &mut impl Write) -> anyhow::Result<()> {
    let api = Api {
        http: reqwest::Client::new(),
        cli: &cli,
    };
    let shown: Value = match &cli.command {
        Command::Order(OrderCommand::Find { channel, channel_order_id, email, account }) => {
            let found = api
                .get("/admin/v1/orders", &[
                    ("channel", channel.clone()),
                    ("channel_order_id", channel_order_id.clone()),
                    ("email", email.clone()),
                    ("account_id", account.clone()),
                ])
                .await?;
            return print(out, &cli, &found, |out, v| rows(out, &v["orders"], &["id", "channel", "channel_order_id", "buyer_email", "state", "units", "paid_at"]));
        }
        Command::Order(OrderCommand::Show { id }) => {
            let order = api.get(&format!("/admin/v1/orders/{id}"), &[]).await?;
            return print(out, &cli, &order, |out, v| {
                fields(out, v, &["id", "channel", "channel_order_id", "buyer_email", "account_id", "state", "paid_at", "gift"])?;
                writeln!(out, "\nLines")?;
                rows(out, &v["lines"], &["line_index", "product_sku", "channel_reference", "quantity", "refunded_quantity"])?;
                writeln!(out, "\nCodes")?;
                code_rows(out, &v["codes"])?;
                if v["replacement_codes"].as_array().is_some_and(|a| !a.is_empty()) {
                    writeln!(out, "\nReplacement codes")?;
                    code_rows(out, &v["replacement_codes"])?;
                }
                writeln!(out, "\nDeliveries")?;
                rows(out, &v["deliveries"], &["id", "kind", "recipient_email", "status", "attempts", "sent_at", "last_error"])?;
                writeln!(out, "\nTimeline")?;
                rows(out, &v["timeline"], &["at", "actor", "action", "subject_type", "subject_id", "reason"])
            });
        }
        Command::Order(OrderCommand::Expiry { id, expires_at, reason }) => {
            api.post(&format!("/admin/v1/orders/{id}/expiry"), json!({ "expires_at": expires_at, "reason": reason })).await?
        }
        Command::Code(CodeCommand::Show { id }) => {
            let code = api.get(&format!("/admin/v1/codes/{id}"), &[]).await?;
            return print(out, &cli, &code, show_code);
        }
        Command::Code(CodeCommand::Lookup { code }) => {
            let code = api.post("/admin/v1/codes/lookup", json!({ "code": code })).await?;
            return print(out, &cli, &code, show_code);
        }
        Command::Code(CodeCommand::Revoke { id, reason, include_redeemed }) => {
            api.post(&format!("/admin/v1/codes/{id}/revoke"), json!({ "reason": reason, "include_redeemed": include_redeemed })).await?
        }
        Command::Code(CodeCommand::Reissue { id, reason, email }) => {
            api.post(&format!("/admin/v1/codes/{id}/reissue"), json!({ "reason": reason, "email": email })).await?
        }
        Command::Code(CodeCommand::Reassign { id, reason, account, entity }) => {
            api.post(&format!("/admin/v1/codes/{id}/reassign"), json!({ "reason": reason, "account_id": account, "entity_ref": entity })).await?
        }
        Command::Code(CodeCommand::Unassign { id, reason }) => {
            api.post(&format!("/admin/v1/codes/{id}/unassign"), json!({ "reason": reason })).await?
        }
        Command::Code(CodeCommand::Expiry { id, expires_at, reason }) => {
            api.post(&format!("/admin/v1/codes/{id}/expiry"), json!({ "expires_at": expires_at, "reason": reason })).await?
        }
        Command::Account { account_id } => {
            let account = api.get(&format!("/admin/v1/accounts/{account_id}"), &[]).await?;
            return print(out, &cli, &account, |out, v| {
                writeln!(out, "Orders")?;
                rows(out, &v["orders"], &["id", "channel", "channel_order_id", "state", "paid_at"])?;
                writeln!(out, "\nAssigned codes")?;
                code_rows(out, &v["codes"])
            });
        }
        Command::Batch(BatchCommand::Create { product, quantity, kind, reason, account, order, email }) => {
            api.post("/admin/v1/batches", json!({
                "product_sku": product, "quantity": quantity, "kind": kind, "reason": reason,
                "account_id": account, "order_id": order, "email": email,
            }))
            .await?
        }
        Command::Batch(BatchCommand::Show { id }) => {
            let batch = api.get(&format!("/admin/v1/batches/{id}"), &[]).await?;
            return print(out, &cli, &batch, |out, v| {
                fields(out, v, &["id", "product_sku", "kind", "quantity", "requested_by", "reason", "exported_at"])?;
                code_rows(out, &v["codes"])
            });
        }
        Command::Batch(BatchCommand::Export { id, reason, out: file }) => {
            let csv = api
                .send(reqwest::Method::POST, &format!("/admin/v1/batches/{id}/export"), &[], Some(json!({ "reason": reason })))
                .await?
                .text()
                .await?;
            match file {
                Some(path) => {
                    std::fs::write(path, &csv).with_context(|| format!("Failed to write {}", path.display()))?;
                    writeln!(out, "{} code(s) written to {}", csv.lines().count().saturating_sub(1), path.display())?;
                }
                None => write!(out, "{csv}")?,
            }
            return Ok(());
        }
        Command::Resend { delivery_id, reason, email } => {
            api.post(&format!("/admin/v1/deliveries/{delivery_id}/resend"), json!({ "reason": reason, "email": email })).await?
        }
        Command::Events { status, channel } => {
            let events = api.get("/admin/v1/events", &[("status", status.clone()), ("channel", channel.clone())]).await?;
            return print(out, &cli, &events, |out, v| {
                rows(out, &v["events"], &["id", "channel", "event_type", "status", "error_code", "last_error", "received_at"])
            });
        }
        Command::RetryEvents { reason, event, channel, error_code } => {
            api.post("/admin/v1/events/retry", json!({ "reason": reason, "event_id": event, "channel": channel, "error_code": error_code })).await?
        }
        Command::Audit(a) => {
            let events = api
                .get("/admin/v1/audit", &[
                    ("subject_type", a.subject_type.clone()),
                    ("subject_id", a.subject_id.clone()),
                    ("actor", a.actor.clone()),
                    ("action", a.action.clone()),
                    ("since", a.since.clone()),
                    ("until", a.until.clone()),
                    ("before", a.before.map(|b| b.to_string())),
                    ("limit", a.limit.map(|l| l.to_string())),
                ])
                .await?;
            return print(out, &cli, &events, |out, v| {
                rows(out, &v["events"], &["id", "at", "actor", "action", "subject_type", "subject_id", "reason"])?;
                if let Some(next) = v["next_before"].as_i64() {
                    writeln!(out, "more: --before {next}")?;
                }
                Ok(())
            });
        }
        Command::Findings(FindingsCommand::List { status, kind, run }) => {
            let findings = api.get("/admin/v1/findings", &[("status", status.clone()), ("kind", kind.clone()), ("run", run.clone())]).await?;
            return print(out, &cli, &findings, |out, v| {
                let list = v["findings"].as_array().cloned().unwrap_or_default();
                let open = list.iter().filter(|f| f["status"] == "open").count();
                writeln!(out, "{} finding(s), {open} open", list.len())?;
                rows(out, &v["findings"], &["id", "kind", "status", "order_id", "channel", "detail", "created_at"])
            });
        }
        Command::Findings(FindingsCommand::Export { status, kind, run }) => {
            let csv = api
                .send(reqwest::Method::GET, "/admin/v1/findings/export", &[("status", status.clone()), ("kind", kind.clone()), ("run", run.clone())], None)
                .await?
                .bytes()
                .await?;
            out.write_all(&csv)?;
            return Ok(());
        }
        Command::Reconcile(ReconcileCommand::Start { channel, from, to, reason, wait }) => {
            let started = api
                .post("/admin/v1/reconciliations", json!({ "channel": channel, "from": from, "to": to, "reason": reason }))
                .await?;
            if !*wait {
                started
            } else {
                let path = format!("/admin/v1/reconciliations/{}", text(&started["id"]));
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
                let run = loop {
                    let run = api.get(&path, &[]).await?;
                    if matches!(run["status"].as_str(), Some("finished" | "failed")) {
                        break run;
                    }
                    if std::time::Instant::now() > deadline {
                        bail!("run {} has not ended after an hour", text(&started["id"]));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                };
                return print(out, &cli, &run, run_summary);
            }
        }
        Command::Reconcile(ReconcileCommand::List { channel, status }) => {
            let runs = api.get("/admin/v1/reconciliations", &[("channel", channel.clone()), ("status", status.clone())]).await?;
            return print(out, &cli, &runs, |out, v| rows(out, &v["runs"], &["id", "channel", "status", "trigger", "window_start", "window_end", "duration_ms", "channel_records", "entitle_orders"]));
        }
        Command::Reconcile(ReconcileCommand::Show { id }) => {
            let run = api.get(&format!("/admin/v1/reconciliations/{id}"), &[]).await?;
            return print(out, &cli, &run, run_summary);
        }
        Command::Findings(FindingsCommand::Resolve { id, reason }) => {
            api.post(&format!("/admin/v1/findings/{id}/resolve"), json!({ "reason": reason })).await?
        }
        Command::Findings(FindingsCommand::Ignore { id, reason }) => {
            api.post(&format!("/admin/v1/findings/{id}/ignore"), json!({ "reason": reason })).await?
        }
        Command::Token(TokenCommand::List) => {
            let tokens = api.get("/admin/v1/tokens", &[]).await?;
            return print(out, &cli, &tokens, |out, v| rows(out, &v["tokens"], &["name", "role", "created_by", "created_at", "last_used_at", "revoked_at"]));
        }
        Command::Token(TokenCommand::Create { name, role, reason }) => {
            api.post("/admin/v1/tokens", json!({ "name": name, "role": role, "reason": reason })).await?
        }
        Command::PlatformKey(PlatformKeyCommand::List) => {
            let keys = api.get("/admin/v1/platform-keys", &[]).await?;
            return print(out, &cli, &keys, |out, v| rows(out, &v["platform_keys"], &["name", "created_by", "created_at", "last_used_at", "revoked_at"]));
        }
        Command::PlatformKey(PlatformKeyCommand::Create { name, reason }) => {
            api.post("/admin/v1/platform-keys", json!({ "name": name, "reason": reason })).await?
        }
        Command::PlatformKey(PlatformKeyCommand::Revoke { name, reason }) => {
            api.post(&format!("/admin/v1/platform-keys/{name}/revoke"), json!({ "reason": reason })).await?
        }
        Command::Token(TokenCommand::Revoke { name, reason }) => {
            api.post(&format!("/admin/v1/tokens/{name}/revoke"), json!({ "reason": reason })).await?
        }
        Command::Endpoint(EndpointCommand::List) => {
            let endpoints = api.get("/admin/v1/platform/endpoints", &[]).await?;
            return print(out, &cli, &endpoints, |out, v| rows(out, &v["endpoints"], &["id", "name", "url", "source", "event_types", "disabled_at"]));
        }
        Command::Endpoint(EndpointCommand::Create { name, url, events, reason }) => {
            api.post("/admin/v1/platform/endpoints", json!({ "name": name, "url": url, "event_types": events, "reason": reason })).await?
        }
        Command::Endpoint(EndpointCommand::Rotate { id, reason }) => {
            api.post(&format!("/admin/v1/platform/endpoints/{id}/rotate"), json!({ "reason": reason })).await?
        }
        Command::Endpoint(EndpointCommand::Disable { id, reason }) => {
            api.post(&format!("/admin/v1/platform/endpoints/{id}/disable"), json!({ "reason": reason })).await?
        }
        Command::Endpoint(EndpointCommand::Enable { id, reason }) => {
            api.post(&format!("/admin/v1/platform/endpoints/{id}/enable"), json!({ "reason": reason })).await?
        }
        Command::Delivery(DeliveryCommand::List { status, endpoint, code, order }) => {
            let query = [("status", status.clone()), ("endpoint", endpoint.clone()), ("code_id", code.clone()), ("order_id", order.clone())];
            let deliveries = api.get("/admin/v1/platform/deliveries", &query).await?;
            return print(out, &cli, &deliveries, |out, v| rows(out, &v["deliveries"], &["id", "event_type", "seq", "endpoint", "status", "attempts", "last_status", "last_error", "due_at"]));
        }
        Command::Delivery(DeliveryCommand::Show { id }) => {
            api.get(&format!("/admin/v1/platform/deliveries/{id}"), &[]).await?
        }
        Command::Delivery(DeliveryCommand::Replay { id, reason }) => {
            api.post(&format!("/admin/v1/platform/deliveries/{id}/replay"), json!({ "reason": reason })).await?
        }
        Command::Products(ProductsCommand::List) => {
            let products = api.get("/admin/v1/products", &[]).await?;
            return print(out, &cli, &products, |out, v| rows(out, &v["products"], &["sku", "name", "validity_days", "active", "references"]));
        }
        Command::Products(ProductsCommand::Reload { reason }) => {
            api.post("/admin/v1/products/reload", json!({ "reason": reason })).await?
        }
    };
    print(out, &cli, &shown, |out, v| fields_all(out, v))
}

fn print(
    out: &mut impl Write,
    cli: &Cli,
    value: &Value,
    table: impl FnOnce(&mut dyn Write, &Value) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(value)?)?;
    } else {
        let mut buffer = Vec::new();
        table(&mut buffer, value)?;
        out.write_all(&buffer)?;
    }
    Ok(())
}

/// A run for people: what it covered, how it went, what it found.
fn run_summary(out: &mut dyn Write, run: &Value) -> std::io::Result<()> {
    writeln!(
        out,
        "Reconciliation {} of {}: {}",
        text(&run["id"]),
        text(&run["channel"]),
        text(&run["status"])
    )?;
    writeln!(
        out,
        "window {} to {}, started by {}",
        text(&run["window_start"]),
        text(&run["window_end"]),
        text(&run["trigger"])
    )?;
    let counts = &run["counts"];
    let compared = if counts["channel_compared"] == true {
        format!(
            "{} channel order(s), {} refund/cancellation record(s), {} page(s), {} API retr(ies)",
            text(&run["channel_records"]),
            text(&counts["channel_adjustments"]),
            text(&counts["pages"]),
            text(&counts["api_retries"])
        )
    } else {
        "the channel's API was not read (native, or not configured)".to_owned()
    };
    writeln!(
        out,
        "{compared}; {} Entitle order(s)",
        text(&run["entitle_orders"])
    )?;
    let memory = run["peak_memory_bytes"]
        .as_f64()
        .map(|b| format!("{:.1} MiB", b / 1048576.0))
        .unwrap_or_else(|| "unknown".to_owned());
    writeln!(
        out,
        "took {} ms, peak memory {memory}; {} healing action(s), {} mismatch(es) already on record",
        text(&run["duration_ms"]),
        text(&counts["actions"]),
        text(&counts["seen_again"])
    )?;
    if !run["error"].is_null() {
        writeln!(out, "error: {}", text(&run["error"]))?;
    }
    let findings = run["findings"].as_array().cloned().unwrap_or_default();
    if findings.is_empty() {
        return writeln!(out, "no findings");
    }
    rows(out, &run["findings"], &["kind", "status", "count"])
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn new_table() -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table
}

fn fields(out: &mut dyn Write, value: &Value, names: &[&str]) -> std::io::Result<()> {
    let mut table = new_table();
    for name in names {
        table.add_row(vec![name.to_string(), text(&value[*name])]);
    }
    writeln!(out, "{table}")
}

fn fields_all(out: &mut dyn Write, value: &Value) -> std::io::Result<()> {
    let mut table = new_table();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            table.add_row(vec![k.clone(), text(v)]);
        }
    }
    writeln!(out, "{table}")
}

fn rows(out: &mut dyn Write, list: &Value, columns: &[&str]) -> std::io::Result<()> {
    let mut table = new_table();
    table.set_header(columns.to_vec());
    for item in list.as_array().into_iter().flatten() {
        table.add_row(columns.iter().map(|c| text(&item[*c])).collect::<Vec<_>>());
    }
    writeln!(out, "{table}")
}

fn code_rows(out: &mut dyn Write, list: &Value) -> std::io::Result<()> {
    let mut table = new_table();
    table.set_header(vec![
        "id",
        "code",
        "product",
        "state",
        "expires_at",
        "assigned to",
    ]);
    for c in list.as_array().into_iter().flatten() {
        let assigned = match &c["assignment"] {
            Value::Null => String::new(),
            a => format!("{} / {}", text(&a["account_id"]), text(&a["entity_ref"])),
        };
        table.add_row(vec![
            text(&c["id"]),
            text(&c["masked"]),
            text(&c["product_sku"]),
            text(&c["state"]),
            text(&c["expires_at"]),
            assigned,
        ]);
    }
    writeln!(out, "{table}")
}

fn show_code(out: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    fields(
        out,
        v,
        &[
            "id",
            "masked",
            "state",
            "issued_at",
            "expires_at",
            "redeemed_at",
            "revoked_at",
        ],
    )?;
    let mut table = new_table();
    table.add_row(vec![
        "product".to_owned(),
        format!(
            "{} ({})",
            text(&v["product"]["sku"]),
            text(&v["product"]["name"])
        ),
    ]);
    table.add_row(vec!["origin".to_owned(), text(&v["origin"])]);
    table.add_row(vec!["assignment".to_owned(), text(&v["assignment"])]);
    table.add_row(vec!["reissue chain".to_owned(), text(&v["reissue_chain"])]);
    writeln!(out, "{table}")?;
    writeln!(out, "\nDeliveries")?;
    rows(
        out,
        &v["deliveries"],
        &["id", "kind", "recipient_email", "status", "sent_at"],
    )?;
    writeln!(out, "\nHistory")?;
    rows(out, &v["history"], &["at", "actor", "action", "reason"])
}
