//! The queue message: one object to move, as versioned JSON.
//!
//! `{"v":1,"key":"image/avatar-1.png","size":1503,"etag":"\"9b2c...\""}`
//!
//! Promises: parsing never panics; anything that is not a version-1 message with a non-empty
//! key is a [`MessageError`] that names what is wrong, so the consumer can record it for the
//! operator instead of retrying it forever.

use serde::{Deserialize, Serialize};

pub const VERSION: u32 = 1;

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
    #[error("message version {0} is not supported (this consumer reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("message has an empty key")]
    EmptyKey,
    #[error("message has a negative size {0}")]
    NegativeSize(i64),
}

impl ObjectMessage {
    pub fn new(key: String, size: i64, etag: String) -> Self {
        Self { v: VERSION, key, size, etag }
    }

    pub fn to_body(&self) -> String {
        serde_json::to_string(self).expect("an ObjectMessage always serialises")
    }

    pub fn parse(body: &str) -> Result<Self, MessageError> {
        #[derive(Deserialize)]
        struct Versioned {
            v: u32,
        }
        let versioned: Versioned = serde_json::from_str(body).map_err(|e| MessageError::NotJson(e.to_string()))?;
        if versioned.v != VERSION {
            return Err(MessageError::UnsupportedVersion(versioned.v));
        }
        let msg: ObjectMessage = serde_json::from_str(body).map_err(|e| MessageError::NotJson(e.to_string()))?;
        if msg.key.is_empty() {
            return Err(MessageError::EmptyKey);
        }
        if msg.size < 0 {
            return Err(MessageError::NegativeSize(msg.size));
        }
        Ok(msg)
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
        fn every_message_round_trips(key in ".{1,200}", size in 0i64.., etag in any::<String>()) {
            let m = ObjectMessage::new(key, size, etag);
            prop_assert_eq!(ObjectMessage::parse(&m.to_body()).unwrap(), m);
        }
    }
}
