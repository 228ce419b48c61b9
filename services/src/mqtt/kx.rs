//! The TLS crypto provider of the front door: *ring* for everything but the X25519 key exchange, which comes
//! from aws-lc-rs.
//!
//! Every full handshake makes one X25519 key pair and one shared secret on each side. On this project's 2-core
//! benchmark machine, *ring* took ~76–125 µs for the two and aws-lc-rs ~42–77 µs in the same micro-benchmark
//! (aws-lc's x86-64 X25519 is s2n-bignum's hand-written assembly; *ring*'s is fiat-crypto's generated C). The
//! difference is under a tenth of the broker's CPU per mTLS connect. Signatures stay on *ring*, which measures
//! as fast as aws-lc-rs for ECDSA P-256 here.

use aws_lc_rs::agreement;
use aws_lc_rs::rand::SystemRandom;
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// *ring*'s provider with [`X25519`] in place of *ring*'s own X25519 (first, as in *ring*'s list), then *ring*'s
/// P-256 and P-384.
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    for group in &mut provider.kx_groups {
        if group.name() == NamedGroup::X25519 {
            *group = X25519;
        }
    }
    provider
}

/// Ephemeral ECDH on curve25519 (RFC 7748), computed by aws-lc-rs.
pub static X25519: &dyn SupportedKxGroup = &X25519Group;

#[derive(Debug)]
struct X25519Group;

impl SupportedKxGroup for X25519Group {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &SystemRandom::new())
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let public = private
            .compute_public_key()
            .map_err(|_| Error::General("X25519 public key".into()))?;
        Ok(Box::new(X25519Exchange { private, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

struct X25519Exchange {
    private: agreement::EphemeralPrivateKey,
    public: agreement::PublicKey,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // TLS 1.3 allows only the 32-byte u-coordinate; aws-lc rejects a peer key whose shared secret would be
        // all zeros (a small-order point), as RFC 8446 § 7.4.2 requires.
        if peer.len() != 32 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        agreement::agree_ephemeral(self.private, peer, PeerMisbehaved::InvalidKeyShare, |secret| {
            Ok(SharedSecret::from(secret))
        })
        .map_err(Error::from)
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_x25519() -> &'static dyn SupportedKxGroup {
        *rustls::crypto::ring::default_provider()
            .kx_groups
            .iter()
            .find(|group| group.name() == NamedGroup::X25519)
            .expect("ring has X25519")
    }

    #[test]
    fn agrees_with_ring_both_ways() {
        for (a, b) in [(X25519, ring_x25519()), (ring_x25519(), X25519), (X25519, X25519)] {
            let (a, b) = (a.start().unwrap(), b.start().unwrap());
            assert_eq!(a.pub_key().len(), 32);
            let (a_public, b_public) = (a.pub_key().to_vec(), b.pub_key().to_vec());
            let ab = a.complete(&b_public).unwrap();
            let ba = b.complete(&a_public).unwrap();
            assert_eq!(ab.secret_bytes(), ba.secret_bytes());
            assert_ne!(ab.secret_bytes(), [0u8; 32]);
        }
    }

    #[test]
    fn refuses_a_key_share_of_the_wrong_length_or_of_small_order() {
        let short = X25519.start().unwrap().complete(&[9u8; 31]).err().unwrap();
        assert_eq!(short, PeerMisbehaved::InvalidKeyShare.into());
        // u = 0 and u = 1 have small order: the shared secret would be all zeros.
        for point in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            let error = X25519.start().unwrap().complete(&point).err().unwrap();
            assert_eq!(error, PeerMisbehaved::InvalidKeyShare.into());
        }
    }

    #[test]
    fn the_provider_offers_it_first_and_keeps_the_nist_curves() {
        let names: Vec<_> = provider().kx_groups.iter().map(|group| group.name()).collect();
        assert_eq!(
            names,
            [NamedGroup::X25519, NamedGroup::secp256r1, NamedGroup::secp384r1]
        );
        assert!(std::ptr::eq(
            provider().kx_groups[0] as *const dyn SupportedKxGroup as *const u8,
            X25519 as *const dyn SupportedKxGroup as *const u8
        ));
    }
}
