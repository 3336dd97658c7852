//! OpenStack Keystone v3 authentication: a [`Session`] that holds a token and finds a
//! service's endpoint (`image`, `object-store`) in the token's catalog.
//!
//! Credentials come from the standard `OS_*` variables or from `clouds.yaml` with
//! `OS_CLOUD` ([`AuthConfig::from_env`]); password, application-credential and token
//! methods. `OS_AUTH_TOKEN` with an endpoint override (`OS_IMAGE_URL`) skips Keystone.
//!
//! Secrets ([`Secret`]) never appear in `Debug` output, errors or logs: every message built
//! from a server's answer goes through [`Session::redact`]. A token close to its expiry
//! (or refused with 401, see [`Session::invalidate`]) is replaced by authenticating again,
//! so a long upload carries on with a fresh token for its next request.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind, Result};

/// A credential: shown as `***` by `Debug` and `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How to prove who we are to Keystone.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum AuthMethod {
    /// `password`: a user (by name in a domain, or by id) scoped to a project.
    Password {
        /// User name (`OS_USERNAME`).
        username: Option<String>,
        /// User id (`OS_USER_ID`), instead of the name.
        user_id: Option<String>,
        /// The user's domain name (`OS_USER_DOMAIN_NAME`, default `Default`).
        user_domain_name: Option<String>,
        /// The user's domain id (`OS_USER_DOMAIN_ID`).
        user_domain_id: Option<String>,
        /// Password (`OS_PASSWORD`).
        password: Secret,
    },
    /// `application_credential`: scoped by the credential itself.
    ApplicationCredential {
        /// Credential id (`OS_APPLICATION_CREDENTIAL_ID`).
        id: Option<String>,
        /// Credential name (`OS_APPLICATION_CREDENTIAL_NAME`, with the user's name).
        name: Option<String>,
        /// Owner's name, with `name`.
        username: Option<String>,
        /// Owner's domain name, with `name`.
        user_domain_name: Option<String>,
        /// Secret (`OS_APPLICATION_CREDENTIAL_SECRET`).
        secret: Secret,
    },
    /// `token`: an existing token (`OS_AUTH_TOKEN`), exchanged for a scoped one with its
    /// catalog, or used as it is when every endpoint needed is given.
    Token {
        /// The token.
        token: Secret,
    },
}

/// The project a password or token is scoped to.
#[derive(Clone, Debug, Default)]
pub struct ProjectScope {
    /// `OS_PROJECT_NAME` (or `OS_TENANT_NAME`).
    pub name: Option<String>,
    /// `OS_PROJECT_ID` (or `OS_TENANT_ID`).
    pub id: Option<String>,
    /// `OS_PROJECT_DOMAIN_NAME` (default `Default` with a name).
    pub domain_name: Option<String>,
    /// `OS_PROJECT_DOMAIN_ID`.
    pub domain_id: Option<String>,
}

