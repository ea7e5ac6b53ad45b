//! Key layout, stable hashing, and the tables a statement reads or writes.
//!
//! Every key starts with the namespace and carries a Redis Cluster hash tag (`{...}`) so that
//! what belongs together shares a slot:
//!
//! | key | what |
//! |---|---|
//! | `ns:{t:users}:qgen` | generation of every cached query that reads `users` |
//! | `ns:{t:users}:wseq` | count of invalidated writes to `users` (orders write-through) |
//! | `ns:{t:users}:egen` | generation of every entity entry of `users` (bumped by writes whose rows are unknown) |
//! | `ns:{t:users}:r:1` | generation of the row `users` / `1` (in the table's slot) |
//! | `ns:{t:posts}:sgen` | generation of `.within(..)` queries of `posts`, moved by writes whose scope values are unknown |
//! | `ns:{t:posts}:v:user_id:1` | generation of `.within(posts::user_id, 1)` queries (in the table's slot) |
//! | `ns:{r:users:1}:e:<fingerprint>` | the entity entry of that row |
//! | `ns:{q:<hash>}:<label>` | a cached query result |
//! | `ns:{k:<key>}` | a cached query result under a custom key (`.key("...")`) |

use std::fmt::Write as _;

/// A statement's part of a query's identity on a backend whose bind collector memclone does not
/// read (see [`crate::identity`]; the others' identities are `identity::collected_digest`), and
/// of a `load_with` key: the `Debug` rendering of `debug_query`, either whole ([`Rendered`]) or
/// rebuilt from its query shape's escaped SQL and this read's binds (see [`binds_of`]). Both
/// hash to the same bytes: `Query { sql: "<escaped>", binds: <binds> }`.
pub(crate) enum Identity<'a> {
    /// The whole text (a `Debug` rendering, or a `load_with` key).
    Text(&'a str),
    /// The SQL as `Debug` escapes it, and the binds as `Debug` lists them.
    Shaped {
        escaped_sql: &'a str,
        binds: &'a str,
    },
}

const DEBUG_MIDDLE: &str = "\", binds: ";
const DEBUG_SUFFIX: &str = " }";

impl Identity<'_> {
    fn len(&self) -> usize {
        match self {
            Identity::Text(text) => text.len(),
            Identity::Shaped { escaped_sql, binds } => {
                DEBUG_PREFIX.len()
                    + escaped_sql.len()
                    + DEBUG_MIDDLE.len()
                    + binds.len()
                    + DEBUG_SUFFIX.len()
            }
        }
    }

    /// The text itself (what a [`Rendered`] holds).
    pub(crate) fn text(&self) -> String {
        let mut bytes = Vec::with_capacity(8 + self.len());
        self.append(&mut bytes);
        String::from_utf8(bytes.split_off(8)).unwrap_or_default()
    }

    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        match self {
            Identity::Text(text) => out.extend_from_slice(text.as_bytes()),
            Identity::Shaped { escaped_sql, binds } => {
                for part in [DEBUG_PREFIX, escaped_sql, DEBUG_MIDDLE, binds, DEBUG_SUFFIX] {
                    out.extend_from_slice(part.as_bytes());
                }
            }
        }
    }
}

