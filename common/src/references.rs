//! The references: the columns whose values name the migrated objects (`REFERENCES`), and the
//! form in which each column's values name them (a bare key, an `s3://` URI, a URL).
//!
//! `REFERENCES=[schema.]table.column[=FORM],...`, e.g. `avatars.path` (the default) or
//! `public.users.avatar_url=https://cdn.example.com/{key},posts.cover_key`.
//!
//! Promises:
//! - identifiers are read as PostgreSQL reads them: unquoted ones fold to lower case, quoted
//!   ones (`"Users"."Avatar URL"`, `""` for a quote) are kept as written, dots and commas
//!   included;
//! - a form maps a key both ways exactly: `value(bucket, key)` is the only value a rewrite
//!   looks for or writes, and `key_in(bucket, value)` gives back the key of any value of that
//!   form (a URL's percent-encoding decoded, whichever characters it encoded);
//! - bad input is an error naming the piece at fault, never a panic.

use std::fmt;
use std::str::FromStr;

use percent_encoding::percent_decode_str;

use crate::keys::KeyMapping;

/// One column whose values name objects, and their form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The schema as given; `None`: the table is found through the search path.
    pub schema: Option<String>,
    pub table: String,
    pub column: String,
    pub form: Form,
}

impl Reference {
    /// The default reference: the take-home's `avatars.path`, bare keys.
    pub fn avatars_path() -> Self {
        Self { schema: None, table: "avatars".into(), column: "path".into(), form: Form::Key }
    }

    /// `[schema.]table.column` as it would be written in `REFERENCES` (quoted where needed).
    pub fn name(&self) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(3);
        parts.extend(self.schema.as_deref());
        parts.extend([self.table.as_str(), self.column.as_str()]);
        parts.into_iter().map(quote_ident).collect::<Vec<_>>().join(".")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())?;
        match &self.form {
            Form::Key => Ok(()),
            form => write!(f, "={form}"),
        }
    }
}

impl FromStr for Reference {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, form) = match split_outside_quotes(s, '=', 2).as_slice() {
            [name] => (*name, Form::Key),
            [name, form] => (*name, form.parse::<Form>().map_err(|e| format!("{s:?}: {e}"))?),
            _ => unreachable!("split in at most two"),
        };
        let parts = split_outside_quotes(name, '.', usize::MAX).into_iter().map(ident).collect::<Result<Vec<_>, _>>();
        let parts = parts.map_err(|e| format!("{s:?}: {e}"))?;
        let (schema, table, column) = match <[String; 2]>::try_from(parts) {
            Ok([table, column]) => (None, table, column),
            Err(parts) => match <[String; 3]>::try_from(parts) {
                Ok([schema, table, column]) => (Some(schema), table, column),
                Err(_) => return Err(format!("{s:?}: write a reference as [schema.]table.column[=FORM]")),
            },
        };
        Ok(Self { schema, table, column, form })
    }
}

/// The references a run follows: at least one, each column once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct References(Vec<Reference>);

impl References {
    pub fn new(list: Vec<Reference>) -> Result<Self, String> {
        if list.is_empty() {
            return Err("REFERENCES names no column: give at least one, e.g. avatars.path".into());
        }
        for (i, a) in list.iter().enumerate() {
            if list[..i].iter().any(|b| (&a.schema, &a.table, &a.column) == (&b.schema, &b.table, &b.column)) {
                return Err(format!("REFERENCES names {} twice: one form per column", a.name()));
            }
        }
        Ok(Self(list))
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Reference> {
        self.0.iter()
    }

    /// Refuses a form that cannot tell a legacy value from a new one: without `{bucket}`, the
    /// values of both buckets look alike, so the prefixes must not overlap.
    pub fn check(&self, mapping: &KeyMapping) -> Result<(), String> {
        let (source, destination) = (mapping.source_prefix.as_str(), mapping.destination_prefix.as_str());
        if !(source.starts_with(destination) || destination.starts_with(source)) {
            return Ok(());
        }
        match self.iter().find(|r| !r.form.names_bucket()) {
            Some(r) => Err(format!(
                "REFERENCES {r}: its values do not name the bucket, and SOURCE_PREFIX {source:?} and \
                 DESTINATION_PREFIX {destination:?} overlap: a legacy value and its new one could not be told \
                 apart. Use a form holding {{bucket}} (s3, or a URL template), or prefixes that do not overlap"
            )),
            None => Ok(()),
        }
    }
}

impl Default for References {
    fn default() -> Self {
        Self(vec![Reference::avatars_path()])
    }
}

impl FromStr for References {
    type Err = String;