/// Everything needed to open a [`Session`]. `Debug` hides the secrets.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    /// Keystone's URL (`OS_AUTH_URL`, e.g. `http://keystone:5000/v3`); None only with a
    /// token and endpoint overrides.
    pub auth_url: Option<String>,
    /// The credential.
    pub method: AuthMethod,
    /// Project scope (password and token methods).
    pub project: ProjectScope,
    /// Region of the endpoints to use (`OS_REGION_NAME`); None: any.
    pub region: Option<String>,
    /// Endpoint interface: public (default), internal or admin (`OS_INTERFACE`).
    pub interface: String,
    /// Endpoints given by hand, by service type (`OS_IMAGE_URL` for `image`): used
    /// instead of the catalog's.
    pub endpoint_overrides: Vec<(String, String)>,
    /// Where the settings came from (a clouds.yaml path and cloud, or `environment`),
    /// for messages.
    pub source: String,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl AuthConfig {
    /// From the environment: `OS_CLOUD` names a cloud in `clouds.yaml` (searched as
    /// openstacksdk does: `OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`,
    /// `~/.config/openstack/clouds.yaml`, `/etc/openstack/clouds.yaml`); otherwise the
    /// `OS_*` variables. `OS_IMAGE_URL` overrides the catalog's image endpoint either way.
    pub fn from_env() -> Result<Self> {
        let mut cfg = match env_var("OS_CLOUD") {
            Some(cloud) => Self::from_clouds_yaml(&cloud, None)?,
            None => Self::from_os_vars(&env_var)?,
        };
        if let Some(u) = env_var("OS_IMAGE_URL") {
            cfg.set_endpoint("image", &u);
        }
        Ok(cfg)
    }

    /// Use `url` for `service_type` instead of the catalog's endpoint.
    pub fn set_endpoint(&mut self, service_type: &str, url: &str) {
        self.endpoint_overrides.retain(|(t, _)| t != service_type);
        self.endpoint_overrides
            .push((service_type.to_string(), url.to_string()));
    }

    /// From `OS_*` variables read through `var` (the environment for [`Self::from_env`]).
    pub fn from_os_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let first = |names: &[&str]| names.iter().find_map(|n| var(n));
        let method = if let Some(secret) = var("OS_APPLICATION_CREDENTIAL_SECRET") {
            AuthMethod::ApplicationCredential {
                id: var("OS_APPLICATION_CREDENTIAL_ID"),
                name: var("OS_APPLICATION_CREDENTIAL_NAME"),
                username: var("OS_USERNAME"),
                user_domain_name: var("OS_USER_DOMAIN_NAME"),
                secret: Secret(secret),
            }
        } else if let Some(password) = var("OS_PASSWORD") {
            AuthMethod::Password {
                username: var("OS_USERNAME"),
                user_id: var("OS_USER_ID"),
                user_domain_name: var("OS_USER_DOMAIN_NAME"),
                user_domain_id: var("OS_USER_DOMAIN_ID"),
                password: Secret(password),
            }
        } else if let Some(token) = first(&["OS_AUTH_TOKEN", "OS_TOKEN"]) {
            AuthMethod::Token {
                token: Secret(token),
            }
        } else {
            return Err(Error::arg(
                "no OpenStack credentials: set OS_CLOUD, or OS_AUTH_URL with OS_PASSWORD, OS_APPLICATION_CREDENTIAL_SECRET or OS_AUTH_TOKEN",
            ));
        };
        let cfg = AuthConfig {
            auth_url: var("OS_AUTH_URL"),
            method,
            project: ProjectScope {
                name: first(&["OS_PROJECT_NAME", "OS_TENANT_NAME"]),
                id: first(&["OS_PROJECT_ID", "OS_TENANT_ID"]),
                domain_name: var("OS_PROJECT_DOMAIN_NAME"),
                domain_id: var("OS_PROJECT_DOMAIN_ID"),
            },
            region: var("OS_REGION_NAME"),
            interface: normalize_interface(var("OS_INTERFACE").as_deref()),
            endpoint_overrides: Vec::new(),
            source: "environment".into(),
        };
        Ok(cfg)
    }

    /// The cloud `cloud` of a `clouds.yaml`: the file `path`, or the first found on the
    /// openstacksdk search path.
    pub fn from_clouds_yaml(cloud: &str, path: Option<&Path>) -> Result<Self> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => clouds_yaml_search_path()
                .into_iter()
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::arg(format!(
                        "OS_CLOUD={cloud}: no clouds.yaml (searched {})",
                        clouds_yaml_search_path()
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("reading clouds.yaml", e).with_path(&path))?;
        // serde_norway's messages quote no values, only positions: safe to show.
        let doc: serde_json::Value = serde_norway::from_str(&text).map_err(|e| {
            Error::invalid(format!("clouds.yaml is not valid YAML: {e}")).with_path(&path)
        })?;
        let c = doc
            .get("clouds")
            .and_then(|c| c.get(cloud))
            .ok_or_else(|| {
                Error::arg(format!("no cloud '{cloud}' under 'clouds:'")).with_path(&path)
            })?;
        let auth = c.get("auth").cloned().unwrap_or_default();
        let s = |v: &serde_json::Value, k: &str| -> Option<String> {
            match v.get(k)? {
                serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        let map = |k: &str| -> Option<String> {
            let key = k.strip_prefix("OS_")?.to_ascii_lowercase();
            match key.as_str() {
                "region_name" => s(c, "region_name"),
                "interface" => s(c, "interface"),
                "auth_token" => s(&auth, "token"),
                _ => s(&auth, &key),
            }
        };
        let mut cfg = Self::from_os_vars(&map)?;
        cfg.source = format!("{} (cloud '{cloud}')", path.display());
        Ok(cfg)
    }

    /// The secret values, to strip from any message.
    pub(crate) fn secrets(&self) -> Vec<String> {
        let s = match &self.method {
            AuthMethod::Password { password, .. } => password,
            AuthMethod::ApplicationCredential { secret, .. } => secret,
            AuthMethod::Token { token } => token,
        };
        vec![s.0.clone()]
    }

    fn override_for(&self, service_type: &str) -> Option<&str> {
        self.endpoint_overrides
            .iter()
            .find(|(t, _)| t == service_type)
            .map(|(_, u)| u.as_str())
    }
}

fn normalize_interface(i: Option<&str>) -> String {
    // The v2-era spellings (publicURL, internalURL, adminURL) are still common in rc files.
    let i = i.unwrap_or("public");
    i.strip_suffix("URL").unwrap_or(i).to_ascii_lowercase()
}

/// Where openstacksdk looks for `clouds.yaml`, in order.
pub fn clouds_yaml_search_path() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(f) = env_var("OS_CLIENT_CONFIG_FILE") {
        v.push(PathBuf::from(f));
    }
    v.push(PathBuf::from("clouds.yaml"));
    if let Some(h) = env_var("XDG_CONFIG_HOME") {
        v.push(Path::new(&h).join("openstack/clouds.yaml"));
    } else if let Some(h) = env_var("HOME") {
        v.push(Path::new(&h).join(".config/openstack/clouds.yaml"));
    }
    v.push(PathBuf::from("/etc/openstack/clouds.yaml"));
    v
}

