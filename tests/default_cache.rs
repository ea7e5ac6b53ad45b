//! The implicit default cache belongs to one process, and says so once: its first use logs one
//! warning, later uses none. (A binary of its own: the default cache is process-wide.)

use diesel_memclone::prelude::*;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::{sqlite, User};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Counts WARN events (a minimal `tracing` subscriber, no extra crate).
struct WarnCounter(Arc<AtomicUsize>);

impl tracing::Subscriber for WarnCounter {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            AtomicUsize::fetch_add(&self.0, 1, Ordering::SeqCst);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread")]
async fn the_implicit_per_process_cache_warns_once() {
    let warnings = Arc::new(AtomicUsize::new(0));
    let _subscriber = tracing::subscriber::set_default(WarnCounter(warnings.clone()));
    let mut conn = sqlite().await;
    for _ in 0..3 {
        let rows: Vec<User> = users::table
            .cached("all")
            .load(&mut conn)
            .await
            .expect("read");
        assert!(rows.is_empty());
    }
    diesel_memclone::insert_into(users::table)
        .values(&User {
            id: 1,
            name: "Ada".into(),
            status: "active".into(),
        })
        .execute(&mut conn)
        .await
        .expect("write");
    assert_eq!(AtomicUsize::load(&warnings, Ordering::SeqCst), 1);
}
