//! Where the datapath is attached, and attaching it.

use super::{State, UpOptions};
use anyhow::Context as _;

use crate::{
    config::Config,
    datapath::{self, AttachMode, Datapath, DriverRefused, LinkFacts, PinPaths, Side},
    netdev_genl::{self, XdpFeatures},
    netif::Interface,
};

/// The hook the datapath runs at, and whether `up` chose it by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hook {
    pub mode: AttachMode,
    /// Chosen, not named nor kept from a restart: a native XDP the drivers
    /// refuse then falls back to TC.
    pub chosen: bool,
}

/// The hook: the one named; without one, a restart keeps the running
/// datapath's, and a fresh start chooses by the interfaces' kinds and
/// drivers (`datapath::choose`).
pub(super) fn mode(
    opts: &UpOptions,
    previous: Option<&State>,
    pins: &PinPaths,
    internal: &Interface,
    external: &Interface,
) -> Hook {
    let kept = |mode| Hook {
        mode,
        chosen: false,
    };
    if let Some(m) = opts.xdp_mode {
        return kept(m);
    }
    if let Some(s) = previous.filter(|s| left_here(s, pins, internal, external)) {
        return kept(s.xdp_mode);
    }
    let choice = datapath::choose(&facts(internal), &facts(external));
    log::info!(
        "datapath at {:?}: {} (--xdp-mode names another)",
        choice.mode,
        choice.why
    );
    Hook {
        mode: choice.mode,
        chosen: true,
    }
}

fn facts(i: &Interface) -> LinkFacts {
    LinkFacts {
        name: i.name.clone(),
        kind: i.link_kind().unwrap_or_else(|e| {
            log::warn!("{}: cannot tell its kind ({e:#}); taken as virtual", i.name);
            Some("unknown".into())
        }),
        xdp: xdp_features(i),
    }
}

fn xdp_features(i: &Interface) -> Option<XdpFeatures> {
    netdev_genl::xdp_features(i.index).unwrap_or_else(|e| {
        log::warn!("{}: cannot read what its driver does at XDP: {e}", i.name);
        None
    })
}

/// Whether the datapath the daemon of `s` left pinned is on these interfaces.
pub(super) fn left_here(
    s: &State,
    pins: &PinPaths,
    internal: &Interface,
    external: &Interface,
) -> bool {
    pins.any_exists()
        && s.internal_ifindex == internal.index
        && s.external_ifindex == external.index
}

/// Loads the datapath and attaches it at `hook`; returns it with the hook
/// it runs at. A native XDP that `up` chose and a driver refuses is
/// replaced by TC, with a warning naming why.
pub(super) fn start(
    pins: &PinPaths,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    hook: Hook,
    adopt: bool,
) -> anyhow::Result<(Datapath, AttachMode)> {
    with_fallback(
        hook,
        adopt,
        |mode, adopt| attach_at(pins, config, internal, external, mode, adopt, hook.chosen),
        || {
            datapath::unpin_all(pins)
                .map(drop)
                .context("removing what the native attempt pinned")
        },
    )
}

/// `start`'s order: `attempt` at the hook; a chosen native XDP that a
/// driver refused is undone and attempted again at TC.
fn with_fallback<T>(
    hook: Hook,
    adopt: bool,
    mut attempt: impl FnMut(AttachMode, bool) -> anyhow::Result<T>,
    undo: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(T, AttachMode)> {
    match attempt(hook.mode, adopt) {
        Ok(t) => Ok((t, hook.mode)),
        Err(e)
            if hook.chosen
                && hook.mode == AttachMode::Native
                && e.chain().any(|c| c.is::<DriverRefused>()) =>
        {
            log::warn!("native XDP refused ({e:#}); the datapath runs at TC instead");
            undo()?;
            let t = attempt(AttachMode::Tc, false)
                .map_err(|tc| tc.context(format!("after native XDP was refused ({e:#})")))?;
            Ok((t, AttachMode::Tc))
        }
        Err(e) => Err(e),
    }
}

fn attach_at(
    pins: &PinPaths,
    config: &Config,
    internal: &Interface,
    external: &Interface,
    mode: AttachMode,
    adopt: bool,
    chosen: bool,
) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load(
        pins,
        datapath::MapSizes {
            flows: config.flow_table_size,
            pinholes: config.pinhole_table_size,
        },
    )?;
    dp.attach(Side::Internal, internal, mode, adopt)?;
    dp.attach(Side::External, external, mode, adopt)?;
    if mode == AttachMode::Native {
        // Each side redirects into the other; many drivers say whether
        // they take redirected frames only once a program is attached.
        let links = [
            (internal.name.as_str(), xdp_features(internal)),
            (external.name.as_str(), xdp_features(external)),
        ];
        for (name, f) in links {
            if let Some(f) = f {
                log::info!("{name}: its driver offers at XDP: {}", f.names());
            }
        }
        let missing = datapath::redirect_targets_missing(links);
        if !missing.is_empty() {
            let missing = missing.join("; ");
            if chosen {
                return Err(DriverRefused(missing).into());
            }
            log::warn!("native XDP: {missing}; frames forwarded there are dropped");
        }
    }
    Ok(dp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHOSEN: Hook = Hook {
        mode: AttachMode::Native,
        chosen: true,
    };

    /// Plays `with_fallback` against attempts that fail as `fails` says.
    fn play(
        hook: Hook,
        fails: impl Fn(AttachMode) -> Option<anyhow::Error>,
    ) -> (anyhow::Result<AttachMode>, Vec<AttachMode>, bool) {
        let mut tried = Vec::new();
        let mut undone = false;
        let r = with_fallback(
            hook,
            false,
            |mode, _| {
                tried.push(mode);
                fails(mode).map_or(Ok(()), Err)
            },
            || {
                undone = true;
                Ok(())
            },
        );
        (r.map(|(_, m)| m), tried, undone)
    }

    fn refused() -> anyhow::Error {
        anyhow::Error::new(DriverRefused("eth1: Operation not supported".into()))
            .context("attaching")
    }

    #[test]
    fn a_chosen_native_xdp_the_driver_refuses_falls_back_to_tc() {
        let (r, tried, undone) = play(CHOSEN, |m| (m == AttachMode::Native).then(refused));
        assert_eq!(r.unwrap(), AttachMode::Tc);
        assert_eq!(tried, [AttachMode::Native, AttachMode::Tc]);
        assert!(undone, "the native attempt is undone first");
    }

    #[test]
    fn a_named_or_kept_hook_never_falls_back() {
        let named = Hook {
            chosen: false,
            ..CHOSEN
        };
        let (r, tried, undone) = play(named, |_| Some(refused()));
        assert!(r.unwrap_err().to_string().contains("attaching"));
        assert_eq!(tried, [AttachMode::Native]);
        assert!(!undone);
    }

    #[test]
    fn other_failures_do_not_fall_back() {
        let (r, tried, _) = play(CHOSEN, |_| Some(anyhow::anyhow!("EBUSY: another program")));
        assert!(r.is_err());
        assert_eq!(tried, [AttachMode::Native]);
    }

    #[test]
    fn a_failing_fallback_names_both_failures() {
        let (r, tried, _) = play(CHOSEN, |m| match m {
            AttachMode::Native => Some(refused()),
            _ => Some(anyhow::anyhow!("tcx: no such device")),
        });
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains("tcx") && e.contains("refused"), "{e}");
        assert_eq!(tried, [AttachMode::Native, AttachMode::Tc]);
    }
}