/// The identity of a cached query: a stable 128-bit hash (xxh3) of length-prefixed parts:
/// `kind`, the result type's `fingerprint` (little-endian) and each statement's identity text.
///
/// xxh3 is specified and stable across processes, platforms and releases, unlike
/// `std::hash::DefaultHasher`; that is what lets several processes share entries.
pub(crate) fn identity_digest(kind: &str, fingerprint: u64, statements: &[Identity<'_>]) -> u128 {
    let fingerprint = fingerprint.to_le_bytes();
    let len =
        16 + kind.len() + fingerprint.len() + statements.iter().map(|s| 8 + s.len()).sum::<usize>();
    let mut bytes = Vec::with_capacity(len);
    for part in [kind.as_bytes(), &fingerprint] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    for statement in statements {
        statement.append(&mut bytes);
    }
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

/// Appends `value` as 32 lower-case hex digits (as `{:032x}` writes it).
fn push_hex128(out: &mut String, value: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(value.to_be_bytes()) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
    out.push_str(std::str::from_utf8(&hex).unwrap_or_default());
}

/// A 64-bit stable hash of a string (fingerprints).
pub fn hash64(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// Makes text safe inside a key: no hash-tag braces, no whitespace, `%` escaped.
pub(crate) fn escape(text: &str, out: &mut String) {
    // Labels and table names are usually plain: copied whole.
    let plain = |b: &u8| b.is_ascii_graphic() && !matches!(b, b'{' | b'}' | b'%' | b':');
    if text.as_bytes().iter().all(plain) {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '{' | '}' | '%' | ':' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c if c.is_ascii_whitespace() || c.is_ascii_control() => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            // Other whitespace and control characters: the whole code point, in a form that
            // cannot be mistaken for the two-digit one.
            c if c.is_whitespace() || c.is_control() => {
                let _ = write!(out, "%u{:X};", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// What every generation key (and write sequence) of the namespace starts with: the keys a
/// near tier follows.
pub(crate) fn generation_prefix(ns: &str) -> String {
    format!("{ns}:{{t:")
}

/// What every custom entry key of the namespace starts with.
pub(crate) fn custom_prefix(ns: &str) -> String {
    format!("{ns}:{{k:")
}

pub(crate) fn query_generation(ns: &str, table: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:qgen");
    key
}

/// The generation of a scoped table's writes whose scope values are unknown: scoped queries of
/// the table carry it instead of the table's query generation.
pub(crate) fn scope_generation(ns: &str, table: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:sgen");
    key
}

/// The generation of the rows of `table` whose scope column `column` holds `value` (as
/// [`ScopeValue`](crate::ScopeValue) renders it): in the table's slot, like a row's.
pub(crate) fn value_generation(ns: &str, table: &str, column: &str, value: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:v:");
    escape(column, &mut key);
    key.push(':');
    escape(value, &mut key);
    key
}

pub(crate) fn write_sequence(ns: &str, table: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:wseq");
    key
}

pub(crate) fn entity_generation(ns: &str, table: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:egen");
    key
}

fn row_prefix(ns: &str, table: &str, pk: &str) -> String {
    let mut key = format!("{ns}:{{r:");
    escape(table, &mut key);
    key.push(':');
    escape(pk, &mut key);
    key.push('}');
    key
}

/// A row's generation lives in its *table's* slot, not the row's: a write sets it in the same
/// script as the table's generations and write sequence, which is what makes write-through
/// safe (see `Store::bump_table`).
pub(crate) fn row_generation(ns: &str, table: &str, pk: &str) -> String {
    let mut key = format!("{ns}:{{t:");
    escape(table, &mut key);
    key.push_str("}:r:");
    escape(pk, &mut key);
    key
}

pub(crate) fn entity_entry(ns: &str, table: &str, pk: &str, fingerprint: u64) -> String {
    let mut key = row_prefix(ns, table, pk);
    let _ = write!(key, ":e:{fingerprint:016x}");
    key
}

pub(crate) fn custom_entry(ns: &str, custom: &str) -> String {
    let mut key = format!("{ns}:{{k:");
    escape(custom, &mut key);
    key.push('}');
    key
}

/// A query's entry: its identity (see [`identity_digest`]) as 32 hex digits, and its label.
pub(crate) fn query_entry(ns: &str, digest: u128, label: &str) -> String {
    let mut key = String::with_capacity(ns.len() + 38 + label.len());
    key.push_str(ns);
    key.push_str(":{q:");
    push_hex128(&mut key, digest);
    key.push_str("}:");
    escape(label, &mut key);
    key
}

/// A statement as Diesel renders it for debugging: `Query { sql: "..", binds: [..] }`.
///
/// Diesel has no public way to walk a query's AST with a pass of our own, so the SQL and the binds
/// come from `debug_query`'s `Debug` form, where the SQL is a Rust string literal: its end is
/// unambiguous whatever the SQL contains (a raw query can contain ` -- binds: `; a string literal's
/// closing quote cannot be forged, since quotes inside it are escaped). The whole rendering is
/// the statement's identity; the SQL alone says which tables it names.
pub(crate) struct Rendered(pub(crate) String);

const DEBUG_PREFIX: &str = "Query { sql: \"";

impl Rendered {
    /// Renders `query` for backend `DB`; `None` when Diesel cannot build its SQL (an empty
    /// changeset, say): running it would fail the same way, and Diesel says why.
    pub(crate) fn of<DB, Q>(query: &Q) -> Option<Self>
    where
        DB: diesel::backend::Backend + Default,
        DB::QueryBuilder: Default,
        Q: diesel::query_builder::QueryFragment<DB>,
    {
        let mut text = String::new();
        write!(text, "{:?}", diesel::debug_query::<DB, _>(query)).ok()?;
        Some(Rendered(text))
    }

    /// The SQL as it appears escaped inside the rendering (cheap: no copy).
    ///
    /// If Diesel ever renders differently, the whole text stands for the SQL: scanning binds as
    /// SQL can only add tables (one more generation read), never hide one.
    pub(crate) fn escaped_sql(&self) -> &str {
        let text = self.0.as_str();
        let Some(rest) = text.strip_prefix(DEBUG_PREFIX) else {
            return text;
        };
        let bytes = rest.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => return &rest[..i],
                _ => i += 1,
            }
        }
        text
    }

    /// The SQL text itself (unescaped).
    pub(crate) fn sql(&self) -> String {
        unescape_debug(self.escaped_sql())
    }
}

/// The binds of `query` as its [`Rendered`] form lists them, when its SQL is exactly `sql`;
/// `None` when it is not (or Diesel cannot build it).
///
/// Cheaper than a [`Rendered`]: the SQL is compared, not escaped, copied and scanned. It comes
/// from `debug_query`'s `Display` form, `<sql> -- binds: <binds>`, written to a writer that sees
/// the SQL arrive whole in its first write (a string argument is written in one piece) and
/// refuses anything but `sql` there, then the literal ` -- binds: ` alone in the second. The
/// binds are formatted as in the `Debug` form (the same list, with the same options).
pub(crate) fn binds_of<DB>(
    query: &dyn diesel::query_builder::QueryFragment<DB>,
    sql: &str,
) -> Option<String>
where
    DB: diesel::backend::Backend + Default,
    DB::QueryBuilder: Default,
{
    struct Binds<'s> {
        sql: &'s str,
        seen: u8,
        binds: String,
    }
    impl std::fmt::Write for Binds<'_> {
        fn write_str(&mut self, piece: &str) -> std::fmt::Result {
            match self.seen {
                0 if piece == self.sql => self.seen = 1,
                1 if piece == " -- binds: " => self.seen = 2,
                2 => self.binds.push_str(piece),
                // Another statement (or another formatting): the caller renders it in full.
                _ => return Err(std::fmt::Error),
            }
            Ok(())
        }
    }
    let mut out = Binds {
        sql,
        seen: 0,
        binds: String::with_capacity(32),
    };
    write!(out, "{}", diesel::debug_query::<DB, _>(&query)).ok()?;
    let listed = out.binds.starts_with('[') && out.binds.ends_with(']');
    (out.seen == 2 && listed).then_some(out.binds)
}

/// Undoes the escapes of `str`'s `Debug` (`\"`, `\\`, `\n`, `\u{..}`, ...).
pub(crate) fn unescape_debug(escaped: &str) -> String {
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some('0') => out.push('\0'),
            Some('u') => {
                let code: String = chars
                    .by_ref()
                    .skip_while(|c| *c == '{')
                    .take_while(|c| *c != '}')
                    .collect();
                match u32::from_str_radix(&code, 16).ok().and_then(char::from_u32) {
                    Some(decoded) => out.push(decoded),
                    None => out.push(char::REPLACEMENT_CHARACTER),
                }
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// A table's name for the cache: the last identifier of its `FROM` clause as Diesel renders it
/// (so `#[sql_name = "people"] persons` is `people`, and `app.people` is `people`), lower-cased.
///
/// Every part of memclone names tables this way (the derive, the write helpers, the tables a
/// cached query reads), so they cannot disagree. The schema is left out on purpose: a statement
/// that relies on the search path names no schema, and two schemas' tables of one name sharing
/// generations only costs extra invalidations, never a stale read.
pub fn table_name<T>(table: &T) -> &'static str
where
    T: diesel::QuerySource + 'static,
    T::FromClause: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    use std::any::TypeId;
    use std::collections::HashMap;
    use std::sync::{OnceLock, RwLock};
    static NAMES: OnceLock<RwLock<HashMap<TypeId, &'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let id = TypeId::of::<T>();
    if let Some(name) = names.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return name;
    }
    let rendered = Rendered::of::<diesel::pg::Pg, _>(&table.from_clause())
        .map(|r| r.sql())
        .unwrap_or_default();
    let name = last_identifier(&rendered).to_lowercase();
    let mut names = names.write().unwrap_or_else(|e| e.into_inner());
    // Leaked once per table type: a program has a fixed, small set of tables.
    names
        .entry(id)
        .or_insert_with(|| Box::leak(name.into_boxed_str()))
}

/// A table named by a string (`depends_on`, `also_invalidates`, `invalidate_table`), named the way
/// [`table_name`] names it: `People`, `"People"`, `app.people` and `"app"."people"` are all
/// `people`.
pub(crate) fn table_from_text(name: &str) -> String {
    last_identifier(name).to_lowercase()
}

/// A table's full name, with its schema when `table!` gives one (`app.people`), lower-cased: what
/// tells apart two tables of one name in different schemas, whose rows must not share entries.
pub fn qualified_table_name<T>(table: &T) -> String
where
    T: diesel::QuerySource,
    T::FromClause: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    let rendered = Rendered::of::<diesel::pg::Pg, _>(&table.from_clause())
        .map(|r| r.sql())
        .unwrap_or_default();
    let parts: Vec<String> = tokenize(&rendered)
        .into_iter()
        .filter_map(|t| match t {
            Token::Ident(name) | Token::Word(name) => Some(name),
            _ => None,
        })
        .collect();
    parts.join(".")
}

/// A table as SQL names it, for `listen::tables`: with its schema when `table!` gives one and its
/// case kept (Diesel renders each identifier quoted: `"app"."Ledger"`). A part that is a plain
/// lower-case identifier is written bare (`app."Ledger"`, `users`): PostgreSQL folds it to the
/// same name, and it reads like what people write.
pub fn table_sql<T>(table: &T) -> String
where
    T: diesel::QuerySource,
    T::FromClause: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    let rendered = Rendered::of::<diesel::pg::Pg, _>(&table.from_clause())
        .map(|r| r.sql())
        .unwrap_or_default();
    let mut parts = Vec::new();
    let mut chars = rendered.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut name = String::new();
        while let Some(n) = chars.next() {
            if n == '"' {
                if chars.next_if_eq(&'"').is_some() {
                    name.push('"');
                    continue;
                }
                break;
            }
            name.push(n);
        }
        parts.push(name);
    }
    parts
        .iter()
        .map(|part| {
            let mut bytes = part.bytes();
            let plain = bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if plain {
                part.clone()
            } else {
                format!("\"{}\"", part.replace('"', "\"\""))
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The last of a chain of quoted identifiers: `"app"."people"` gives `people`.
fn last_identifier(from_clause: &str) -> String {
    match tokenize(from_clause)
        .into_iter()
        .rev()
        .find_map(|t| match t {
            Token::Ident(name) | Token::Word(name) => Some(name),
            _ => None,
        }) {
        Some(name) => name,
        None => from_clause.to_owned(),
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Word(String),
    Dot,
    Comma,
    Open,
    Close,
    Other,
}

fn tokenize(sql: &str) -> Vec<Token> {
    tokenize_with(sql, false, false)
}

/// Tokens of `sql`; with `backslash_escapes`, a backslash escapes the next character in a string
/// literal (MySQL's default), without it a backslash is an ordinary character (standard SQL).
/// With `comments`, `-- ..`, `# ..` (MySQL) and `/* .. */` are skipped: a comment's text is not
/// SQL, and a quote in it (`-- the author's`) would otherwise open a literal that hides the
/// rest of the statement. (Without, for the SQL where those characters are not comments:
/// MySQL's `1--1`, PostgreSQL's `#` operator.)
fn tokenize_with(sql: &str, backslash_escapes: bool, comments: bool) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '-' | '#' if comments && (c == '#' || chars.peek() == Some(&'-')) => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
            }
            '/' if comments && chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                for n in chars.by_ref() {
                    if previous == '*' && n == '/' {
                        break;
                    }
                    previous = n;
                }
            }
            '"' | '`' => {
                let mut name = String::new();
                while let Some(n) = chars.next() {
                    if n == c {
                        // A doubled quote is an escaped quote inside the name.
                        if chars.peek() == Some(&c) {
                            chars.next();
                            name.push(c);
                            continue;
                        }
                        break;
                    }
                    name.push(n);
                }
                tokens.push(Token::Ident(name.to_lowercase()));
            }
            '\'' => {
                // A string literal: skip it whole.
                while let Some(n) = chars.next() {
                    if n == '\\' && backslash_escapes {
                        chars.next();
                        continue;
                    }
                    if n == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                            continue;
                        }
                        break;
                    }
                }
                tokens.push(Token::Other);
            }
            '.' => tokens.push(Token::Dot),
            ',' => tokens.push(Token::Comma),
            '(' => tokens.push(Token::Open),
            ')' => tokens.push(Token::Close),
            c if c.is_alphanumeric() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' || n == '$' {
                        word.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                tokens.push(Token::Word(word.to_lowercase()));
            }
            c if c.is_whitespace() => {}
            _ => tokens.push(Token::Other),
        }
    }
    tokens
}

