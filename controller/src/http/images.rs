//! The image store routes (operator): `HEAD`/`PUT /v1/images/blobs/{digest}`
//! upload the layers and config of an image (a blob already stored is not sent
//! again), `PUT /v1/images/manifests` tags a manifest whose blobs are stored,
//! `GET /v1/images` lists the tags and `DELETE /v1/images` removes one. Agents
//! read the store over their link, as a registry (see
//! [`crate::services::images`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use futures_util::StreamExt;
use novacron_api::ApiError;
use novacron_common::clock::unix_ms;
use novacron_common::pki::Role;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem, internal};
use crate::services::events::{NewEvent, kind};
use crate::services::images::{ImageError, MAX_BLOB_BYTES, digest_hex};
use crate::state::store::ImageRecord;

/// An upload that sends nothing for this long is dropped.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(60);

/// The image routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(blob_stored, put_blob))
        .routes(routes!(put_manifest))
        .routes(routes!(list_images, delete_image))
}

/// `PUT /v1/images/manifests`: tag a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ManifestRequest {
    /// The repository (`team/api`).
    pub name: String,
    /// The tag (`1.4`).
    pub tag: String,
    /// The manifest (OCI image manifest JSON), every blob it names stored.
    pub manifest: String,
}

/// `DELETE /v1/images?name=&tag=`.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
pub struct ImageTag {
    /// The repository.
    pub name: String,
    /// The tag.
    pub tag: String,
}

#[utoipa::path(head, path = "/v1/images/blobs/{digest}", tag = "workloads", params(("digest" = String, Path, description = "sha256:<hex>")), responses((status = 200, description = "stored; Content-Length is its size"), (status = 404, description = "not stored"), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn blob_stored(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(digest): Path<String>,
) -> Result<axum::response::Response, Problem> {
    caller.require(Role::Operator)?;
    let images = st.images.clone();
    let len = tokio::task::spawn_blocking(move || images.blob_len(&digest))
        .await
        .map_err(internal)?;
    Ok(match len {
        Some(n) => axum::response::Response::builder()
            .status(StatusCode::OK)
            .header("content-length", n)
            .body(Body::empty())
            .map_err(internal)?,
        None => axum::response::IntoResponse::into_response(StatusCode::NOT_FOUND),
    })
}

#[utoipa::path(put, path = "/v1/images/blobs/{digest}", tag = "workloads", params(("digest" = String, Path, description = "sha256:<hex> of the body")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the blob's bytes"), responses((status = 201, description = "stored (or already there)"), (status = 400, description = "the body's digest is not the one named", content_type = "application/problem+json", body = ApiError), (status = 413, description = "larger than the 32 GiB a blob may have", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the disk is full; nothing was kept", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn put_blob(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(digest): Path<String>,
    body: Body,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    if digest_hex(&digest).is_none() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("{digest:?} is not a digest; expected sha256:<64 hex digits>"),
        ));
    }
    let upload = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let path = st.images.partial_path(&upload).map_err(internal)?;
    let result = receive(&path, body, &digest).await;
    let images = st.images.clone();
    match result {
        Ok(()) => {
            let d = digest.clone();
            tokio::task::spawn_blocking(move || images.commit(&upload, &d))
                .await
                .map_err(internal)?
                .map_err(image_problem)?;
            Ok(StatusCode::CREATED)
        }
        Err(problem) => {
            let _ = tokio::task::spawn_blocking(move || images.abort(&upload)).await;
            Err(problem)
        }
    }
}

/// Writes the body to `path`, hashing it; `Ok` once its digest is `digest`.
async fn receive(path: &std::path::Path, body: Body, digest: &str) -> Result<(), Problem> {
    let full = |e: &std::io::Error| e.raw_os_error() == Some(28);
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut hash = Sha256::new();
    let mut have = 0u64;
    let mut stream = body.into_data_stream();
    loop {
        let chunk = match tokio::time::timeout(UPLOAD_IDLE, stream.next()).await {
            Err(_) => {
                return Err(Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload sent nothing for {}s", UPLOAD_IDLE.as_secs()),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Problem::new(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body: {e}"),
                ));
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        have += chunk.len() as u64;
        if have > MAX_BLOB_BYTES {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a blob may have at most {MAX_BLOB_BYTES} bytes"),
            ));
        }
        hash.update(&chunk);
        if let Err(e) = file.write_all(&chunk).await {
            return Err(if full(&e) {
                Problem::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "the controller's disk is full; nothing was kept".to_string(),
                )
            } else {
                internal(e)
            });
        }
    }
    file.sync_all().await.map_err(internal)?;
    let got = format!("sha256:{}", hex::encode(hash.finalize()));
    if got != digest {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the body's digest is {got}, not {digest}; nothing was kept"),
        ));
    }
    Ok(())
}

#[utoipa::path(put, path = "/v1/images/manifests", tag = "workloads", request_body = ManifestRequest, responses((status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 200, description = "tagged", body = ImageRecord), (status = 409, description = "a blob it names is not stored", content_type = "application/problem+json", body = ApiError), (status = 422, description = "a bad name, tag or manifest", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn put_manifest(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ManifestRequest>,
) -> Result<Json<ImageRecord>, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let images = st.images.clone();
    let who = by.clone();
    let record = tokio::task::spawn_blocking(move || {
        images.put_manifest(
            &req.name,
            &req.tag,
            req.manifest.as_bytes(),
            &who,
            unix_ms(SystemTime::now()),
        )
    })
    .await
    .map_err(internal)?
    .map_err(image_problem)?;
    st.events.note(
        NewEvent::new(
            kind::IMAGE_PUSHED,
            by,
            format!(
                "image {}:{} pushed: {} ({} layers, {} bytes)",
                record.name, record.tag, record.digest, record.layers, record.size
            ),
        )
        .detail("image", record.key())
        .detail("digest", &record.digest),
    );
    Ok(Json(record))
}

#[utoipa::path(get, path = "/v1/images", tag = "workloads", responses((status = 200, description = "every tag in the controller's image store", body = Vec<ImageRecord>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_images(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<ImageRecord>>, Problem> {
    caller.require(Role::Viewer)?;
    let images = st.images.clone();
    tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(internal)?
        .map(Json)
        .map_err(crate::http::api::store_problem)
}

#[utoipa::path(delete, path = "/v1/images", tag = "workloads", params(ImageTag), responses((status = 400, description = "name or tag is missing", content_type = "application/problem+json", body = ApiError), (status = 204, description = "untagged (its blobs stay while other tags use them)"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_image(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(q): Query<ImageTag>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let images = st.images.clone();
    let (name, tag) = (q.name.clone(), q.tag.clone());
    let removed = tokio::task::spawn_blocking(move || images.untag(&name, &tag))
        .await
        .map_err(internal)?
        .map_err(crate::http::api::store_problem)?;
    if removed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!(
                "image {}:{} is not in the controller's store",
                q.name, q.tag
            ),
        ))
    }
}

fn image_problem(e: ImageError) -> Problem {
    match e {
        ImageError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        ImageError::Missing(m) => Problem::new(StatusCode::CONFLICT, m),
        ImageError::Io(e) if e.raw_os_error() == Some(28) => Problem::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "the controller's disk is full; nothing was kept".to_string(),
        ),
        ImageError::Io(e) => internal(e),
        ImageError::Store(e) => crate::http::api::store_problem(e),
    }
}
