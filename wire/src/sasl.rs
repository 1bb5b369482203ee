//! SASL for Kafka clients (SaslHandshake v1, SaslAuthenticate): PLAIN (RFC 4616) and
//! SCRAM-SHA-256/512 (RFC 5802, 7677, as Kafka speaks them). Sans-I/O: messages in,
//! messages and decisions out; the connection does the waiting and the answering.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;

use hmac::Mac;
use hmac::SimpleHmac;
use hmac::digest::KeyInit;
use hmac::digest::core_api::BlockSizeUser;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256, Sha512};

/// The mechanisms SaslHandshake offers, in Kafka's names.
pub const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// SCRAM's stored form of a password for one hash function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredential {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScramMechanism {
    Sha256,
    Sha512,
}

impl ScramMechanism {
    pub fn name(self) -> &'static str {
        match self {
            ScramMechanism::Sha256 => "SCRAM-SHA-256",
            ScramMechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    /// The credential of `password` with `salt` and `iterations`.
    pub fn credential(self, password: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let salted = match self {
            ScramMechanism::Sha256 => salt_password::<Sha256>(password, salt, iterations),
            ScramMechanism::Sha512 => salt_password::<Sha512>(password, salt, iterations),
        };
        let client_key = self.hmac(&salted, b"Client Key");
        ScramCredential {
            salt: salt.to_vec(),
            iterations,
            stored_key: self.hash(&client_key),
            server_key: self.hmac(&salted, b"Server Key"),
        }
    }

    /// HMAC(key, data) with this mechanism's hash function.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        fn mac<D: Digest + BlockSizeUser>(key: &[u8], data: &[u8]) -> Vec<u8> {
            let mut mac = <SimpleHmac<D> as KeyInit>::new_from_slice(key)
                .expect("HMAC takes keys of any length");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            ScramMechanism::Sha256 => mac::<Sha256>(key, data),
            ScramMechanism::Sha512 => mac::<Sha512>(key, data),
        }
    }

    /// H(data) with this mechanism's hash function.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            ScramMechanism::Sha256 => Sha256::digest(data).to_vec(),
            ScramMechanism::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// SaltedPassword := Hi(password, salt, i), PBKDF2 with HMAC-H.
fn salt_password<D: Digest + BlockSizeUser + Clone + Sync>(
    password: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Vec<u8> {
    let mut salted = vec![0u8; <D as Digest>::output_size()];
    pbkdf2::pbkdf2::<SimpleHmac<D>>(password, salt, iterations, &mut salted)
        .expect("HMAC takes keys of any length");
    salted
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Scram(ScramMechanism),
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "SCRAM-SHA-256" => Some(Mechanism::Scram(ScramMechanism::Sha256)),
            "SCRAM-SHA-512" => Some(Mechanism::Scram(ScramMechanism::Sha512)),
            _ => None,
        }
    }
}

/// A malformed or refused SASL message; the exchange ends.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SaslError(pub String);

fn bad(message: impl Into<String>) -> SaslError {
    SaslError(message.into())
}

/// PLAIN's one message: `[authzid] NUL authcid NUL password`. Returns the user and the
/// password; an authorization identity other than the user is refused.
pub fn parse_plain(message: &[u8]) -> Result<(String, Vec<u8>), SaslError> {
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(user), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("PLAIN message is not authzid NUL user NUL password"));
    };
    let user = std::str::from_utf8(user).map_err(|_| bad("PLAIN user name is not UTF-8"))?;
    if !authzid.is_empty() && authzid != user.as_bytes() {
        return Err(bad("PLAIN authorization identity differs from the user"));
    }
    if user.is_empty() {
        return Err(bad("PLAIN user name is empty"));
    }
    Ok((user.to_string(), password.to_vec()))
}

/// The user a SCRAM client-first message names, before the exchange starts.
pub struct ClientFirst {
    pub user: String,
    gs2_header: String,
    bare: String,
    nonce: String,
}

