//! Application filters and data-filter factories: the events a call and
//! its connections raise, and what filters may do in them.

use super::tests::*;
use super::*;

/// What a scripted step returned: (event, step, result).
type StepResult = (EventKind, &'static str, Result<(), ErrorKind>);

/// A filter whose handler runs a script of calls and records the results.
struct Scripted {
    name: &'static str,
    mask: filters::EventMask,
    script: std::sync::Mutex<Vec<(EventKind, &'static str)>>,
    results: std::sync::Mutex<Vec<StepResult>>,
    terminated: std::sync::Mutex<Vec<u64>>,
}

impl Scripted {
    fn new(
        name: &'static str,
        mask: filters::EventMask,
        script: &[(EventKind, &'static str)],
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            mask,
            script: std::sync::Mutex::new(script.to_vec()),
            results: Default::default(),
            terminated: Default::default(),
        })
    }
    fn results(&self) -> Vec<StepResult> {
        self.results.lock().unwrap().clone()
    }
}

struct Nop;
impl filters::DataFilter for Nop {
    fn name(&self) -> &str {
        "nop"
    }
    fn on_data(&mut self, _d: filters::Direction, data: Vec<u8>) -> filters::Action {
        filters::Action::Forward(data)
    }
}

impl AppFilter for Scripted {
    fn name(&self) -> &str {
        self.name
    }
    fn events(&self) -> filters::EventMask {
        self.mask
    }
    fn on_event(&self, ev: &mut filters::EventContext<'_>) -> Result<(), ApiError> {
        let steps: Vec<&'static str> = self
            .script
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k == ev.kind)
            .map(|(_, s)| *s)
            .collect();
        for step in steps {
            let r = match step {
                "deny" => ev.deny(0),
                "deny1" => ev.deny(1),
                "attach" => ev.attach_data_filter(Box::new(Nop), filters::PriorityClass::Middle),
                "emulate" => ev.emulate_for_bind(),
                "fail" => return Err(ApiError::new(ErrorKind::Internal, "out of memory")),
                _ => Ok(()),
            };
            self.results
                .lock()
                .unwrap()
                .push((ev.kind, step, r.map_err(|e| e.kind)));
        }
        Ok(())
    }
    fn on_terminating(&self, connection: u64) {
        self.terminated.lock().unwrap().push(connection);
    }
}

#[test]
fn a_deny_in_the_bind_event_fails_the_call_with_nothing_left() {
    let (mut e, s) = engine();
    let f = Scripted::new(
        "denier",
        filters::EventMask::BIND_TCP,
        &[(EventKind::BindTcp, "deny")],
    );
    e.register_filter(f.clone());
    let err = e
        .bind_for_client(&bind(s, &["10.1.0.2:5001", "10.1.0.2:5002"]))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::AddressInUse);
    assert!(
        err.message.contains("denied by filter denier"),
        "{}",
        err.message
    );
    assert_clean(&e);
    assert!(e.take_relay_cmds().is_empty());
}

#[test]
fn calls_are_valid_only_in_their_events() {
    let (mut e, s) = engine();
    let f = Scripted::new(
        "checker",
        filters::EventMask::BIND_TCP | filters::EventMask::BIND_UDP | filters::EventMask::LISTEN,
        &[
            (EventKind::Listen, "deny"),
            (EventKind::BindTcp, "deny1"),
            (EventKind::BindTcp, "attach"),
            (EventKind::BindUdp, "attach"),
            (EventKind::BindUdp, "emulate"),
            (EventKind::BindUdp, "emulate"),
        ],
    );
    e.register_filter(f.clone());
    let t = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    assert_eq!(
        state(&e, t.connections[0].id),
        State::Listening,
        "a deny in listen has no effect"
    );
    let u = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap();
    let r = f.results();
    let get = |k: EventKind, step: &str| {
        r.iter()
            .filter(|(kk, ss, _)| *kk == k && *ss == step)
            .map(|(_, _, res)| *res)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        get(EventKind::Listen, "deny"),
        vec![Err(ErrorKind::BadContext)],
        "listen cannot be refused"
    );
    assert_eq!(
        get(EventKind::BindTcp, "deny1"),
        vec![Err(ErrorKind::InvalidArgument)],
        "Deny(1)"
    );
    assert_eq!(
        get(EventKind::BindTcp, "attach"),
        vec![Err(ErrorKind::BadContext)],
        "TCP data filters attach at accept, not bind"
    );
    assert_eq!(get(EventKind::BindUdp, "attach"), vec![Ok(())]);
    assert_eq!(
        get(EventKind::BindUdp, "emulate"),
        vec![Ok(()), Err(ErrorKind::AlreadyEmulated)]
    );
    // The UDP bind with a data filter attached is user mode; the TCP one is kernel.
    let mode = |id: u64| mode(&e, id);
    assert_eq!(mode(t.connections[0].id), Mode::Kernel);
    assert_eq!(mode(u.connections[0].id), Mode::User);
    // Terminating reaches the filters without registration.
    e.kill(t.connections[0].id).unwrap();
    assert_eq!(*f.terminated.lock().unwrap(), vec![t.connections[0].id]);
}

