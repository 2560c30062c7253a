//! The lines the kernel forwards without the daemon
//! (`firewall_common::ftp_lines`) are exactly lines this filter forwards
//! byte for byte and forgets: whatever the filter's state, when it is at a
//! line boundary such a line comes out unchanged, calls nothing and leaves
//! the filter at a line boundary.

use firewall_common::ftp_lines::{plain_command, plain_reply};
use proptest::prelude::*;

use super::tests::{control, from_client, from_server, Fake};
use super::tests_published::published;
use super::*;

#[derive(Debug, Clone)]
enum Seg {
    Client(Vec<u8>),
    Server(Vec<u8>),
}

fn segment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Line-like: a verb or a code, then text.
        ("[A-Za-z]{1,5}", "( [ -~]{0,30})?", "(\r\n|\n|\r|)")
            .prop_map(|(v, a, e)| format!("{v}{a}{e}").into_bytes()),
        ("[0-9]{3}", "[ -]", "[ -~]{0,30}", "(\r\n|\n|)")
            .prop_map(|(c, s, t, e)| format!("{c}{s}{t}{e}").into_bytes()),
        (
            "(PORT|EPRT|PASV|EPSV|ABOR|LPSV) ?",
            "[0-9,|.]{0,25}",
            "(\r\n|)"
        )
            .prop_map(|(v, a, e)| format!("{v}{a}{e}").into_bytes()),
        ("22[789][ -]", "[ -~]{0,30}", "(\r\n|)")
            .prop_map(|(c, t, e)| format!("{c}{t}{e}").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

fn seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        segment().prop_map(Seg::Client),
        segment().prop_map(Seg::Server)
    ]
}

fn calls(f: &Fake) -> usize {
    f.binds.lock().unwrap().len() + f.redirects.lock().unwrap().len()
}

fn check(mut c: Control, fake: Arc<Fake>, segs: Vec<Seg>) -> Result<(), TestCaseError> {
    for s in segs {
        let (commands, data) = match &s {
            Seg::Client(d) => (true, d),
            Seg::Server(d) => (false, d),
        };
        let kernel = c.at_line_boundary(commands)
            && if commands {
                plain_command(data)
            } else {
                plain_reply(data)
            };
        let before = calls(&fake);
        let out = if commands {
            from_client(&mut c, data)
        } else {
            from_server(&mut c, data)
        };
        if kernel {
            let (same, other) = if commands {
                (&out.to_server, &out.to_client)
            } else {
                (&out.to_client, &out.to_server)
            };
            prop_assert_eq!(same, data, "forwarded as it came");
            prop_assert!(other.is_empty());
            prop_assert_eq!(out.urgent_at, None);
            prop_assert_eq!(calls(&fake), before, "no call");
            prop_assert!(c.at_line_boundary(commands), "still at a line boundary");
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn kernel_lines_are_forwarded_as_they_are(segs in proptest::collection::vec(seg(), 1..12)) {
        let (c, fake, _) = control();
        check(c, fake, segs)?;
    }

    #[test]
    fn kernel_lines_are_forwarded_as_they_are_for_a_published_server(segs in proptest::collection::vec(seg(), 1..12)) {
        let (c, fake) = published();
        check(c, fake, segs)?;
    }
}

#[test]
fn the_filter_leaves_a_line_boundary_inside_lines_and_multi_line_replies() {
    let (mut c, _, _) = control();
    assert!(c.at_line_boundary(true) && c.at_line_boundary(false));
    from_client(&mut c, b"USER x");
    assert!(!c.at_line_boundary(true));
    from_client(&mut c, b"\r\n");
    assert!(c.at_line_boundary(true));
    from_server(&mut c, b"211-Features:\r\n");
    assert!(!c.at_line_boundary(false), "a multi-line reply is open");
    from_server(&mut c, b"211 End\r\n");
    assert!(c.at_line_boundary(false));
}
