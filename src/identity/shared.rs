//! One copy of what many identities repeat: a tenant's id, a tenant list, a role list. A hundred thousand
//! cached tokens of fifty tenants hold fifty tenant ids, not a hundred thousand. The sets are plain values
//! the caller owns and passes in; nothing here is global.

use super::{Identity, TenantId};
use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// A list shared by reference count and one pointer wide, where an `Arc<[T]>` takes two: an identity's
/// tenant and role lists, most of them interned and held by many cached identities, which keeps a cached
/// token in a smaller size class. Empty allocates nothing. Compares, hashes and prints as its slice.
pub struct SharedList<T>(Option<Arc<Box<[T]>>>);

impl<T> SharedList<T> {
    /// Whether both hold the same allocation (two empty lists do).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        match (&a.0, &b.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl<T> Clone for SharedList<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Default for SharedList<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<T> std::ops::Deref for SharedList<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        self.0.as_deref().map_or(&[], |b| &b[..])
    }
}

impl<T> Borrow<[T]> for SharedList<T> {
    fn borrow(&self) -> &[T] {
        self
    }
}

impl<T> From<Vec<T>> for SharedList<T> {
    fn from(v: Vec<T>) -> Self {
        Self((!v.is_empty()).then(|| Arc::new(v.into_boxed_slice())))
    }
}

impl<T: Clone> From<&[T]> for SharedList<T> {
    fn from(v: &[T]) -> Self {
        v.to_vec().into()
    }
}

impl<T> FromIterator<T> for SharedList<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<T>>().into()
    }
}

impl<T: PartialEq> PartialEq for SharedList<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Eq> Eq for SharedList<T> {}

impl<T: Hash> Hash for SharedList<T> {
    // As the slice hashes, so a set of lists can be searched with a slice (`Borrow<[T]>`).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for SharedList<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: serde::Serialize> serde::Serialize for SharedList<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<T: Eq + Hash> Shareable for SharedList<T> {
    fn in_use(&self) -> bool {
        self.0.as_ref().is_none_or(|a| Arc::strong_count(a) > 1)
    }
}

/// A set of shared values. A value nobody else holds any more is dropped when the set has doubled since it
/// was last pruned, so the set stays within twice what is in use.
pub struct Interner<T> {
    set: Mutex<(HashSet<T>, usize)>,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            set: Mutex::new((HashSet::new(), 0)),
        }
    }
}

/// What an [`Interner`] can hold: a cheap-to-clone handle whose holders can be counted.
pub trait Shareable: Clone + Eq + Hash {
    /// Whether anything besides the interner holds this value.
    fn in_use(&self) -> bool;
}

impl<T: ?Sized + Eq + Hash> Shareable for Arc<T> {
    fn in_use(&self) -> bool {
        Arc::strong_count(self) > 1
    }
}

impl Shareable for super::SharedStr {
    fn in_use(&self) -> bool {
        // A literal (no count) lives for ever anyway.
        Self::strong_count(self).is_none_or(|n| n > 1)
    }
}

impl Shareable for TenantId {
    fn in_use(&self) -> bool {
        self.as_shared().in_use()
    }
}

impl<T: Shareable> Interner<T> {
    /// The shared copy of `value`, made from it (`make`) the first time.
    pub fn intern<Q>(&self, value: &Q, make: impl FnOnce(&Q) -> T) -> T
    where
        T: Borrow<Q>,
        Q: ?Sized + Eq + Hash,
    {
        let Ok(mut guard) = self.set.lock() else {
            return make(value);
        };
        let (set, pruned_at) = &mut *guard;
        if let Some(shared) = set.get(value) {
            return shared.clone();
        }
        if set.len() >= (*pruned_at * 2).max(1024) {
            set.retain(Shareable::in_use);
            *pruned_at = set.len();
        }
        let shared = make(value);
        set.insert(shared.clone());
        shared
    }