    /// A comma-separated list (commas inside quoted identifiers do not separate).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let list = split_outside_quotes(s, ',', usize::MAX)
            .into_iter()
            .filter(|piece| !piece.trim().is_empty())
            .map(Reference::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(list)
    }
}

impl fmt::Display for References {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list: Vec<String> = self.0.iter().map(Reference::to_string).collect();
        f.write_str(&list.join(","))
    }
}

/// How a column's values name objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    /// The object's key itself (`image/avatar-1.png`).
    Key,
    /// A template holding `{key}` once and `{bucket}` at most once: `s3://{bucket}/{key}`
    /// (written `s3`), `https://cdn.example.com/{key}`. In a template that starts with
    /// `http://` or `https://` the key is percent-encoded as a URL's path carries it (every
    /// byte but unreserved characters and `/`); elsewhere it is written as it is.
    Template(String),
}

const KEY: &str = "{key}";
const BUCKET: &str = "{bucket}";
const S3_URI: &str = "s3://{bucket}/{key}";

impl Form {
    /// Whether values of this form name the bucket.
    pub fn names_bucket(&self) -> bool {
        matches!(self, Form::Template(t) if t.contains(BUCKET))
    }

    /// Whether the key is percent-encoded in values of this form.
    pub fn encodes(&self) -> bool {
        matches!(self, Form::Template(t) if t.starts_with("http://") || t.starts_with("https://"))
    }

    /// The text before and after the key in a value naming an object of `bucket`.
    pub fn around(&self, bucket: &str) -> (String, String) {
        match self {
            Form::Key => (String::new(), String::new()),
            Form::Template(t) => {
                let (lead, tail) = t.split_once(KEY).expect("a template holds {key}");
                (lead.replace(BUCKET, bucket), tail.replace(BUCKET, bucket))
            }
        }
    }

    /// The value naming `key` in `bucket`.
    pub fn value(&self, bucket: &str, key: &str) -> String {
        match self {
            Form::Key => key.to_owned(),
            Form::Template(_) => {
                let (lead, tail) = self.around(bucket);
                if self.encodes() {
                    format!("{lead}{}{tail}", crate::keys::encode_path(key))
                } else {
                    format!("{lead}{key}{tail}")
                }
            }
        }
    }

    /// The key that `value` names in `bucket` when it has this form; `None` otherwise (another
    /// bucket, another host, a malformed percent-encoding).
    pub fn key_in(&self, bucket: &str, value: &str) -> Option<String> {
        let (lead, tail) = self.around(bucket);
        let middle = value.strip_prefix(lead.as_str())?.strip_suffix(tail.as_str())?;
        if !self.encodes() {
            return Some(middle.to_owned());
        }
        // A '%' not followed by two hex digits is not a URL's encoding.
        let bytes = middle.as_bytes();
        let well_formed = bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b != b'%' || bytes.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)));
        if !well_formed {
            return None;
        }
        percent_decode_str(middle).decode_utf8().ok().map(|k| k.into_owned())
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Form::Key => f.write_str("key"),
            Form::Template(t) if t == S3_URI => f.write_str("s3"),
            Form::Template(t) => f.write_str(t),
        }
    }
}

impl FromStr for Form {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s {
            "key" => return Ok(Form::Key),
            "s3" => return Ok(Form::Template(S3_URI.into())),
            _ => {}
        }
        if s.chars().any(char::is_control) {
            return Err("a form must not contain control characters".into());
        }
        if s.matches(KEY).count() != 1 {
            return Err(format!(
                "the form {s:?} must be `key`, `s3`, or a template holding {{key}} once \
                 (e.g. https://cdn.example.com/{{key}})"
            ));
        }
        if s.matches(BUCKET).count() > 1 {
            return Err(format!("the form {s:?} holds {{bucket}} more than once"));
        }
        let rest = s.replace(KEY, "").replace(BUCKET, "");
        if rest.contains('{') || rest.contains('}') {
            return Err(format!("the form {s:?} holds a brace other than {{key}} and {{bucket}}"));
        }
        Ok(Form::Template(s.to_owned()))
    }
}

