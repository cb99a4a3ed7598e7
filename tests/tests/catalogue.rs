//! The catalogue in the database changes only by an explicit, audited sync
//! or by the first process of a higher `version`; a process with another
//! catalogue at the same or a lower version is reported, not raced.

use entitle_jobs::{
    catalogue::{AtStart, Catalogue},
    token::Role,
};
use entitle_tests::{Options, TestApp};
use serde_json::json;

/// The shipped catalogue with the basic kit renamed, at `version`.
fn variant(name: &str, version: u64) -> Catalogue {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/catalogue.toml");
    let mut catalogue = Catalogue::load(std::path::Path::new(path)).unwrap();
    catalogue.version = version;
    catalogue
        .product
        .iter_mut()
        .find(|p| p.sku == "KIT-BASIC")
        .unwrap()
        .name = name.to_owned();
    catalogue
}

async fn kit_name(app: &TestApp) -> String {
    sqlx::query_scalar("SELECT name FROM product WHERE sku = 'KIT-BASIC'")
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_higher_version_or_an_explicit_sync_changes_the_catalogue() {
    let app = TestApp::spawn_with(Options {
        smtp: false,
        worker: false,
    })
    .await;
    let shipped = kit_name(&app).await;
    let findings = "SELECT count(*) FROM reconciliation_finding WHERE kind = 'catalogue_differs'";

    // Another process with an edited file at the same version: reported,
    // not synced, and reported once however often it starts.
    let edited = variant("Edited kit", 1);
    for _ in 0..2 {
        assert_eq!(
            edited.at_start(&app.pool, "system:other").await.unwrap(),
            AtStart::Differs {
                database: 1,
                file: 1
            }
        );
    }
    assert_eq!(kit_name(&app).await, shipped);
    assert_eq!(app.count(findings).await, 1);

    // The first process of version 2 rolls it out, audited.
    let next = variant("Kit, second edition", 2);
    assert_eq!(
        next.at_start(&app.pool, "system:deploy-2").await.unwrap(),
        AtStart::Synced { from: Some(1) }
    );
    assert_eq!(kit_name(&app).await, "Kit, second edition");
    let (actor, reason): (String, String) = sqlx::query_as(
        "SELECT actor, reason FROM audit_event WHERE action = 'catalogue.synced' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(actor, "system:deploy-2");
    assert!(reason.contains("version 2"), "{reason}");
    assert_eq!(
        next.at_start(&app.pool, "system:deploy-2b").await.unwrap(),
        AtStart::Unchanged
    );

    // A process still on version 1 does not take it back.
    assert_eq!(
        Catalogue::load(&app.ctx.config.catalogue.file)
            .unwrap()
            .at_start(&app.pool, "system:old")
            .await
            .unwrap(),
        AtStart::Differs {
            database: 2,
            file: 1
        }
    );
    assert_eq!(kit_name(&app).await, "Kit, second edition");

    // Two different files of version 3 started at once: one wins, the
    // other is reported; they do not overwrite each other.
    let (a, b) = (variant("Kit A", 3), variant("Kit B", 3));
    let (first, second) = tokio::join!(
        a.at_start(&app.pool, "system:a"),
        b.at_start(&app.pool, "system:b")
    );
    let outcomes = [first.unwrap(), second.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, AtStart::Synced { .. }))
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes.contains(&AtStart::Differs {
        database: 3,
        file: 3
    }));
    let won = kit_name(&app).await;
    assert!(won == "Kit A" || won == "Kit B", "{won}");

    // An explicit sync puts the file in force whatever its version.
    let admin = app.token(Role::Admin).await;
    let (status, body) = app
        .admin(
            "POST",
            "/admin/v1/products/reload",
            Some(&admin),
            Some(json!({ "reason": "back to the shipped catalogue" })),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(kit_name(&app).await, shipped);
    let version: i64 = sqlx::query_scalar("SELECT version FROM catalogue_state")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(version, 1);
}
