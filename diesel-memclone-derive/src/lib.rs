//! `#[derive(MemClone)]` and `#[derive(CacheValue)]` for
//! [diesel-memclone](https://docs.rs/diesel-memclone). Use them through `diesel_memclone`,
//! which re-exports both.

mod expand;

use proc_macro::TokenStream;

/// Makes a Diesel model cacheable by primary key and as a query result.
///
/// Reads `#[diesel(table_name = ..)]` and `#[diesel(primary_key(..))]` like Diesel does
/// (defaults: the snake-case plural of the struct name, and `id`), and its own options:
///
/// * `#[memclone(ttl = 60)]`: entry lifetime in seconds for this model's rows;
/// * `#[memclone(name = "Person")]`: the model's name;
/// * `#[memclone(scope(user_id, ..))]`: fields whose columns cached queries may be confined to
///   with `Cached::within(posts::user_id, value)` (`diesel_memclone::ScopeColumn` is
///   implemented for each column, and the rows name their values to the writes that return
///   them). Such a query vouches that it reads only rows of the table with that value; if it
///   reads others, a write to them leaves it stale until its TTL. At most one model per
///   `table!` declares scopes (a second does not compile), and the field's type must be a
///   `diesel_memclone::ScopeValue` (integers, `bool`, `String`, `Uuid`, their `Option`s).
///
/// The table's name and the key columns' names come from Diesel itself (the `table!`'s
/// `#[sql_name]` and the columns' `Column::NAME`), so a renamed table or column needs nothing.
#[proc_macro_derive(MemClone, attributes(memclone, diesel))]
pub fn derive_memclone(input: TokenStream) -> TokenStream {
    syn::parse2(input.into())
        .and_then(expand::memclone)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Makes any serde struct usable as a cached query's row (a selection of columns, a join row).
#[proc_macro_derive(CacheValue, attributes(memclone))]
pub fn derive_cache_value(input: TokenStream) -> TokenStream {
    syn::parse2(input.into())
        .and_then(expand::cache_value)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
