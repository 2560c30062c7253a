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
    match Config::parse(text, &internal, &external) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(c) => {
            // The rules fit the datapath and read as it reads them.
            let rules = c.datapath_rules();
            assert!(!rules.is_empty() || c.rules.is_empty());
            assert!(rules.len() <= firewall_common::rules::RULE_SLOTS as usize);
            for r in &c.rules {
                assert!(!r.describe().is_empty());
            }
            let _ = firewall_common::rules::allows(&rules, 6, [10, 1, 0, 2], [192, 0, 2, 1], 80);
            // An FTP server's publishing is never in the kernel's table.
            assert!(c
                .published
                .iter()
                .all(|p| !p.ftp || c.ftp_ports.contains(&p.server.port())));
        }
    }
});