/// Splits at `sep` outside double quotes, into at most `max` pieces.
fn split_outside_quotes(s: &str, sep: char, max: usize) -> Vec<&str> {
    let (mut pieces, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted && pieces.len() + 1 < max => {
                pieces.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&s[start..]);
    pieces
}

/// One identifier: `"As Written"` (with `""` for a quote), or unquoted, folded to lower case.
fn ident(s: &str) -> Result<String, String> {
    let s = s.trim();
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')).filter(|_| s.len() >= 2) {
        if inner.is_empty() || inner.replace("\"\"", "").contains('"') {
            return Err(format!("{s} is not a quoted identifier"));
        }
        return Ok(inner.replace("\"\"", "\""));
    }
    let mut chars = s.chars();
    let ok = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    if !ok {
        return Err(format!("{s:?} is not an identifier (quote names with other characters, as in \"Avatar URL\")"));
    }
    // PostgreSQL folds ASCII letters only.
    Ok(s.to_ascii_lowercase())
}

/// An identifier as SQL must write it: as it is when PostgreSQL would read it back unchanged,
/// quoted otherwise.
pub fn quote_ident(s: &str) -> String {
    let mut chars = s.chars();
    let plain = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { s.to_owned() } else { sql_ident(s) }
}

/// An identifier quoted, as generated SQL writes every one (a column named `order` or `user`
/// needs it).
pub fn sql_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_avatars_path_as_bare_keys() {
        let refs = References::default();
        assert_eq!(refs.to_string(), "avatars.path");
        assert_eq!("avatars.path".parse::<References>().unwrap(), refs);
    }

    #[test]
    fn names_fold_like_postgresql_and_quotes_keep_them() {
        let r: Reference = "Public.Users.Avatar_URL".parse().unwrap();
        assert_eq!((r.schema.as_deref(), r.table.as_str(), r.column.as_str()), (Some("public"), "users", "avatar_url"));
        let r: Reference = r#""My Schema"."User.s"."Avatar ""URL""""#.parse().unwrap();
        assert_eq!(
            (r.schema.as_deref(), r.table.as_str(), r.column.as_str()),
            (Some("My Schema"), "User.s", "Avatar \"URL\"")
        );
        assert_eq!(r.name(), r#""My Schema"."User.s"."Avatar ""URL""""#);
        assert_eq!(r.name().parse::<Reference>().unwrap(), r);
    }

    #[test]
    fn lists_split_at_commas_outside_quotes_and_take_forms() {
        let refs: References =
            r#"public.users.avatar_url=https://cdn.example.com/{key}, posts.cover_key ,"a,b".c=s3"#.parse().unwrap();
        let list: Vec<&Reference> = refs.iter().collect();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].form, Form::Template("https://cdn.example.com/{key}".into()));
        assert_eq!(list[1].form, Form::Key);
        assert_eq!((list[2].table.as_str(), list[2].column.as_str()), ("a,b", "c"));
        assert_eq!(list[2].form.to_string(), "s3");
        assert_eq!(refs.to_string().parse::<References>().unwrap(), refs);
    }

    #[test]
    fn bad_references_are_errors_naming_the_piece() {
        for (bad, says) in [
            ("avatars", "[schema.]table.column"),
            ("a.b.c.d", "[schema.]table.column"),
            ("avatars.", "not an identifier"),
            ("my table.path", "not an identifier"),
            ("avatars.path=https://cdn/", "{key}"),
            ("avatars.path=https://cdn/{key}/{key}", "{key}"),
            ("avatars.path=https://{bucket}.{bucket}/{key}", "{bucket}"),
            ("avatars.path=https://cdn/{id}/{key}", "brace"),
            ("\"\".path", "quoted identifier"),
            ("", "no column"),
            ("avatars.path,AVATARS.PATH=s3", "twice"),
        ] {
            let err = bad.parse::<References>().unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn forms_map_keys_to_values_and_back() {
        let key = Form::Key;
        assert_eq!(key.value("legacy-s3", "image/a b.png"), "image/a b.png");
        assert_eq!(key.key_in("legacy-s3", "image/a b.png").as_deref(), Some("image/a b.png"));

        let s3: Form = "s3".parse().unwrap();
        assert_eq!(s3.value("legacy-s3", "image/a b.png"), "s3://legacy-s3/image/a b.png");
        assert_eq!(s3.key_in("legacy-s3", "s3://legacy-s3/image/a b.png").as_deref(), Some("image/a b.png"));
        assert_eq!(s3.key_in("production-s3", "s3://legacy-s3/image/a b.png"), None);

        let cdn: Form = "https://cdn.example.com/{key}".parse().unwrap();
        assert!(cdn.encodes());
        let value = cdn.value("legacy-s3", "image/ä b+c%.png");
        assert_eq!(value, "https://cdn.example.com/image/%C3%A4%20b%2Bc%25.png");
        assert_eq!(cdn.key_in("legacy-s3", &value).as_deref(), Some("image/ä b+c%.png"));
        // Another encoder's choices name the same key.
        assert_eq!(cdn.key_in("x", "https://cdn.example.com/image%2Fa%7e.png").as_deref(), Some("image/a~.png"));
        assert_eq!(cdn.key_in("x", "https://cdn.example.com/image/a%zz.png"), None);
        assert_eq!(cdn.key_in("x", "https://other.example.com/image/a.png"), None);

        let host: Form = "https://{bucket}.s3.amazonaws.com/{key}?v=1".parse().unwrap();
        assert_eq!(host.value("legacy-s3", "image/a.png"), "https://legacy-s3.s3.amazonaws.com/image/a.png?v=1");
        assert_eq!(host.around("production-s3"), ("https://production-s3.s3.amazonaws.com/".into(), "?v=1".into()));
        assert_eq!(
            host.key_in("legacy-s3", "https://legacy-s3.s3.amazonaws.com/image/a.png?v=1").as_deref(),
            Some("image/a.png")
        );
        assert_eq!(host.key_in("legacy-s3", "https://legacy-s3.s3.amazonaws.com/image/a.png"), None);
    }

    proptest::proptest! {
        /// Whatever the key (spaces, `%`, `?`, non-ASCII...), each form gives back the key its
        /// value was written for, and a value names only its own bucket's object where the
        /// form holds the bucket.
        #[test]
        fn every_form_gives_back_the_key_it_wrote(key in "\\PC{0,40}") {
            for form in ["key", "s3", "https://cdn.example.com/{key}", "https://{bucket}.s3.amazonaws.com/{key}?v=1"] {
                let form: Form = form.parse().unwrap();
                let value = form.value("legacy-s3", &key);
                proptest::prop_assert_eq!(form.key_in("legacy-s3", &value), Some(key.clone()));
                if form.to_string().contains("{bucket}") || form.to_string() == "s3" {
                    proptest::prop_assert_eq!(form.key_in("production-s3", &value), None);
                }
            }
        }
    }

    #[test]
    fn forms_without_the_bucket_need_prefixes_that_do_not_overlap() {
        let mapping = |from: &str, to: &str| {
            KeyMapping::new("legacy-s3".into(), from.parse().unwrap(), "production-s3".into(), to.parse().unwrap())
                .unwrap()
        };
        let bare: References = "avatars.path".parse().unwrap();
        let s3: References = "avatars.path=s3".parse().unwrap();
        assert!(bare.check(&mapping("image/", "avatar/")).is_ok());
        let err = bare.check(&mapping("image/", "image/")).unwrap_err();
        assert!(err.contains("could not be told apart"), "{err}");
        assert!(bare.check(&mapping("image/", "image/moved/")).is_err());
        assert!(s3.check(&mapping("image/", "image/")).is_ok());
    }

    #[test]
    fn identifiers_are_quoted_only_when_needed() {
        assert_eq!(quote_ident("avatars"), "avatars");
        assert_eq!(quote_ident("Avatars"), "\"Avatars\"");
        assert_eq!(quote_ident("a b"), "\"a b\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("1a"), "\"1a\"");
    }
}
