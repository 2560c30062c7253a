//! Reload (SIGHUP, `firewall-ctl reload`): the configuration file read
//! again and applied to the running daemon — the engine's rules, policy and
//! timeouts, the wall's sources and published servers — without touching an
//! established flow or a pending pinhole. A change only a restart applies is
//! refused whole, naming its key; nothing is applied then.

use std::sync::Arc;

use super::{api_server::blocking, notify, wall, Shared};
use crate::{
    api::{ApiError, ErrorKind, Reloaded},
    config::Config,
};

pub(super) async fn reload(shared: &Arc<Shared>) -> Result<Reloaded, ApiError> {
    // One reload at a time: the second reads the file after the first applied it.
    let _turn = shared.reload_turn.lock().await;
    notify::reloading();
    let result = apply(shared).await;
    notify::ready("up");
    match &result {
        Ok(r) if r.changed.is_empty() => log::info!("reload: nothing changed"),
        Ok(r) => log::info!("reload: applied {}", r.changed.join(", ")),
        Err(e) => log::warn!("reload refused: {e}"),
    }
    result
}

async fn apply(shared: &Arc<Shared>) -> Result<Reloaded, ApiError> {
    let invalid = |e: String| ApiError::new(ErrorKind::InvalidArgument, e);
    let new = Config::read(
        shared.config_path.as_deref(),
        &shared.internal,
        &shared.external,
    )
    .map_err(|e| invalid(format!("{e:#}")))?;
    let old = shared.config();
    let changed = old
        .reload_changes(&new)
        .map_err(|e| invalid(format!("config file: {e}")))?;
    if changed.is_empty() {
        return Ok(Reloaded { changed: vec![] });
    }
    let engine_config = new.engine_config(&shared.internal, &shared.external);
    shared
        .engine
        .call(move |e| e.reconfigure(engine_config))
        .await?;
    let (pins, cfg, internal) = (shared.pins.clone(), new.clone(), shared.internal.clone());
    blocking(move || wall::reapply(&pins, &cfg, &internal)).await?;
    *shared.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    Ok(Reloaded {
        changed: changed.into_iter().map(String::from).collect(),
    })
}
