//! SASL-based authentication support.

use base64::Engine;
use base64::display::Base64Display;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use rand::{self, RngExt};
use sha2::digest::FixedOutput;
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::io;
use std::iter;
use std::mem;
use std::str;

// TANDEM PATCH (see TANDEM-PATCH.md): SaltedPassword cache.
mod cache;

const NONCE_LENGTH: usize = 24;

/// The maximum SCRAM iteration count the client will accept from the server.
///
/// The iteration count is sent by the server and drives a PBKDF2 loop, so an
/// unbounded value lets a malicious or impersonating server force the client to
/// perform an arbitrary number of HMAC operations before authentication even
/// completes (a denial of service). 100_000 is ~24x the PostgreSQL default of
/// 4096 and matches the default cap the PostgreSQL JDBC driver (pgjdbc) adopted
/// for the same issue (CVE-2026-42198).
const MAX_ITERATION_COUNT: u32 = 100_000;

/// The identifier of the SCRAM-SHA-256 SASL authentication mechanism.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The identifier of the SCRAM-SHA-256-PLUS SASL authentication mechanism.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

// since postgres passwords are not required to exclude saslprep-prohibited
// characters or even be valid UTF8, we run saslprep if possible and otherwise
// return the raw password.
fn normalize(pass: &[u8]) -> Vec<u8> {
    let pass = match str::from_utf8(pass) {
        Ok(pass) => pass,
        Err(_) => return pass.to_vec(),
    };

    match stringprep::saslprep(pass) {
        Ok(pass) => pass.into_owned().into_bytes(),
        Err(_) => pass.as_bytes().to_vec(),
    }
}

pub(crate) fn hi(str: &[u8], salt: &[u8], i: u32) -> [u8; 32] {
    // TANDEM PATCH: key the HMAC once and clone the keyed state (ipad and opad
    // blocks already absorbed) per iteration, instead of re-keying it in every
    // iteration: half the SHA-256 compressions.
    let keyed = Hmac::<Sha256>::new_from_slice(str).expect("HMAC is able to accept all key sizes");
    let mut hmac = keyed.clone();
    hmac.update(salt);
    hmac.update(&[0, 0, 0, 1]);
    let mut prev = hmac.finalize().into_bytes();

    let mut hi = prev;

    for _ in 1..i {
        let mut hmac = keyed.clone();
        hmac.update(&prev);
        prev = hmac.finalize().into_bytes();

        for (hi, prev) in hi.iter_mut().zip(prev) {
            *hi ^= prev;
        }
    }

    hi.into()
}

/// TANDEM PATCH: `hi()` through the process-wide cache. Returns the
/// SaltedPassword and, on a miss, the key to insert once the server has
/// proved itself (see `ScramSha256::finish`).
fn salted_password(password: &[u8], salt: &[u8], i: u32) -> ([u8; 32], Option<cache::Key>) {
    let key = cache::Key::new(password, salt, i);
    if let Some(salted_password) = cache::global().get(&key) {
        return (salted_password, None);
    }
    (hi(password, salt, i), Some(key))
}

/// TANDEM PATCH, for tests: whether the process-wide SCRAM cache holds a
/// SaltedPassword for this password (before SASLprep, as given to
/// [`ScramSha256::new`]), salt (decoded) and iteration count.
#[doc(hidden)]
pub fn salted_password_is_cached(password: &[u8], salt: &[u8], iterations: u32) -> bool {
    cache::global().contains(&cache::Key::new(&normalize(password), salt, iterations))
}

enum ChannelBindingInner {
    Unrequested,
    Unsupported,
    TlsServerEndPoint(Vec<u8>),
}

/// The channel binding configuration for a SCRAM authentication exchange.
pub struct ChannelBinding(ChannelBindingInner);

impl ChannelBinding {
    /// The server did not request channel binding.
    pub fn unrequested() -> ChannelBinding {
        ChannelBinding(ChannelBindingInner::Unrequested)
    }

    /// The server requested channel binding but the client is unable to provide it.
    pub fn unsupported() -> ChannelBinding {
        ChannelBinding(ChannelBindingInner::Unsupported)
    }