    /// How many distinct values are held.
    pub fn len(&self) -> usize {
        self.set.lock().map_or(0, |s| s.0.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sets an identity's repeated parts are shared through.
#[derive(Default)]
pub struct SharedParts {
    tenants: Interner<TenantId>,
    tenant_lists: Interner<SharedList<TenantId>>,
    lists: Interner<SharedList<String>>,
    names: Interner<Arc<[(TenantId, String)]>>,
}

impl SharedParts {
    /// Replaces `identity`'s tenant ids and lists with the shared copies of equal values.
    pub fn share(&self, identity: &mut Identity) {
        if let Some(t) = &identity.tenant {
            identity.tenant = Some(self.tenant(t));
        }
        if !identity.tenants.is_empty() {
            let tenants: Vec<TenantId> = identity.tenants.iter().map(|t| self.tenant(t)).collect();
            identity.tenants = self
                .tenant_lists
                .intern(&tenants[..], |t| SharedList::from(t));
        }
        identity.roles = self.list(&identity.roles);
        if let Some(extras) = &mut identity.extras {
            if !extras.tenant_names.is_empty() {
                let names: Vec<(TenantId, String)> = (extras.tenant_names.iter())
                    .map(|(id, name)| (self.tenant(id), name.clone()))
                    .collect();
                extras.tenant_names = self.names.intern(&names[..], |n| Arc::from(n));
            }
            extras.permissions = self.list(&extras.permissions);
        }
    }

    fn tenant(&self, t: &TenantId) -> TenantId {
        self.tenants.intern(t.as_str(), |_| t.clone())
    }

    fn list(&self, list: &SharedList<String>) -> SharedList<String> {
        if list.is_empty() {
            return list.clone();
        }
        self.lists.intern(&list[..], |_| list.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ClaimPath, Dialect, MappingRules, SharedStr, map_claims};
    use serde_json::json;

    fn identity(sub: &str, tenant: &str) -> Identity {
        let rules = MappingRules {
            dialect: Dialect::Keycloak,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        let claims = json!({"sub": sub, "tenant_id": tenant, "realm_access": {"roles": ["member", "viewer"]}});
        map_claims("iss", claims.as_object().unwrap(), &rules).unwrap()
    }

    #[test]
    fn equal_tenants_and_lists_become_one_copy() {
        let parts = SharedParts::default();
        let (mut a, mut b) = (identity("u1", "acme"), identity("u2", "acme"));
        let before = a.clone();
        parts.share(&mut a);
        parts.share(&mut b);
        assert_eq!(a, before, "sharing changes no value");
        let (ta, tb) = (a.tenant.as_ref().unwrap(), b.tenant.as_ref().unwrap());
        assert!(SharedStr::ptr_eq(ta.as_shared(), tb.as_shared()));
        assert!(SharedList::ptr_eq(&a.tenants, &b.tenants));
        assert!(SharedList::ptr_eq(&a.roles, &b.roles));
        assert!(SharedStr::ptr_eq(a.tenants[0].as_shared(), ta.as_shared()));
        let mut other = identity("u3", "globex");
        parts.share(&mut other);
        assert!(!SharedList::ptr_eq(&a.tenants, &other.tenants));
    }

    /// Keycloak names each organization (its alias) in every member's token: one copy of the names
    /// however many members are cached.
    #[test]
    fn organization_names_become_one_copy() {
        let rules = MappingRules {
            dialect: Dialect::Keycloak,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        let member = |sub: &str| {
            let claims = json!({"sub": sub, "organization": {"acme": {"id": "org-1"}}});
            map_claims("iss", claims.as_object().unwrap(), &rules).unwrap()
        };
        let parts = SharedParts::default();
        let (mut a, mut b) = (member("u1"), member("u2"));
        let before = a.clone();
        parts.share(&mut a);
        parts.share(&mut b);
        assert_eq!(a, before, "sharing changes no value");
        assert_eq!(a.tenant_name("org-1"), Some("acme"));
        let names = |i: &Identity| i.extras.as_ref().unwrap().tenant_names.clone();
        assert!(Arc::ptr_eq(&names(&a), &names(&b)));
        assert!(SharedStr::ptr_eq(
            names(&a)[0].0.as_shared(),
            a.tenant.as_ref().unwrap().as_shared()
        ));
    }

    /// Shared or not, a cached identity weighs its tenant list: the cache's byte bound has to hold when
    /// every token carries a list of its own.
    #[test]
    fn a_shared_list_still_weighs_as_owned() {
        let parts = SharedParts::default();
        let rules = MappingRules {
            dialect: Dialect::Frontegg,
            tenant_claim: ClaimPath::new("tenant_id").unwrap(),
            roles_claim: ClaimPath::new("roles").unwrap(),
            id_prefix: None,
        };
        let many: Vec<String> = (0..200).map(|i| format!("tenant-{i:0>40}")).collect();
        let mut small = map_claims(
            "iss",
            json!({"sub": "u", "tenantId": "t"}).as_object().unwrap(),
            &rules,
        )
        .unwrap();
        let claims = json!({"sub": "u", "tenantId": "t", "tenantIds": many});
        let mut large = map_claims("iss", claims.as_object().unwrap(), &rules).unwrap();
        parts.share(&mut small);
        parts.share(&mut large);
        assert!(
            large.heap_size() >= small.heap_size() + 200 * 47,
            "{} against {}",
            large.heap_size(),
            small.heap_size()
        );
    }

    #[test]
    fn values_nobody_holds_are_dropped_as_the_set_grows() {
        let parts = SharedParts::default();
        for i in 0..5000 {
            let mut id = identity("u", &format!("tenant-{i}"));
            parts.share(&mut id);
        }
        // Pruned whenever it doubled past 1,024: never more than twice the floor while nothing is held.
        assert!(parts.tenants.len() <= 2048, "{}", parts.tenants.len());
        let mut held = identity("u", "kept");
        parts.share(&mut held);
        for i in 0..5000 {
            let mut id = identity("u", &format!("again-{i}"));
            parts.share(&mut id);
        }
        let mut again = identity("v", "kept");
        parts.share(&mut again);
        assert!(SharedStr::ptr_eq(
            held.tenant.as_ref().unwrap().as_shared(),
            again.tenant.as_ref().unwrap().as_shared()
        ));
    }
}
