//! The configuration file: defaults, a full file, the documented example,
//! and errors that name their key.

use std::time::Duration;

use super::*;

pub(super) fn ifs() -> (Interface, Interface) {
    let i = Interface {
        name: "in0".into(),
        index: 2,
        networks: vec!["10.1.0.1/24".parse().unwrap()],
    };
    let e = Interface {
        name: "ex0".into(),
        index: 3,
        networks: vec!["10.2.0.1/24".parse().unwrap()],
    };
    (i, e)
}

#[test]
fn defaults_come_from_interfaces() {
    let (i, e) = ifs();
    let c = Config::defaults(&i, &e).unwrap();
    assert_eq!(
        c.internal_networks,
        vec!["10.1.0.0/24".parse::<Ipv4Net>().unwrap()]
    );
    assert_eq!(c.external_addresses, vec![Ipv4Addr::new(10, 2, 0, 1)]);
    assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
    assert_eq!(c.port_range, DEFAULT_PORT_RANGE);
    assert_eq!(c.protocols[0].name, "ftp");
    assert_eq!(c.protocols[0].clients, c.internal_networks);
    assert_eq!(c.networks[0].ranges, c.internal_networks);
    assert!(c.default_allowed_addresses.is_empty());
    assert_eq!(c.tftp_ports, vec![69], "the TFTP helper is on");
    let off = Config::parse("[tftp]\nports = []", &i, &e).unwrap();
    assert!(off.tftp_ports.is_empty());
}

#[test]
fn full_file() {
    let (i, e) = ifs();
    let c = Config::parse(
        r#"
[addresses]
internal_networks = ["10.1.0.0/16", "192.168.0.0/24"]
external_addresses = ["10.2.0.1"]
[maps]
flows = 4096
pinholes = 1024
[timeouts]
udp_idle = 30
pinhole = 20
[ports]
range = "30000-30099"
snat_block = 8
[policy]
default_allowed_addresses = ["allow-addresses-in-class-c-network"]
[[protocols]]
name = "sip"
transport = "udp"
ports = [5060]
clients = ["10.1.0.0/24"]
[networks]
lan = ["10.1.0.0/23"]
dmz = ["192.168.0.0/24"]
[ftp]
enabled = false
"#,
        &i,
        &e,
    )
    .unwrap();
    assert_eq!(c.internal_networks.len(), 2);
    assert_eq!(c.flow_table_size, 4096);
    assert_eq!(c.pinhole_table_size, 1024);
    assert_eq!(c.timeouts.udp_idle, Duration::from_secs(30));
    assert_eq!(c.timeouts.pinhole, Duration::from_secs(20));
    assert_eq!(c.port_range, 30000..=30099);
    assert_eq!(c.snat_block, 8);
    assert_eq!(
        c.default_allowed_addresses,
        ConnFlags::ALLOW_ADDRESSES_IN_CLASS_C_NETWORK
    );
    assert_eq!(c.protocols.len(), 1);
    assert_eq!(c.protocols[0].transport, Transport::Udp);
    assert_eq!(c.networks.len(), 2);
    assert!(c.ftp_ports.is_empty());
}

#[test]
fn the_documented_example_is_valid() {
    let (i, e) = ifs();
    let c = Config::parse(include_str!("../../../docs/firewall.example.toml"), &i, &e).unwrap();
    assert_eq!(c.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.port_range, DEFAULT_PORT_RANGE);
    assert_eq!(c.client_quota, DEFAULT_CLIENT_QUOTA);
    assert_eq!(c.ftp_ports, DEFAULT_FTP_PORTS);
    assert_eq!(c.fwmark, DEFAULT_FWMARK);
    assert_eq!(c.nat_port_range, DEFAULT_NAT_PORT_RANGE);
    assert_eq!(c.outbound_from, c.internal_networks);
}

#[test]
fn the_wall_admits_the_internal_networks_unless_told_otherwise() {
    let (i, e) = ifs();
    let c = Config::parse(
        "[wall]\noutbound_from = [\"10.1.0.0/25\"]\n[nat]\nports = \"61000-61999\"",
        &i,
        &e,
    )
    .unwrap();
    assert_eq!(
        c.outbound_from,
        vec!["10.1.0.0/25".parse::<ipnet::Ipv4Net>().unwrap()]
    );
    assert_eq!(c.nat_port_range, 61000..=61999);
    assert!(c.published.is_empty());
    let c = Config::parse(
        "[[publish]]\ntransport = \"udp\"\nport = 53\nserver = \"10.1.0.2:5353\"",
        &i,
        &e,
    )
    .unwrap();
    assert_eq!(c.published.len(), 1);
    assert_eq!(c.published[0].server, "10.1.0.2:5353".parse().unwrap());
}

