//! The operators' actions, as form POSTs: scale a job, restart or migrate an
//! allocation, drain or uncordon a node. Each goes through
//! [`authorize`](super::auth::authorize) (origin, CSRF token, role) whatever the
//! page showed, then through the same services as the API call it mirrors, and
//! answers with a redirect to the page it came from (its outcome shown there
//! once).

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use novacron_api::ApplyRequest;
use novacron_common::manifest::{JobType, scaled_manifest};
use novacron_common::pki::Role;
use serde::Deserialize;
use tracing::info;

use super::Ui;
use super::auth::{User, authorize};
use super::html::seg;
use crate::services::events::{NewEvent, kind};

/// The most replicas the scale form accepts.
pub const MAX_REPLICAS: u32 = 10_000;

/// A form with only the CSRF token.
#[derive(Debug, Deserialize)]
pub struct ActionForm {
    /// The session's CSRF token (missing reads as empty, and is refused).
    #[serde(default)]
    pub csrf: String,
}

/// The scale form.
#[derive(Debug, Deserialize)]
pub struct ScaleForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
    /// The replicas wanted (checked here, so that a bad number is explained).
    #[serde(default)]
    pub replicas: String,
}

/// `POST /ui/jobs/{name}/scale`: the job's stored manifest with `spec.replicas`
/// changed, applied as a new version (what `novacron job scale` does).
pub async fn scale(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(name): Path<String>,
    Form(form): Form<ScaleForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    let replicas: u32 = match form.replicas.trim().parse() {
        Ok(n) if n <= MAX_REPLICAS => n,
        _ => {
            return user.error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "replicas: {:?} is not a whole number from 0 to {MAX_REPLICAS}",
                    form.replicas
                ),
            );
        }
    };
    let job = match ui.api.workloads.job(&name) {
        Ok(j) => j,
        Err(e) => return user.error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    if job.summary.job_type == JobType::System {
        return user.error(
            StatusCode::CONFLICT,
            &format!("job {name} is a system job: it runs one replica per matching node and has no replicas to scale"),
        );
    }
    let file = format!("job {name} (scaled to {replicas} from the dashboard)");
    let manifest = match scaled_manifest(&file, &job.manifest, replicas) {
        Ok(m) => m,
        Err(e) => return user.error(StatusCode::UNPROCESSABLE_ENTITY, &e),
    };
    let back = format!("/ui/jobs/{}", seg(&name));
    match crate::http::jobs::apply(&ui.api, ApplyRequest { file, manifest }, user.who.clone()).await
    {
        Ok(result) => {
            info!(who = %user.who, job = %name, replicas, "job scaled from the dashboard");
            let mut message = format!(
                "job {} scaled to {replicas}: {} (version {})",
                result.job, result.outcome, result.version
            );
            if let Some(by) = &job.summary.scaled_by {
                message.push_str(&format!(
                    "; note: the running count is set by {by}, which still decides it"
                ));
            }
            done(&ui, &user, &back, message)
        }
        Err(problem) => problem_page(&user, problem),
    }
}

/// `POST /ui/allocations/{id}/restart`.
pub async fn restart(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    let alloc = match ui.api.workloads.allocation(&id) {
        Ok(a) => a,
        Err(e) => return user.error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let back = format!("/ui/jobs/{}", seg(&alloc.job));
    match ui.api.workloads.restart(&id, &user.who) {
        Ok(true) => done(
            &ui,
            &user,
            &back,
            format!("allocation {id} is restarting; a replacement is placed"),
        ),
        Ok(false) => user.error(
            StatusCode::CONFLICT,
            &format!(
                "allocation {id} is already {} and not wanted any more; nothing to restart",
                alloc.state
            ),
        ),
        Err(e) => problem_page(&user, crate::http::jobs::workload_problem(e)),
    }
}

/// `POST /ui/allocations/{id}/migrate`: to the scheduler's choice of node, in
/// the job's checkpoint mode.
pub async fn migrate(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    match ui
        .api
        .migrations
        .start_migration(&id, None, None, &user.who)
    {
        Ok(status) => done(
            &ui,
            &user,
            "/ui/migrations",
            format!("migration {} of {id} to {} started", status.id, status.to),
        ),
        Err(e) => user.error(StatusCode::CONFLICT, &e.to_string()),
    }
}

/// `POST /ui/nodes/{name}/drain`: cordons the node (nothing new is placed
/// there), as `POST /v1/nodes/{name}/drain` does; its running allocations can
/// then be migrated from its page.
pub async fn drain(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    let allocations = match ui.api.migrations.cordon(&name, &user.who) {
        Ok(a) => a,
        Err(e) => return user.error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    ui.api.events.note(
        NewEvent::new(
            kind::NODE_CORDONED,
            user.who.clone(),
            format!(
                "node {name} cordoned for a drain; {} running allocation(s) to migrate",
                allocations.len()
            ),
        )
        .node(&name),
    );
    ui.api.workloads.wake();
    done(
        &ui,
        &user,
        &format!("/ui/nodes/{}", seg(&name)),
        format!(
            "node {name} is cordoned; migrate its {} running allocation(s) below",
            allocations.len()
        ),
    )
}

/// `POST /ui/nodes/{name}/uncordon`.
pub async fn uncordon(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    if let Err(e) = ui.api.registry.set_cordoned(&name, false) {
        return user.error(StatusCode::NOT_FOUND, &e.to_string());
    }
    ui.api.events.note(
        NewEvent::new(
            kind::NODE_UNCORDONED,
            user.who.clone(),
            format!("node {name} uncordoned"),
        )
        .node(&name),
    );
    ui.api.workloads.wake();
    done(
        &ui,
        &user,
        &format!("/ui/nodes/{}", seg(&name)),
        format!("node {name} takes new work again"),
    )
}

/// Leaves `message` for the next page and sends the browser to `back`.
fn done(ui: &Ui, user: &User, back: &str, message: String) -> Response {
    ui.sessions.flash(&user.id, message);
    Redirect::to(back).into_response()
}

/// An API problem as an error page.
fn problem_page(user: &User, problem: crate::http::api::Problem) -> Response {
    user.error(problem.0, &problem.1)
}
