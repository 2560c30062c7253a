//! BPF_PROG_RUN fixtures of the access rules: the first matching entry
//! decides a new outbound connection, no match denies, and a change of the
//! rules (a reload) switches banks so that a packet sees old or new rules.

use firewall_common::{stats::Counter, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use firewall_ctl::datapath::Side;
use firewall_tests::{
    fixture::*,
    packet::{view, Spec, TCP_SYN},
};

fn syn(dport: u16) -> Vec<u8> {
    Spec {
        tcp_flags: TCP_SYN,
        ..Spec::tcp(CLIENT, 40000 + dport, SERVER, dport)
    }
    .build()
}

fn entry(action: u8, protocol: u8, ports: (u16, u16)) -> Rule {
    Rule {
        protocol,
        port_lo: ports.0,
        port_hi: ports.1,
        ..Rule::everything(action)
    }
}

#[test]
fn the_first_matching_rule_decides_and_no_match_denies() {
    let mut fx = Fixture::new("rules").unwrap();
    fx.raise_wall(1024..=19999).unwrap();
    let to_server = Rule {
        dst_addr: SERVER,
        dst_mask: [255; 4],
        ..entry(rule_action::DENY, IPPROTO_TCP, (22, 22))
    };
    fx.set_rules(&[
        to_server,
        entry(rule_action::ALLOW, IPPROTO_TCP, (22, 80)),
        entry(rule_action::ALLOW, IPPROTO_ICMP, (0, 0)),
    ])
    .unwrap();

    let r = fx.run(Side::Internal, &syn(80));
    assert_eq!(r.action, XDP_REDIRECT);
    assert_eq!(view(&r.frame).src, FW_EXTERNAL);
    let r = fx.run(Side::Internal, &syn(22));
    assert_eq!(r.action, XDP_DROP, "the deny in front of the allow");
    let r = fx.run(Side::Internal, &syn(443));
    assert_eq!(r.action, XDP_DROP, "no rule matches");
    let udp = Spec::udp(CLIENT, 5353, SERVER, 53).build();
    assert_eq!(fx.run(Side::Internal, &udp).action, XDP_DROP);
    let ping = Spec::echo(CLIENT, SERVER, 7, true).build();
    assert_eq!(
        fx.run(Side::Internal, &ping).action,
        XDP_REDIRECT,
        "icmp, any id"
    );
    assert_eq!(fx.counter(Counter::DropRule), 3);
    assert_eq!(fx.counter(Counter::PrimaryEstablished), 2);

    // At TC the same.
    assert_eq!(
        fx.run_tc(Side::Internal, &syn(444)).action,
        2,
        "TC_ACT_SHOT"
    );
    assert_eq!(fx.counter(Counter::DropRule), 4);

    // New rules (a reload), twice: each switches banks.
    fx.set_rules(&[entry(rule_action::ALLOW, IPPROTO_UDP, (53, 53))])
        .unwrap();
    assert_eq!(fx.run(Side::Internal, &udp).action, XDP_REDIRECT);
    assert_eq!(fx.run(Side::Internal, &syn(81)).action, XDP_DROP);
    fx.set_rules(&[]).unwrap();
    let udp2 = Spec::udp(CLIENT, 5354, SERVER, 53).build();
    assert_eq!(
        fx.run(Side::Internal, &udp2).action,
        XDP_DROP,
        "no rules: nothing out"
    );
    // What is established stays: rules decide new connections only.
    assert_eq!(fx.run(Side::Internal, &udp).action, XDP_REDIRECT);
}
