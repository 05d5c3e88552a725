//! The handshake of a peer connection: hellos, proofs and refusals, laid out byte by
//! byte in the header of [`super`].
//!
//! The encoding and the proofs are pure functions; [`dial`] and [`accept`] only move
//! their bytes over a socket. Neither sends the secret, reads more than
//! [`MAX_HANDSHAKE_BYTES`], nor bounds its own time: the caller wraps them in
//! [`PeerConfig::handshake_timeout`] and then, on a refusal, calls [`refuse`].

use std::io;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    ClusterSecret, HostAddr, PeerConfig, RefusalReason, MAX_HOST_ADDR_BYTES, PROTOCOL_VERSION,
};

pub(crate) const MAGIC: [u8; 4] = *b"SHLP";
pub(crate) const NONCE_BYTES: usize = 32;
pub(crate) const PROOF_BYTES: usize = 32;
/// Magic and version: read and checked before the rest of a hello.
const PREFIX_BYTES: usize = 6;
/// Role, nonce and identity length: the fixed part of a hello after the prefix.
const FIXED_BYTES: usize = 1 + NONCE_BYTES + 1;
pub(crate) const MAX_HELLO_BYTES: usize = PREFIX_BYTES + FIXED_BYTES + MAX_HOST_ADDR_BYTES;
/// The most a side reads before it is authenticated or refused: a hello, then a proof.
pub(crate) const MAX_HANDSHAKE_BYTES: usize = MAX_HELLO_BYTES + 1 + PROOF_BYTES;
pub(crate) const TAG_PROOF: u8 = 0x01;
pub(crate) const TAG_REFUSAL: u8 = 0x02;
const PROOF_LABEL: &[u8; 16] = b"shoal-peer-proof";

/// Longest a refusing side spends telling the peer and waiting for it to close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes a refusing side reads and discards while it waits for the peer to close.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

const _: () = assert!(MAX_HANDSHAKE_BYTES == 328);

/// Which end of the connection a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Dialer = 0x01,
    Acceptor = 0x02,
}

impl Role {
    fn from_byte(byte: u8) -> Option<Role> {
        match byte {
            0x01 => Some(Role::Dialer),
            0x02 => Some(Role::Acceptor),
            _ => None,
        }
    }
}

/// The first message of each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    pub(crate) version: u16,
    pub(crate) role: Role,
    pub(crate) nonce: [u8; NONCE_BYTES],
    pub(crate) identity: HostAddr,
}

impl Hello {
    /// This build's hello, with a fresh nonce.
    pub(crate) fn new(role: Role, identity: HostAddr) -> io::Result<Hello> {
        let mut nonce = [0; NONCE_BYTES];
        getrandom::fill(&mut nonce)
            .map_err(|error| io::Error::other(format!("cannot draw a handshake nonce: {error}")))?;
        Ok(Hello {
            version: PROTOCOL_VERSION,
            role,
            nonce,
            identity,
        })
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let identity = self.identity.as_str().as_bytes();
        let mut out = Vec::with_capacity(PREFIX_BYTES + FIXED_BYTES + identity.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.push(self.role as u8);
        out.extend_from_slice(&self.nonce);
        // A HostAddr has at most MAX_HOST_ADDR_BYTES, which fits in a byte.
        out.push(identity.len() as u8);
        out.extend_from_slice(identity);
        out
    }

    /// Decodes a whole hello of this version.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Hello, RefusalReason> {
        let prefix = bytes.get(..PREFIX_BYTES).ok_or(RefusalReason::Malformed)?;
        let version = check_prefix(prefix)?;
        let fixed = bytes
            .get(PREFIX_BYTES..PREFIX_BYTES + FIXED_BYTES)
            .ok_or(RefusalReason::Malformed)?;
        let role = Role::from_byte(fixed[0]).ok_or(RefusalReason::Malformed)?;
        let mut nonce = [0; NONCE_BYTES];
        nonce.copy_from_slice(&fixed[1..1 + NONCE_BYTES]);
        let identity_len = fixed[1 + NONCE_BYTES] as usize;
        let identity = &bytes[PREFIX_BYTES + FIXED_BYTES..];
        if identity.len() != identity_len {
            return Err(RefusalReason::Malformed);
        }
        let identity = HostAddr::from_bytes(identity).map_err(|_| RefusalReason::Malformed)?;
        Ok(Hello {
            version,
            role,
            nonce,
            identity,
        })
    }
}

