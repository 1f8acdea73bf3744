#![allow(dead_code)]
//! A browser-like HTTP client for the dashboard's server-rendered pages: signs in through
//! the real form (double-submit cookie), keeps the session cookie, sends forms with the
//! session's CSRF token, and does not follow redirects (tests look at them).

use roony::control::dashboard::auth;
use roony::control::db::Actor;
use roony::control::db::ControlDb;
use roony::control::db::admin_users::{AdminUser, Role};

pub const PASSWORD: &str = "correct horse battery staple";

/// A response: status, `Location`, `Set-Cookie` values, body.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub cookies: Vec<String>,
    pub body: String,
    pub content_type: String,
}

pub struct Dash {
    pub base: String,
    pub client: reqwest::Client,
    /// `name=value` cookies sent with every request.
    pub jar: Vec<(String, String)>,
    pub user: Option<AdminUser>,
}

/// Creates a dashboard user directly in the database.
pub async fn create_user(db: &ControlDb, email: &str, role: Role) -> AdminUser {
    let hash = auth::hash_password(PASSWORD).unwrap();
    db.create_admin_user(email, "Test User", role, &hash, &Actor::system(), now())
        .await
        .unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Dash {
    pub fn new(base: &str) -> Dash {
        Dash {
            base: base.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            jar: Vec::new(),
            user: None,
        }
    }

    /// A user of `role` created in `db`, signed in.
    pub async fn signed_in(db: &ControlDb, base: &str, email: &str, role: Role) -> Dash {
        let user = create_user(db, email, role).await;
        let mut d = Dash::new(base);
        let page = d.login(email, PASSWORD).await;
        assert_eq!(page.status, 303, "sign-in failed: {}", page.body);
        d.user = Some(user);
        d
    }

    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn remember(&mut self, set_cookies: &[String]) {
        for c in set_cookies {
            let first = c.split(';').next().unwrap_or("");
            if let Some((k, v)) = first.split_once('=') {
                self.jar.retain(|(name, _)| name != k);
                let expired = c.contains("Max-Age=0");
                if !expired && !v.is_empty() {
                    self.jar.push((k.to_string(), v.to_string()));
                }
            }
        }
    }

    async fn finish(&mut self, resp: reqwest::Response) -> Page {
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_string());
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let cookies: Vec<String> = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        self.remember(&cookies);
        let body = resp.text().await.unwrap();
        Page {
            status,
            location,
            cookies,
            body,
            content_type,
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    /// The session's CSRF token (derived from the session cookie, as the pages embed it).
    pub fn csrf(&self) -> String {
        self.jar
            .iter()
            .find(|(k, _)| k == auth::SESSION_COOKIE)
            .map(|(_, v)| auth::csrf_token(v))
            .unwrap_or_default()
    }

    /// Posts `form` plus the session's CSRF token.
    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let csrf = self.csrf();
        let mut fields: Vec<(&str, &str)> = form.to_vec();
        fields.push((auth::CSRF_FIELD, &csrf));
        self.post_raw(path, &fields).await
    }

    /// Posts exactly `form` (no CSRF token added).
    pub async fn post_raw(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.finish(resp).await
    }

    /// Signs in through the form; the response of the form's POST.
    pub async fn login(&mut self, email: &str, password: &str) -> Page {
        let form = self.get("/login").await;
        assert_eq!(form.status, 200, "{}", form.body);
        let nonce = self
            .jar
            .iter()
            .find(|(k, _)| k == auth::LOGIN_CSRF_COOKIE)
            .map(|(_, v)| v.clone())
            .expect("login csrf cookie");
        self.post_raw(
            "/login",
            &[
                ("email", email),
                ("password", password),
                ("_login_csrf", &nonce),
            ],
        )
        .await
    }
}