    /// The server requested channel binding and the client will use the `tls-server-end-point`
    /// method.
    pub fn tls_server_end_point(signature: Vec<u8>) -> ChannelBinding {
        ChannelBinding(ChannelBindingInner::TlsServerEndPoint(signature))
    }

    fn gs2_header(&self) -> &'static str {
        match self.0 {
            ChannelBindingInner::Unrequested => "y,,",
            ChannelBindingInner::Unsupported => "n,,",
            ChannelBindingInner::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn cbind_data(&self) -> &[u8] {
        match self.0 {
            ChannelBindingInner::Unrequested | ChannelBindingInner::Unsupported => &[],
            ChannelBindingInner::TlsServerEndPoint(ref buf) => buf,
        }
    }
}

enum State {
    Update {
        nonce: String,
        password: Vec<u8>,
        channel_binding: ChannelBinding,
    },
    Finish {
        salted_password: [u8; 32],
        auth_message: String,
        // TANDEM PATCH: set on a cache miss, inserted once the server is verified.
        cache_key: Option<cache::Key>,
    },
    Done,
}

/// A type which handles the client side of the SCRAM-SHA-256/SCRAM-SHA-256-PLUS authentication
/// process.
///
/// During the authentication process, if the backend sends an `AuthenticationSASL` message which
/// includes `SCRAM-SHA-256` as an authentication mechanism, this type can be used.
///
/// After a `ScramSha256` is constructed, the buffer returned by the `message()` method should be
/// sent to the backend in a `SASLInitialResponse` message along with the mechanism name.
///
/// The server will reply with an `AuthenticationSASLContinue` message. Its contents should be
/// passed to the `update()` method, after which the buffer returned by the `message()` method
/// should be sent to the backend in a `SASLResponse` message.
///
/// The server will reply with an `AuthenticationSASLFinal` message. Its contents should be passed
/// to the `finish()` method, after which the authentication process is complete.
pub struct ScramSha256 {
    message: String,
    state: State,
}

impl ScramSha256 {
    /// Constructs a new instance which will use the provided password for authentication.
    pub fn new(password: &[u8], channel_binding: ChannelBinding) -> ScramSha256 {
        // rand 0.5's ThreadRng is cryptographically secure
        let mut rng = rand::rng();
        let nonce = (0..NONCE_LENGTH)
            .map(|_| {
                let mut v = rng.random_range(0x21u8..0x7e);
                if v == 0x2c {
                    v = 0x7e
                }
                v as char
            })
            .collect::<String>();

        ScramSha256::new_inner(password, channel_binding, nonce)
    }

    fn new_inner(password: &[u8], channel_binding: ChannelBinding, nonce: String) -> ScramSha256 {
        ScramSha256 {
            message: format!("{}n=,r={}", channel_binding.gs2_header(), nonce),
            state: State::Update {
                nonce,
                password: normalize(password),
                channel_binding,
            },
        }
    }

    /// Returns the message which should be sent to the backend in an `SASLResponse` message.
    pub fn message(&self) -> &[u8] {
        if let State::Done = self.state {
            panic!("invalid SCRAM state");
        }
        self.message.as_bytes()
    }

