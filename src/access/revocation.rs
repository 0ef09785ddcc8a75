//! The sessions and users whose tokens are refused before their `exp`, in memory, checked on every
//! request (cached tokens included). When nothing is revoked, the check is one atomic load.

use super::tokens::{Authenticated, SessionKey};
use crate::provision::revocations::{Revocation, Revoked};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// Per issuer: ended sessions (sid -> until, Unix seconds) and users (sub -> not before, until).
#[derive(Default)]
struct Snapshot {
    sessions: HashMap<String, HashMap<SessionKey, i64>>,
    users: HashMap<String, HashMap<String, (i64, i64)>>,
}

impl Snapshot {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.users.is_empty()
    }

    fn add(&mut self, r: &Revocation) {
        let until = r.expires_at.timestamp();
        match &r.revoked {
            Revoked::Session(sid) => {
                let e = self
                    .sessions
                    .entry(r.issuer.clone())
                    .or_default()
                    .entry(SessionKey::of(sid))
                    .or_insert(until);
                *e = (*e).max(until);
            }
            Revoked::User { sub, not_before } => {
                let e = self
                    .users
                    .entry(r.issuer.clone())
                    .or_default()
                    .entry(sub.clone())
                    .or_insert((*not_before, until));
                *e = (e.0.max(*not_before), e.1.max(until));
            }
        }
    }
}

#[derive(Default)]
pub struct RevocationSet {
    snapshot: ArcSwap<Snapshot>,
}

impl RevocationSet {
    /// Whether the token behind `a` was revoked: its session ended, or its user logged out everywhere
    /// at or after the second it was issued. A token without `iat` cannot show it came after, so it is refused too.
    pub fn revoked(&self, a: &Authenticated, now: i64) -> bool {
        let snap = self.snapshot.load();
        if snap.is_empty() {
            return false;
        }
        let issuer: &str = &a.issuer.name;
        if let (Some(sid), Some(sessions)) = (a.sid, snap.sessions.get(issuer))
            && sessions.get(&sid).is_some_and(|until| *until > now)
        {
            return true;
        }
        if let (Some(sub), Some(users)) = (&a.identity.subject, snap.users.get(issuer))
            && let Some((not_before, until)) = users.get(sub.as_str())
            && *until > now
        {
            // `iat` has whole seconds: a token issued in the logout's own second may predate it, so it
            // goes too (a login in that very second signs in again).
            return a.issued_at().is_none_or(|iat| iat <= *not_before);
        }
        false
    }

    /// Replaces the set with what the database holds (at start, on a missed notification, periodically).
    pub fn replace(&self, all: &[Revocation]) {
        let mut snap = Snapshot::default();
        for r in all {
            snap.add(r);
        }
        self.snapshot.store(Arc::new(snap));
    }

    /// Adds revocations made here, at once (the database has them too).
    pub fn add(&self, new: &[Revocation]) {
        self.snapshot.rcu(|old| {
            let mut snap = Snapshot {
                sessions: old.sessions.clone(),
                users: old.users.clone(),
            };
            for r in new {
                snap.add(r);
            }
            snap
        });
    }

    pub fn len(&self) -> usize {
        let s = self.snapshot.load();
        s.sessions.values().map(HashMap::len).sum::<usize>()
            + s.users.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.snapshot.load().is_empty()
    }
}