/// One endpoint of the token's catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogEndpoint {
    /// Service type (`image`, `object-store`, `identity`).
    pub service_type: String,
    /// public, internal or admin.
    pub interface: String,
    /// Region id.
    pub region: Option<String>,
    /// The URL.
    pub url: String,
}

struct TokenState {
    token: Secret,
    expires_at: Option<SystemTime>,
    catalog: Vec<CatalogEndpoint>,
}

/// An authenticated session: a token, renewed as needed, and the endpoints of its catalog.
/// Shared by the Glance client and (later) Swift: [`token`](Self::token) and
/// [`endpoint`](Self::endpoint) are all a client needs.
pub struct Session {
    cfg: AuthConfig,
    client: reqwest::blocking::Client,
    state: Mutex<Option<TokenState>>,
    refresh_margin: Mutex<Duration>,
    auths: AtomicU64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.cfg)
            .field("authentications", &self.authentications())
            .finish_non_exhaustive()
    }
}

/// How long before its expiry a token is replaced: long enough for the request it goes on.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(300);

impl Session {
    /// Open a session: authenticate now (so bad credentials fail before any work), unless
    /// the config is a token with every endpoint overridden, which needs no Keystone.
    pub fn new(cfg: AuthConfig) -> Result<Self> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // Uploads stream for as long as they take: no overall timeout.
            .timeout(None::<Duration>)
            .user_agent(concat!("diskconv/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::arg(format!("HTTP client: {e}")))?;
        let s = Session {
            cfg,
            client,
            state: Mutex::new(None),
            refresh_margin: Mutex::new(DEFAULT_REFRESH_MARGIN),
            auths: AtomicU64::new(0),
        };
        if s.cfg.auth_url.is_some() {
            s.authenticate()?;
        } else if let AuthMethod::Token { token } = &s.cfg.method {
            *s.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(TokenState {
                token: token.clone(),
                expires_at: None,
                catalog: Vec::new(),
            });
        } else {
            return Err(Error::arg(
                "no Keystone URL: set OS_AUTH_URL (or auth_url in clouds.yaml)",
            ));
        }
        Ok(s)
    }

    /// From the environment ([`AuthConfig::from_env`]).
    pub fn from_env() -> Result<Self> {
        Self::new(AuthConfig::from_env()?)
    }

    /// The config the session was opened with.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// The HTTP client (blocking, no overall timeout), for the services' requests.
    pub fn client(&self) -> &reqwest::blocking::Client {
        &self.client
    }

    /// Replace tokens this long before they expire (default [`DEFAULT_REFRESH_MARGIN`]).
    pub fn set_refresh_margin(&self, margin: Duration) {
        *self
            .refresh_margin
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = margin;
    }

    /// How many times the session has authenticated to Keystone.
    pub fn authentications(&self) -> u64 {
        self.auths.load(Ordering::SeqCst)
    }

    /// A valid token: the current one, or a new one when it expires within the refresh
    /// margin or was [`invalidate`](Self::invalidate)d.
    pub fn token(&self) -> Result<String> {
        let margin = *self
            .refresh_margin
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = st.as_ref() {
                let fresh = t.expires_at.is_none_or(|e| e > SystemTime::now() + margin);
                if fresh {
                    return Ok(t.token.0.clone());
                }
            }
        }
        if self.cfg.auth_url.is_none() {
            return Err(Error::new(
                ErrorKind::Io,
                "the token was refused and there is no OS_AUTH_URL to get a new one",
            ));
        }
        self.authenticate()?;
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(st.as_ref().expect("set by authenticate").token.0.clone())
    }