    /// Updates the state machine with the response from the backend.
    ///
    /// This should be called when an `AuthenticationSASLContinue` message is received.
    pub fn update(&mut self, message: &[u8]) -> io::Result<()> {
        let (client_nonce, password, channel_binding) =
            match mem::replace(&mut self.state, State::Done) {
                State::Update {
                    nonce,
                    password,
                    channel_binding,
                } => (nonce, password, channel_binding),
                _ => return Err(io::Error::other("invalid SCRAM state")),
            };

        let message =
            str::from_utf8(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;

        let parsed = Parser::new(message).server_first_message()?;

        if !parsed.nonce.starts_with(&client_nonce) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid nonce"));
        }

        if parsed.iteration_count > MAX_ITERATION_COUNT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "SCRAM iteration count exceeds the maximum allowed",
            ));
        }

        let salt = match STANDARD.decode(parsed.salt) {
            Ok(salt) => salt,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        };

        // TANDEM PATCH: was `hi(&password, &salt, parsed.iteration_count)`.
        let (salted_password, cache_key) =
            salted_password(&password, &salt, parsed.iteration_count);

        let mut hmac = Hmac::<Sha256>::new_from_slice(&salted_password)
            .expect("HMAC is able to accept all key sizes");
        hmac.update(b"Client Key");
        let client_key = hmac.finalize().into_bytes();

        let mut hash = Sha256::default();
        hash.update(client_key);
        let stored_key = hash.finalize_fixed();

        let mut cbind_input = vec![];
        cbind_input.extend(channel_binding.gs2_header().as_bytes());
        cbind_input.extend(channel_binding.cbind_data());
        let cbind_input = STANDARD.encode(&cbind_input);

        self.message.clear();
        write!(&mut self.message, "c={},r={}", cbind_input, parsed.nonce).unwrap();

        let auth_message = format!("n=,r={},{},{}", client_nonce, message, self.message);

        let mut hmac = Hmac::<Sha256>::new_from_slice(&stored_key)
            .expect("HMAC is able to accept all key sizes");
        hmac.update(auth_message.as_bytes());
        let client_signature = hmac.finalize().into_bytes();

        let mut client_proof = client_key;
        for (proof, signature) in client_proof.iter_mut().zip(client_signature) {
            *proof ^= signature;
        }

        write!(
            &mut self.message,
            ",p={}",
            Base64Display::new(&client_proof, &STANDARD)
        )
        .unwrap();

        self.state = State::Finish {
            salted_password,
            auth_message,
            cache_key,
        };
        Ok(())
    }

    /// Finalizes the authentication process.
    ///
    /// This should be called when the backend sends an `AuthenticationSASLFinal` message.
    /// Authentication has only succeeded if this method returns `Ok(())`.
    pub fn finish(&mut self, message: &[u8]) -> io::Result<()> {
        let (salted_password, auth_message, cache_key) =
            match mem::replace(&mut self.state, State::Done) {
                State::Finish {
                    salted_password,
                    auth_message,
                    cache_key,
                } => (salted_password, auth_message, cache_key),
                _ => return Err(io::Error::other("invalid SCRAM state")),
            };

        let message =
            str::from_utf8(message).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;

        let parsed = Parser::new(message).server_final_message()?;

        let verifier = match parsed {
            ServerFinalMessage::Error(e) => {
                return Err(io::Error::other(format!("SCRAM error: {e}")));
            }
            ServerFinalMessage::Verifier(verifier) => verifier,
        };

        let verifier = match STANDARD.decode(verifier) {
            Ok(verifier) => verifier,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidInput, e)),
        };

        let mut hmac = Hmac::<Sha256>::new_from_slice(&salted_password)
            .expect("HMAC is able to accept all key sizes");
        hmac.update(b"Server Key");
        let server_key = hmac.finalize().into_bytes();

        let mut hmac = Hmac::<Sha256>::new_from_slice(&server_key)
            .expect("HMAC is able to accept all key sizes");
        hmac.update(auth_message.as_bytes());
        hmac.verify_slice(&verifier)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "SCRAM verification error"))?;

        // TANDEM PATCH: the server knows the verifier derived from this
        // SaltedPassword, so it is the right one: keep it for the next login.
        if let Some(key) = cache_key {
            cache::global().insert(key, salted_password);
        }
        Ok(())
    }
}

struct Parser<'a> {
    s: &'a str,
    it: iter::Peekable<str::CharIndices<'a>>,
}

impl<'a> Parser<'a> {
    fn new(s: &'a str) -> Parser<'a> {
        Parser {
            s,
            it: s.char_indices().peekable(),
        }
    }

    fn eat(&mut self, target: char) -> io::Result<()> {
        match self.it.next() {
            Some((_, c)) if c == target => Ok(()),
            Some((i, c)) => {
                let m =
                    format!("unexpected character at byte {i}: expected `{target}` but got `{c}");
                Err(io::Error::new(io::ErrorKind::InvalidInput, m))
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "unexpected EOF",
            )),
        }
    }

    fn take_while<F>(&mut self, f: F) -> io::Result<&'a str>
    where
        F: Fn(char) -> bool,
    {
        let start = match self.it.peek() {
            Some(&(i, _)) => i,
            None => return Ok(""),
        };

        loop {
            match self.it.peek() {
                Some(&(_, c)) if f(c) => {
                    self.it.next();
                }
                Some(&(i, _)) => return Ok(&self.s[start..i]),
                None => return Ok(&self.s[start..]),
            }
        }
    }

