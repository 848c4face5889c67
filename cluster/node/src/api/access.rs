//! Who may call what: roles from the common name of the verified client
//! certificate (`[api] roles`), or `anonymous_roles` for clients without one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use tandem_config::{ApiRole, ApiSettings};
use tonic::{Request, Status};

/// Who is calling, as far as the transport can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No verified client certificate (plaintext, or TLS without one).
    Anonymous,
    /// A client certificate verified against `client_ca`, by its subject CN.
    Certificate {
        /// The certificate's subject common name.
        cn: String,
    },
    /// A verified certificate whose subject has no readable CN: no roles.
    NoCommonName,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Anonymous => f.write_str("anonymous client"),
            Caller::Certificate { cn } => write!(f, "client certificate CN={cn:?}"),
            Caller::NoCommonName => f.write_str("client certificate without a common name"),
        }
    }
}

impl Caller {
    /// The caller of a request, from the TLS session's peer certificate.
    pub fn of<T>(request: &Request<T>) -> Caller {
        let Some(certs) = request.peer_certs() else { return Caller::Anonymous };
        let Some(leaf) = certs.first() else { return Caller::Anonymous };
        match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(|cn| Caller::Certificate { cn: cn.to_string() })
                .unwrap_or(Caller::NoCommonName),
            Err(_) => Caller::NoCommonName,
        }
    }
}

/// The role table of the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    by_cn: BTreeMap<String, BTreeSet<ApiRole>>,
    anonymous: BTreeSet<ApiRole>,
}

impl Access {
    /// A table from certificate CNs to roles, and the roles of anonymous clients.
    pub fn new(by_cn: BTreeMap<String, Vec<ApiRole>>, anonymous: Vec<ApiRole>) -> Self {
        Access {
            by_cn: by_cn.into_iter().map(|(cn, roles)| (cn, expand(roles))).collect(),
            anonymous: expand(anonymous),
        }
    }

    /// The table `[api]` describes.
    pub fn from_settings(settings: &ApiSettings) -> Self {
        Access::new(settings.roles.clone(), settings.effective_anonymous_roles())
    }

    /// The roles a caller has (`operator` includes `viewer`).
    pub fn roles(&self, caller: &Caller) -> BTreeSet<ApiRole> {
        match caller {
            Caller::Anonymous => self.anonymous.clone(),
            Caller::Certificate { cn } => self.by_cn.get(cn).cloned().unwrap_or_default(),
            Caller::NoCommonName => BTreeSet::new(),
        }
    }

    /// Lets the request through if its caller has `need`, else `PERMISSION_DENIED`
    /// naming the call, the role needed, and who the caller is.
    pub fn authorize<T>(&self, request: &Request<T>, need: ApiRole, call: &str) -> Result<Caller, Status> {
        let caller = Caller::of(request);
        let roles = self.roles(&caller);
        if roles.contains(&need) {
            return Ok(caller);
        }
        let has = if roles.is_empty() {
            "no roles".to_string()
        } else {
            format!("roles {}", roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(", "))
        };
        let hint = match &caller {
            Caller::Anonymous => "; connect with a client certificate whose CN has that role in [api] roles",
            Caller::Certificate { .. } => "; add the role to this CN in [api] roles",
            Caller::NoCommonName => "; use a certificate whose subject has a CN listed in [api] roles",
        };
        Err(Status::permission_denied(format!("{call} needs role {need}; the {caller} has {has}{hint}")))
    }
}

fn expand(roles: Vec<ApiRole>) -> BTreeSet<ApiRole> {
    let mut set: BTreeSet<ApiRole> = roles.into_iter().collect();
    if set.contains(&ApiRole::Operator) {
        set.insert(ApiRole::Viewer);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_includes_viewer_only() {
        let a = Access::new(
            BTreeMap::from([("ops".to_string(), vec![ApiRole::Operator]), ("hv".to_string(), vec![ApiRole::Host])]),
            vec![],
        );
        let ops = a.roles(&Caller::Certificate { cn: "ops".into() });
        assert_eq!(ops, BTreeSet::from([ApiRole::Viewer, ApiRole::Operator]));
        let hv = a.roles(&Caller::Certificate { cn: "hv".into() });
        assert_eq!(hv, BTreeSet::from([ApiRole::Host]));
        assert!(a.roles(&Caller::Anonymous).is_empty());
        assert!(a.roles(&Caller::Certificate { cn: "stranger".into() }).is_empty());
    }

    #[test]
    fn denial_names_call_role_and_caller() {
        let a = Access::new(BTreeMap::new(), vec![ApiRole::Viewer]);
        let req = Request::new(());
        assert_eq!(a.authorize(&req, ApiRole::Viewer, "GetStatus").unwrap(), Caller::Anonymous);
        let e = a.authorize(&req, ApiRole::Operator, "StopGroup").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().starts_with("StopGroup needs role operator; the anonymous client has roles viewer"), "{e}");
    }
}