    /// When the current token stops being fresh: its expiry less the refresh margin (the
    /// moment [`token`](Self::token) would authenticate again). None without a token or
    /// when Keystone gave no expiry.
    pub fn token_renew_at(&self) -> Option<SystemTime> {
        let margin = *self
            .refresh_margin
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let at = st.as_ref()?.expires_at?;
        Some(at.checked_sub(margin).unwrap_or(UNIX_EPOCH))
    }

    /// Forget the current token (a service answered 401): the next [`token`](Self::token)
    /// authenticates again.
    pub fn invalidate(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.cfg.auth_url.is_some() {
            *st = None;
        } else if let Some(t) = st.as_mut() {
            // A fixed token cannot be renewed: make token() say so.
            t.expires_at = Some(UNIX_EPOCH);
        }
    }

    /// The URL of `service_type` (`image`, `object-store`): the override if any, else the
    /// catalog's endpoint for the configured interface and region. No trailing `/`.
    pub fn endpoint(&self, service_type: &str) -> Result<String> {
        if let Some(u) = self.cfg.override_for(service_type) {
            return Ok(u.trim_end_matches('/').to_string());
        }
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let catalog = st.as_ref().map(|t| t.catalog.as_slice()).unwrap_or(&[]);
        pick_endpoint(
            catalog,
            service_type,
            &self.cfg.interface,
            self.cfg.region.as_deref(),
        )
        .map(|u| u.trim_end_matches('/').to_string())
    }