/// Words a table follows (MySQL's `STRAIGHT_JOIN` is a join).
const TABLE_KEYWORDS: &[&str] = &["from", "join", "straight_join", "update", "into"];
/// Words that end a `FROM` list (`ON` and `USING` do not: `FROM a JOIN b ON .., c` lists `c`).
const CLAUSE_KEYWORDS: &[&str] = &[
    "where",
    "group",
    "order",
    "limit",
    "having",
    "select",
    "set",
    "values",
    "union",
    "offset",
    "returning",
    "window",
    "for",
];

/// [`tables_in_sql`] of a rendered statement, remembered per SQL text (without binds): the same
/// query shape is scanned once, not on every hit.
pub(crate) fn tables_of(rendered: &Rendered) -> std::sync::Arc<[String]> {
    use std::sync::{Arc, OnceLock};
    static SCANNED: OnceLock<moka::sync::Cache<String, Arc<[String]>>> = OnceLock::new();
    let scanned = SCANNED.get_or_init(|| moka::sync::Cache::new(10_000));
    let escaped = rendered.escaped_sql();
    if let Some(tables) = scanned.get(escaped) {
        return tables;
    }
    let tables: Arc<[String]> = tables_in_sql(&rendered.sql()).into();
    scanned.insert(escaped.to_owned(), tables.clone());
    tables
}