#[test]
fn a_filter_registered_for_the_resulting_event_keeps_connections_in_user_mode() {
    // The decision rule: registered for accepts (TCP binds) or connects (TCP redirects).
    let (mut e, s) = engine();
    let k = e.bind_for_client(&bind(s, &["10.1.0.2:5001"])).unwrap();
    assert_eq!(
        mode(&e, k.connections[0].id),
        Mode::Kernel,
        "nobody registered"
    );
    e.register_filter(Scripted::new(
        "watcher",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[],
    ));
    let u = e.bind_for_client(&bind(s, &["10.1.0.2:5002"])).unwrap();
    assert_eq!(mode(&e, u.connections[0].id), Mode::User);
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    assert_eq!(
        mode(&e, r.actions[0].id),
        Mode::Kernel,
        "redirects raise connect, not accept"
    );
    // The accept event through the relay's hook: a deny aborts, an attach adds a data filter.
    e.register_filter(Scripted::new(
        "gate",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[(EventKind::AcceptedConnection, "deny")],
    ));
    let d = e
        .on_connection_event(
            u.connections[0].id,
            EventKind::AcceptedConnection,
            a("198.51.100.7:20"),
        )
        .unwrap();
    assert_eq!(d.denied_by.as_deref(), Some("gate"));
    // A failing handler fails the accept.
    e.register_filter(Scripted::new(
        "broken",
        filters::EventMask::ACCEPTED_CONNECTION,
        &[(EventKind::AcceptedConnection, "fail")],
    ));
    assert_eq!(
        e.on_connection_event(
            u.connections[0].id,
            EventKind::AcceptedConnection,
            a("198.51.100.7:20")
        )
        .unwrap_err()
        .kind,
        ErrorKind::Internal
    );
}

