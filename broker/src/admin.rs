//! The admin HTTP API (axum): health, Prometheus metrics, and topic management,
//! plus the client half that `weir topic ...` uses. Errors map to HTTP statuses here
//! and nowhere else.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

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
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/topics", get(list_topics).post(create_topic))
        .route(
            "/v1/topics/{name}",
            get(describe_topic).delete(delete_topic),
        )
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

impl From<ReadError> for ApiFailure {
    fn from(e: ReadError) -> Self {
        let status = match &e {
            ReadError::UnknownTopic(_) | ReadError::UnknownPartition { .. } => {
                StatusCode::NOT_FOUND
            }
            ReadError::OffsetOutOfRange { .. } => StatusCode::BAD_REQUEST,
            ReadError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiFailure(status, e.to_string())
    }
}

/// The client side, for `weir topic ...`.
pub struct AdminClient {
    base: String,
    http: reqwest::Client,
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
        }
    }

    async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<Option<T>> {
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the weir admin API at {}: {e}", self.base)
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&body).map_or(body, |e| e.error);
            anyhow::bail!("{message} (HTTP {})", status.as_u16());
        }
        if status == reqwest::StatusCode::NO_CONTENT {
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
}