/// [`tables_in_sql`] of a statement's SQL, remembered per SQL text like [`tables_of`] (apart
/// from it: an SQL text may be another's escaped form).
pub(crate) fn tables_of_sql(sql: &str) -> std::sync::Arc<[String]> {
    use std::sync::{Arc, OnceLock};
    static SCANNED: OnceLock<moka::sync::Cache<String, Arc<[String]>>> = OnceLock::new();
    let scanned = SCANNED.get_or_init(|| moka::sync::Cache::new(10_000));
    if let Some(tables) = scanned.get(sql) {
        return tables;
    }
    let tables: Arc<[String]> = tables_in_sql(sql).into();
    scanned.insert(sql.to_owned(), tables.clone());
    tables
}

/// Every table a statement may read, from its SQL text (lower-cased, unquoted).
///
/// Over-approximates on purpose: a name that is not a table only costs one more generation read,
/// while a missed table would be a stale read. Counted: quoted names that qualify a column
/// (`"users"."id"`) and names that follow `FROM`, `JOIN`, `UPDATE`, `INTO` (with an optional
/// schema, and comma-separated lists after `FROM`).
pub(crate) fn tables_in_sql(sql: &str) -> Vec<String> {
    // Whether a backslash escapes a quote depends on the server and its settings; read the
    // statement both ways and keep every table either way finds.
    // Whether `--`, `#` and `/*` open comments depends on the server too: every reading counts.
    let mut tables = tables_in_tokens(tokenize_with(sql, false, false));
    for (backslash_escapes, comments) in [(true, false), (false, true), (true, true)] {
        for table in tables_in_tokens(tokenize_with(sql, backslash_escapes, comments)) {
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
    }
    tables
}

fn tables_in_tokens(tokens: Vec<Token>) -> Vec<String> {
    // `FROM ONLY t`, `JOIN LATERAL (..)`: the modifier is not the table.
    let mut kept: Vec<Token> = Vec::with_capacity(tokens.len());
    for token in tokens {
        let modifier = matches!(&token, Token::Word(w) if w == "only" || w == "lateral");
        let after_table_keyword = matches!(kept.last(), Some(Token::Word(w)) if TABLE_KEYWORDS.contains(&w.as_str()))
            || kept.last() == Some(&Token::Comma);
        if !(modifier && after_table_keyword) {
            kept.push(token);
        }
    }
    let tokens = kept;
    let mut tables: Vec<String> = Vec::new();
    let mut push = |name: &str| {
        if !tables.iter().any(|t| t == name) {
            tables.push(name.to_owned());
        }
    };
    let mut in_from_list = false;
    for (i, token) in tokens.iter().enumerate() {
        let name = match token {
            Token::Ident(name) => name.as_str(),
            Token::Word(word) => {
                if TABLE_KEYWORDS.contains(&word.as_str()) {
                    in_from_list = word == "from"
                        || (in_from_list && matches!(word.as_str(), "join" | "straight_join"));
                } else if CLAUSE_KEYWORDS.contains(&word.as_str()) {
                    in_from_list = false;
                }
                word.as_str()
            }
            Token::Comma | Token::Dot | Token::Open | Token::Close | Token::Other => continue,
        };
        let previous = i.checked_sub(1).map(|p| &tokens[p]);
        // `FROM (a JOIN b ..)`: the first table of a parenthesized join follows the `(`s.
        let opens = tokens[..i]
            .iter()
            .rev()
            .take_while(|t| **t == Token::Open)
            .count();
        let after_keyword = matches!(
            i.checked_sub(opens + 1).map(|p| &tokens[p]),
            Some(Token::Word(w)) if TABLE_KEYWORDS.contains(&w.as_str())
        ) && !(opens > 0
            && matches!(token, Token::Word(w) if matches!(w.as_str(), "select" | "with" | "values")));
        let qualifies = matches!(token, Token::Ident(_)) && tokens.get(i + 1) == Some(&Token::Dot);
        let schema_qualified = previous == Some(&Token::Dot)
            && i >= 3
            && matches!(&tokens[i - 3], Token::Word(w) if TABLE_KEYWORDS.contains(&w.as_str()));
        let listed = in_from_list && previous == Some(&Token::Comma);
        let is_keyword = matches!(token, Token::Word(w) if TABLE_KEYWORDS.contains(&w.as_str()));
        if !is_keyword && (after_keyword || qualifies || schema_qualified || listed) {
            push(name);
        }
    }
    tables
}

/// What a write statement does, as far as the cache is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WrittenStatement {
    /// The table it writes (lower-cased, unquoted).
    pub(crate) table: String,
    /// What the statement does.
    pub(crate) verb: Verb,
    /// The columns its `SET` clause assigns (an update, or an upsert's `DO UPDATE SET`).
    pub(crate) assigned: Vec<String>,
    /// Other tables a raw statement names, invalidated with `table`.
    pub(crate) also_named: Vec<String>,
}