#[test]
fn ftp_filter_is_on_by_default_and_can_be_turned_off() {
    let (i, e) = ifs();
    assert_eq!(Config::defaults(&i, &e).unwrap().ftp_ports, vec![21]);
    let off = Config::parse("[ftp]\nenabled = false", &i, &e).unwrap();
    assert!(off.ftp_ports.is_empty());
    let other = Config::parse("[ftp]\nports = [21, 2121]", &i, &e).unwrap();
    assert_eq!(other.ftp_ports, vec![21, 2121]);
}

#[test]
fn plain_control_lines_go_through_the_kernel_unless_asked_otherwise() {
    let (i, e) = ifs();
    assert!(Config::defaults(&i, &e).unwrap().ftp_kernel_lines);
    let user = Config::parse("[ftp]\ncontrol_lines = \"user\"", &i, &e).unwrap();
    assert!(!user.ftp_kernel_lines);
    assert!(!user.ftp_user_mode, "data connections stay in the kernel");
}

#[test]
fn control_connections_are_proxied_unless_read_in_place() {
    let (i, e) = ifs();
    assert!(!Config::defaults(&i, &e).unwrap().ftp_in_place);
    let proxy = Config::parse("[ftp]\ncontrol = \"proxy\"", &i, &e).unwrap();
    assert!(!proxy.ftp_in_place);
    let in_place = Config::parse("[ftp]\ncontrol = \"in-place\"", &i, &e).unwrap();
    assert!(in_place.ftp_in_place);
    assert!(in_place.ftp_kernel_lines, "the other settings as they were");
    // Only a restart changes it (the programs, the interception).
    let err = proxy.reload_changes(&in_place).unwrap_err();
    assert!(err.to_string().contains("ftp.control"), "{err}");
}

#[test]
fn errors_name_the_key() {
    let (i, e) = ifs();
    let cases = [
        ("[addresses]\ninternal_networks = [\"10.1.0.0/24\", \"nope\"]", "addresses.internal_networks[1]"),
        ("[addresses]\ninternal_networks = [\"10.1.0.1/24\"]", "host bits"),
        ("[addresses]\nexternal_addresses = [\"10.9.9.9\"]", "not an address of interface ex0"),
        ("[maps]\nflows = 3", "maps.flows"),
        ("[maps]\npinholes = 3", "maps.pinholes"),
        ("[timeouts]\nudp_idle = 0", "timeouts.udp_idle"),
        ("[timeouts]\npinhole = 9999999", "timeouts.pinhole"),
        ("[maps]\nflowz = 3", "unknown field `flowz`"),
        ("[maps]\nflows = \"many\"", "line 2"),
        ("[addresses]\ninternal_networks = []", "at least one"),
        ("[ports]\nrange = \"80-90\"", "below 1024"),
        ("[ports]\nrange = \"9000\"", "ports.range"),
        ("[ports]\nrange = \"9000-2000\"", "ends before it starts"),
        ("[policy]\ndefault_allowed_addresses = [\"timeout\"]", "not an allowed-address flag"),
        ("[policy]\ndefault_allowed_addresses = [\"lots\"]", "policy.default_allowed_addresses[0]"),
        ("[[protocols]]\nname = \"x\"\ntransport = \"sctp\"", "protocols[0].transport"),
        ("[[protocols]]\nname = \"x y\"\ntransport = \"tcp\"", "protocols[0].name"),
        ("[[protocols]]\nname = \"x\"\ntransport = \"tcp\"\n[[protocols]]\nname = \"x\"\ntransport = \"udp\"", "defined twice"),
        ("[networks]\nlan = [\"10.0.0.0/99\"]", "networks.lan[0]"),
        ("[scan]\nblock_executables = [\"gopher\"]", "scan.block_executables[0]"),
        ("[scan]\nblock_everything = true", "unknown field `block_everything`"),
        ("[policy]\nclient_quota = 0", "policy.client_quota"),
        ("[ftp]\nports = [21, 21]", "ftp.ports[1]"),
        ("[ftp]\nports = []", "ftp.ports"),
        ("[ftp]\nports = [0]", "ftp.ports[0]"),
        ("[nat]\nports = \"19000-21000\"", "nat.ports"),
        ("[nat]\nports = \"5000\"", "nat.ports"),
        ("[ports]\nrange = \"1024-9999\"", "overlaps the pinhole ports"),
        ("[wall]\noutbound_from = [\"10.1.0.0/33\"]", "wall.outbound_from[0]"),
        ("[wall]\ninbound = true", "unknown field `inbound`"),
        ("[[publish]]\ntransport = \"tcp\"\nport = 8080\nserver = \"10.9.0.2:80\"", "publish[0].server"),
        ("[[publish]]\ntransport = \"tcp\"\nport = 30000\nserver = \"10.1.0.2:80\"", "publish[0].port"),
        ("[[publish]]\ntransport = \"tcp\"\nport = 80\nserver = \"10.1.0.2\"", "publish[0].server"),
        ("[[publish]]\ntransport = \"tcp\"\nport = 80\nserver = \"10.1.0.2:80\"\n[[publish]]\ntransport = \"tcp\"\nport = 80\nserver = \"10.1.0.3:80\"", "publish[1].port"),
        ("[ftp]\nport = 21", "unknown field `port`"),
        ("[ftp]\ndata_connections = \"fast\"", "ftp.data_connections"),
        ("[ftp]\ncontrol_lines = \"fast\"", "ftp.control_lines"),
        ("[ftp]\ncontrol = \"inplace\"", "ftp.control"),
        ("[timeouts]\nudp_idle = \"5 parsecs\"", "timeouts.udp_idle"),
        ("[timeouts]\nudp_mapping = 60", "RFC 4787's minimum of 120 s"),
        ("[timeouts]\nudp_idle = 600\nudp_mapping = 300", "shorter than timeouts.udp_idle"),
        ("[addresses]\nexternal_addresses = [\"10.2.0\"]", "addresses.external_addresses[0]"),
        ("[[protocols]]\nname = \"tftp\"\ntransport = \"udp\"", "ftp.enabled"),
        ("[interception]\nfwmark = 0", "interception.fwmark"),
        ("[interception]\nroute_table = 254", "interception.route_table"),
        ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
        ("[metrics]\nlisten = \"127.0.0.1:0\"", "metrics.listen"),
        ("[metrics]\nport = 9469", "unknown field `port`"),
        ("[tftp]\nports = [69, 69]", "tftp.ports[1]"),
        ("[tftp]\nports = [0]", "tftp.ports[0]"),
        ("[tftp]\nports = [69, 70, 71, 72, 73]", "at most 4 ports"),
        ("[tftp]\nenabled = true", "unknown field `enabled`"),
    ];
    for (text, want) in cases {
        let got = Config::parse(text, &i, &e).unwrap_err().to_string();
        assert!(got.contains(want), "{text:?}: {got}");
    }
}