/// Checks the magic and the version at the start of a hello; returns the version.
fn check_prefix(prefix: &[u8]) -> Result<u16, RefusalReason> {
    if prefix.len() != PREFIX_BYTES || prefix[..MAGIC.len()] != MAGIC {
        return Err(RefusalReason::NotAPeer);
    }
    let version = u16::from_be_bytes([prefix[4], prefix[5]]);
    if version != PROTOCOL_VERSION {
        return Err(RefusalReason::VersionMismatch);
    }
    Ok(version)
}

/// The keyed MAC by which `prover` shows that it holds the secret, fed with the proof
/// message; finalize it to send, or verify a received proof with it.
pub(crate) fn proof(
    secret: &ClusterSecret,
    prover: Role,
    dialer_nonce: &[u8; NONCE_BYTES],
    acceptor_nonce: &[u8; NONCE_BYTES],
    prover_identity: &HostAddr,
) -> Hmac<Sha256> {
    let identity = prover_identity.as_str().as_bytes();
    let mut mac = secret.mac();
    mac.update(PROOF_LABEL);
    mac.update(&PROTOCOL_VERSION.to_be_bytes());
    mac.update(&[prover as u8]);
    mac.update(dialer_nonce);
    mac.update(acceptor_nonce);
    mac.update(&[identity.len() as u8]);
    mac.update(identity);
    mac
}

/// The proof message: its tag, then the MAC.
fn proof_message(mac: Hmac<Sha256>) -> [u8; 1 + PROOF_BYTES] {
    let mut message = [TAG_PROOF; 1 + PROOF_BYTES];
    message[1..].copy_from_slice(&mac.finalize().into_bytes());
    message
}

/// How a handshake ended without a connection.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// This side refused the peer; the caller tells it with [`refuse`].
    WeRefused(RefusalReason),
    /// The peer refused this side.
    TheyRefused(RefusalReason),
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(error: io::Error) -> HandshakeError {
        HandshakeError::Io(error)
    }
}

/// Reads the peer's hello, which must come from `expected` and speak this version.
pub(crate) async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    expected: Role,
) -> Result<Hello, HandshakeError> {
    let mut bytes = [0; MAX_HELLO_BYTES];
    stream.read_exact(&mut bytes[..PREFIX_BYTES]).await?;
    check_prefix(&bytes[..PREFIX_BYTES]).map_err(HandshakeError::WeRefused)?;
    let fixed_end = PREFIX_BYTES + FIXED_BYTES;
    stream
        .read_exact(&mut bytes[PREFIX_BYTES..fixed_end])
        .await?;
    let identity_len = bytes[fixed_end - 1] as usize;
    stream
        .read_exact(&mut bytes[fixed_end..fixed_end + identity_len])
        .await?;
    let hello =
        Hello::decode(&bytes[..fixed_end + identity_len]).map_err(HandshakeError::WeRefused)?;
    if hello.role != expected {
        return Err(HandshakeError::WeRefused(RefusalReason::Malformed));
    }
    Ok(hello)
}

/// Reads a proof or a refusal; returns the proof.
async fn read_proof<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<[u8; PROOF_BYTES], HandshakeError> {
    match stream.read_u8().await? {
        TAG_PROOF => {
            let mut proof = [0; PROOF_BYTES];
            stream.read_exact(&mut proof).await?;
            Ok(proof)
        }
        TAG_REFUSAL => {
            let code = stream.read_u8().await?;
            Err(HandshakeError::TheyRefused(RefusalReason::from_code(code)))
        }
        _ => Err(HandshakeError::WeRefused(RefusalReason::Malformed)),
    }
}