/// A write statement's verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verb {
    /// `INSERT` (an upsert too).
    Insert,
    /// `REPLACE` (MySQL, SQLite): may delete rows it does not return.
    Replace,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// A statement whose SQL memclone could not read.
    Unknown,
}

impl Verb {
    /// The verb a (lower-cased) keyword names, if it names one.
    fn of_keyword(word: &str) -> Option<Verb> {
        match word {
            "insert" => Some(Verb::Insert),
            "replace" => Some(Verb::Replace),
            "update" => Some(Verb::Update),
            "delete" => Some(Verb::Delete),
            _ => None,
        }
    }
}

impl WrittenStatement {
    /// A write to `table` that memclone cannot read: every row may have changed or moved.
    pub(crate) fn unknown(table: &str) -> Self {
        WrittenStatement {
            table: table.to_owned(),
            verb: Verb::Unknown,
            assigned: Vec::new(),
            also_named: Vec::new(),
        }
    }
}

/// Reads a write statement's verb, table and assigned columns from its SQL.
pub(crate) fn written_statement(sql: &str) -> Option<WrittenStatement> {
    let table = written_table(sql)?;
    let tokens = tokenize_with(sql, false, true);
    let at = tokens
        .iter()
        .position(|t| matches!(t, Token::Word(w) if Verb::of_keyword(w).is_some()))?;
    let Token::Word(keyword) = &tokens[at] else {
        return None;
    };
    let mut verb = Verb::of_keyword(keyword)?;
    // SQLite's `INSERT OR REPLACE` and `UPDATE OR REPLACE` delete the rows they conflict with,
    // which they do not return: as `REPLACE`.
    if let [Token::Word(or), Token::Word(conflict), ..] = &tokens[at + 1..] {
        if or == "or" && conflict == "replace" {
            verb = Verb::Replace;
        }
    }
    // A write inside parentheses (PostgreSQL's data-modifying `WITH d AS (DELETE ..)`) changes
    // rows the statement's `RETURNING` does not return: its rows are unknown.
    let mut depth = 0usize;
    for token in &tokens {
        match token {
            Token::Open => depth += 1,
            Token::Close => depth = depth.saturating_sub(1),
            Token::Word(w) if depth > 0 && matches!(w.as_str(), "insert" | "update" | "delete") => {
                verb = Verb::Unknown;
            }
            _ => {}
        }
    }
    // Read with comments and without (see `tokenize_with`): a column either reading finds
    // counts.
    let mut assigned = assigned_columns(&tokens);
    for column in assigned_columns(&tokenize(sql)) {
        if !assigned.contains(&column) {
            assigned.push(column);
        }
    }
    Some(WrittenStatement {
        table,
        verb,
        assigned,
        also_named: Vec::new(),
    })
}