#[test]
fn timeouts_take_units() {
    let (i, e) = ifs();
    let c = Config::parse(
        "[timeouts]\ntcp_established = \"2h\"\nudp_idle = 45",
        &i,
        &e,
    )
    .unwrap();
    assert_eq!(c.timeouts.tcp_established, Duration::from_secs(7200));
    assert_eq!(c.timeouts.udp_idle, Duration::from_secs(45));
    assert_eq!(c.timeouts.udp_mapping, Duration::from_secs(300));
    // Unset, the UDP mapping outlives a long udp_idle.
    let c = Config::parse("[timeouts]\nudp_idle = \"15m\"", &i, &e).unwrap();
    assert_eq!(c.timeouts.udp_mapping, Duration::from_secs(900));
    let c = Config::parse("[timeouts]\nudp_mapping = \"2m\"", &i, &e).unwrap();
    assert_eq!(c.timeouts.udp_mapping, Duration::from_secs(120));
}

#[test]
fn metrics_are_opt_in() {
    let (i, e) = ifs();
    assert_eq!(Config::defaults(&i, &e).unwrap().metrics_listen, None);
    let c = Config::parse("[metrics]\nlisten = \"[::1]:9469\"", &i, &e).unwrap();
    assert_eq!(c.metrics_listen, Some("[::1]:9469".parse().unwrap()));
}

#[test]
fn a_published_ftp_server_goes_through_the_filter() {
    let (i, e) = ifs();
    let publish = "[[publish]]\ntransport = \"tcp\"\nport = 2121\nserver = \"10.1.0.2:21\"\n\
                   [[publish]]\ntransport = \"tcp\"\nport = 8080\nserver = \"10.1.0.2:80\"\n";
    let c = Config::parse(publish, &i, &e).unwrap();
    assert!(c.published[0].ftp && !c.published[1].ftp);
    let off = Config::parse(&format!("{publish}[ftp]\nenabled = false\n"), &i, &e).unwrap();
    assert!(
        !off.published[0].ftp,
        "the filter off: forwarded in the kernel"
    );
    // Its listener belongs to the interception: a restart changes it.
    let moved = Config::parse(&publish.replace("2121", "2122"), &i, &e).unwrap();
    let err = c.reload_changes(&moved).unwrap_err();
    assert_eq!(err.key, "publish (an FTP server)");
    let other = Config::parse(&publish.replace("8080", "8081"), &i, &e).unwrap();
    assert_eq!(c.reload_changes(&other).unwrap(), vec!["publish"]);
}
