//! The API's request parser: any line gets a request or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = firewall_ctl::api::parse_request(line);
    }
});