    fn printable(&mut self) -> io::Result<&'a str> {
        self.take_while(|c| matches!(c, '\x21'..='\x2b' | '\x2d'..='\x7e'))
    }

    fn nonce(&mut self) -> io::Result<&'a str> {
        self.eat('r')?;
        self.eat('=')?;
        self.printable()
    }

    fn base64(&mut self) -> io::Result<&'a str> {
        self.take_while(|c| matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '/' | '+' | '='))
    }

    fn salt(&mut self) -> io::Result<&'a str> {
        self.eat('s')?;
        self.eat('=')?;
        self.base64()
    }

    fn posit_number(&mut self) -> io::Result<u32> {
        let n = self.take_while(|c| c.is_ascii_digit())?;
        n.parse()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn iteration_count(&mut self) -> io::Result<u32> {
        self.eat('i')?;
        self.eat('=')?;
        self.posit_number()
    }

    fn eof(&mut self) -> io::Result<()> {
        match self.it.peek() {
            Some(&(i, _)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected trailing data at byte {i}"),
            )),
            None => Ok(()),
        }
    }

    fn server_first_message(&mut self) -> io::Result<ServerFirstMessage<'a>> {
        let nonce = self.nonce()?;
        self.eat(',')?;
        let salt = self.salt()?;
        self.eat(',')?;
        let iteration_count = self.iteration_count()?;
        self.eof()?;

        Ok(ServerFirstMessage {
            nonce,
            salt,
            iteration_count,
        })
    }

    fn value(&mut self) -> io::Result<&'a str> {
        self.take_while(|c| !matches!(c, '\0' | '=' | ','))
    }

    fn server_error(&mut self) -> io::Result<Option<&'a str>> {
        match self.it.peek() {
            Some(&(_, 'e')) => {}
            _ => return Ok(None),
        }

        self.eat('e')?;
        self.eat('=')?;
        self.value().map(Some)
    }

    fn verifier(&mut self) -> io::Result<&'a str> {
        self.eat('v')?;
        self.eat('=')?;
        self.base64()
    }

    fn server_final_message(&mut self) -> io::Result<ServerFinalMessage<'a>> {
        let message = match self.server_error()? {
            Some(error) => ServerFinalMessage::Error(error),
            None => ServerFinalMessage::Verifier(self.verifier()?),
        };
        self.eof()?;
        Ok(message)
    }
}

struct ServerFirstMessage<'a> {
    nonce: &'a str,
    salt: &'a str,
    iteration_count: u32,
}