    /// The catalog of the current token.
    pub fn catalog(&self) -> Vec<CatalogEndpoint> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.as_ref().map(|t| t.catalog.clone()).unwrap_or_default()
    }

    /// `text` with every secret of this session (credential and tokens) replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets = self.cfg.secrets();
        if let Some(t) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            secrets.push(t.token.0.clone());
        }
        let mut out = text.to_string();
        for s in secrets.iter().filter(|s| s.len() >= 4) {
            out = out.replace(s.as_str(), "***");
        }
        out
    }

    fn auth_body(&self) -> Result<serde_json::Value> {
        use serde_json::json;
        let domain = |name: &Option<String>, id: &Option<String>| match (id, name) {
            (Some(id), _) => json!({ "id": id }),
            (None, Some(n)) => json!({ "name": n }),
            (None, None) => json!({ "id": "default" }),
        };
        let identity = match &self.cfg.method {
            AuthMethod::Password {
                username,
                user_id,
                user_domain_name,
                user_domain_id,
                password,
            } => {
                let user = match (user_id, username) {
                    (Some(id), _) => json!({ "id": id, "password": password.0 }),
                    (None, Some(n)) => json!({
                        "name": n,
                        "domain": domain(user_domain_name, user_domain_id),
                        "password": password.0,
                    }),
                    (None, None) => {
                        return Err(Error::arg(
                            "password authentication needs OS_USERNAME or OS_USER_ID",
                        ))
                    }
                };
                json!({ "methods": ["password"], "password": { "user": user } })
            }
            AuthMethod::ApplicationCredential {
                id,
                name,
                username,
                user_domain_name,
                secret,
            } => {
                let ac = match (id, name, username) {
                    (Some(id), _, _) => json!({ "id": id, "secret": secret.0 }),
                    (None, Some(n), Some(u)) => json!({
                        "name": n,
                        "user": { "name": u, "domain": domain(user_domain_name, &None) },
                        "secret": secret.0,
                    }),
                    _ => {
                        return Err(Error::arg(
                            "application credential authentication needs OS_APPLICATION_CREDENTIAL_ID (or _NAME with OS_USERNAME)",
                        ))
                    }
                };
                json!({ "methods": ["application_credential"], "application_credential": ac })
            }
            AuthMethod::Token { token } => {
                json!({ "methods": ["token"], "token": { "id": token.0 } })
            }
        };
        let mut auth = json!({ "identity": identity });
        // Application credentials carry their own scope; Keystone refuses another.
        if !matches!(self.cfg.method, AuthMethod::ApplicationCredential { .. }) {
            let p = &self.cfg.project;
            let project = match (&p.id, &p.name) {
                (Some(id), _) => Some(json!({ "id": id })),
                (None, Some(n)) => Some(json!({
                    "name": n,
                    "domain": domain(&p.domain_name, &p.domain_id),
                })),
                (None, None) => None,
            };
            if let Some(project) = project {
                auth["scope"] = json!({ "project": project });
            }
        }
        Ok(json!({ "auth": auth }))
    }

    fn authenticate(&self) -> Result<()> {
        let base = self.cfg.auth_url.as_deref().expect("checked by callers");
        let base = base.trim_end_matches('/');
        // OS_AUTH_URL is often given without the version (http://host:5000).
        let url = if base.ends_with("/v3") {
            format!("{base}/auth/tokens")
        } else {
            format!("{base}/v3/auth/tokens")
        };
        let body = self.auth_body()?;
        let fail =
            |msg: String| Error::new(ErrorKind::Io, self.redact(&msg)).with_path(self.redact(&url));
        let resp = self
            .client
            .post(&url)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .map_err(|e| fail(format!("cannot reach Keystone: {}", error_chain(&e))))?;
        self.auths.fetch_add(1, Ordering::SeqCst);
        let status = resp.status();
        let token = resp
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().unwrap_or_default();
        if !status.is_success() {
            let what = match status.as_u16() {
                401 => "Keystone refused the credentials",
                403 => "Keystone refused the scope",
                _ => "Keystone authentication failed",
            };
            return Err(fail(format!(
                "{what} from {} (HTTP {}: {})",
                self.cfg.source,
                status.as_u16(),
                server_message(&text)
            )));
        }
        let token = token.ok_or_else(|| fail("Keystone gave no X-Subject-Token".into()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|_| fail("Keystone's token is not JSON".into()))?;
        let t = &v["token"];
        let expires_at = t["expires_at"].as_str().and_then(parse_rfc3339);
        let mut catalog = Vec::new();
        for s in t["catalog"].as_array().into_iter().flatten() {
            let ty = s["type"].as_str().unwrap_or_default();
            for e in s["endpoints"].as_array().into_iter().flatten() {
                if let Some(u) = e["url"].as_str() {
                    catalog.push(CatalogEndpoint {
                        service_type: ty.to_string(),
                        interface: e["interface"].as_str().unwrap_or("public").to_string(),
                        region: e["region_id"]
                            .as_str()
                            .or_else(|| e["region"].as_str())
                            .map(str::to_string),
                        url: u.to_string(),
                    });
                }
            }
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(TokenState {
            token: Secret(token),
            expires_at,
            catalog,
        });
        Ok(())
    }
}

/// The first endpoint of `service_type` for `interface` and (if given) `region`.
pub fn pick_endpoint(
    catalog: &[CatalogEndpoint],
    service_type: &str,
    interface: &str,
    region: Option<&str>,
) -> Result<String> {
    catalog
        .iter()
        .find(|e| {
            e.service_type == service_type
                && e.interface == interface
                && region.is_none_or(|r| e.region.as_deref() == Some(r))
        })
        .map(|e| e.url.clone())
        .ok_or_else(|| {
            let have: Vec<String> = catalog
                .iter()
                .filter(|e| e.service_type == service_type)
                .map(|e| format!("{}/{}", e.interface, e.region.as_deref().unwrap_or("-")))
                .collect();
            Error::arg(format!(
                "the token's catalog has no '{service_type}' endpoint for interface {interface}{}{}",
                region.map(|r| format!(" in region {r}")).unwrap_or_default(),
                if have.is_empty() {
                    String::new()
                } else {
                    format!(" (it has {})", have.join(", "))
                }
            ))
        })
}

/// The `message` of an OpenStack error body (`{"error": {"message": ...}}` or Glance's
/// HTML/text), on one line and bounded.
pub(crate) fn server_message(body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let m = v
        .as_ref()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or_else(|| v["message"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.to_string());
    // Glance answers errors as a small HTML page, and puts <br /> in its JSON messages too:
    // keep the text.
    let mut text = String::new();
    let mut in_tag = false;
    for c in m.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                text.push(' ');
            }
            _ if !in_tag => text.push(c),
            _ => {}
        }
    }
    let m = text;
    let mut words: Vec<&str> = m.split_whitespace().collect();
    // An error page's title and heading say the same ("415 Unsupported Media Type" twice).
    if let Some(k) = (1..=6).find(|&k| words.len() >= 2 * k && words[..k] == words[k..2 * k]) {
        words.drain(..k);
    }
    let one = words.join(" ");
    one.chars().take(300).collect()
}

pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `2026-12-01T16:17:22.000000Z` (or with `+00:00`) as a time; None if not that shape.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let sign = if r.starts_with('-') { -1 } else { 1 };
            sign * (r.get(1..3)?.parse::<i64>().ok()? * 3600
                + r.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("2026-12-01T15:17:22.000000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_138_242
        );
        let t2 = parse_rfc3339("2026-12-01T16:17:22+01:00").unwrap();
        assert_eq!(t, t2);
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert!(parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn debug_hides_secrets() {
        let vars = |k: &str| match k {
            "OS_AUTH_URL" => Some("http://127.0.0.1:1/v3".to_string()),
            "OS_USERNAME" => Some("alice".to_string()),
            "OS_PASSWORD" => Some("hunter2-very-secret".to_string()),
            "OS_PROJECT_NAME" => Some("p".to_string()),
            _ => None,
        };
        let cfg = AuthConfig::from_os_vars(&vars).unwrap();
        let d = format!("{cfg:?}");
        assert!(!d.contains("hunter2"), "{d}");
        assert!(d.contains("alice") && d.contains("***"), "{d}");
        // A refused connection's error carries neither the password nor the body.
        let e = Session::new(cfg).unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("cannot reach Keystone"), "{e}");
    }

    #[test]
    fn catalog_choice() {
        let ep = |t: &str, i: &str, r: &str, u: &str| CatalogEndpoint {
            service_type: t.into(),
            interface: i.into(),
            region: Some(r.into()),
            url: u.into(),
        };
        let cat = vec![
            ep("image", "internal", "R1", "http://int"),
            ep("image", "public", "R2", "http://pub2"),
            ep("image", "public", "R1", "http://pub1"),
            ep("object-store", "public", "R1", "http://swift"),
        ];
        assert_eq!(
            pick_endpoint(&cat, "image", "public", Some("R1")).unwrap(),
            "http://pub1"
        );
        assert_eq!(
            pick_endpoint(&cat, "image", "public", None).unwrap(),
            "http://pub2"
        );
        assert_eq!(
            pick_endpoint(&cat, "image", "internal", None).unwrap(),
            "http://int"
        );
        let e = pick_endpoint(&cat, "image", "admin", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no 'image' endpoint for interface admin"), "{e}");
        assert_eq!(normalize_interface(Some("publicURL")), "public");
    }

    #[test]
    fn clouds_yaml_appcred() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("clouds.yaml");
        std::fs::write(
            &p,
            "clouds:\n  lab:\n    auth_type: v3applicationcredential\n    auth:\n      auth_url: http://127.0.0.1:5000/v3\n      application_credential_id: abc123\n      application_credential_secret: s3cr3t-value\n    region_name: RegionTwo\n    interface: internal\n",
        )
        .unwrap();
        let c = AuthConfig::from_clouds_yaml("lab", Some(&p)).unwrap();
        assert_eq!(c.auth_url.as_deref(), Some("http://127.0.0.1:5000/v3"));
        assert_eq!(c.region.as_deref(), Some("RegionTwo"));
        assert_eq!(c.interface, "internal");
        assert!(
            matches!(&c.method, AuthMethod::ApplicationCredential { id: Some(i), .. } if i == "abc123")
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let e = AuthConfig::from_clouds_yaml("nope", Some(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no cloud 'nope'"), "{e}");
    }
}
