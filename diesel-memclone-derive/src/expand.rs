//! The expansions, on `proc_macro2` tokens so that they can be unit-tested.

use proc_macro2::{Span, TokenStream};
use quote::{quote, ToTokens};
use syn::punctuated::Punctuated;
use syn::{Data, DeriveInput, Expr, Fields, Ident, Lit, Meta, Token};

const MEMCLONE: &str = "memclone";
const TTL: &str = "ttl";
const NAME: &str = "name";
const TABLE: &str = "table";
const SCOPE: &str = "scope";
const VALID_OPTIONS: &str = "`ttl = <seconds>`, `name = \"...\"`, `scope(field, ..)`";

/// Collects every error instead of stopping at the first.
#[derive(Default)]
struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[derive(Default)]
struct Options {
    ttl: Option<u64>,
    name: Option<String>,
    /// The fields named in `scope(..)`.
    scopes: Vec<Ident>,
}

fn memclone_options(input: &DeriveInput, errors: &mut Errors, allowed: &[&str]) -> Options {
    let mut options = Options::default();
    for attr in input.attrs.iter().filter(|a| a.path().is_ident(MEMCLONE)) {
        let parsed = attr.parse_nested_meta(|meta| {
            let key = meta
                .path
                .get_ident()
                .map(Ident::to_string)
                .unwrap_or_default();
            if key == TABLE && allowed.contains(&NAME) {
                let _: Lit = meta.value()?.parse()?;
                errors.push(meta.error(
                    "`table` is no longer needed: memclone takes the table's SQL name from \
                     Diesel's `table!` (its `#[sql_name]`, if any); remove this option",
                ));
                return Ok(());
            }
            if key == SCOPE && allowed.contains(&SCOPE) {
                return meta.parse_nested_meta(|field| {
                    match field.path.get_ident() {
                        Some(ident) if !options.scopes.contains(ident) => {
                            options.scopes.push(ident.clone())
                        }
                        Some(_) => errors.push(field.error("this field is already a scope")),
                        None => errors.push(field.error("`scope(..)` lists field names")),
                    }
                    Ok(())
                });
            }
            if !allowed.contains(&key.as_str()) {
                return Err(meta.error(format!(
                    "unknown memclone option `{}`; expected one of {}",
                    meta.path.to_token_stream(),
                    allowed_list(allowed)
                )));
            }
            let value: Lit = meta.value()?.parse()?;
            match (key.as_str(), &value) {
                (TTL, Lit::Int(int)) => match int.base10_parse::<u64>() {
                    Ok(0) | Err(_) => errors.push(syn::Error::new_spanned(
                        int,
                        "`ttl` is a whole number of seconds greater than 0",
                    )),
                    Ok(seconds) => options.ttl = Some(seconds),
                },
                (TTL, other) => errors.push(syn::Error::new_spanned(
                    other,
                    "`ttl` is a whole number of seconds, like `ttl = 60`",
                )),
                (NAME, Lit::Str(text)) if !text.value().trim().is_empty() => {
                    options.name = Some(text.value());
                }
                (_, other) => errors.push(syn::Error::new_spanned(
                    other,
                    format!("`{key}` is a non-empty string, like `{key} = \"users\"`"),
                )),
            }
            Ok(())
        });
        if let Err(error) = parsed {
            errors.push(error);
        }
    }
    options
}

