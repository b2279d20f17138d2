//! Queue messages: objects to move, as versioned JSON.
//!
//! Version 1 carries one object:
//! `{"v":1,"key":"image/avatar-1.png","size":1503,"etag":"\"9b2c...\""}`
//! Version 2 carries several (fewer SQS requests per object, a shallower queue):
//! `{"v":2,"objects":[{"key":"image/a.png","size":1503,"etag":"\"9b2c...\""},...]}`
//! The feeder writes version 1 for one object per message and version 2 otherwise; the
//! consumer reads both ([`decode`]).
//!
//! Bodies are ASCII: every character outside ASCII is written as a JSON `\uXXXX` escape
//! (a surrogate pair above U+FFFF), and control characters as JSON always writes them. S3
//! allows any character in a key, SQS only `#x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD
//! #x10000-#x10FFFF` in a body, and AWS has both refused others (`InvalidMessageContents`) and
//! replaced them with U+FFFD: escaped, every legal key arrives byte for byte. Bodies written
//! before, with raw UTF-8, read the same ([`decode`] is plain JSON).
//!
//! Promises: parsing never panics; anything that is not such a message with non-empty keys,
//! sizes that are not negative and at most [`MAX_OBJECTS`] objects is a [`MessageError`] that
//! names what is wrong, so the consumer can record it for the operator instead of retrying it
//! forever.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;
/// The version with several objects per message.
pub const BATCH_VERSION: u32 = 2;
/// The most objects one message may carry (what the feeder sends is far smaller: a message
/// holds at most 256 KiB).
pub const MAX_OBJECTS: usize = 100;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMessage {
    pub v: u32,
    /// The source key, prefix included.
    pub key: String,
    /// Size in bytes when listed.
    pub size: i64,
    /// ETag when listed, quotes included as S3 returns it.
    pub etag: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message body is not valid JSON for an object message: {0}")]
    NotJson(String),
    #[error("message version {0} is not supported (this consumer reads versions {VERSION} and {BATCH_VERSION})")]
    UnsupportedVersion(u32),
    #[error("message has an empty key")]
    EmptyKey,
    #[error("message has a negative size {0}")]
    NegativeSize(i64),
    #[error("message carries no object")]
    NoObject,
    #[error("message carries {0} objects, more than {MAX_OBJECTS}")]
    TooManyObjects(usize),
}

/// One object of a version-2 message.
#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    size: i64,
    etag: String,
}

#[derive(Serialize, Deserialize)]
struct Batch {
    v: u32,
    objects: Vec<Entry>,
}

#[derive(Deserialize)]
struct Versioned {
    v: u32,
}

impl ObjectMessage {
    pub fn new(key: String, size: i64, etag: String) -> Self {
        Self { v: VERSION, key, size, etag }
    }

    pub fn to_body(&self) -> String {
        to_ascii_json(self)
    }

    /// Parses a version-1 message (one object).
    pub fn parse(body: &str) -> Result<Self, MessageError> {
        match from_json::<Versioned>(body)?.v {
            VERSION => Self::parse_v1(body),
            other => Err(MessageError::UnsupportedVersion(other)),
        }
    }

    /// Parses a body already known to be version 1.
    fn parse_v1(body: &str) -> Result<Self, MessageError> {
        let msg: ObjectMessage = from_json(body)?;
        msg.check()?;
        Ok(msg)
    }

    fn check(&self) -> Result<(), MessageError> {
        if self.key.is_empty() {
            return Err(MessageError::EmptyKey);
        }
        if self.size < 0 {
            return Err(MessageError::NegativeSize(self.size));
        }
        Ok(())
    }
}

fn from_json<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, MessageError> {
    serde_json::from_str(body).map_err(|e| MessageError::NotJson(e.to_string()))
}

/// The body of one message carrying these objects: version 1 for one, version 2 for more.
pub fn encode(objects: &[ObjectMessage]) -> String {
    match objects {
        [one] => one.to_body(),
        many => {
            let objects =
                many.iter().map(|o| Entry { key: o.key.clone(), size: o.size, etag: o.etag.clone() }).collect();
            to_ascii_json(&Batch { v: BATCH_VERSION, objects })
        }
    }
}

/// JSON with every non-ASCII character escaped, as in a body (see the module documentation).
pub fn to_ascii_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, AsciiFormatter);
    value.serialize(&mut serializer).expect("messages always serialise");
    String::from_utf8(out).expect("ASCII is UTF-8")
}

