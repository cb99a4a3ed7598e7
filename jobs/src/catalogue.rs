//! The product catalogue: read from a TOML file and synchronised into
//! `product` and `channel_product`, so products change without code. The
//! database changes only by an explicit, audited sync: `products reload`
//! (admin API, `entitlectl`, `entitle-gateway sync-catalogue`), or the first
//! process to start with a higher `version` in its file. A process whose
//! file differs at the same or a lower version reports it (a log line, a
//! finding, a metric) and runs with the database's catalogue: several
//! processes with different files never overwrite each other in turn.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::{
    audit::{self, AuditEvent},
    finding::{self, NewFinding},
};

/// The catalogue file's contents.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Raise it with each change meant to reach the database at the next
    /// start (or sync explicitly).
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub product: Vec<ProductEntry>,
}

/// What starting with a catalogue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtStart {
    /// The database had this catalogue already.
    Unchanged,
    /// The database had none, or an older version: it has this one now.
    Synced { from: Option<u64> },
    /// The file differs from the database's catalogue at the same or a
    /// lower version: not synced, reported.
    Differs { database: u64, file: u64 },
}

/// One `[[product]]` of the catalogue file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProductEntry {
    pub sku: String,
    pub name: String,
    pub validity_days: i32,
    #[serde(default = "default_template")]
    pub email_template: String,
    /// Stripe price ids that sell this product.
    #[serde(default)]
    pub stripe_prices: Vec<String>,
    /// Shopify variant ids that sell this product.
    #[serde(default)]
    pub shopify_variants: Vec<String>,
    /// Shopify SKUs that sell it, used when a variant id is not mapped.
    #[serde(default)]
    pub shopify_skus: Vec<String>,
    /// SKUs of the platform's native checkout.
    #[serde(default)]
    pub native_skus: Vec<String>,
}

fn default_template() -> String {
    "default".to_owned()
}

use crate::channel::{native, shopify, stripe};

