//! The product catalogue: read from a TOML file at start and synchronised into
//! `product` and `channel_product`, so products change without code.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

/// The catalogue file's contents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    #[serde(default)]
    pub product: Vec<ProductEntry>,
}

/// One `[[product]]` of the catalogue file.
#[derive(Debug, Clone, Deserialize)]
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

    /// Makes the database match the catalogue, in one transaction. Products
    /// dropped from the file are deactivated, not deleted: codes refer to them.
    pub async fn sync(&self, pool: &PgPool) -> anyhow::Result<()> {
        let mut tx = pool
            .begin()
            .await
            .context("Failed to begin catalogue sync")?;
        // Serialise concurrent syncs from several processes starting at once.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('entitle.catalogue_sync'))")
            .execute(&mut *tx)
            .await?;
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
        tx.commit()
            .await
            .context("Failed to commit catalogue sync")?;
        Ok(())
    }
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
