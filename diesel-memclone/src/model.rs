//! The traits `#[derive(MemClone)]` and `#[derive(CacheValue)]` implement.

use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// A row of a table, named by table and primary key, as written into entity keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RowKey {
    /// The table's name for the cache (see [`table_name`](crate::table_name)).
    pub table: &'static str,
    /// The primary key, rendered with `Debug` (stable for integers, strings and tuples).
    pub primary_key: String,
}

impl RowKey {
    /// A row key from its parts.
    pub fn new(table: &'static str, primary_key: impl Debug) -> Self {
        Self {
            table,
            primary_key: format!("{primary_key:?}"),
        }
    }
}

/// A value that can be cached: it can be stored, has a stable shape fingerprint, and knows the
/// tables and rows it was read from.
///
/// Implemented for scalars, `String`, `Vec<T>`, `Option<T>`, tuples of up to 8 elements and
/// every `#[derive(MemClone)]` model. `#[derive(CacheValue)]` implements it for other structs
/// (a select of a few columns, a join's row).
pub trait CacheValue: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// A stable hash of the value's shape (field names and types). It is part of every key, so
    /// changing a struct makes its old entries unreachable instead of misread.
    fn fingerprint() -> u64;

    /// Adds the tables whose models appear in this type. A query over such a value depends on
    /// them in addition to the tables its SQL names.
    fn tables(_out: &mut Vec<&'static str>) {}

    /// The columns of this type's primary key, when it is a model. A write whose `SET` clause
    /// assigns one of them moves rows to other keys, so it evicts every row of the table.
    fn key_columns() -> &'static [&'static str] {
        &[]
    }

    /// The entity entry lifetime of this type, when it is a model with `#[memclone(ttl)]`.
    fn entity_ttl() -> Option<std::time::Duration> {
        None
    }

    /// Adds the rows this value holds (for writes that return rows: only those rows' entity
    /// entries are evicted, rather than every entity entry of the table).
    fn rows(&self, _out: &mut Vec<RowKey>) {}

    /// The SQL names of this type's scope columns (`#[memclone(scope(..))]`), when it is a
    /// model that declares some. A write that assigns one of them moves rows between scopes.
    fn scope_columns() -> &'static [&'static str] {
        &[]
    }

    /// Adds this row's scope values, when it is a model that declares scope columns: each
    /// column's SQL name and its value as [`ScopeValue::scope_text`] renders it. A write that
    /// returns such rows invalidates only the scoped queries of those values (see
    /// [`Cached::within`](crate::Cached::within)).
    fn scope_values(&self, _out: &mut Vec<(&'static str, String)>) {}
}

/// A column of a model's table that cached queries may declare they are confined to, with
/// [`Cached::within`](crate::Cached::within). `#[derive(MemClone)]` implements it for each
/// column named in `#[memclone(scope(field, ..))]`; do not implement it by hand.
pub trait ScopeColumn: diesel::Column {
    /// The model's field type for this column.
    type Value: ScopeValue;

    /// The table of the model that declares the column as a scope, as memclone names it
    /// ([`MemClone::table`]): that model's writes name the rows' values. A function rather than
    /// the model as an associated type, so that a private model may declare scopes on the
    /// public column types of `table!`.
    fn model_table() -> &'static str;
}

/// A scope column's value type: two values are equal in the database exactly when their
/// [`scope_text`](ScopeValue::scope_text) is equal. Implemented for integers, `bool`, `String`,
/// `uuid::Uuid` and `Option`s of them; not for floats (`-0.0 = 0.0` in SQL, not in their
/// text). Implement it for a newtype only if that holds for it, and mind case-insensitive
/// collations (MySQL's default): `'Rust' = 'rust'` there, so a `String` scope column must use a
/// case-sensitive one.
pub trait ScopeValue {
    /// The value as scope keys hold it: its `Debug` text, as [`RowKey`] renders keys.
    fn scope_text(&self) -> String;
}

macro_rules! scope_values {
    ($($ty:ty),* $(,)?) => {$(
        impl ScopeValue for $ty {
            fn scope_text(&self) -> String {
                format!("{self:?}")
            }
        }
    )*};
}

scope_values!(
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    bool,
    String,
    uuid::Uuid
);

impl<T: ScopeValue> ScopeValue for Option<T> {
    fn scope_text(&self) -> String {
        match self {
            Some(value) => format!("Some({})", value.scope_text()),
            None => "None".to_owned(),
        }
    }
}

/// A table that a model declares scope columns on: implemented by `#[derive(MemClone)]`, once
/// per table, so that a second model declaring scopes on the same `table!` does not compile
/// (a write returning the other model's rows would not name the first one's scope values).
#[doc(hidden)]
pub trait ScopedTable {}

/// A Diesel model whose rows are cached by primary key. Implement it with `#[derive(MemClone)]`.
pub trait MemClone: CacheValue {
    /// The model's name (the struct name, or `#[memclone(name = "...")]`).
    const NAME: &'static str;
    /// The table's name for the cache, taken from Diesel's `table!` (its SQL name, lower-cased,
    /// without the schema): see [`table_name`](crate::table_name).
    fn table() -> &'static str;
    /// The table as SQL names it, for `listen::tables` and the `install_sql` of its
    /// triggers (feature `postgres`): with its schema when `table!` gives one, and quoted where
    /// a bare name would not name it (`app."Ledger"`). `#[derive(MemClone)]` renders it from
    /// the `table!`; the default is [`table`](MemClone::table).
    fn table_sql() -> &'static str {
        Self::table()
    }
    /// The shape the fingerprint is computed from: table, fields and their types.
    const SHAPE: &'static str;
    /// The model's entry lifetime in seconds (`#[memclone(ttl = 60)]`), if it has its own.
    const TTL_SECONDS: Option<u64>;
    /// The primary key (a tuple for a composite key).
    type PrimaryKey: Debug + Clone + Send + Sync + 'static;
    /// The Diesel query that loads one row by primary key (`table.find(pk)`).
    type FindQuery: Send + 'static;

    /// This row's primary key.
    fn primary_key(&self) -> Self::PrimaryKey;

    /// The query that loads the row with this key.
    fn find_query(primary_key: Self::PrimaryKey) -> Self::FindQuery;

    /// This row's key in the store.
    fn row_key(&self) -> RowKey {
        RowKey::new(Self::table(), self.primary_key())
    }

    /// The key columns that row-level database triggers may name the changed rows by
    /// (`listen::row_triggers(..).models::<..>()`, feature `postgres`), or none: then the table
    /// is invalidated whole. Only keys whose text PostgreSQL renders exactly as [`RowKey`] does
    /// (`i16`, `i32`, `i64`, `bool`, `String`, `uuid::Uuid`, and tuples of them) qualify: for
    /// any other key type (a newtype, say) a row named by the database would be a key nothing
    /// reads, and the cached row would stay stale. `#[derive(MemClone)]` implements it from the
    /// key's type.
    fn row_key_columns() -> &'static [&'static str] {
        &[]
    }
}

