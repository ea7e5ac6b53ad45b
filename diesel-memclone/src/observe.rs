//! What the cache tells the outside: `tracing` spans always, and metrics through the
//! [`metrics`](https://docs.rs/metrics) facade with the `metrics` feature.
//!
//! # Spans
//!
//! Both spans are at `DEBUG` level, target `diesel_memclone`. With no subscriber listening (or
//! one that filters `DEBUG` out) a span costs one cached check of its call site: nothing is
//! formatted or allocated.
//!
//! | span | fields |
//! | --- | --- |
//! | `memclone.read` | `label` (the query's label, or the table of an entity read), `entity` (true for `find`, `reload`), `tables` (what invalidates the entry), `outcome` (below), `bytes` (the entry's size when one was read or stored) |
//! | `memclone.invalidate` | `tables` (the written tables), `rows` (how many rows were named, when known), `outcome` (`delivered` or `undelivered`) |
//!
//! A read's `outcome` is one of `hit_near`, `hit_redis`, `hit_memory` (or `hit_store` for
//! another store), `miss`, `bypass`, `coalesced`, `lock_wait`, `stale`; `corrupt` and
//! `lock_timeout` are recorded before the read goes on to its final outcome.
//!
//! # Metrics (feature `metrics`)
//!
//! Every name is emitted through the facade; the program installs a recorder (the Prometheus,
//! StatsD or OpenTelemetry exporter) before the first cached call. Without a recorder the
//! cache does no metrics work but one check per event (a zero-sized recorder is taken for the
//! facade's no-op recorder and gets nothing). Without the feature no metrics code is compiled.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `memclone_hits_total` | counter | `tier`, `label` | reads answered by the cache; `tier` is `near` (the near tier, no store call), `redis`, `memory` (the in-process store) or `store` (another [`Store`](crate::store::Store)) |
//! | `memclone_misses_total` | counter | `label` | reads that went to the database and stored their result |
//! | `memclone_bypasses_total` | counter | `label` | reads that went to the database without the store (transaction, store down, undelivered invalidation, reload) |
//! | `memclone_coalesced_total` | counter | `label` | reads answered by another caller's load in this process (single-flight) |
//! | `memclone_stale_served_total` | counter | `label` | expired entries served while another caller refreshed them |
//! | `memclone_corrupt_entries_total` | counter | `label` | entries that did not decode and were replaced |
//! | `memclone_lock_waits_total` | counter | `label` | reads answered by another process's load after waiting for its fill lock |
//! | `memclone_lock_timeouts_total` | counter | `label` | waits for a fill lock that timed out |
//! | `memclone_fill_seconds` | histogram | `label` | database reads the cache made for a read (misses and bypasses); for the `*_from` reads, with the wait for the pool's connection |
//! | `memclone_invalidations_total` | counter | `table` | invalidations, one per written table |
//! | `memclone_invalidations_undelivered_total` | counter | `table` | invalidations the store did not take (kept, retried; the table's reads bypass the cache meanwhile) |
//! | `memclone_store_seconds` | histogram | `outcome` (`ok`, `error`, `timeout`) | store calls (one round trip each for Redis) |
//! | `memclone_store_errors_total` | counter | | store calls that failed or timed out |
//!
//! Cardinality is bounded by the program's source: `label` is the string given to
//! [`cached`](crate::CachedDsl::cached) (a literal in nearly every program: do not put
//! arguments in it; they belong to the query's binds, which are not labels), or the table's
//! name for entity reads ([`find`](crate::find), [`reload`](crate::reload)), and `table` is a
//! table of the schema. No metric is labelled by key, bind or row. The counters match
//! [`Cache::stats`](crate::Cache::stats), summed over every cache of the process.
