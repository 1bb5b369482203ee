//! The admin HTTP API (axum): health, Prometheus metrics, topics, deployed plugins,
//! pipelines and users, plus the client half that `weir topic|plugin|pipeline|user ...`
//! uses. Errors map to HTTP statuses here and nowhere else.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::auth::{UserError, UserView, Users};
use crate::plugins::PipelineConfig;
use crate::plugins::Pipelines;
use crate::plugins::manager::{ManagerError, PipelineView, PluginView};
use crate::plugins::registry::MAX_PLUGIN_BYTES;
use crate::replication::{Replication, RuleStatus};
use crate::storage::{Log, PartitionInfo, ReadError, TopicConfig, TopicError, TopicInfo};

/// A topic as the API shows it: config under Kafka's key names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicView {
    pub name: String,
    pub partitions: u32,
    pub config: BTreeMap<String, String>,
    pub created_ms: i64,
}

impl From<TopicInfo> for TopicView {
    fn from(t: TopicInfo) -> Self {
        Self {
            name: t.name,
            partitions: t.partitions,
            config: t.config.entries().into_iter().collect(),
            created_ms: t.created_ms,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopicDescription {
    pub topic: TopicView,
    pub partitions: Vec<PartitionInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateTopic {
    pub name: String,
    /// Default: `[topic_defaults] partitions`.
    pub partitions: Option<u32>,
    /// Kafka config keys; the rest come from `[topic_defaults]`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

pub struct AdminState {
    pub log: Log,
    pub registry: Registry,
    pub topic_defaults: TopicConfig,
    pub default_partitions: u32,
    pub pipelines: Arc<Pipelines>,
    pub replication: Arc<Replication>,
    pub users: Arc<Users>,
    /// Set once every listener is up: `/health` answers 503 "starting" until then (the
    /// admin API comes up first, so that start-up can be watched).
    pub serving: Arc<std::sync::atomic::AtomicBool>,
    /// `[admin] token`: when set, every request but `/health` carries it as a bearer token.
    pub token: Option<String>,
    pub status: Arc<crate::status::StatusSources>,
}

/// Refuses a request without the bearer token, when one is configured. `/health` stays
/// open, for supervisors and load balancers.
async fn require_token(
    State(state): State<Arc<AdminState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    // The page's files hold no data; the page asks for the token when `/v1/status` needs it.
    let path = request.uri().path();
    if path == "/health" || PAGE_FILES.iter().any(|(p, _, _)| *p == path) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Digests compared, so the time taken says nothing about the token's bytes.
    let digest = |t: &str| <sha2::Sha256 as sha2::Digest>::digest(t.as_bytes());
    if presented.is_some_and(|p| digest(p) == digest(token)) {
        return next.run(request).await;
    }
    let error = ApiError {
        error: "this admin API needs its token: set WEIR_ADMIN_TOKEN".into(),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        Json(error),
    )
        .into_response()
}

async fn health(State(state): State<Arc<AdminState>>) -> Response {
    if state.serving.load(std::sync::atomic::Ordering::Acquire) {
        Json(serde_json::json!({ "status": "ok" })).into_response()
    } else {
        let starting = Json(serde_json::json!({ "status": "starting" }));
        (StatusCode::SERVICE_UNAVAILABLE, starting).into_response()
    }
}

/// The status page (`broker/assets/status/`), shipped inside the binary: a gateway is
/// often offline, so nothing comes from a CDN. uPlot draws the charts.
const PAGE_FILES: [(&str, &str, &str); 5] = [
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../assets/status/index.html"),
    ),
    (
        "/assets/status.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/status/status.js"),
    ),
    (
        "/assets/status.css",
        "text/css; charset=utf-8",
        include_str!("../assets/status/status.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/status/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/status/uPlot.min.css"),
    ),
];

pub fn router(state: Arc<AdminState>) -> Router {
    let mut router = Router::new();
    for (path, content_type, body) in PAGE_FILES {
        router = router.route(
            path,
            get(move || async move {
                (
                    [
                        (axum::http::header::CONTENT_TYPE, content_type),
                        (axum::http::header::CACHE_CONTROL, "no-cache"),
                    ],
                    body,
                )
            }),
        );
    }
    router
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route(
            "/v1/topics/{name}",
            get(describe_topic).delete(delete_topic),
        )
        .route("/v1/plugins", get(list_plugins))
        .route(
            "/v1/plugins/{name}",
            put(deploy_plugin)
                .delete(remove_plugin)
                .layer(DefaultBodyLimit::max(MAX_PLUGIN_BYTES)),
        )
        .route("/v1/pipelines", get(list_pipelines).post(create_pipeline))
        .route(
            "/v1/pipelines/{name}",
            get(describe_pipeline).delete(delete_pipeline),
        )
        .route("/v1/pipelines/{name}/pause", post(pause_pipeline))
        .route("/v1/pipelines/{name}/resume", post(resume_pipeline))
        .route("/v1/users", get(list_users))
        .route("/v1/users/{name}", put(set_user).delete(remove_user))
        .route(
            "/v1/replication",
            get(|State(state): State<Arc<AdminState>>| async move {
                Json(state.replication.status())
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
}

async fn list_topics(State(state): State<Arc<AdminState>>) -> Json<Vec<TopicView>> {
    Json(
        state
            .log
            .topics()
            .into_iter()
            .map(TopicView::from)
            .collect(),
    )
}

async fn create_topic(
    State(state): State<Arc<AdminState>>,
    Json(req): Json<CreateTopic>,
) -> Result<(StatusCode, Json<TopicView>), ApiFailure> {
    let config = state
        .topic_defaults
        .clone()
        .with_overrides(req.config.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(TopicError::from)?;
    let partitions = req.partitions.unwrap_or(state.default_partitions);
    let info = state
        .log
        .create_topic(&req.name, partitions, config)
        .await?;
    tracing::info!(topic = %info.name, partitions, "topic created");
    Ok((StatusCode::CREATED, Json(info.into())))
}

async fn status(
    State(state): State<Arc<AdminState>>,
) -> Result<Json<crate::status::Status>, ApiFailure> {
    // Reads every topic's partitions: off the async workers.
    let sources = state.status.clone();
    let status = tokio::task::spawn_blocking(move || sources.status())
        .await
        .map_err(|e| ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(status))
}

async fn describe_topic(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<TopicDescription>, ApiFailure> {
    let log = state.log.clone();
    let (info, partitions) = tokio::task::spawn_blocking(move || log.describe(&name))
        .await
        .map_err(|e| ApiFailure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(TopicDescription {
        topic: info.into(),
        partitions,
    }))
}

async fn delete_topic(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    state.log.delete_topic(&name).await?;
    tracing::info!(topic = %name, "topic deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_plugins(
    State(state): State<Arc<AdminState>>,
) -> Result<Json<Vec<PluginView>>, ApiFailure> {
    Ok(Json(state.pipelines.plugins()?))
}

/// The body is the component's bytes.
async fn deploy_plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<PluginView>), ApiFailure> {
    let view = state.pipelines.deploy(&name, body.to_vec()).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn remove_plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    state.pipelines.remove_plugin(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_pipelines(State(state): State<Arc<AdminState>>) -> Json<Vec<PipelineView>> {
    Json(state.pipelines.list())
}

async fn create_pipeline(
    State(state): State<Arc<AdminState>>,
    Json(config): Json<PipelineConfig>,
) -> Result<(StatusCode, Json<PipelineView>), ApiFailure> {
    let view = state.pipelines.create(config).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

async fn describe_pipeline(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<PipelineView>, ApiFailure> {
    Ok(Json(state.pipelines.describe(&name)?))
}

async fn pause_pipeline(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<PipelineView>, ApiFailure> {
    Ok(Json(state.pipelines.pause(&name).await?))
}

async fn resume_pipeline(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<Json<PipelineView>, ApiFailure> {
    Ok(Json(state.pipelines.resume(&name).await?))
}

async fn delete_pipeline(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    state.pipelines.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PUT /v1/users/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetPassword {
    pub password: String,
}

async fn list_users(State(state): State<Arc<AdminState>>) -> Json<Vec<UserView>> {
    Json(state.users.list())
}

/// Adds the user (201) or sets its new password (200); effective for the next login.
async fn set_user(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    Json(req): Json<SetPassword>,
) -> Result<StatusCode, ApiFailure> {
    let created = state.users.add(&name, req.password.as_bytes()).await?;
    tracing::info!(user = %name, created, "user credentials stored");
    Ok(if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    })
}

async fn remove_user(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    state.users.remove(&name).await?;
    tracing::info!(user = %name, "user removed");
    Ok(StatusCode::NO_CONTENT)
}

/// An error response: status and message.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<TopicError> for ApiFailure {
    fn from(e: TopicError) -> Self {
        let status = match &e {
            TopicError::InvalidName(_)
            | TopicError::InvalidConfig(_)
            | TopicError::InvalidPartitions(_) => StatusCode::BAD_REQUEST,
            TopicError::AlreadyExists(_) | TopicError::Collides { .. } => StatusCode::CONFLICT,
            TopicError::NotFound(_) => StatusCode::NOT_FOUND,
            TopicError::Storage(s) if s.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
            TopicError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, e.to_string())
    }
}

impl From<ManagerError> for ApiFailure {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::Invalid(_) => StatusCode::BAD_REQUEST,
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::Topic(e) => return ApiFailure::from(e.clone()),
            _ if e.is_disk_full() => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, e.to_string())
    }
}

impl From<UserError> for ApiFailure {
    fn from(e: UserError) -> Self {
        let status = match &e {
            UserError::InvalidName(_) | UserError::InvalidPassword(_) => StatusCode::BAD_REQUEST,
            UserError::NotFound(_) => StatusCode::NOT_FOUND,
            UserError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, e.to_string())
    }
}

impl From<ReadError> for ApiFailure {
    fn from(e: ReadError) -> Self {
        let status = match &e {
            ReadError::NotFound(_) => StatusCode::NOT_FOUND,
            ReadError::OffsetOutOfRange { .. } => StatusCode::BAD_REQUEST,
            ReadError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, e.to_string())
    }
}

/// The client side, for `weir topic|plugin|pipeline ...`.
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl AdminClient {
    /// `address` is a URL (`http://127.0.0.1:9644`) or a bare `host:port`.
    pub fn new(address: &str) -> Self {
        let base = if address.contains("://") {
            address.trim_end_matches('/').to_string()
        } else {
            format!("http://{address}")
        };
        Self {
            base,
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// A client for the CLI: `WEIR_ADMIN_TOKEN` is sent as the bearer token, and
    /// `WEIR_ADMIN_CA` (a PEM file) is trusted for an `https://` address.
    pub fn from_env(address: &str) -> anyhow::Result<Self> {
        let mut client = Self::new(address);
        client.token = std::env::var("WEIR_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        if let Ok(path) = std::env::var("WEIR_ADMIN_CA") {
            let pem =
                std::fs::read(&path).map_err(|e| anyhow::anyhow!("WEIR_ADMIN_CA {path}: {e}"))?;
            let mut builder = reqwest::Client::builder();
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("WEIR_ADMIN_CA {path}: {e}"))?
            {
                builder = builder.add_root_certificate(cert);
            }
            client.http = builder.build()?;
        }
        Ok(client)
    }

    /// Sends `request`; an error status becomes an error with the API's message.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the weir admin API at {}: {e}", self.base)
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&body).map_or(body, |e| e.error);
            anyhow::bail!("{message} (HTTP {})", status.as_u16());
        }
        Ok(response)
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<Option<T>> {
        let response = self.send(request).await?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Ok(Some(response.json().await?))
    }

    pub async fn create_topic(&self, req: &CreateTopic) -> anyhow::Result<TopicView> {
        let url = format!("{}/v1/topics", self.base);
        self.call(self.http.post(url).json(req))
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    pub async fn list_topics(&self) -> anyhow::Result<Vec<TopicView>> {
        let url = format!("{}/v1/topics", self.base);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }

    /// `/v1/status`: what the status page shows.
    pub async fn status(&self) -> anyhow::Result<crate::status::Status> {
        let url = format!("{}/v1/status", self.base);
        self.call(self.http.get(url))
            .await?
            .ok_or_else(|| anyhow::anyhow!("the broker has no /v1/status"))
    }

    pub async fn describe_topic(&self, name: &str) -> anyhow::Result<TopicDescription> {
        let url = format!("{}/v1/topics/{name}", self.base);
        self.call(self.http.get(url))
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    pub async fn delete_topic(&self, name: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/topics/{name}", self.base);
        self.call::<serde_json::Value>(self.http.delete(url))
            .await
            .map(drop)
    }

    pub async fn deploy_plugin(&self, name: &str, wasm: Vec<u8>) -> anyhow::Result<PluginView> {
        let url = format!("{}/v1/plugins/{name}", self.base);
        let request = self
            .http
            .put(url)
            .header("content-type", "application/wasm")
            .body(wasm);
        self.call(request)
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    /// Adds a user or sets its password; true if the user is new.
    pub async fn set_user(&self, name: &str, password: &str) -> anyhow::Result<bool> {
        let url = format!("{}/v1/users/{name}", self.base);
        let body = SetPassword {
            password: password.to_string(),
        };
        let response = self.send(self.http.put(url).json(&body)).await?;
        Ok(response.status() == reqwest::StatusCode::CREATED)
    }

    pub async fn list_users(&self) -> anyhow::Result<Vec<UserView>> {
        let url = format!("{}/v1/users", self.base);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }

    pub async fn remove_user(&self, name: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/users/{name}", self.base);
        self.call::<serde_json::Value>(self.http.delete(url))
            .await
            .map(drop)
    }

    pub async fn list_plugins(&self) -> anyhow::Result<Vec<PluginView>> {
        let url = format!("{}/v1/plugins", self.base);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }

    pub async fn remove_plugin(&self, name: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/plugins/{name}", self.base);
        self.call::<serde_json::Value>(self.http.delete(url))
            .await
            .map(drop)
    }

    pub async fn create_pipeline(&self, config: &PipelineConfig) -> anyhow::Result<PipelineView> {
        let url = format!("{}/v1/pipelines", self.base);
        self.call(self.http.post(url).json(config))
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    pub async fn list_pipelines(&self) -> anyhow::Result<Vec<PipelineView>> {
        let url = format!("{}/v1/pipelines", self.base);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }

    pub async fn describe_pipeline(&self, name: &str) -> anyhow::Result<PipelineView> {
        let url = format!("{}/v1/pipelines/{name}", self.base);
        self.call(self.http.get(url))
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    /// `action` is `pause` or `resume`.
    pub async fn control_pipeline(&self, name: &str, action: &str) -> anyhow::Result<PipelineView> {
        let url = format!("{}/v1/pipelines/{name}/{action}", self.base);
        self.call(self.http.post(url))
            .await?
            .ok_or_else(|| anyhow::anyhow!("empty response"))
    }

    pub async fn delete_pipeline(&self, name: &str) -> anyhow::Result<()> {
        let url = format!("{}/v1/pipelines/{name}", self.base);
        self.call::<serde_json::Value>(self.http.delete(url))
            .await
            .map(drop)
    }

    pub async fn replication_status(&self) -> anyhow::Result<Vec<RuleStatus>> {
        let url = format!("{}/v1/replication", self.base);
        Ok(self.call(self.http.get(url)).await?.unwrap_or_default())
    }
}