/// Key types whose text PostgreSQL's `::text` renders exactly as their `Debug` does (the text
/// [`RowKey`] holds), given the column types Diesel maps them to; a row-level trigger's payload
/// names such rows by the same key as memclone's writes.
#[doc(hidden)]
pub trait DatabaseKeyText {}

impl DatabaseKeyText for i16 {}
impl DatabaseKeyText for i32 {}
impl DatabaseKeyText for i64 {}
impl DatabaseKeyText for bool {}
impl DatabaseKeyText for String {}
impl DatabaseKeyText for uuid::Uuid {}
impl<A: DatabaseKeyText, B: DatabaseKeyText> DatabaseKeyText for (A, B) {}
impl<A: DatabaseKeyText, B: DatabaseKeyText, C: DatabaseKeyText> DatabaseKeyText for (A, B, C) {}
impl<A: DatabaseKeyText, B: DatabaseKeyText, C: DatabaseKeyText, D: DatabaseKeyText> DatabaseKeyText
    for (A, B, C, D)
{
}

/// Whether a concrete key type `T` is a [`DatabaseKeyText`], for the derive's generated code:
/// `(&&KeyTextProbe::<T>::new()).database_text()` picks [`KnownKeyText`] when `T` implements
/// it and [`UnknownKeyText`] otherwise (method resolution tries `&&Probe` before `&Probe`).
#[doc(hidden)]
pub struct KeyTextProbe<T>(std::marker::PhantomData<T>);

impl<T> KeyTextProbe<T> {
    #[doc(hidden)]
    pub fn new() -> Self {
        KeyTextProbe(std::marker::PhantomData)
    }
}

#[doc(hidden)]
pub trait KnownKeyText {
    fn database_text(&self) -> bool {
        true
    }
}

impl<T: DatabaseKeyText> KnownKeyText for &KeyTextProbe<T> {}