/// The columns a statement's `SET` clause names (or what may be one: over-approximating is
/// safe).
fn assigned_columns(tokens: &[Token]) -> Vec<String> {
    let mut assigned = Vec::new();
    // The columns a `SET` assigns, or MySQL's `ON DUPLICATE KEY UPDATE` (no `SET` there).
    let set = tokens
        .iter()
        .position(|t| matches!(t, Token::Word(w) if w == "set"))
        .or_else(|| {
            tokens
                .windows(3)
                .position(|w| {
                    matches!(w, [Token::Word(a), Token::Word(b), Token::Word(c)]
                        if a == "duplicate" && b == "key" && c == "update")
                })
                .map(|at| at + 2)
        });
    if let Some(set) = set {
        // Every name in the SET clause counts (over-approximating is safe); only a keyword at
        // the statement's own level ends it, not one inside a subquery's parentheses.
        let mut depth = 0usize;
        for token in &tokens[set + 1..] {
            match token {
                Token::Open => depth += 1,
                Token::Close => depth = depth.saturating_sub(1),
                Token::Word(w)
                    if depth == 0 && matches!(w.as_str(), "where" | "returning" | "from") =>
                {
                    break
                }
                Token::Ident(name) => assigned.push(name.clone()),
                Token::Word(w) if !matches!(w.as_str(), "excluded" | "default" | "null") => {
                    assigned.push(w.clone())
                }
                _ => {}
            }
        }
    }
    assigned
}

/// The conflict resolutions of SQLite's `INSERT OR ..` and `UPDATE OR ..`.
const SQLITE_CONFLICT_WORDS: &[&str] = &["rollback", "abort", "replace", "fail", "ignore"];

