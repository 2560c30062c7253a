//! The configuration parser: any text gets a configuration or an error
//! naming the key.
#![no_main]

use firewall_ctl::{config::Config, netif::Interface};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let internal = Interface {
        name: "vfi".into(),
        index: 2,
        networks: vec!["10.1.0.1/24".parse().unwrap()],
    };
    let external = Interface {
        name: "vfe".into(),
        index: 3,
        networks: vec!["10.2.0.1/24".parse().unwrap()],
    };
    if let Err(e) = Config::parse(text, &internal, &external) {
        assert!(!e.to_string().is_empty());
    }
});