/// The dialer's side. Returns the identity the acceptor proved.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    config: &PeerConfig,
) -> Result<HostAddr, HandshakeError> {
    let ours = Hello::new(Role::Dialer, config.identity.clone())?;
    stream.write_all(&ours.encode()).await?;
    let theirs = read_hello(stream, Role::Acceptor).await?;
    let our_proof = proof(
        &config.secret,
        Role::Dialer,
        &ours.nonce,
        &theirs.nonce,
        &ours.identity,
    );
    stream.write_all(&proof_message(our_proof)).await?;
    let their_proof = read_proof(stream).await?;
    proof(
        &config.secret,
        Role::Acceptor,
        &ours.nonce,
        &theirs.nonce,
        &theirs.identity,
    )
    .verify_slice(&their_proof)
    .map_err(|_| HandshakeError::WeRefused(RefusalReason::WrongSecret))?;
    Ok(theirs.identity)
}

/// The acceptor's side. Returns the identity the dialer proved.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    config: &PeerConfig,
) -> Result<HostAddr, HandshakeError> {
    let ours = Hello::new(Role::Acceptor, config.identity.clone())?;
    stream.write_all(&ours.encode()).await?;
    let theirs = read_hello(stream, Role::Dialer).await?;
    let their_proof = read_proof(stream).await?;
    proof(
        &config.secret,
        Role::Dialer,
        &theirs.nonce,
        &ours.nonce,
        &theirs.identity,
    )
    .verify_slice(&their_proof)
    .map_err(|_| HandshakeError::WeRefused(RefusalReason::WrongSecret))?;
    let our_proof = proof(
        &config.secret,
        Role::Acceptor,
        &theirs.nonce,
        &ours.nonce,
        &ours.identity,
    );
    stream.write_all(&proof_message(our_proof)).await?;
    Ok(theirs.identity)
}

