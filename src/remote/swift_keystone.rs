//! Swift authenticated by Keystone v3: a [`Session`]'s token and the `object-store`
//! endpoint of its catalog (for `OS_REGION_NAME`/`OS_INTERFACE`) as the storage URL.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::error::{Error, Result};

use super::keystone::Session;
use super::swift::{SwiftAuthenticate, SwiftToken, SWIFT_RENEW_AHEAD};

/// A Keystone [`Session`] as a source of Swift tokens. The first token is the session's
/// own (it authenticated when opened); each later call comes from a token Swift refused
/// (401) or one about to expire, so it makes the session authenticate again. A token's
/// expiry for Swift is the moment the session would renew it, so a long upload renews
/// ahead of Keystone's expiry instead of waiting for a 401.
pub struct KeystoneSwift {
    session: Arc<Session>,
    used: AtomicBool,
}

impl KeystoneSwift {
    /// Wrap an open session (its catalog must list `object-store`, or the config override
    /// it with [`AuthConfig::set_endpoint`](super::AuthConfig::set_endpoint)).
    pub fn new(session: Arc<Session>) -> Self {
        KeystoneSwift {
            session,
            used: AtomicBool::new(false),
        }
    }

    /// The session, e.g. to count its authentications.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }
}

impl fmt::Debug for KeystoneSwift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeystoneSwift").field(&self.session).finish()
    }
}

impl SwiftAuthenticate for KeystoneSwift {
    fn authenticate(&self) -> Result<SwiftToken> {
        if self.used.swap(true, Ordering::SeqCst) {
            self.session.invalidate();
        }
        let token = self.session.token()?;
        let storage_url = self.session.endpoint("object-store").map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "Swift via Keystone: {}",
                    self.session.redact(&e.to_string())
                ),
            )
        })?;
        // Swift renews a token a minute before its `expires`: give it the session's renewal
        // time plus that minute, so both renew at the same moment.
        let expires = self.session.token_renew_at().map(|at| {
            let left = at.duration_since(SystemTime::now()).unwrap_or_default();
            Instant::now() + left + SWIFT_RENEW_AHEAD
        });
        Ok(SwiftToken {
            storage_url,
            token,
            expires,
        })
    }

    fn secrets(&self) -> Vec<String> {
        self.session.config().secrets()
    }
}