fn allowed_list(allowed: &[&str]) -> String {
    if allowed.len() == 3 {
        return VALID_OPTIONS.to_owned();
    }
    allowed
        .iter()
        .map(|a| format!("`{a}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `#[diesel(...)]` says about the table and the primary key.
struct DieselOptions {
    table: Option<syn::Path>,
    primary_key: Option<Vec<Ident>>,
}

fn diesel_options(input: &DeriveInput, errors: &mut Errors) -> DieselOptions {
    let mut options = DieselOptions {
        table: None,
        primary_key: None,
    };
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("diesel")) {
        let metas = match attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated) {
            Ok(metas) => metas,
            // Diesel's own derive reports malformed diesel attributes.
            Err(_) => continue,
        };
        for meta in metas {
            match meta {
                Meta::NameValue(nv) if nv.path.is_ident("table_name") => match nv.value {
                    Expr::Path(path) => options.table = Some(path.path),
                    other => errors.push(syn::Error::new_spanned(other, "expected a table path")),
                },
                Meta::List(list) if list.path.is_ident("primary_key") => {
                    match list.parse_args_with(Punctuated::<Ident, Token![,]>::parse_terminated) {
                        Ok(keys) if !keys.is_empty() => {
                            options.primary_key = Some(keys.into_iter().collect())
                        }
                        Ok(_) => {
                            errors.push(syn::Error::new_spanned(list, "primary_key needs a field"))
                        }
                        Err(error) => errors.push(error),
                    }
                }
                _ => {}
            }
        }
    }
    options
}

struct Field {
    ident: Ident,
    ty: syn::Type,
    /// The SQL column: `#[diesel(column_name = ..)]`, or the field's name.
    column: String,
}

/// A field's `#[diesel(column_name = ..)]`, if it has one.
fn column_name(field: &syn::Field) -> Option<String> {
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("diesel")) {
        let Ok(metas) = attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
        else {
            continue;
        };
        for meta in metas {
            if let Meta::NameValue(nv) = meta {
                if nv.path.is_ident("column_name") {
                    match nv.value {
                        Expr::Path(path) => return path.path.get_ident().map(|i| i.to_string()),
                        Expr::Lit(syn::ExprLit {
                            lit: Lit::Str(text),
                            ..
                        }) => return Some(text.value()),
                        _ => {}
                    }
                }
            }
        }
    }
    None
}

fn named_fields(input: &DeriveInput, derive: &str) -> syn::Result<Vec<Field>> {
    if !input.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &input.generics,
            format!("{derive} cannot be derived for a generic struct"),
        ));
    }
    match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(fields) => Ok(fields
                .named
                .iter()
                .map(|f| {
                    let ident = f.ident.clone().expect("named");
                    let column = column_name(f).unwrap_or_else(|| ident.to_string());
                    Field {
                        ident,
                        ty: f.ty.clone(),
                        column,
                    }
                })
                .collect()),
            other => Err(syn::Error::new_spanned(
                other,
                format!("{derive} needs a struct with named fields"),
            )),
        },
        Data::Enum(data) => Err(syn::Error::new_spanned(
            data.enum_token,
            format!("{derive} can only be derived for structs, not enums"),
        )),
        Data::Union(data) => Err(syn::Error::new_spanned(
            data.union_token,
            format!("{derive} can only be derived for structs, not unions"),
        )),
    }
}

/// The shape string: the fingerprint's input. Whitespace-free so that formatting changes do
/// not change it.
fn shape(prefix: &str, name: &Ident, fields: &[Field]) -> String {
    let mut shape = format!("{prefix}|{name}{{");
    for field in fields {
        let ty = field.ty.to_token_stream().to_string().replace(' ', "");
        shape.push_str(&format!("{}:{ty},", field.ident));
    }
    shape.push('}');
    shape
}

/// The `table!` column a field reads, as an identifier (`r#type` for a keyword).
fn column_ident(column: &str, span: Span) -> Ident {
    match column.strip_prefix("r#") {
        Some(raw) => Ident::new_raw(raw, span),
        None => syn::parse_str::<Ident>(column)
            .map(|i| Ident::new(&i.to_string(), span))
            .unwrap_or_else(|_| Ident::new_raw(column, span)),
    }
}

/// Diesel's default table name: the struct name in snake case, plus `s`.
fn default_table(name: &Ident) -> String {
    let mut out = String::new();
    for (i, c) in name.to_string().chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out.push('s');
    out
}