#[doc(hidden)]
pub trait UnknownKeyText {
    fn database_text(&self) -> bool {
        false
    }
}

impl<T> UnknownKeyText for KeyTextProbe<T> {}

macro_rules! scalar_values {
    ($($ty:ty),* $(,)?) => {$(
        impl CacheValue for $ty {
            fn fingerprint() -> u64 {
                crate::key::hash64(stringify!($ty))
            }
        }
    )*};
}

scalar_values!(
    bool,
    i8,
    i16,
    i32,
    i64,
    i128,
    u8,
    u16,
    u32,
    u64,
    u128,
    f32,
    f64,
    char,
    String,
    ()
);

/// Combines a container's name with its parts' fingerprints, in order: unlike XOR, it neither
/// cancels (`Vec<Vec<T>>` is not `T`) nor commutes (`Vec<Option<T>>` is not `Option<Vec<T>>`).
fn combine(container: &str, parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(crate::key::hash64(container), |hash, part| {
            xxhash_rust::xxh3::xxh3_64_with_seed(&part.to_le_bytes(), hash)
        })
}

impl<T: CacheValue> CacheValue for Vec<T> {
    fn fingerprint() -> u64 {
        combine("Vec", &[T::fingerprint()])
    }
    fn tables(out: &mut Vec<&'static str>) {
        T::tables(out)
    }
    fn rows(&self, out: &mut Vec<RowKey>) {
        self.iter().for_each(|v| v.rows(out))
    }
}

impl<T: CacheValue> CacheValue for Option<T> {
    fn fingerprint() -> u64 {
        combine("Option", &[T::fingerprint()])
    }
    fn tables(out: &mut Vec<&'static str>) {
        T::tables(out)
    }
    fn rows(&self, out: &mut Vec<RowKey>) {
        if let Some(v) = self {
            v.rows(out)
        }
    }
}

macro_rules! tuple_values {
    ($($name:ident)+) => {
        impl<$($name: CacheValue),+> CacheValue for ($($name,)+) {
            fn fingerprint() -> u64 {
                combine("tuple", &[$($name::fingerprint()),+])
            }
            fn tables(out: &mut Vec<&'static str>) {
                $( $name::tables(out); )+
            }
            #[allow(non_snake_case)]
            fn rows(&self, out: &mut Vec<RowKey>) {
                let ($($name,)+) = self;
                $( $name.rows(out); )+
            }
        }
    };
}

tuple_values!(A);
tuple_values!(A B);
tuple_values!(A B C);
tuple_values!(A B C D);
tuple_values!(A B C D E);
tuple_values!(A B C D E F);
tuple_values!(A B C D E F G);
tuple_values!(A B C D E F G H);

/// How `#[derive(CacheValue)]` asks a field for its tables and rows: through
/// [`CacheValue`] when the field's type implements it (a model, a `Vec` or `Option` of models,
/// another derived value), and not at all otherwise (a `chrono::NaiveDateTime`, a `Uuid`, a
/// `serde_json::Value`, an enum: any `Serialize + DeserializeOwned` type). The derive sees
/// concrete field types, so method resolution picks the first impl whose bound holds
/// (autoref specialization) without the derive naming a bound. Not public API.
#[doc(hidden)]
pub mod field {
    use super::{CacheValue, RowKey};
    use std::marker::PhantomData;

    /// Stands for a field of type `T`.
    pub struct Probe<T>(PhantomData<fn() -> T>);

    impl<T> Probe<T> {
        /// The probe.
        pub const NEW: Self = Probe(PhantomData);
    }

    /// Fields whose type is a [`CacheValue`]: chosen first.
    pub trait ValueField<T> {
        /// The tables of the field's type.
        fn field_tables(&self, out: &mut Vec<&'static str>);
        /// The rows the field holds.
        fn field_rows(&self, value: &T, out: &mut Vec<RowKey>);
    }

    impl<T: CacheValue> ValueField<T> for Probe<T> {
        fn field_tables(&self, out: &mut Vec<&'static str>) {
            T::tables(out)
        }
        fn field_rows(&self, value: &T, out: &mut Vec<RowKey>) {
            value.rows(out)
        }
    }

    /// Every other field: no tables, no rows.
    pub trait PlainField<T> {
        /// Nothing.
        fn field_tables(&self, _out: &mut Vec<&'static str>) {}
        /// Nothing.
        fn field_rows(&self, _value: &T, _out: &mut Vec<RowKey>) {}
    }

    impl<T> PlainField<T> for &Probe<T> {}
}