impl Catalogue {
    /// Reads and checks a catalogue file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("Failed to read the catalogue file {}", path.display()))?;
        let catalogue: Catalogue = toml_from_str(&text)
            .with_context(|| format!("Failed to parse the catalogue file {}", path.display()))?;
        catalogue.check()?;
        Ok(catalogue)
    }

    /// Every (channel, reference) pair of the catalogue with its product SKU.
    fn mappings(&self) -> Vec<(&'static str, String, &str)> {
        let mut out = Vec::new();
        for p in &self.product {
            for price in &p.stripe_prices {
                out.push((stripe::CHANNEL, price.clone(), p.sku.as_str()));
            }
            for variant in &p.shopify_variants {
                out.push((
                    shopify::CHANNEL,
                    shopify::variant_reference(variant),
                    p.sku.as_str(),
                ));
            }
            for sku in &p.shopify_skus {
                out.push((
                    shopify::CHANNEL,
                    shopify::sku_reference(sku),
                    p.sku.as_str(),
                ));
            }
            for sku in &p.native_skus {
                out.push((native::CHANNEL, sku.clone(), p.sku.as_str()));
            }
        }
        out
    }

    /// Rejects what would make a reference ambiguous or a code unusable.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut skus = HashMap::new();
        for p in &self.product {
            if p.sku.trim().is_empty() {
                bail!("a product has an empty sku");
            }
            if p.validity_days <= 0 {
                bail!("product {}: validity_days must be positive", p.sku);
            }
            if skus.insert(p.sku.as_str(), ()).is_some() {
                bail!("product sku {} appears twice", p.sku);
            }
        }
        let mut refs = HashMap::new();
        for (channel, reference, sku) in self.mappings() {
            if let Some(other) = refs.insert((channel, reference.clone()), sku) {
                bail!("{channel} reference {reference} maps to both {other} and {sku}");
            }
        }
        Ok(())
    }

    /// A hash of the catalogue's content: what tells two files apart.
    pub fn hash(&self) -> Vec<u8> {
        let canonical = serde_json::to_vec(self).expect("a catalogue serialises");
        Sha256::digest(canonical).to_vec()
    }

    /// Makes the database match the catalogue in one transaction, and
    /// records its version, audited as `catalogue.synced` by `actor` with
    /// `reason`. Products dropped from the file are deactivated, not
    /// deleted: codes refer to them.
    pub async fn sync(&self, pool: &PgPool, actor: &str, reason: &str) -> anyhow::Result<()> {
        let mut tx = pool
            .begin()
            .await
            .context("Failed to begin catalogue sync")?;
        lock(&mut tx).await?;
        let before = state(&mut tx).await?.map(|(version, _)| version);
        self.apply(&mut tx, actor, reason, before).await?;
        tx.commit()
            .await
            .context("Failed to commit catalogue sync")?;
        Ok(())
    }

    /// What a starting process does: syncs when the database has no
    /// catalogue or an older version, does nothing when it has this one,
    /// and otherwise reports the difference (a finding, once per pair of
    /// catalogues) and leaves the database's catalogue in force.
    pub async fn at_start(&self, pool: &PgPool, process: &str) -> anyhow::Result<AtStart> {
        let mut tx = pool
            .begin()
            .await
            .context("Failed to begin catalogue sync")?;
        lock(&mut tx).await?;
        let hash = self.hash();
        let outcome = match state(&mut tx).await? {
            Some((_, current)) if current == hash => AtStart::Unchanged,
            None => {
                self.apply(&mut tx, process, "the first process of this database", None)
                    .await?;
                AtStart::Synced { from: None }
            }
            Some((database, _)) if self.version > database => {
                let reason = format!(
                    "the first process of catalogue version {} (was {database})",
                    self.version
                );
                self.apply(&mut tx, process, &reason, Some(database))
                    .await?;
                AtStart::Synced {
                    from: Some(database),
                }
            }
            Some((database, current)) => {
                let detail = format!(
                    "{process} started with a catalogue file (version {}) that differs from the \
                     database's (version {database}); it was not synced. Raise `version` in the \
                     file to roll it out, or run `entitlectl products reload`; until then every \
                     process uses the database's catalogue",
                    self.version
                );
                finding::record(
                    &mut tx,
                    process,
                    NewFinding {
                        kind: "catalogue_differs",
                        order_id: None,
                        code_id: None,
                        channel: None,
                        channel_reference: None,
                        detail,
                        action_taken: None,
                        dedupe_key: format!("catalogue_differs:{}:{}", hex(&current), hex(&hash)),
                        run_id: None,
                    },
                )
                .await?;
                AtStart::Differs {
                    database,
                    file: self.version,
                }
            }
        };
        tx.commit()
            .await
            .context("Failed to commit catalogue sync")?;
        Ok(outcome)
    }

    async fn apply(
        &self,
        tx: &mut PgConnection,
        actor: &str,
        reason: &str,
        before: Option<u64>,
    ) -> anyhow::Result<()> {
        let skus: Vec<&str> = self.product.iter().map(|p| p.sku.as_str()).collect();
        for p in &self.product {
            sqlx::query(
                "INSERT INTO product (id, sku, name, validity_days, email_template, active)
                 VALUES ($1, $2, $3, $4, $5, true)
                 ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name,
                    validity_days = EXCLUDED.validity_days,
                    email_template = EXCLUDED.email_template,
                    active = true, updated_at = now()",
            )
            .bind(Uuid::now_v7())
            .bind(&p.sku)
            .bind(&p.name)
            .bind(p.validity_days)
            .bind(&p.email_template)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("Failed to save product {}", p.sku))?;
        }
        sqlx::query("UPDATE product SET active = false, updated_at = now() WHERE active AND NOT (sku = ANY($1))")
            .bind(&skus)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM channel_product")
            .execute(&mut *tx)
            .await?;
        for (channel, reference, sku) in self.mappings() {
            sqlx::query(
                "INSERT INTO channel_product (channel, reference, product_id)
                 SELECT $1, $2, id FROM product WHERE sku = $3",
            )
            .bind(channel)
            .bind(reference)
            .bind(sku)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO catalogue_state (singleton, version, hash, products, synced_by)
             VALUES (true, $1, $2, $3, $4)
             ON CONFLICT (singleton) DO UPDATE SET version = excluded.version,
                 hash = excluded.hash, products = excluded.products,
                 synced_at = now(), synced_by = excluded.synced_by",
        )
        .bind(self.version as i64)
        .bind(self.hash())
        .bind(self.product.len() as i32)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        audit::record(
            tx,
            AuditEvent {
                actor,
                action: "catalogue.synced",
                subject_type: "catalogue",
                subject_id: "catalogue".to_owned(),
                reason: Some(reason),
                data: json!({
                    "before": { "version": before },
                    "after": { "version": self.version, "hash": hex(&self.hash()), "products": self.product.len() },
                }),
            },
        )
        .await?;
        Ok(())
    }
}

/// Serialises syncs from several processes starting at once.
async fn lock(tx: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('entitle.catalogue_sync'))")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The database's catalogue version and hash, if it has one.
async fn state(tx: &mut PgConnection) -> sqlx::Result<Option<(u64, Vec<u8>)>> {
    let row: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, hash FROM catalogue_state WHERE singleton")
            .fetch_optional(&mut *tx)
            .await?;
    Ok(row.map(|(version, hash)| (version as u64, hash)))
}

/// A short form of a hash, for people: its first 8 bytes in hex.
fn hex(bytes: &[u8]) -> String {
    hex::encode(&bytes[..bytes.len().min(8)])
}

fn toml_from_str(text: &str) -> anyhow::Result<Catalogue> {
    use figment::{
        Figment,
        providers::{Format, Toml},
    };
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_mapped_twice_is_rejected() {
        let c = toml_from_str(
            r#"
            [[product]]
            sku = "A"
            name = "A"
            validity_days = 1
            stripe_prices = ["price_x"]
            [[product]]
            sku = "B"
            name = "B"
            validity_days = 1
            stripe_prices = ["price_x"]
            "#,
        )
        .unwrap();
        let err = c.check().unwrap_err().to_string();
        assert!(err.contains("price_x"), "{err}");
    }

    #[test]
    fn the_shipped_catalogue_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/catalogue.toml");
        Catalogue::load(&path).unwrap();
    }
}