/// Expands `#[derive(MemClone)]`.
pub(crate) fn memclone(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let fields = named_fields(&input, "MemClone")?;
    let options = memclone_options(&input, &mut errors, &[TTL, NAME, SCOPE]);
    let diesel = diesel_options(&input, &mut errors);
    let ident = &input.ident;

    let table_path = diesel
        .table
        .clone()
        .unwrap_or_else(|| Ident::new(&default_table(ident), Span::call_site()).into());
    // Only the fingerprint's input: the table's name for the cache comes from Diesel at run time.
    let table_rust = table_path
        .segments
        .last()
        .map(|s| s.ident.to_string())
        .unwrap_or_default();

    let key_idents = diesel
        .primary_key
        .clone()
        .unwrap_or_else(|| vec![Ident::new("id", ident.span())]);
    let mut key_types = Vec::new();
    for key in &key_idents {
        match fields.iter().find(|f| f.ident == *key) {
            Some(field) => key_types.push(field.ty.clone()),
            None if diesel.primary_key.is_some() => errors.push(syn::Error::new_spanned(
                key,
                format!("`{key}` is not a field of `{ident}`"),
            )),
            None => errors.push(syn::Error::new_spanned(
                ident,
                format!(
                    "`{ident}` has no field `id`; name its primary key with \
                     `#[diesel(primary_key(field, ...))]`"
                ),
            )),
        }
    }
    // Scope columns: each a field, its column taken from Diesel's `table!` (a
    // `#[diesel(column_name)]` rename maps to its column).
    let mut scope_fields = Vec::new();
    for scope in &options.scopes {
        match fields.iter().find(|f| f.ident == *scope) {
            Some(field) => scope_fields.push(field),
            None => errors.push(syn::Error::new_spanned(
                scope,
                format!("`{scope}` is not a field of `{ident}`"),
            )),
        }
    }
    errors.finish()?;

    let scope_columns: Vec<TokenStream> = scope_fields
        .iter()
        .map(|f| {
            let column = column_ident(&f.column, f.ident.span());
            quote!(#table_path::#column)
        })
        .collect();
    let scope_types: Vec<&syn::Type> = scope_fields.iter().map(|f| &f.ty).collect();
    let scope_idents: Vec<&Ident> = scope_fields.iter().map(|f| &f.ident).collect();
    let scope_impls = (!scope_fields.is_empty()).then(|| {
        quote! {
            // One model per table declares scopes: a second one does not compile.
            impl ::diesel_memclone::__private::ScopedTable for #table_path::table {}
            #(
                impl ::diesel_memclone::ScopeColumn for #scope_columns {
                    type Value = #scope_types;
                    fn model_table() -> &'static str {
                        <#ident as ::diesel_memclone::MemClone>::table()
                    }
                }
            )*
        }
    });

    let name = options.name.unwrap_or_else(|| ident.to_string());
    // The key columns' SQL names, from Diesel's `Column::NAME` (a `#[sql_name]` in `table!`).
    let key_columns: Vec<TokenStream> = key_idents
        .iter()
        .filter_map(|k| fields.iter().find(|f| f.ident == *k))
        .map(|f| {
            let column = column_ident(&f.column, f.ident.span());
            quote!(<#table_path::#column as ::diesel_memclone::__private::diesel::Column>::NAME)
        })
        .collect();
    let shape = shape(&table_rust, ident, &fields);
    let ttl = match options.ttl {
        Some(seconds) => quote!(::core::option::Option::Some(#seconds)),
        None => quote!(::core::option::Option::None),
    };
    let (pk_type, pk_value) = if key_idents.len() == 1 {
        let ty = &key_types[0];
        let field = &key_idents[0];
        (
            quote!(#ty),
            quote!(::core::clone::Clone::clone(&self.#field)),
        )
    } else {
        (
            quote!((#(#key_types,)*)),
            quote!((#(::core::clone::Clone::clone(&self.#key_idents),)*)),
        )
    };
    Ok(quote! {
        const _: () = {
            impl ::diesel_memclone::CacheValue for #ident {
                fn fingerprint() -> u64 {
                    // The schema-qualified table is part of it: two schemas' tables of one name
                    // share generations (safe) but must not share rows.
                    static FINGERPRINT: ::std::sync::OnceLock<u64> = ::std::sync::OnceLock::new();
                    *FINGERPRINT.get_or_init(|| {
                        ::diesel_memclone::__private::hash64(&::std::format!(
                            "{}|{}",
                            <Self as ::diesel_memclone::MemClone>::SHAPE,
                            ::diesel_memclone::__private::qualified_table_name(&#table_path::table),
                        ))
                    })
                }
                fn tables(out: &mut ::std::vec::Vec<&'static str>) {
                    out.push(<Self as ::diesel_memclone::MemClone>::table());
                }
                fn rows(&self, out: &mut ::std::vec::Vec<::diesel_memclone::RowKey>) {
                    out.push(::diesel_memclone::MemClone::row_key(self));
                }
                fn key_columns() -> &'static [&'static str] {
                    const KEY_COLUMNS: &[&str] = &[#(#key_columns),*];
                    KEY_COLUMNS
                }
                fn entity_ttl() -> ::core::option::Option<::core::time::Duration> {
                    <Self as ::diesel_memclone::MemClone>::TTL_SECONDS
                        .map(::core::time::Duration::from_secs)
                }
                fn scope_columns() -> &'static [&'static str] {
                    const SCOPE_COLUMNS: &[&str] = &[#(
                        <#scope_columns as ::diesel_memclone::__private::diesel::Column>::NAME
                    ),*];
                    SCOPE_COLUMNS
                }
                fn scope_values(
                    &self,
                    out: &mut ::std::vec::Vec<(&'static str, ::std::string::String)>,
                ) {
                    #(
                        out.push((
                            <#scope_columns as ::diesel_memclone::__private::diesel::Column>::NAME,
                            ::diesel_memclone::ScopeValue::scope_text(&self.#scope_idents),
                        ));
                    )*
                }
            }

            #scope_impls

            impl ::diesel_memclone::MemClone for #ident {
                const NAME: &'static str = #name;
                fn table() -> &'static str {
                    static TABLE: ::std::sync::OnceLock<&'static str> = ::std::sync::OnceLock::new();
                    TABLE.get_or_init(|| ::diesel_memclone::table_name(&#table_path::table))
                }
                fn table_sql() -> &'static str {
                    static TABLE_SQL: ::std::sync::OnceLock<::std::string::String> =
                        ::std::sync::OnceLock::new();
                    TABLE_SQL
                        .get_or_init(|| ::diesel_memclone::__private::table_sql(&#table_path::table))
                        .as_str()
                }
                const SHAPE: &'static str = #shape;
                const TTL_SECONDS: ::core::option::Option<u64> = #ttl;
                type PrimaryKey = #pk_type;
                type FindQuery = ::diesel_memclone::__private::diesel::dsl::Find<
                    #table_path::table,
                    #pk_type,
                >;
                fn primary_key(&self) -> Self::PrimaryKey {
                    #pk_value
                }
                fn find_query(primary_key: Self::PrimaryKey) -> Self::FindQuery {
                    ::diesel_memclone::__private::diesel::QueryDsl::find(#table_path::table, primary_key)
                }
                fn row_key_columns() -> &'static [&'static str] {
                    // Only keys whose database text is their `Debug` text (see the trait).
                    #[allow(unused_imports)]
                    use ::diesel_memclone::__private::{KnownKeyText as _, UnknownKeyText as _};
                    let probe = ::diesel_memclone::__private::KeyTextProbe::<#pk_type>::new();
                    if (&&probe).database_text() {
                        <Self as ::diesel_memclone::CacheValue>::key_columns()
                    } else {
                        &[]
                    }
                }
            }

            impl #ident {
                /// The row with this primary key, from the cache or else the database
                /// (generated by `#[derive(MemClone)]`).
                pub async fn find_cached<'q, C>(
                    conn: &mut C,
                    primary_key: #pk_type,
                ) -> ::diesel_memclone::Result<Self>
                where
                    C: ::diesel_memclone::diesel_async::AsyncConnection,
                    <Self as ::diesel_memclone::MemClone>::FindQuery:
                        ::diesel_memclone::diesel_async::methods::LoadQuery<'q, C, Self> + 'q,
                {
                    ::diesel_memclone::find::<Self, C>(conn, primary_key).await
                }

                /// The row with this primary key, from the cache or else the database, on a
                /// synchronous Diesel connection (generated by `#[derive(MemClone)]`; see
                /// `diesel_memclone::sync`).
                pub fn find_cached_blocking<'q, C>(
                    conn: &mut C,
                    primary_key: #pk_type,
                ) -> ::diesel_memclone::Result<Self>
                where
                    C: ::diesel_memclone::__private::diesel::Connection,
                    <Self as ::diesel_memclone::MemClone>::FindQuery:
                        ::diesel_memclone::__private::diesel::query_dsl::LoadQuery<'q, C, Self> + 'q,
                {
                    ::diesel_memclone::sync::find::<Self, C>(conn, primary_key)
                }
            }
        };
    })
}

/// Expands `#[derive(CacheValue)]`.
pub(crate) fn cache_value(input: DeriveInput) -> syn::Result<TokenStream> {
    let mut errors = Errors::default();
    let fields = named_fields(&input, "CacheValue")?;
    let _ = memclone_options(&input, &mut errors, &[]);
    errors.finish()?;
    let ident = &input.ident;
    let shape = shape("value", ident, &fields);
    // A field's tables and rows come from its type when that is a `CacheValue` (a model, a
    // `Vec` of models) and are empty otherwise, so that any serde field type derives (a
    // `NaiveDateTime`, a `serde_json::Value`, an enum); see `diesel_memclone::__private::field`.
    let types: Vec<&syn::Type> = fields.iter().map(|f| &f.ty).collect();
    let names = fields.iter().map(|f| &f.ident);
    Ok(quote! {
        const _: () = {
            #[allow(unused_imports)]
            use ::diesel_memclone::__private::field::{PlainField as _, ValueField as _};

            impl ::diesel_memclone::CacheValue for #ident {
                fn fingerprint() -> u64 {
                    ::diesel_memclone::__private::hash64(#shape)
                }
                fn tables(out: &mut ::std::vec::Vec<&'static str>) {
                    #( (&::diesel_memclone::__private::field::Probe::<#types>::NEW)
                        .field_tables(out); )*
                }
                fn rows(&self, out: &mut ::std::vec::Vec<::diesel_memclone::RowKey>) {
                    #( (&::diesel_memclone::__private::field::Probe::<#types>::NEW)
                        .field_rows(&self.#names, out); )*
                }
            }
        };
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(tokens: TokenStream) -> syn::Result<String> {
        memclone(syn::parse2(tokens).unwrap()).map(|t| t.to_string())
    }

    #[test]
    fn reads_diesel_table_and_key() {
        let out = expand(quote! {
            #[diesel(table_name = crate::schema::posts, primary_key(user_id, slug))]
            struct Post { user_id: i32, slug: String, body: String }
        })
        .unwrap();
        assert!(
            out.contains("table_name (& crate :: schema :: posts :: table)"),
            "{out}"
        );
        assert!(out.contains("type PrimaryKey = (i32 , String ,)"), "{out}");
    }

    #[test]
    fn defaults_follow_diesel() {
        let out = expand(quote! { struct BlogPost { id: i64 } }).unwrap();
        assert!(out.contains("blog_posts :: table"), "{out}");
        assert!(out.contains("type PrimaryKey = i64"), "{out}");
    }

    #[test]
    fn key_columns_use_the_sql_column_names() {
        let out = expand(quote! {
            struct Account { #[diesel(column_name = account_id)] id: i32, name: String }
        })
        .unwrap();
        assert!(
            out.contains("< accounts :: account_id as :: diesel_memclone :: __private :: diesel :: Column > :: NAME"),
            "{out}"
        );
    }

    #[test]
    fn collects_every_error() {
        let error = expand(quote! {
            #[memclone(ttl = 0, colour = "red")]
            #[diesel(primary_key(missing))]
            struct User { id: i32 }
        })
        .unwrap_err();
        let messages: Vec<String> = error.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
    }

    #[test]
    fn fingerprint_changes_with_fields() {
        let a = shape("t", &Ident::new("A", Span::call_site()), &[]);
        let fields = vec![Field {
            ident: Ident::new("x", Span::call_site()),
            ty: syn::parse_quote!(Option<i32>),
            column: "x".into(),
        }];
        let b = shape("t", &Ident::new("A", Span::call_site()), &fields);
        assert_ne!(a, b);
        assert_eq!(b, "t|A{x:Option<i32>,}");
    }
}
