//! How a user proves who it is: a password in the clear (the configuration,
//! [`crate::BrokerHandle::add_user`]) or the salted hash RabbitMQ keeps and exports in its
//! definitions (`password_hash`: base64 of four bytes of salt followed by
//! `hash(salt ++ password)`, with the hash its `hashing_algorithm` names).

use base64::Engine;
use md5::Md5;
use sha2::{Digest, Sha256, Sha512};

/// What a user logs in with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Credential {
    /// A password given in the clear.
    Password(String),
    /// RabbitMQ's salted hash; one too short to hold a salt, or of a `hashing_algorithm`
    /// RabbitMQ does not have (`None`), lets no password in (as in RabbitMQ, e.g. the empty
    /// hash of a user created without a password).
    Hash {
        /// The hash function.
        algorithm: Option<HashAlgorithm>,
        /// Four bytes of salt, then the hash of salt and password.
        salted: Vec<u8>,
    },
}

/// The hash functions of RabbitMQ's `hashing_algorithm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HashAlgorithm {
    /// `rabbit_password_hashing_sha256`, RabbitMQ's default.
    Sha256,
    /// `rabbit_password_hashing_sha512`.
    Sha512,
    /// `rabbit_password_hashing_md5`, from RabbitMQ before 3.6.
    Md5,
}

impl HashAlgorithm {
    /// The algorithm of a definitions `hashing_algorithm`, if RabbitMQ has it.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "rabbit_password_hashing_sha256" => Some(Self::Sha256),
            "rabbit_password_hashing_sha512" => Some(Self::Sha512),
            "rabbit_password_hashing_md5" => Some(Self::Md5),
            _ => None,
        }
    }

    fn digest(self, salt: &[u8], password: &[u8]) -> Vec<u8> {
        fn of<D: Digest>(salt: &[u8], password: &[u8]) -> Vec<u8> {
            D::new()
                .chain_update(salt)
                .chain_update(password)
                .finalize()
                .to_vec()
        }
        match self {
            Self::Sha256 => of::<Sha256>(salt, password),
            Self::Sha512 => of::<Sha512>(salt, password),
            Self::Md5 => of::<Md5>(salt, password),
        }
    }
}

impl Credential {
    /// A definitions `password_hash` (base64), hashed with `algorithm`; `None` when it is not
    /// base64.
    pub(crate) fn from_hash(algorithm: Option<HashAlgorithm>, base64: &str) -> Option<Self> {
        let salted = base64::engine::general_purpose::STANDARD
            .decode(base64)
            .ok()?;
        Some(Self::Hash { algorithm, salted })
    }

    /// Whether `password` is this user's. An empty password never is (RabbitMQ refuses it
    /// before looking at the user).
    pub(crate) fn verifies(&self, password: &str) -> bool {
        if password.is_empty() {
            return false;
        }
        match self {
            Self::Password(own) => own == password,
            Self::Hash {
                algorithm: Some(algorithm),
                salted,
            } => match salted.split_at_checked(4) {
                Some((salt, hash)) if !hash.is_empty() => {
                    algorithm.digest(salt, password.as_bytes()) == hash
                }
                _ => false,
            },
            Self::Hash {
                algorithm: None, ..
            } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_hashes_verify_their_password_only() {
        // Made as RabbitMQ makes them (salt 01 02 03 04), and checked by logging in to
        // RabbitMQ 3.10.8 after importing them (ORACLE.md).
        let sha256 = Credential::from_hash(
            Some(HashAlgorithm::Sha256),
            "AQIDBDB9kM21iEUzN1lZ+6VReCsdNqS0sERdAQTcY6Xs3PMz",
        )
        .expect("base64");
        assert!(sha256.verifies("secret"));
        assert!(!sha256.verifies("Secret"));
        assert!(!sha256.verifies(""));
        let sha512 = Credential::from_hash(
            Some(HashAlgorithm::Sha512),
            "CQgHBpMTJ5jX6mPK2LLBcbWDhf0PohTKKhzFlNCi28YLeGe46//nFLhlqSPjV+HjAN8jTqyK9912CKqpKULObCJ4Hzo=",
        )
        .expect("base64");
        assert!(sha512.verifies("secret5"));
        assert!(!sha512.verifies("secret"));
        // md5 over salt 01 02 03 04 and "old".
        let md5 = Credential::Hash {
            algorithm: Some(HashAlgorithm::Md5),
            salted: [
                &[1u8, 2, 3, 4][..],
                &Md5::digest(b"\x01\x02\x03\x04old")[..],
            ]
            .concat(),
        };
        assert!(md5.verifies("old"));
        assert!(!md5.verifies("new"));
        for short in ["", "AQID", "AQIDBA=="] {
            let hash = Credential::from_hash(Some(HashAlgorithm::Sha256), short).expect("base64");
            assert!(!hash.verifies(""), "{short:?} lets nothing in");
        }
        assert_eq!(
            Credential::from_hash(Some(HashAlgorithm::Sha256), "not base64!"),
            None
        );
        let unknown = Credential::Hash {
            algorithm: None,
            salted: [
                &[1u8, 2, 3, 4][..],
                &Md5::digest(b"\x01\x02\x03\x04old")[..],
            ]
            .concat(),
        };
        assert!(
            !unknown.verifies("old"),
            "an unknown algorithm lets nothing in"
        );
        assert!(Credential::Password("p".into()).verifies("p"));
        assert!(
            !Credential::Password(String::new()).verifies(""),
            "nor does an empty password"
        );
    }
}