/// The table an `INSERT`/`REPLACE`/`UPDATE`/`DELETE` statement writes.
pub(crate) fn written_table(sql: &str) -> Option<String> {
    let tokens = tokenize_with(sql, false, true);
    let start = tokens
        .iter()
        .position(|t| matches!(t, Token::Word(w) if Verb::of_keyword(w).is_some()))?;
    // SQLite's `INSERT OR REPLACE`, `UPDATE OR ABORT`..: the conflict clause is not the table.
    let mut after = &tokens[start + 1..];
    if let [Token::Word(or), Token::Word(conflict), rest @ ..] = after {
        if or == "or" && SQLITE_CONFLICT_WORDS.contains(&conflict.as_str()) {
            after = rest;
        }
    }
    let mut rest = after.iter().filter(|t| {
        !matches!(t, Token::Word(w) if matches!(w.as_str(), "into" | "from" | "ignore" | "or" | "low_priority"))
    });
    let mut name = match rest.next()? {
        Token::Ident(n) | Token::Word(n) => n.clone(),
        _ => return None,
    };
    // `"schema"."table"`: the table is the last part.
    while let (Some(Token::Dot), Some(Token::Ident(n) | Token::Word(n))) =
        (rest.next(), rest.next())
    {
        name = n.clone();
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_of_diesel_selects() {
        let pg = r#"SELECT "users"."id", "posts"."title" FROM ("users" INNER JOIN "posts" ON ("posts"."user_id" = "users"."id")) WHERE ("users"."status" = $1)"#;
        assert_eq!(tables_in_sql(pg), vec!["users", "posts"]);
        let count = r#"SELECT COUNT(*) FROM "users""#;
        assert_eq!(tables_in_sql(count), vec!["users"]);
        let mysql = "SELECT COUNT(*) FROM `users` WHERE `users`.`id` IN (SELECT `comments`.`user_id` FROM `comments`)";
        assert_eq!(tables_in_sql(mysql), vec!["users", "comments"]);
        let schema = r#"SELECT COUNT(*) FROM "app"."Accounts""#;
        assert!(tables_in_sql(schema).contains(&"accounts".to_string()));
        let raw =
            "select * from users u, orders o join items on items.id = o.item where name = 'from x'";
        let found = tables_in_sql(raw);
        for t in ["users", "orders", "items"] {
            assert!(found.contains(&t.to_string()), "{t} missing from {found:?}");
        }
        assert!(!found.contains(&"x".to_string()));
    }

    #[test]
    fn written_tables() {
        assert_eq!(
            written_table(r#"UPDATE "users" SET "name" = $1"#).as_deref(),
            Some("users")
        );
        assert_eq!(
            written_table("INSERT INTO `posts` (`a`) VALUES (?)").as_deref(),
            Some("posts")
        );
        assert_eq!(
            written_table(r#"DELETE FROM "a"."b" WHERE 1"#).as_deref(),
            Some("b")
        );
        assert_eq!(
            written_table("INSERT OR IGNORE INTO `t` DEFAULT VALUES").as_deref(),
            Some("t")
        );
        assert_eq!(written_table("SELECT 1"), None);
    }

    #[test]
    fn written_statements() {
        let update = written_statement(r#"UPDATE "users" SET "id" = $1, "name" = $2 WHERE ("users"."id" = $3) RETURNING "users"."id""#).unwrap();
        assert_eq!(
            (update.verb, update.table.as_str()),
            (Verb::Update, "users")
        );
        assert!(
            update.assigned.contains(&"id".to_string())
                && update.assigned.contains(&"name".to_string())
        );
        assert!(
            !update.assigned.contains(&"users".to_string()),
            "{:?}",
            update.assigned
        );
        let upsert = written_statement(r#"INSERT INTO "m" ("a", "b") VALUES ($1, $2) ON CONFLICT ("a") DO UPDATE SET "b" = excluded."b""#).unwrap();
        assert_eq!(upsert.verb, Verb::Insert);
        assert!(upsert.assigned.contains(&"b".to_string()));
        let delete = written_statement(r#"DELETE FROM "users" WHERE ("users"."id" = $1)"#).unwrap();
        assert_eq!((delete.verb, delete.assigned.len()), (Verb::Delete, 0));
        let odku = written_statement("INSERT INTO `posts` (`id`, `user_id`) VALUES (?, ?) ON DUPLICATE KEY UPDATE `user_id` = VALUES(`user_id`) RETURNING `id`").unwrap();
        assert!(
            odku.assigned.contains(&"user_id".to_string()),
            "{:?}",
            odku.assigned
        );
        let cte = written_statement(r#"WITH gone AS (DELETE FROM posts WHERE id = 10 RETURNING id) UPDATE posts SET title = 'c2' WHERE id = 20 RETURNING *"#).unwrap();
        assert_eq!(cte.verb, Verb::Unknown);
        for (sql, table, verb) in [
            (
                "UPDATE OR REPLACE posts SET title = 'z' WHERE id = 10",
                "posts",
                Verb::Replace,
            ),
            (
                "UPDATE OR ABORT \"posts\" SET title = 'z'",
                "posts",
                Verb::Update,
            ),
            (
                "INSERT OR REPLACE INTO posts (id) VALUES (1)",
                "posts",
                Verb::Replace,
            ),
            (
                "INSERT OR IGNORE INTO `t` DEFAULT VALUES",
                "t",
                Verb::Insert,
            ),
        ] {
            let parsed = written_statement(sql).unwrap();
            assert_eq!((parsed.table.as_str(), parsed.verb), (table, verb), "{sql}");
        }
        let commented = written_statement(
            "-- update the title\nUPDATE posts SET title = 'x' /* where */, user_id = 2 WHERE id = 1",
        )
        .unwrap();
        assert_eq!(commented.table, "posts");
        assert!(
            commented.assigned.contains(&"user_id".to_owned()),
            "{:?}",
            commented.assigned
        );
        let replace = written_statement("REPLACE INTO `users` (`id`) VALUES (?)").unwrap();
        assert_eq!(replace.verb, Verb::Replace);
        assert_eq!(WrittenStatement::unknown("users").verb, Verb::Unknown);
    }

    #[test]
    fn keys_escape_braces_and_carry_tags() {
        let key = entity_entry("app", "users", "\"a}b\"", 1);
        assert_eq!(key, "app:{r:users:\"a%7Db\"}:e:0000000000000001");
        let key = row_generation("app", "users", "\"a}b\"");
        assert_eq!(key, "app:{t:users}:r:\"a%7Db\"");
        assert_eq!(query_generation("app", "users"), "app:{t:users}:qgen");
        assert_eq!(scope_generation("app", "posts"), "app:{t:posts}:sgen");
        assert_eq!(
            value_generation("app", "posts", "user_id", "\"a:b}\""),
            "app:{t:posts}:v:user_id:\"a%3Ab%7D\""
        );
        assert_eq!(
            query_entry("app", 0xff, "active users"),
            "app:{q:000000000000000000000000000000ff}:active%20users"
        );
    }

    #[test]
    fn rendered_sql_ends_where_the_literal_ends() {
        use diesel::sqlite::Sqlite;
        let tricky = "SELECT \"a\\b\" FROM t /* -- binds: [] */\n\tJOIN u ON 'x\"' = '\u{2028}'";
        let query = diesel::sql_query(tricky).bind::<diesel::sql_types::Text, _>(" -- binds: \"");
        let rendered = Rendered::of::<Sqlite, _>(&query).unwrap();
        assert!(rendered.0.starts_with(DEBUG_PREFIX), "{}", rendered.0);
        assert_eq!(rendered.sql(), tricky);
        let tables = tables_in_sql(&rendered.sql());
        assert!(tables.contains(&"t".to_owned()) && tables.contains(&"u".to_owned()));
        // Not Diesel's format: the whole text stands for the SQL (more tables, never fewer).
        let other = Rendered("SELECT 1 FROM t".to_owned());
        assert_eq!(other.escaped_sql(), "SELECT 1 FROM t");
    }

    #[test]
    fn table_names_come_from_diesel() {
        diesel::table! { #[sql_name = "People"] persons (id) { id -> Integer } }
        diesel::table! { app.ledger (id) { id -> Integer } }
        diesel::table! { #[sql_name = "odd\"name"] odd (id) { id -> Integer } }
        assert_eq!(table_name(&persons::table), "people");
        assert_eq!(table_name(&ledger::table), "ledger");
        assert_eq!(qualified_table_name(&ledger::table), "app.ledger");
        assert_eq!(qualified_table_name(&persons::table), "people");
        assert_eq!(table_name(&odd::table), "odd\"name");
        // A read of the same tables names them the same way.
        let sql =
            Rendered::of::<diesel::pg::Pg, _>(&diesel::QueryDsl::select(ledger::table, ledger::id))
                .unwrap()
                .sql();
        assert!(tables_in_sql(&sql).contains(&"ledger".to_owned()), "{sql}");
        let sql = Rendered::of::<diesel::pg::Pg, _>(&diesel::QueryDsl::select(odd::table, odd::id))
            .unwrap()
            .sql();
        assert!(
            tables_in_sql(&sql).contains(&"odd\"name".to_owned()),
            "{sql}"
        );
    }

    #[test]
    fn reads_found_by_the_review() {
        let only = r#"SELECT COUNT(*) FROM  ONLY "users""#;
        assert_eq!(tables_in_sql(only), vec!["users"]);
        let lateral = "SELECT * FROM a JOIN LATERAL (SELECT * FROM b) x ON true, c";
        for t in ["a", "b", "c"] {
            assert!(tables_in_sql(lateral).contains(&t.to_owned()), "{t}");
        }
        for comment in ["-- it's\n", "# it's\n", "/* it's */"] {
            let sql = format!("SELECT * FROM a {comment} JOIN b ON b.id = a.id");
            assert!(tables_in_sql(&sql).contains(&"b".to_owned()), "{sql}");
        }
        let straight = "SELECT a.id FROM a STRAIGHT_JOIN b ON b.id = a.id, c";
        for t in ["a", "b", "c"] {
            assert!(tables_in_sql(straight).contains(&t.to_owned()), "{t}");
        }
        let nested = "SELECT count(*) FROM ((a JOIN b ON a.id = b.a_id) JOIN c ON true)";
        for t in ["a", "b", "c"] {
            assert!(tables_in_sql(nested).contains(&t.to_owned()), "{t}");
        }
        let subquery = "SELECT * FROM (SELECT id FROM a) x, (VALUES (1)) v";
        assert!(!tables_in_sql(subquery).contains(&"select".to_owned()));
        assert!(!tables_in_sql(subquery).contains(&"values".to_owned()));
        let not_a_comment = "SELECT 1--1 FROM a";
        assert!(tables_in_sql(not_a_comment).contains(&"a".to_owned()));
        let mysql_escape = r"SELECT * FROM a WHERE n = 'O\'Brien' AND id IN (SELECT id FROM b)";
        assert!(tables_in_sql(mysql_escape).contains(&"b".to_owned()));
        let standard = r"SELECT * FROM a WHERE n = 'C:\' AND id IN (SELECT id FROM b)";
        assert!(tables_in_sql(standard).contains(&"b".to_owned()));
        let moved = written_statement(
            r#"UPDATE "users" SET "name" = (SELECT 'z' FROM users LIMIT 1), "id" = $1 WHERE ("users"."id" = $2)"#,
        )
        .unwrap();
        assert!(
            moved.assigned.contains(&"id".to_owned()),
            "{:?}",
            moved.assigned
        );
        for text in ["Ledger", "\"Ledger\"", "app.ledger", "\"app\".\"Ledger\""] {
            assert_eq!(table_from_text(text), "ledger", "{text}");
        }
    }

    /// The identity hash as releases up to 0.1 computed it: streamed, formatted by `{:032x}`.
    fn stable_hash(parts: &[&[u8]]) -> String {
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for part in parts {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        format!("{:032x}", hasher.digest128())
    }

    #[test]
    fn hash_is_stable() {
        // Pinned: a change here silently splits every deployed cache.
        let digest = |kind: &str, statements: &[Identity<'_>]| {
            let mut key = String::new();
            push_hex128(&mut key, identity_digest(kind, 7, statements));
            key
        };
        let text =
            r#"Query { sql: "SELECT \"a\" FROM \"t\" WHERE \"t\".\"id\" = $1", binds: [1] }"#;
        assert_eq!(
            digest("load", &[Identity::Text(text)]),
            stable_hash(&[b"load", &7u64.to_le_bytes(), text.as_bytes()])
        );
        assert_eq!(
            digest("load", &[Identity::Text(text)]),
            "ab67f6c9e9fbb378f6c058a6f76c6b83"
        );
        let shaped = Identity::Shaped {
            escaped_sql: r#"SELECT \"a\" FROM \"t\" WHERE \"t\".\"id\" = $1"#,
            binds: "[1]",
        };
        assert_eq!(shaped.text(), text);
        assert_eq!(
            digest("two", &[Identity::Text(text), shaped]),
            stable_hash(&[
                b"two",
                &7u64.to_le_bytes(),
                text.as_bytes(),
                text.as_bytes()
            ])
        );
        assert_ne!(stable_hash(&[b"a", b"bc"]), stable_hash(&[b"ab", b"c"]));
        assert_eq!(hash64("x"), xxhash_rust::xxh3::xxh3_64(b"x"));
    }

    #[test]
    fn binds_come_alone_when_the_sql_is_the_shapes() {
        use diesel::prelude::*;
        use diesel::sqlite::Sqlite;
        diesel::table! { people (id) { id -> Integer, name -> Text } }
        let tricky = "it's \"quoted\" -- binds: [x]\n\u{2028}";
        let query = people::table
            .filter(people::name.eq(tricky))
            .filter(people::id.eq_any(vec![1, 2]))
            .limit(3);
        let rendered = Rendered::of::<Sqlite, _>(&query).unwrap();
        let sql = rendered.sql();
        let binds = binds_of::<Sqlite>(&query, &sql).expect("the SQL is the shape's");
        let shaped = Identity::Shaped {
            escaped_sql: rendered.escaped_sql(),
            binds: &binds,
        };
        assert_eq!(shaped.text(), rendered.0);
        // Another SQL is refused, even one that starts with the shape's.
        assert_eq!(binds_of::<Sqlite>(&query, &sql[..sql.len() - 1]), None);
        let longer = people::table
            .filter(people::name.eq(tricky))
            .filter(people::id.eq_any(vec![1, 2, 3]))
            .limit(3);
        assert_eq!(binds_of::<Sqlite>(&longer, &sql), None);
        // A raw statement whose text contains the separator.
        let raw =
            diesel::sql_query("SELECT 1 -- binds: [2]").bind::<diesel::sql_types::Text, _>("[3]");
        let rendered = Rendered::of::<Sqlite, _>(&raw).unwrap();
        assert_eq!(binds_of::<Sqlite>(&raw, "SELECT 1"), None);
        let binds = binds_of::<Sqlite>(&raw, &rendered.sql()).unwrap();
        assert_eq!(binds, r#"["[3]"]"#);
    }
}
