//! Any bytes as SASL messages (PLAIN, SCRAM client-first, SCRAM client-final after a
//! real server-first): each returns a value or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_wire::sasl::{ClientFirst, Scram, ScramMechanism, parse_plain};

fuzz_target!(|data: &[u8]| {
    let _ = parse_plain(data);
    let _ = ClientFirst::parse(data);
    // Split: a valid first message, then the fuzzer's bytes as the final one.
    let first = ClientFirst::parse(b"n,,n=user,r=fuzz").expect("valid");
    let credential = ScramMechanism::Sha256.credential(b"pw", b"salt", 1);
    let (scram, _) = Scram::start(ScramMechanism::Sha256, first, credential);
    let _ = scram.finish(data);
});