enum ServerFinalMessage<'a> {
    Error(&'a str),
    Verifier(&'a str),
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parse_server_first_message() {
        let message = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
        let message = Parser::new(message).server_first_message().unwrap();
        assert_eq!(message.nonce, "fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j");
        assert_eq!(message.salt, "QSXCR+Q6sek8bf92");
        assert_eq!(message.iteration_count, 4096);
    }

    #[test]
    fn parse_server_error_message() {
        let message = "e=invalid-proof";
        match Parser::new(message).server_final_message().unwrap() {
            ServerFinalMessage::Error(error) => assert_eq!(error, "invalid-proof"),
            ServerFinalMessage::Verifier(_) => panic!("expected server error"),
        }

        // the error value ends at the first '\0', '=' or ','
        for message in ["invalid-proof\0x", "invalid-proof=x", "invalid-proof,x"] {
            assert_eq!(Parser::new(message).value().unwrap(), "invalid-proof");
        }
    }

    // recorded auth exchange from psql
    #[test]
    fn exchange() {
        let password = "foobar";
        let nonce = "9IZ2O01zb9IgiIZ1WJ/zgpJB";

        let client_first = "n,,n=,r=9IZ2O01zb9IgiIZ1WJ/zgpJB";
        let server_first = "r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i\
             =4096";
        let client_final = "c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,p=AmNKosjJzS3\
             1NTlQYNs5BTeQjdHdk7lOflDo5re2an8=";
        let server_final = "v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=";

        let mut scram = ScramSha256::new_inner(
            password.as_bytes(),
            ChannelBinding::unsupported(),
            nonce.to_string(),
        );
        assert_eq!(str::from_utf8(scram.message()).unwrap(), client_first);

        scram.update(server_first.as_bytes()).unwrap();
        assert_eq!(str::from_utf8(scram.message()).unwrap(), client_final);

        scram.finish(server_final.as_bytes()).unwrap();
    }

    #[test]
    fn excessive_iteration_count_is_rejected() {
        // a malicious server cannot force an unbounded PBKDF2 loop; the iteration
        // count is rejected before `hi()` runs.
        let nonce = "9IZ2O01zb9IgiIZ1WJ/zgpJB";
        let server_first =
            "r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i=1000000";

        let mut scram =
            ScramSha256::new_inner(b"foobar", ChannelBinding::unsupported(), nonce.to_string());
        assert!(scram.update(server_first.as_bytes()).is_err());
    }
}

// TANDEM PATCH: tests of the keyed-once `hi()` and the SaltedPassword cache.
#[cfg(test)]
mod tandem_patch_test {
    use super::*;

    /// `hi()` as published in 0.6.12: re-keys the HMAC in every iteration.
    fn hi_rekeying(str: &[u8], salt: &[u8], i: u32) -> [u8; 32] {
        let mut hmac = Hmac::<Sha256>::new_from_slice(str).unwrap();
        hmac.update(salt);
        hmac.update(&[0, 0, 0, 1]);
        let mut prev = hmac.finalize().into_bytes();
        let mut hi = prev;
        for _ in 1..i {
            let mut hmac = Hmac::<Sha256>::new_from_slice(str).unwrap();
            hmac.update(&prev);
            prev = hmac.finalize().into_bytes();
            for (hi, prev) in hi.iter_mut().zip(prev) {
                *hi ^= prev;
            }
        }
        hi.into()
    }

    /// ClientProof and ServerSignature from a SaltedPassword (RFC 5802, section 3).
    fn proof_and_signature(salted_password: &[u8; 32], auth_message: &str) -> (String, String) {
        let mac = |key: &[u8], data: &[u8]| {
            let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
            m.update(data);
            m.finalize().into_bytes()
        };
        let client_key = mac(salted_password, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let client_signature = mac(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        let server_key = mac(salted_password, b"Server Key");
        let server_signature = mac(&server_key, auth_message.as_bytes());
        (STANDARD.encode(proof), STANDARD.encode(server_signature))
    }

    #[test]
    fn keyed_once_hi_matches_the_rekeying_original() {
        // Keys shorter and longer than the SHA-256 block (the latter are hashed first).
        let long_key = [0x5a_u8; 100];
        for (password, salt) in [
            (&b"pencil"[..], &b"salt"[..]),
            (b"", b"\x00\x01"),
            (&long_key[..], b"a longer salt of 24 bytes"),
        ] {
            for i in [1, 2, 3, 4096] {
                assert_eq!(
                    hi(password, salt, i),
                    hi_rekeying(password, salt, i),
                    "i={i}"
                );
            }
        }
    }

    /// RFC 7677, section 3 (user "user", password "pencil"). PostgreSQL sends
    /// an empty user name, so the exchange itself cannot go through
    /// `ScramSha256`; the proof and signature are computed from the
    /// SaltedPassword the cache path returns, uncached and then cached.
    #[test]
    fn rfc7677_vector_uncached_and_cached() {
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let client_final_without_proof =
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let auth_message =
            format!("{client_first_bare},{server_first},{client_final_without_proof}");
        let expected = (
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".to_string(),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_string(),
        );

        let password = normalize(b"pencil");
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        // No other test uses this password: the first lookup misses.
        let (uncached, key) = salted_password(&password, &salt, 4096);
        let key = key.expect("a miss returns the key to insert");
        assert_eq!(uncached, hi_rekeying(&password, &salt, 4096));
        assert_eq!(proof_and_signature(&uncached, &auth_message), expected);

        cache::global().insert(key, uncached);
        assert!(salted_password_is_cached(b"pencil", &salt, 4096));
        let (cached, key) = salted_password(&password, &salt, 4096);
        assert!(key.is_none(), "a hit");
        assert_eq!(proof_and_signature(&cached, &auth_message), expected);

        // Another password, salt or iteration count is a miss.
        let (_, key) = salted_password(&normalize(b"pencil2"), &salt, 4096);
        assert!(key.is_some());
        let (_, key) = salted_password(&password, b"other salt", 4096);
        assert!(key.is_some());
        let (_, key) = salted_password(&password, &salt, 4097);
        assert!(key.is_some());
    }

    /// A recorded psql exchange (empty user name, as PostgreSQL sends it):
    /// done twice, the second time from the cache; then a wrong password
    /// against the same salt fails and is not cached.
    #[test]
    fn exchange_is_cached_only_after_the_server_is_verified() {
        let nonce = "9IZ2O01zb9IgiIZ1WJ/zgpJB";
        let server_first = "r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i\
             =4096";
        let client_final = "c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,p=AmNKosjJzS3\
             1NTlQYNs5BTeQjdHdk7lOflDo5re2an8=";
        let server_final = "v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=";
        let salt = STANDARD.decode("fs3IXBy7U7+IvVjZ").unwrap();
        let scram = |password: &[u8]| {
            ScramSha256::new_inner(password, ChannelBinding::unsupported(), nonce.to_string())
        };

        // (The upstream `exchange` test may cache the same login concurrently,
        // so the first login here may already be a hit.)
        let mut s = scram(b"foobar");
        s.update(server_first.as_bytes()).unwrap();
        assert_eq!(str::from_utf8(s.message()).unwrap(), client_final);
        s.finish(server_final.as_bytes()).unwrap();
        assert!(salted_password_is_cached(b"foobar", &salt, 4096));

        let mut s = scram(b"foobar");
        s.update(server_first.as_bytes()).unwrap();
        assert!(
            matches!(
                s.state,
                State::Finish {
                    cache_key: None,
                    ..
                }
            ),
            "a cache hit"
        );
        assert_eq!(str::from_utf8(s.message()).unwrap(), client_final);
        s.finish(server_final.as_bytes()).unwrap();

        let mut s = scram(b"foobaz");
        s.update(server_first.as_bytes()).unwrap();
        assert_ne!(str::from_utf8(s.message()).unwrap(), client_final);
        let e = s.finish(server_final.as_bytes()).unwrap_err();
        assert_eq!(e.to_string(), "SCRAM verification error");
        assert!(!salted_password_is_cached(b"foobaz", &salt, 4096));
    }

    /// A password no other test uses, with the server's answers computed here.
    #[test]
    fn inserted_when_finish_verifies_the_server_not_before() {
        let nonce = "Zq8rT2vX5yB7dF1hJ4lN6pR9";
        let server_first = format!("r={nonce}srv,s=dGFuZGVtLXNhbHQ=,i=4096");
        let salt = b"tandem-salt";
        let mut s = ScramSha256::new_inner(
            b"only-here",
            ChannelBinding::unsupported(),
            nonce.to_string(),
        );
        s.update(server_first.as_bytes()).unwrap();
        assert!(!salted_password_is_cached(b"only-here", salt, 4096));

        let client_final = str::from_utf8(s.message()).unwrap().to_string();
        let without_proof = &client_final[..client_final.find(",p=").unwrap()];
        let auth_message = format!("n=,r={nonce},{server_first},{without_proof}");
        let salted = hi(&normalize(b"only-here"), salt, 4096);
        let (proof, signature) = proof_and_signature(&salted, &auth_message);
        assert_eq!(client_final, format!("{without_proof},p={proof}"));
        s.finish(format!("v={signature}").as_bytes()).unwrap();
        assert!(salted_password_is_cached(b"only-here", salt, 4096));
    }

    #[test]
    fn a_server_error_caches_nothing() {
        let nonce = "Ab3dE6gH9jK2mN5pQ8sT1vW4";
        let server_first = format!("r={nonce}srv,s=c2FsdC1mb3ItZXJyb3I=,i=4096");
        let mut s = ScramSha256::new_inner(
            b"rejected",
            ChannelBinding::unsupported(),
            nonce.to_string(),
        );
        s.update(server_first.as_bytes()).unwrap();
        assert!(s.finish(b"e=invalid-proof").is_err());
        assert!(!salted_password_is_cached(
            b"rejected",
            b"salt-for-error",
            4096
        ));
    }
}