/// Records establishments it is told of.
struct Caller(&'static str, std::sync::Mutex<Vec<(u64, Option<String>)>>);

impl AppFilter for Caller {
    fn name(&self) -> &str {
        self.0
    }
    fn events(&self) -> filters::EventMask {
        filters::EventMask::all()
    }
    fn on_event(&self, _ev: &mut filters::EventContext<'_>) -> Result<(), ApiError> {
        Ok(())
    }
    fn on_established(&self, connection: u64, context: Option<&str>) {
        self.1
            .lock()
            .unwrap()
            .push((connection, context.map(str::to_string)));
    }
}

#[test]
fn established_goes_only_to_the_calling_filter() {
    // A filter registered for every event makes the connection
    // user mode (it could attach at accept), so the relay reports it.
    let (mut e, s) = engine();
    let caller = Arc::new(Caller("ftp", Default::default()));
    let other = Arc::new(Caller("other", Default::default()));
    e.register_filter(other.clone());
    e.register_filter(caller.clone());
    let made = |e: &mut Engine<MemMaps>, id: u64, conn: u64| {
        e.on_relay_event(RelayEvent::Established {
            owner: id,
            conn,
            from: a("198.51.100.7:20"),
            to: a("10.1.0.2:5001"),
            bytes: Arc::default(),
        });
    };
    let id = e
        .bind_for_client_by(caller.clone(), &bind(s, &["10.1.0.2:5001"]))
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(mode(&e, id), Mode::User);
    made(&mut e, id, 1);
    assert_eq!(
        *caller.1.lock().unwrap(),
        vec![(id, Some("ctx".to_string()))],
        "the caller, with its context"
    );
    assert!(
        other.1.lock().unwrap().is_empty(),
        "never another filter, even one registered for everything"
    );
    // Without a session filter to notify (pSessionFilter = NULL), nobody hears of it.
    let q = e
        .bind_for_client_by(
            caller.clone(),
            &BindRequest {
                notify: false,
                ..bind(s, &["10.1.0.2:5002"])
            },
        )
        .unwrap()
        .connections[0]
        .id;
    made(&mut e, q, 2);
    assert_eq!(caller.1.lock().unwrap().len(), 1);
}

struct NopFactory;
impl filters::DataFilterFactory for NopFactory {
    fn name(&self) -> &str {
        "nop"
    }
    fn priority(&self) -> filters::PriorityClass {
        filters::PriorityClass::Middle
    }
    fn create(&self) -> Box<dyn filters::DataFilter> {
        Box::new(Nop)
    }
}

#[test]
fn data_filter_factories_by_address() {
    // The kernel/user decision is taken at the
    // call; a factory only decides which data filter a connection gets.
    let (mut e, s) = engine();
    let f = || Arc::new(NopFactory) as Arc<dyn filters::DataFilterFactory>;
    // Registered before the call for the endpoint: user mode, and the accept gets the filter once.
    let fid = e
        .set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45000"), f())
        .unwrap();
    let id = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45000")),
            flags: ConnFlags::ALLOW_MULTIPLE,
            ..bind(s, &["10.1.0.2:5001"])
        })
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(mode(&e, id), Mode::User);
    let d = e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:20"))
        .unwrap();
    assert_eq!(d.data_filters.len(), 1, "created automatically");
    let d = e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:21"))
        .unwrap();
    assert!(d.data_filters.is_empty(), "one connection per factory");
    assert_eq!(
        kind(e.cancel(fid)),
        ErrorKind::Terminating,
        "used: cancelling again says so"
    );

    // Cancelled before the accept: no data filter; the connection stays user mode (the decision stands).
    let fid = e
        .set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45001"), f())
        .unwrap();
    let id = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45001")),
            ..bind(s, &["10.1.0.2:5002"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.cancel(fid).unwrap();
    assert_eq!(kind(e.cancel(fid)), ErrorKind::Terminating);
    assert!(e
        .on_connection_event(id, EventKind::AcceptedConnection, a("198.51.100.7:22"))
        .unwrap()
        .data_filters
        .is_empty());
    assert_eq!(mode(&e, id), Mode::User);

    // Without a factory at call time: kernel mode, and a later factory cannot change that.
    let k = e
        .bind_for_client(&BindRequest {
            proxy: Some(a("10.2.0.1:45002")),
            ..bind(s, &["10.1.0.2:5003"])
        })
        .unwrap()
        .connections[0]
        .id;
    e.set_data_filter_factory(EventKind::AcceptedConnection, a("10.2.0.1:45002"), f())
        .unwrap();
    assert_eq!(mode(&e, k), Mode::Kernel);

    // UDP binds take theirs at bind time; redirects are keyed by the destination; any port with port 0.
    e.set_data_filter_factory(EventKind::BindUdp, a("10.2.0.1:0"), f())
        .unwrap();
    let u = e
        .bind_for_client(&BindRequest {
            protocol: Transport::Udp,
            ..bind(s, &["10.1.0.2:6000"])
        })
        .unwrap()
        .connections[0]
        .id;
    assert_eq!(mode(&e, u), Mode::User);
    let cmds = e.take_relay_cmds();
    assert!(cmds
        .iter()
        .any(|c| matches!(c, RelayCmd::Start(j) if j.owner == u && j.filters.len() == 1)));
    e.set_data_filter_factory(EventKind::ConnectTcp, a("198.51.100.7:2000"), f())
        .unwrap();
    let r = e
        .redirect_connections(&redirect(s, &["198.51.100.7:2000"]))
        .unwrap();
    assert_eq!(mode(&e, r.actions[0].id), Mode::User);
    assert_eq!(
        e.on_connection_event(
            r.actions[0].id,
            EventKind::ConnectTcp,
            a("198.51.100.7:2000")
        )
        .unwrap()
        .data_filters
        .len(),
        1
    );
    // TCP binds have no data filter at bind time.
    assert_eq!(
        kind(e.set_data_filter_factory(EventKind::BindTcp, a("10.2.0.1:0"), f())),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn udp_destination_events_of_redirects() {
    // A filter registered for UDP destinations makes UDP redirects user mode;
    // in the event it may refuse the destination (IFWXUdpDestination::Deny)
    // or attach a data filter.
    let (mut e, s) = engine();
    let f = Scripted::new(
        "udp-gate",
        filters::EventMask::UDP_DESTINATION,
        &[
            (EventKind::UdpDestination, "deny"),
            (EventKind::UdpDestination, "attach"),
        ],
    );
    e.register_filter(f.clone());
    let r = e
        .redirect_connections(&RedirectRequest {
            protocol: Transport::Udp,
            ..redirect(s, &["198.51.100.7:2200"])
        })
        .unwrap();
    let id = r.actions[0].id;
    assert_eq!(mode(&e, id), Mode::User);
    assert!(
        matches!(&e.take_relay_cmds()[..], [RelayCmd::Start(j)] if j.event == Some(EventKind::UdpDestination))
    );
    let d = e
        .on_connection_event(id, EventKind::UdpDestination, a("198.51.100.7:2200"))
        .unwrap();
    assert_eq!(d.denied_by.as_deref(), Some("udp-gate"));
    assert_eq!(d.data_filters.len(), 1);
    assert!(
        f.results().iter().all(|(_, _, r)| r.is_ok()),
        "{:?}",
        f.results()
    );
}