impl ClientFirst {
    /// `gs2-header client-first-message-bare`: `n,,n=user,r=nonce[,ext]`.
    pub fn parse(message: &[u8]) -> Result<ClientFirst, SaslError> {
        let text = std::str::from_utf8(message).map_err(|_| bad("SCRAM message is not UTF-8"))?;
        let mut parts = text.splitn(3, ',');
        let (Some(cbind), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("SCRAM client-first message has no GS2 header"));
        };
        match cbind {
            "n" | "y" => {}
            _ if cbind.starts_with("p=") => {
                return Err(bad("SCRAM channel binding is not supported"));
            }
            _ => return Err(bad("SCRAM GS2 header is malformed")),
        }
        let mut user = None;
        let mut nonce = None;
        for attribute in bare.split(',') {
            match attribute.split_once('=') {
                Some(("n", v)) => user = Some(unescape_name(v)?),
                Some(("r", v)) if !v.is_empty() => nonce = Some(v.to_string()),
                Some(("m", _)) => return Err(bad("SCRAM mandatory extensions are not supported")),
                Some(("tokenauth", "true")) => {
                    return Err(bad("delegation tokens are not supported"));
                }
                _ => {}
            }
        }
        let (Some(user), Some(nonce)) = (user, nonce) else {
            return Err(bad("SCRAM client-first message lacks n= or r="));
        };
        if let Some(id) = authzid.strip_prefix("a=")
            && unescape_name(id)? != user
        {
            return Err(bad("SCRAM authorization identity differs from the user"));
        }
        Ok(ClientFirst {
            user,
            gs2_header: format!("{cbind},{authzid},"),
            bare: bare.to_string(),
            nonce,
        })
    }
}

