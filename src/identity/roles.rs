//! IdP roles -> the app role. Pure: a list of app roles from strongest to weakest, a map from IdP role
//! names, and a default. When several IdP roles map, the strongest app role wins.

use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct RoleMap {
    /// Strongest first.
    app_roles: Vec<String>,
    map: HashMap<String, usize>,
    default: usize,
}

/// Frontegg's built-in roles and Keycloak's conventional `admin` role.
pub const DEFAULT_MAPPINGS: &[(&str, &str)] = &[
    ("Admin", "admin"),
    ("admin", "admin"),
    ("Member", "member"),
    ("member", "member"),
    ("Viewer", "viewer"),
    ("ReadOnly", "viewer"),
    ("viewer", "viewer"),
];

/// Why a role map cannot be built; the caller says which setting each came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleMapError {
    #[error("at least one app role is required")]
    NoAppRoles,
    #[error("`{mapping}`: `{role}` is not an app role (known: {known})")]
    MappedToUnknown {
        mapping: String,
        role: String,
        known: String,
    },
    #[error("`{0}` is not IDP_ROLE=APP_ROLE")]
    NotAMapping(String),
    #[error("`{role}` is not an app role (known: {known})")]
    UnknownDefault { role: String, known: String },
}

impl RoleMap {
    /// `mappings` (`IDP_ROLE=APP_ROLE`) are applied over the defaults; every app role named must be in `app_roles`.
    pub fn new(
        app_roles: &[String],
        mappings: &[String],
        default: &str,
    ) -> Result<Self, Vec<RoleMapError>> {
        let mut errors = Vec::new();
        if app_roles.is_empty() {
            errors.push(RoleMapError::NoAppRoles);
        }
        let index = |role: &str| app_roles.iter().position(|r| r == role);
        let mut map = HashMap::new();
        for (idp, app) in DEFAULT_MAPPINGS {
            if let Some(i) = index(app) {
                map.insert((*idp).to_owned(), i);
            }
        }
        for m in mappings {
            match m.split_once('=') {
                Some((idp, app)) if !idp.trim().is_empty() => match index(app.trim()) {
                    Some(i) => {
                        map.insert(idp.trim().to_owned(), i);
                    }
                    None => errors.push(RoleMapError::MappedToUnknown {
                        mapping: m.clone(),
                        role: app.trim().to_owned(),
                        known: app_roles.join(", "),
                    }),
                },
                _ => errors.push(RoleMapError::NotAMapping(m.clone())),
            }
        }
        let default = index(default).unwrap_or_else(|| {
            errors.push(RoleMapError::UnknownDefault {
                role: default.to_owned(),
                known: app_roles.join(", "),
            });
            0
        });
        if errors.is_empty() {
            Ok(Self {
                app_roles: app_roles.to_vec(),
                map,
                default,
            })
        } else {
            Err(errors)
        }
    }

    /// The strongest app role any of `idp_roles` maps to, else the default.
    pub fn app_role(&self, idp_roles: &[String]) -> &str {
        let best = idp_roles
            .iter()
            .filter_map(|r| self.map.get(r).copied())
            .min()
            .unwrap_or(self.default);
        &self.app_roles[best]
    }

    /// The app roles, strongest first.
    pub fn app_roles(&self) -> &[String] {
        &self.app_roles
    }

    /// The strongest app role, given to the owner of a personal organization.
    pub fn strongest(&self) -> &str {
        &self.app_roles[0]
    }

    /// The role for users none of whose IdP roles map, and for tenants no token speaks for.
    pub fn default_role(&self) -> &str {
        &self.app_roles[self.default]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> Vec<String> {
        ["admin", "member", "viewer"].map(String::from).to_vec()
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_map_frontegg_and_keycloak_roles() {
        let m = RoleMap::new(&roles(), &[], "member").unwrap();
        assert_eq!(m.app_role(&v(&["Admin"])), "admin");
        assert_eq!(m.app_role(&v(&["ReadOnly"])), "viewer");
        assert_eq!(m.app_role(&v(&["default-roles-acme", "admin"])), "admin");
        assert_eq!(
            m.app_role(&v(&["something-else"])),
            "member",
            "unmapped roles get the default"
        );
        assert_eq!(m.app_role(&[]), "member");
    }

    #[test]
    fn the_strongest_mapped_role_wins() {
        let m = RoleMap::new(&roles(), &v(&["billing=viewer", "ops=admin"]), "viewer").unwrap();
        assert_eq!(m.app_role(&v(&["billing", "ops"])), "admin");
        assert_eq!(m.app_role(&v(&["Viewer", "Member"])), "member");
    }

    #[test]
    fn bad_mappings_are_all_reported() {
        let errs = RoleMap::new(&roles(), &v(&["x=owner", "nonsense"]), "boss").unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
