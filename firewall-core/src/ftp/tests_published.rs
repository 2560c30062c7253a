//! The FTP filter in front of a published server: the client outside, the
//! server inside.

use super::tests::{from_client, from_server, text, Fake, EXT, INT};
use super::*;

/// An outside client on a published server (10.1.0.5), reached at the
/// firewall's external address.
const CLIENT: &str = "192.0.2.7:50000";
const SERVER: &str = "10.1.0.5:21";

pub(super) fn published() -> (Control, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let c = Control::published(
        fake.clone(),
        Arc::new(FtpStats::default()),
        CLIENT.parse().unwrap(),
        SERVER.parse().unwrap(),
        EXT,
        ConnFlags::empty(),
    )
    .unwrap();
    (c, fake)
}

#[test]
fn the_session_is_the_published_servers() {
    let (_c, fake) = published();
    assert_eq!(
        *fake.sessions.lock().unwrap(),
        vec![Ipv4Addr::new(10, 1, 0, 5)]
    );
}

#[test]
fn a_passive_reply_binds_the_servers_port_on_the_external_address_in_proxy_mode() {
    let (mut c, fake) = published();
    let out = from_server(&mut c, b"227 Entering Passive Mode (10,1,0,5,117,48).\r\n");
    assert_eq!(
        text(&out.to_client),
        "227 Entering Passive Mode (10,2,0,1,156,65).\r\n"
    );
    let req = fake.binds.lock().unwrap()[0].clone();
    assert_eq!(req.clients, vec!["10.1.0.5:30000".parse().unwrap()]);
    assert_eq!(req.proxy, Some(SocketAddrV4::new(EXT, 0)));
    assert_eq!(req.flags, ConnFlags::TIMEOUT | ConnFlags::PROXY_MODE);
    let filter = req.ip_filter.as_ref().unwrap();
    assert!(filter.allows("192.0.2.7".parse().unwrap()));
    assert!(!filter.allows("192.0.2.8".parse().unwrap()));

    let out = from_server(
        &mut c,
        b"229 Entering Extended Passive Mode (|||30001|)\r\n",
    );
    assert_eq!(
        text(&out.to_client),
        "229 Entering Extended Passive Mode (|||40002|)\r\n"
    );
    assert_eq!(
        fake.binds.lock().unwrap()[1].clients,
        vec!["10.1.0.5:30001".parse().unwrap()]
    );
}

#[test]
fn an_active_command_goes_through_the_internal_address() {
    let (mut c, fake) = published();
    let out = from_client(&mut c, b"PORT 192,0,2,7,195,81\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,1,0,1,195,81\r\n");
    let req = fake.redirects.lock().unwrap()[0].clone();
    assert_eq!(req.connects, vec!["192.0.2.7:50001".parse().unwrap()]);
    assert_eq!(req.proxy_external, Some(SocketAddrV4::new(EXT, 0)));
    assert_eq!(req.internal, None, "the firewall's internal address");
    let out = from_client(&mut c, b"EPRT |1|192.0.2.7|50002|\r\n");
    assert_eq!(text(&out.to_server), format!("EPRT |1|{INT}|50002|\r\n"));
}

#[test]
fn bounces_are_refused_both_ways() {
    let (mut c, fake) = published();
    let out = from_client(&mut c, b"PORT 10,1,0,9,195,81\r\n");
    assert!(out.to_server.is_empty());
    assert!(text(&out.to_client).starts_with("500 Illegal PORT"));
    let out = from_server(&mut c, b"227 Entering Passive Mode (10,1,0,9,117,48).\r\n");
    assert!(text(&out.to_client).starts_with("500 Firewall refused the passive address"));
    assert!(fake.binds.lock().unwrap().is_empty() && fake.redirects.lock().unwrap().is_empty());
}

#[test]
fn the_role_survives_a_hand_over() {
    let (c, fake) = published();
    let state = c.hand_over();
    assert!(state.published);
    let mut c = Control::resume(fake.clone(), Arc::new(FtpStats::default()), state).unwrap();
    assert_eq!(fake.sessions.lock().unwrap()[1], Ipv4Addr::new(10, 1, 0, 5));
    let out = from_client(&mut c, b"PORT 192,0,2,7,195,81\r\n");
    assert_eq!(text(&out.to_server), "PORT 10,1,0,1,195,81\r\n");
}