/// serde_json's compact formatter, writing non-ASCII characters as `\uXXXX`.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// The objects of a message of either version.
pub fn decode(body: &str) -> Result<Vec<ObjectMessage>, MessageError> {
    match from_json::<Versioned>(body)?.v {
        VERSION => ObjectMessage::parse_v1(body).map(|m| vec![m]),
        BATCH_VERSION => {
            let batch: Batch = from_json(body)?;
            match batch.objects.len() {
                0 => return Err(MessageError::NoObject),
                n if n > MAX_OBJECTS => return Err(MessageError::TooManyObjects(n)),
                _ => {}
            }
            batch
                .objects
                .into_iter()
                .map(|e| {
                    let m = ObjectMessage::new(e.key, e.size, e.etag);
                    m.check().map(|()| m)
                })
                .collect()
        }
        other => Err(MessageError::UnsupportedVersion(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = ObjectMessage::new("image/a b.png".into(), 1503, "\"9b2c\"".into());
        let body = m.to_body();
        assert_eq!(body, r#"{"v":1,"key":"image/a b.png","size":1503,"etag":"\"9b2c\""}"#);
        assert_eq!(ObjectMessage::parse(&body).unwrap(), m);
    }

    /// Keys with characters SQS cannot carry (U+FFFE, U+FFFF, controls) and any other
    /// character travel as ASCII and come back byte for byte; a body of the earlier raw UTF-8
    /// form reads the same.
    #[test]
    fn bodies_are_ascii_and_every_key_survives() {
        let key = "image/\u{FFFE}\u{FFFF}\u{1}\u{7f}é漢😀\u{D7FF}\u{E000}.png";
        let m = ObjectMessage::new(key.into(), 1, "\"e\"".into());
        let body = m.to_body();
        assert!(body.is_ascii(), "{body}");
        assert!(body.contains(r"\ufffe\uffff\u0001") && body.contains(r"\ud83d\ude00"), "{body}");
        assert_eq!(ObjectMessage::parse(&body).unwrap(), m);
        let batch = encode(&[m.clone(), m.clone()]);
        assert!(batch.is_ascii());
        assert_eq!(decode(&batch).unwrap(), vec![m.clone(), m]);
        let raw = "{\"v\":1,\"key\":\"image/é漢.png\",\"size\":1,\"etag\":\"e\"}";
        assert_eq!(ObjectMessage::parse(raw).unwrap().key, "image/é漢.png");
    }

    #[test]
    fn rejects_malformed_bodies_without_panicking() {
        assert!(matches!(ObjectMessage::parse("not json"), Err(MessageError::NotJson(_))));
        assert!(matches!(ObjectMessage::parse("{}"), Err(MessageError::NotJson(_))));
        assert!(matches!(ObjectMessage::parse(r#"{"v":1,"key":"k"}"#), Err(MessageError::NotJson(_))));
        assert_eq!(
            ObjectMessage::parse(r#"{"v":2,"key":"k","size":1,"etag":"e"}"#),
            Err(MessageError::UnsupportedVersion(2))
        );
        assert_eq!(ObjectMessage::parse(r#"{"v":1,"key":"","size":1,"etag":"e"}"#), Err(MessageError::EmptyKey));
        assert_eq!(
            ObjectMessage::parse(r#"{"v":1,"key":"k","size":-1,"etag":"e"}"#),
            Err(MessageError::NegativeSize(-1))
        );
        assert!(ObjectMessage::parse("\u{0}\u{ffff}").is_err());
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn one_object_is_version_1_and_several_are_version_2() {
        let a = ObjectMessage::new("image/a.png".into(), 1, "\"e1\"".into());
        let b = ObjectMessage::new("image/b c.png".into(), 2, "\"e2\"".into());
        assert_eq!(encode(std::slice::from_ref(&a)), a.to_body());
        let body = encode(&[a.clone(), b.clone()]);
        assert_eq!(
            body,
            r#"{"v":2,"objects":[{"key":"image/a.png","size":1,"etag":"\"e1\""},{"key":"image/b c.png","size":2,"etag":"\"e2\""}]}"#
        );
        assert_eq!(decode(&body).unwrap(), vec![a.clone(), b]);
        assert_eq!(decode(&a.to_body()).unwrap(), vec![a]);
    }

    #[test]
    fn rejects_malformed_batches() {
        assert_eq!(decode(r#"{"v":2,"objects":[]}"#), Err(MessageError::NoObject));
        assert_eq!(decode(r#"{"v":2,"objects":[{"key":"","size":1,"etag":"e"}]}"#), Err(MessageError::EmptyKey));
        assert_eq!(
            decode(r#"{"v":2,"objects":[{"key":"k","size":-3,"etag":"e"}]}"#),
            Err(MessageError::NegativeSize(-3))
        );
        assert!(matches!(decode(r#"{"v":2,"objects":{}}"#), Err(MessageError::NotJson(_))));
        assert!(matches!(decode(r#"{"v":2}"#), Err(MessageError::NotJson(_))));
        assert_eq!(decode(r#"{"v":3,"objects":[]}"#), Err(MessageError::UnsupportedVersion(3)));
        let many = format!(r#"{{"v":2,"objects":[{}]}}"#, vec![r#"{"key":"k","size":1,"etag":"e"}"#; 101].join(","));
        assert_eq!(decode(&many), Err(MessageError::TooManyObjects(101)));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parsing_any_text_never_panics(body in any::<String>()) {
            let _ = ObjectMessage::parse(&body);
        }

        #[test]
        fn parsing_json_shaped_text_never_panics(
            v in any::<i64>(), key in any::<String>(), size in any::<i64>(), etag in any::<String>(), extra in "[,:{}\\[\\]\"a-z0-9 ]{0,20}"
        ) {
            let body = format!(r#"{{"v":{v},"key":{},"size":{size},"etag":{}{extra}}}"#, serde_json::json!(key), serde_json::json!(etag));
            if let Ok(m) = ObjectMessage::parse(&body) {
                prop_assert!(!m.key.is_empty() && m.size >= 0 && m.v == VERSION);
            }
        }

        #[test]
        fn decoding_any_text_never_panics(body in any::<String>()) {
            let _ = decode(&body);
        }

        #[test]
        fn every_batch_round_trips(keys in proptest::collection::vec(".{1,100}", 1..20), size in 0i64..) {
            let objects: Vec<ObjectMessage> = keys.into_iter().map(|k| ObjectMessage::new(k, size, "\"e\"".into())).collect();
            prop_assert_eq!(decode(&encode(&objects)).unwrap(), objects);
        }

        #[test]
        fn every_message_round_trips(key in ".{1,200}", size in 0i64.., etag in any::<String>()) {
            let m = ObjectMessage::new(key, size, etag);
            prop_assert!(m.to_body().is_ascii());
            prop_assert_eq!(ObjectMessage::parse(&m.to_body()).unwrap(), m);
        }
    }
}