/// Tells the peer why it is refused (except one that is no Shoal peer), then closes
/// the sending side and reads until the peer closes too, so that the refusal is not
/// lost to a reset. Bounded by [`REFUSAL_LINGER`].
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reason: RefusalReason,
) {
    let linger = async {
        if reason != RefusalReason::NotAPeer {
            stream.write_all(&[TAG_REFUSAL, reason.code()]).await.ok()?;
        }
        stream.shutdown().await.ok()?;
        let mut drained = 0;
        let mut scratch = [0; 4096];
        while drained < REFUSAL_DRAIN_BYTES {
            match stream.read(&mut scratch).await.ok()? {
                0 => break,
                read => drained += read,
            }
        }
        Some(())
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> ClusterSecret {
        ClusterSecret::new(&[byte; 32]).unwrap()
    }

    fn host(name: &str) -> HostAddr {
        HostAddr::new(name).unwrap()
    }

    #[test]
    fn hellos_round_trip_with_their_documented_layout() {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Acceptor,
            nonce: [7; NONCE_BYTES],
            identity: host("10.0.0.1:7001"),
        };
        let bytes = hello.encode();
        assert_eq!(&bytes[..4], b"SHLP");
        assert_eq!(&bytes[4..6], &PROTOCOL_VERSION.to_be_bytes());
        assert_eq!(bytes[6], 0x02);
        assert_eq!(&bytes[7..39], &[7; 32]);
        assert_eq!(bytes[39] as usize, "10.0.0.1:7001".len());
        assert_eq!(&bytes[40..], b"10.0.0.1:7001");
        assert_eq!(Hello::decode(&bytes), Ok(hello));
    }

    #[test]
    fn bad_hellos_are_refused_with_their_reason() {
        let good = Hello::new(Role::Dialer, host("a:1")).unwrap().encode();
        let mut other_version = good.clone();
        other_version[5] = other_version[5].wrapping_add(1);
        assert_eq!(
            Hello::decode(&other_version),
            Err(RefusalReason::VersionMismatch)
        );
        let mut other_magic = good.clone();
        other_magic[0] = b'X';
        assert_eq!(Hello::decode(&other_magic), Err(RefusalReason::NotAPeer));
        let mut bad_role = good.clone();
        bad_role[6] = 9;
        assert_eq!(Hello::decode(&bad_role), Err(RefusalReason::Malformed));
        let mut long_identity = good.clone();
        long_identity[39] = 200;
        assert_eq!(Hello::decode(&long_identity), Err(RefusalReason::Malformed));
        let mut unprintable = good.clone();
        *unprintable.last_mut().unwrap() = b'\n';
        assert_eq!(Hello::decode(&unprintable), Err(RefusalReason::Malformed));
        let mut empty_identity = good[..40].to_vec();
        empty_identity[39] = 0;
        assert_eq!(
            Hello::decode(&empty_identity),
            Err(RefusalReason::Malformed)
        );
        for cut in 0..good.len() {
            assert!(Hello::decode(&good[..cut]).is_err());
        }
    }

    #[test]
    fn a_proof_holds_only_for_its_secret_role_nonces_and_identity() {
        let (dialer_nonce, acceptor_nonce) = ([1; NONCE_BYTES], [2; NONCE_BYTES]);
        let sent = proof(
            &secret(1),
            Role::Dialer,
            &dialer_nonce,
            &acceptor_nonce,
            &host("a:1"),
        )
        .finalize()
        .into_bytes();
        let check = |secret: &ClusterSecret, role, dialer, acceptor, identity: &str| {
            proof(secret, role, dialer, acceptor, &host(identity))
                .verify_slice(&sent)
                .is_ok()
        };
        assert!(check(
            &secret(1),
            Role::Dialer,
            &dialer_nonce,
            &acceptor_nonce,
            "a:1"
        ));
        assert!(!check(
            &secret(2),
            Role::Dialer,
            &dialer_nonce,
            &acceptor_nonce,
            "a:1"
        ));
        assert!(!check(
            &secret(1),
            Role::Acceptor,
            &dialer_nonce,
            &acceptor_nonce,
            "a:1"
        ));
        assert!(!check(
            &secret(1),
            Role::Dialer,
            &acceptor_nonce,
            &dialer_nonce,
            "a:1"
        ));
        assert!(!check(
            &secret(1),
            Role::Dialer,
            &dialer_nonce,
            &acceptor_nonce,
            "a:2"
        ));
    }

    #[test]
    fn nonces_differ_between_hellos() {
        let first = Hello::new(Role::Dialer, host("a:1")).unwrap();
        let second = Hello::new(Role::Dialer, host("a:1")).unwrap();
        assert_ne!(first.nonce, second.nonce);
    }

    #[test]
    fn refusal_codes_round_trip() {
        for code in 0..=u8::MAX {
            assert_eq!(RefusalReason::from_code(code).code(), code);
        }
        assert_eq!(
            RefusalReason::from_code(1).to_string(),
            "wrong cluster secret"
        );
        assert_eq!(
            RefusalReason::from_code(2).to_string(),
            "protocol version mismatch"
        );
        assert_eq!(RefusalReason::from_code(3).to_string(), "handshake timeout");
    }

    /// A whole handshake over an in-memory pipe, for each pairing of secrets.
    #[tokio::test]
    async fn handshakes_agree_only_on_a_shared_secret() {
        async fn run(
            dialer_secret: u8,
            acceptor_secret: u8,
        ) -> (
            Result<HostAddr, HandshakeError>,
            Result<HostAddr, HandshakeError>,
        ) {
            let (mut left, mut right) = tokio::io::duplex(4096);
            let dialer = PeerConfig::new(host("dialer:1"), secret(dialer_secret));
            let acceptor = PeerConfig::new(host("acceptor:2"), secret(acceptor_secret));
            let accepting = async {
                let result = accept(&mut right, &acceptor).await;
                if let Err(HandshakeError::WeRefused(reason)) = &result {
                    refuse(&mut right, *reason).await;
                }
                result
            };
            let dialing = async move {
                let result = dial(&mut left, &dialer).await;
                // Closing lets a refusing acceptor stop lingering.
                drop(left);
                result
            };
            tokio::join!(dialing, accepting)
        }
        let (dialed, accepted) = run(1, 1).await;
        assert_eq!(dialed.unwrap(), host("acceptor:2"));
        assert_eq!(accepted.unwrap(), host("dialer:1"));
        let (dialed, accepted) = run(1, 2).await;
        assert!(matches!(
            dialed,
            Err(HandshakeError::TheyRefused(RefusalReason::WrongSecret))
        ));
        assert!(matches!(
            accepted,
            Err(HandshakeError::WeRefused(RefusalReason::WrongSecret))
        ));
    }
}
