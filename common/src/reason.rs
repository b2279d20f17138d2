//! Why an object (or message) was set aside for the operator: the reasons recorded in
//! `avatar_migration_failures`, and the values of `feeder failures --reason`.

/// Why an object (or message) was set aside for the operator; a value of `feeder failures
/// --reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Reason {
    /// The source object no longer exists; nothing to copy.
    SourceMissing,
    /// The destination key holds different content; never overwritten (I3).
    DestinationConflict,
    /// The message could not be read.
    MalformedMessage,
    /// The message names a key outside SOURCE_PREFIX.
    OutsidePrefix,
    /// A row points at a legacy object that does not exist (found by `feeder verify`).
    RowObjectMissing,
    /// Larger than one CopyObject can copy (5 GiB): recorded by versions before multipart
    /// copies; no longer recorded.
    TooLarge,
    /// The destination exists with the same size but its identity with the source could not
    /// be proven without reading more than `COMPARE_MAX_BYTES`; left as it is.
    DestinationUnproven,
    /// S3 denies access to this object (403 AccessDenied on it).
    AccessDenied,
    /// The object is archived (Glacier, Deep Archive, Intelligent-Tiering archive): restore it
    /// first (`InvalidObjectState`).
    ObjectArchived,
    /// The destination key would be longer than S3 allows (`KeyTooLongError`).
    KeyTooLong,
    /// The object's KMS key is disabled, missing or not granted (`KMS.*`).
    EncryptionKeyUnusable,
    /// Failed on every delivery up to the queue's `maxReceiveCount`: its message goes to the
    /// dead-letter queue; the detail holds the last error. `feeder redrive` retries it.
    RetriesExhausted,
}

impl Reason {
    /// The refusals: S3 or KMS refused this object (or, when every object around it is refused,
    /// the role or a policy refuses them all).
    pub const REFUSALS: [Reason; 2] = [Reason::AccessDenied, Reason::EncryptionKeyUnusable];

    /// Whether this is one of [`Self::REFUSALS`].
    pub fn is_refusal(self) -> bool {
        Self::REFUSALS.contains(&self)
    }

    /// The names of [`Self::REFUSALS`], as recorded.
    pub fn refusal_names() -> [&'static str; 2] {
        Self::REFUSALS.map(Reason::as_str)
    }

    /// The reason recorded as `name`, if any.
    pub fn parse(name: &str) -> Option<Reason> {
        <Reason as clap::ValueEnum>::value_variants().iter().copied().find(|r| r.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SourceMissing => "source_missing",
            Reason::DestinationConflict => "destination_conflict",
            Reason::MalformedMessage => "malformed_message",
            Reason::OutsidePrefix => "outside_prefix",
            Reason::RowObjectMissing => "row_object_missing",
            Reason::TooLarge => "too_large",
            Reason::DestinationUnproven => "destination_unproven",
            Reason::AccessDenied => "access_denied",
            Reason::ObjectArchived => "object_archived",
            Reason::KeyTooLong => "key_too_long",
            Reason::EncryptionKeyUnusable => "encryption_key_unusable",
            Reason::RetriesExhausted => "retries_exhausted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names recorded in the database are the names `feeder failures --reason` takes.
    #[test]
    fn a_reasons_recorded_name_is_its_command_line_name() {
        for reason in <Reason as clap::ValueEnum>::value_variants() {
            let name = clap::ValueEnum::to_possible_value(reason).unwrap();
            assert_eq!(name.get_name(), reason.as_str());
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        assert_eq!(Reason::parse("no_such_reason"), None);
    }
}
