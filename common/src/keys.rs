//! The key mapping: `SOURCE_PREFIX` + rest becomes `DESTINATION_PREFIX` + rest, and the
//! `x-amz-copy-source` value for a key.
//!
//! Promises: the mapping is exact byte-prefix matching (case-sensitive: `Image/...` and
//! `imagex/...` are not under `image/`), and the copy source is percent-encoded so that keys
//! with spaces, `+`, `%`, `&`, `=` or non-ASCII characters survive (the SDK does not encode
//! `copy_source` itself).

use std::fmt;
use std::str::FromStr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// A key prefix such as `image/`. Not empty, at most 512 bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("a prefix must not be empty (moving a whole bucket is not supported)".into());
        }
        if s.len() > 512 {
            return Err(format!("a prefix must be at most 512 bytes, this one is {}", s.len()));
        }
        if s.chars().any(char::is_control) {
            return Err("a prefix must not contain control characters".into());
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where objects move from and to.
#[derive(Clone, Debug)]
pub struct KeyMapping {
    pub source_bucket: String,
    pub source_prefix: Prefix,
    pub destination_bucket: String,
    pub destination_prefix: Prefix,
}

/// A mapping whose destination lies inside its own source, or the other way round.
#[derive(Debug, thiserror::Error)]
#[error(
    "SOURCE_PREFIX {source_prefix:?} and DESTINATION_PREFIX {destination_prefix:?} overlap in the same bucket \
     {bucket:?}: choose prefixes where neither starts with the other"
)]
pub struct PrefixesOverlap {
    bucket: String,
    source_prefix: Prefix,
    destination_prefix: Prefix,
}

impl KeyMapping {
    /// Builds a mapping, refusing one whose destination lies inside its own source (the moved
    /// objects would be listed and moved again, forever).
    pub fn new(
        source_bucket: String,
        source_prefix: Prefix,
        destination_bucket: String,
        destination_prefix: Prefix,
    ) -> Result<Self, PrefixesOverlap> {
        if source_bucket == destination_bucket
            && (destination_prefix.0.starts_with(&source_prefix.0)
                || source_prefix.0.starts_with(&destination_prefix.0))
        {
            return Err(PrefixesOverlap { bucket: source_bucket, source_prefix, destination_prefix });
        }
        Ok(Self { source_bucket, source_prefix, destination_bucket, destination_prefix })
    }

    /// The destination key for a source key, or `None` when the key is not under the source
    /// prefix.
    pub fn destination_key(&self, source_key: &str) -> Option<String> {
        source_key.strip_prefix(self.source_prefix.as_str()).map(|rest| format!("{}{rest}", self.destination_prefix))
    }

    /// The `x-amz-copy-source` header value for a key of the source bucket.
    pub fn copy_source(&self, source_key: &str) -> String {
        copy_source(&self.source_bucket, source_key)
    }
}

/// Everything but unreserved characters and `/` is percent-encoded, as S3 expects of
/// `x-amz-copy-source` and of a key in a request's path (and as SigV4 signs it).
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/');

pub fn copy_source(bucket: &str, key: &str) -> String {
    format!("{bucket}/{}", encode_path(key))
}

/// A key as a request's path carries it: each byte but unreserved characters and `/`
/// percent-encoded.
pub fn encode_path(key: &str) -> percent_encoding::PercentEncode<'_> {
    utf8_percent_encode(key, COPY_SOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn mapping() -> KeyMapping {
        KeyMapping::new(
            "legacy-s3".into(),
            "image/".parse().unwrap(),
            "production-s3".into(),
            "avatar/".parse().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn maps_keys_under_the_source_prefix() {
        let m = mapping();
        assert_eq!(m.destination_key("image/avatar-1.png").as_deref(), Some("avatar/avatar-1.png"));
        assert_eq!(m.destination_key("image/a/b c+d.png").as_deref(), Some("avatar/a/b c+d.png"));
        assert_eq!(m.destination_key("image/").as_deref(), Some("avatar/"));
    }

    #[test]
    fn leaves_keys_outside_the_prefix() {
        let m = mapping();
        assert_eq!(m.destination_key("imagex/avatar-1.png"), None);
        assert_eq!(m.destination_key("Image/avatar-1.png"), None);
        assert_eq!(m.destination_key("avatar/avatar-1.png"), None);
        assert_eq!(m.destination_key("image"), None);
    }

    #[test]
    fn copy_source_encodes_awkward_keys() {
        assert_eq!(copy_source("b", "image/a b+c%d&e=f.png"), "b/image/a%20b%2Bc%25d%26e%3Df.png");
        assert_eq!(copy_source("b", "image/é/ü~x_y-z.png"), "b/image/%C3%A9/%C3%BC~x_y-z.png");
    }

    #[test]
    fn refuses_overlapping_prefixes_in_one_bucket() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        assert!(KeyMapping::new("b".into(), p("image/"), "b".into(), p("image/new/")).is_err());
        assert!(KeyMapping::new("b".into(), p("image/"), "b".into(), p("avatar/")).is_ok());
        assert!(KeyMapping::new("a".into(), p("image/"), "b".into(), p("image/")).is_ok());
    }

    #[test]
    fn refuses_bad_prefixes() {
        assert!("".parse::<Prefix>().is_err());
        assert!("a\nb".parse::<Prefix>().is_err());
        assert!("x".repeat(513).parse::<Prefix>().is_err());
    }
}

#[cfg(test)]
mod properties {
    use super::tests::mapping;
    use super::*;
    use proptest::prelude::*;

    /// Keys as S3 allows them: any UTF-8 up to 1,024 bytes, control characters included.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "image/\\PC{0,40}", "image/[\\x00-\\x1f \\t+%&=?#/é日]{0,30}", "imag.{0,5}"]
    }

    proptest! {
        #[test]
        fn the_mapping_never_leaves_the_destination_prefix(k in key()) {
            let m = mapping();
            match m.destination_key(&k) {
                Some(d) => {
                    prop_assert!(k.starts_with("image/"));
                    prop_assert!(d.starts_with("avatar/"));
                    prop_assert_eq!(&d["avatar/".len()..], &k["image/".len()..]);
                }
                None => prop_assert!(!k.starts_with("image/")),
            }
        }

        #[test]
        fn the_mapping_never_maps_two_keys_to_one(a in key(), b in key()) {
            let m = mapping();
            if let (Some(da), Some(db)) = (m.destination_key(&a), m.destination_key(&b)) {
                prop_assert_eq!(da == db, a == b);
            }
        }

        #[test]
        fn the_copy_source_decodes_back_to_the_key(k in key()) {
            let source = copy_source("legacy-s3", &k);
            let encoded = source.strip_prefix("legacy-s3/").unwrap();
            prop_assert!(encoded.bytes().all(|b| b.is_ascii_graphic()), "{}", encoded);
            let decoded = percent_encoding::percent_decode_str(encoded).decode_utf8().unwrap();
            prop_assert_eq!(decoded, k.as_str());
        }
    }
}
