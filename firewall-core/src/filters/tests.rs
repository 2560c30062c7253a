use super::*;

fn blocker() -> (Chain, Arc<AtomicU64>) {
    let blocked = Arc::new(AtomicU64::new(0));
    let f: Arc<dyn DataFilterFactory> = Arc::new(ExecutableBlockerFactory {
        blocked: blocked.clone(),
    });
    (Chain::new(&[f]), blocked)
}

#[test]
fn executables_are_stopped_text_passes() {
    let (mut c, blocked) = blocker();
    assert!(matches!(
        c.data(Direction::FromExternal, b"MZ\x90\x00rest".to_vec()),
        Action::Close(_)
    ));
    assert_eq!(blocked.load(Ordering::Relaxed), 1);
    let (mut c, _) = blocker();
    assert_eq!(
        c.data(Direction::FromExternal, b"hello".to_vec()),
        Action::Forward(b"hello".to_vec())
    );
    assert_eq!(
        c.data(Direction::FromExternal, b"MZ later is fine".to_vec()),
        Action::Forward(b"MZ later is fine".to_vec())
    );
    // Each direction is judged on its own first bytes.
    assert!(matches!(
        c.data(Direction::FromInternal, b"ZM".to_vec()),
        Action::Close(_)
    ));
}

#[test]
fn a_split_signature_is_held_then_judged() {
    let (mut c, _) = blocker();
    assert_eq!(
        c.data(Direction::FromExternal, b"M".to_vec()),
        Action::Forward(vec![]),
        "held"
    );
    assert!(matches!(
        c.data(Direction::FromExternal, b"Z....".to_vec()),
        Action::Close(_)
    ));
    let (mut c, _) = blocker();
    assert_eq!(
        c.data(Direction::FromExternal, b"M".to_vec()),
        Action::Forward(vec![])
    );
    assert_eq!(
        c.data(Direction::FromExternal, b"ail".to_vec()),
        Action::Forward(b"Mail".to_vec()),
        "released with the rest"
    );
    // A stream of one byte is released at its end.
    let (mut c, _) = blocker();
    assert_eq!(
        c.data(Direction::FromInternal, b"M".to_vec()),
        Action::Forward(vec![])
    );
    assert_eq!(
        c.end(Direction::FromInternal),
        Action::Forward(b"M".to_vec())
    );
}

/// A filter that tags bytes, to see the order.
struct Tag(&'static str, PriorityClass);
impl DataFilter for Tag {
    fn name(&self) -> &str {
        self.0
    }
    fn on_data(&mut self, _dir: Direction, mut data: Vec<u8>) -> Action {
        data.extend_from_slice(self.0.as_bytes());
        Action::Forward(data)
    }
}
impl DataFilterFactory for Tag {
    fn name(&self) -> &str {
        self.0
    }
    fn priority(&self) -> PriorityClass {
        self.1
    }
    fn create(&self) -> Box<dyn DataFilter> {
        Box::new(Tag(self.0, self.1))
    }
}

#[test]
fn the_chain_runs_in_priority_order_per_direction() {
    let fs: Vec<Arc<dyn DataFilterFactory>> = vec![
        Arc::new(Tag("E", PriorityClass::External)),
        Arc::new(Tag("N", PriorityClass::Nat)),
        Arc::new(Tag("M", PriorityClass::Middle)),
    ];
    let mut c = Chain::new(&fs);
    assert_eq!(
        c.data(Direction::FromInternal, b">".to_vec()),
        Action::Forward(b">NME".to_vec()),
        "client side first"
    );
    assert_eq!(
        c.data(Direction::FromExternal, b"<".to_vec()),
        Action::Forward(b"<EMN".to_vec()),
        "Internet side first"
    );
}