/// `=2C` is `,` and `=3D` is `=` in a SCRAM user name; any other `=` is malformed.
fn unescape_name(name: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(bad("SCRAM user name has a bad escape")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A SCRAM exchange after the server's first message.
pub struct Scram {
    mechanism: ScramMechanism,
    pub user: String,
    credential: ScramCredential,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl Scram {
    /// Answers the client's first message with the salt, iterations and the joined
    /// nonce. `credential` is the user's, or a stand-in for an unknown user (the
    /// exchange then fails at the proof, as a wrong password does).
    pub fn start(
        mechanism: ScramMechanism,
        first: ClientFirst,
        credential: ScramCredential,
    ) -> (Scram, Vec<u8>) {
        let mut server_nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut server_nonce);
        let nonce = format!("{}{}", first.nonce, B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        let reply = server_first.clone().into_bytes();
        let scram = Scram {
            mechanism,
            user: first.user,
            credential,
            gs2_header: first.gs2_header,
            client_first_bare: first.bare,
            server_first,
            nonce,
        };
        (scram, reply)
    }

    /// Checks the client's final message (`c=...,r=...,p=proof`) and returns the
    /// server's final message (`v=signature`), or why the proof was refused.
    pub fn finish(&self, message: &[u8]) -> Result<Vec<u8>, SaslError> {
        let text = std::str::from_utf8(message).map_err(|_| bad("SCRAM message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or_else(|| bad("SCRAM client-final message has no proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attribute in without_proof.split(',') {
            match attribute.split_once('=') {
                Some(("c", v)) => channel = Some(v),
                Some(("r", v)) => nonce = Some(v),
                _ => {}
            }
        }
        if channel != Some(B64.encode(&self.gs2_header).as_str()) {
            return Err(bad("SCRAM channel binding does not match the GS2 header"));
        }
        // The whole nonce must come back; librdkafka repeats its own part in front of
        // it (Kafka's broker accepts that too: it checks the end).
        if !nonce.is_some_and(|n| n.ends_with(self.nonce.as_str())) {
            return Err(bad("SCRAM nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| bad("SCRAM proof is not base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let m = self.mechanism;
        let signature = m.hmac(&self.credential.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return Err(bad("SCRAM proof has the wrong length"));
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(p, s)| p ^ s).collect();
        if !equal_in_constant_time(&m.hash(&client_key), &self.credential.stored_key) {
            return Err(bad("invalid credentials"));
        }
        let server_signature = m.hmac(&self.credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_messages() {
        assert_eq!(
            parse_plain(b"\0dev1\0pw").unwrap(),
            ("dev1".to_string(), b"pw".to_vec())
        );
        assert_eq!(parse_plain(b"dev1\0dev1\0pw").unwrap().0, "dev1");
        assert!(parse_plain(b"admin\0dev1\0pw").is_err());
        assert!(parse_plain(b"dev1\0pw").is_err());
        assert!(parse_plain(b"\0\0pw").is_err());
        assert!(parse_plain(b"\0\xff\0pw").is_err());
    }

    /// RFC 7677's whole exchange: user "user", password "pencil", the client's nonce
    /// and proof from the RFC; the server's nonce is ours, so the proof is recomputed
    /// the way a client does and the RFC's figures check the key derivation.
    #[test]
    fn scram_sha256_exchange() {
        let m = ScramMechanism::Sha256;
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let credential = m.credential(b"pencil", &salt, 4096);
        let first = ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        assert_eq!(first.user, "user");
        let (scram, server_first) = Scram::start(m, first, credential.clone());
        let server_first = String::from_utf8(server_first).unwrap();
        assert!(server_first.starts_with("r=rOprNGfwEbeRWgbNEkqO"));
        assert!(server_first.ends_with(",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"));
        let nonce = &server_first[2..server_first.find(',').unwrap()];

        // The client's side, from the password.
        let salted = {
            let mut out = [0u8; 32];
            pbkdf2::pbkdf2::<hmac::SimpleHmac<sha2::Sha256>>(b"pencil", &salt, 4096, &mut out)
                .unwrap();
            out
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=user,r=rOprNGfwEbeRWgbNEkqO,{server_first},{without_proof}");
        let client_key = m.hmac(&salted, b"Client Key");
        let signature = m.hmac(&m.hash(&client_key), auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let good = format!("{without_proof},p={}", B64.encode(&proof));
        let server_final = scram.finish(good.as_bytes()).unwrap();
        let expected = m.hmac(&credential.server_key, auth_message.as_bytes());
        assert_eq!(
            server_final,
            format!("v={}", B64.encode(expected)).into_bytes()
        );

        let mut wrong = proof.clone();
        wrong[0] ^= 1;
        let bad_proof = format!("{without_proof},p={}", B64.encode(&wrong));
        assert!(scram.finish(bad_proof.as_bytes()).is_err());
        let bad_nonce = format!("c=biws,r=rOprNGfwEbeRWgbNEkqO,p={}", B64.encode(&proof));
        // librdkafka's form, its nonce in front of the whole one: the proof is then
        // over that message, so this one (computed without it) fails on the proof.
        let repeated = format!(
            "c=biws,r=rOprNGfwEbeRWgbNEkqO{nonce},p={}",
            B64.encode(&proof)
        );
        assert_eq!(
            scram.finish(repeated.as_bytes()),
            Err(bad("invalid credentials"))
        );
        assert!(scram.finish(bad_nonce.as_bytes()).is_err());
        assert!(scram.finish(b"c=biws").is_err());
        assert!(scram.finish(b"\xff").is_err());
    }

    #[test]
    fn client_first_messages() {
        assert_eq!(
            ClientFirst::parse(b"n,,n=a=2Cb=3Dc,r=x").unwrap().user,
            "a,b=c"
        );
        assert_eq!(ClientFirst::parse(b"n,a=u,n=u,r=x").unwrap().user, "u");
        for bad in [
            &b"n,a=v,n=u,r=x"[..],
            b"p=tls-unique,,n=u,r=x",
            b"n,,n=u",
            b"n,,r=x",
            b"n,,n=a=2,r=x",
            b"n,,n=u,r=x,tokenauth=true",
            b"x",
            b"\xff,,n=u,r=x",
        ] {
            assert!(
                ClientFirst::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
