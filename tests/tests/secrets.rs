//! Secrets end to end: set with the CLI (arguments, standard input, a manifest
//! through `apply`), sealed in the store, never shown by the API or logged,
//! delivered to the one job that uses them as a variable and as a file on a
//! tmpfs, rolled out when they change, kept across a controller restart, and
//! refused for deletion while used.

use std::time::Duration;

use novacron_common::wire::AllocState;
use novacron_tests::{
    Controller, JobCleanup, docker, ensure_test_image, job_containers, one_node_fleet, service_job,
    succeeded as ok, wait_for,
};

/// What `command` prints in each running container of `job`.
fn seen(job: &str, command: &str) -> Vec<String> {
    job_containers(job)
        .iter()
        .filter_map(|id| docker(&["exec", id, "sh", "-c", command]).ok())
        .collect()
}

async fn running(c: &Controller, job: &str, n: usize) -> bool {
    c.job(job).await.is_ok_and(|d| {
        d.allocations
            .iter()
            .filter(|a| a.desired_run && a.state == AllocState::Running)
            .count()
            == n
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_their_job_as_variables_and_tmpfs_files_and_never_show() {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let (dir, mut c, agent) = one_node_fleet("novacron-secrets-", &format!("sec{pid}"), &[])
        .await
        .expect("fleet");

    // Values no log, answer or store file may hold.
    let first = format!("pw-first-{pid}-x7");
    let second = format!("pw-second-{pid}-y8");
    let cert = format!("CERT-{pid}-z9");
    let out = ok(&c.cli(&[
        "secret",
        "set",
        "db",
        &format!("password={first}"),
        "user=app",
    ]));
    assert!(out.contains("secret db created (version 1)"), "{out}");
    let manifest = dir.path().join("tls.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: novacron.io/v1\nkind: Secret\nmetadata: {{name: tls}}\nspec:\n  data:\n    cert: \"{cert}\"\n"
        ),
    )
    .expect("manifest");
    let out = ok(&c.cli(&["apply", "-f", manifest.to_str().expect("utf-8")]));
    assert!(out.contains("secret tls created (version 1)"), "{out}");
    let again = ok(&c.cli(&["apply", "-f", manifest.to_str().expect("utf-8")]));
    assert!(
        again.contains("secret tls unchanged (version 1)"),
        "{again}"
    );

    // A job that uses both, and one that uses neither.
    let job = format!("uses-{pid}");
    let other = format!("plain-{pid}");
    let _c1 = JobCleanup(job.clone());
    let _c2 = JobCleanup(other.clone());
    let uses = "    secrets:\n      - {secret: db, key: password, env: DB_PASSWORD}\n      - {secret: tls, key: cert, file: /run/secrets/tls.crt}\n";
    c.apply(
        "uses.yaml",
        &service_job(&job, 1, "exec sleep 3600", uses, ""),
    )
    .await
    .expect("apply");
    c.apply(
        "plain.yaml",
        &service_job(&other, 1, "exec sleep 3600", "", ""),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(60), "both jobs running", || async {
        running(&c, &job, 1).await && running(&c, &other, 1).await
    })
    .await
    .expect("running");
    assert_eq!(
        seen(&job, "echo $DB_PASSWORD"),
        std::slice::from_ref(&first)
    );
    assert_eq!(
        seen(&job, "cat /run/secrets/tls.crt"),
        std::slice::from_ref(&cert)
    );
    assert_eq!(
        seen(
            &job,
            "touch /run/secrets/tls.crt 2>/dev/null && echo writable || echo read-only"
        ),
        ["read-only"]
    );
    assert_eq!(seen(&other, "echo ${DB_PASSWORD:-none}"), ["none"]);
    assert_eq!(
        seen(
            &other,
            "test -e /run/secrets/tls.crt && echo yes || echo no"
        ),
        ["no"]
    );
    // The file's source on the node is a tmpfs, private to the agent.
    let id = job_containers(&job).remove(0);
    let sources =
        docker(&["inspect", "-f", "{{range .Mounts}}{{.Source}} {{end}}", &id]).expect("inspect");
    let source = sources
        .split_whitespace()
        .next()
        .expect("a mount")
        .to_string();
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", &source])
        .output()
        .expect("stat");
    assert_eq!(
        String::from_utf8_lossy(&fs.stdout).trim(),
        "tmpfs",
        "{source}"
    );

    // The API names keys, versions and users, never a value; so does the CLI.
    let list = ok(&c.cli(&["secret", "list", "-o", "json"]));
    let shown = ok(&c.cli(&["secret", "show", "db"]));
    for text in [&list, &shown] {
        assert!(!text.contains(&first) && !text.contains(&cert), "{text}");
    }
    assert!(
        list.contains("\"password\"") && list.contains(&job),
        "{list}"
    );

    // A new version rolls the job out to it; the job that does not use it stays.
    let other_before = job_containers(&other);
    let out = ok(&c.cli(&[
        "secret",
        "set",
        "db",
        &format!("password={second}"),
        "user=app",
    ]));
    assert!(out.contains("secret db updated (version 2)"), "{out}");
    assert!(
        out.contains(&format!("job {job} rolls out as version 2")),
        "{out}"
    );
    wait_for(
        Duration::from_secs(60),
        "the new value in the job",
        || async { seen(&job, "echo $DB_PASSWORD") == [second.clone()] },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", seen(&job, "echo $DB_PASSWORD")));
    assert_eq!(job_containers(&other), other_before, "untouched");

    // In use: not deleted. Unknown: a clear error.
    let del = c.cli(&["secret", "delete", "db"]);
    assert!(!del.status.success());
    let why = String::from_utf8_lossy(&del.stderr);
    assert!(
        why.contains("is used by jobs") && why.contains(&job),
        "{why}"
    );
    let err = c
        .apply(
            "missing.yaml",
            &service_job(
                "missing",
                1,
                "exec sleep 1",
                "    secrets:\n      - {secret: db, key: nope, env: X}\n",
                "",
            ),
        )
        .await
        .expect_err("no such key");
    assert!(err.to_string().contains("has no key \\\"nope\\\""), "{err}");

    // After a restart the controller opens the sealed values again: a new
    // replica of the job gets the current value.
    c.restart().await.expect("restart");
    c.wait_ready(&agent.name, Duration::from_secs(30))
        .await
        .expect("ready again");
    c.apply(
        "uses.yaml",
        &service_job(&job, 2, "exec sleep 3600", uses, ""),
    )
    .await
    .expect("scale to 2");
    wait_for(
        Duration::from_secs(60),
        "two replicas with the value",
        || async {
            running(&c, &job, 2).await
                && seen(&job, "echo $DB_PASSWORD") == [second.clone(), second.clone()]
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", seen(&job, "echo $DB_PASSWORD")));

    // Nothing wrote a value where it could be read back: the store file, the
    // controller's and agent's logs.
    let mut places = vec![dir.path().join("controller/controller.redb")];
    for entry in std::fs::read_dir(dir.path()).expect("dir").flatten() {
        if entry.file_name().to_string_lossy().ends_with(".log") {
            places.push(entry.path());
        }
    }
    for place in &places {
        let bytes = std::fs::read(place).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        for value in [&first, &second, &cert] {
            assert!(
                !text.contains(value.as_str()),
                "{} holds a secret value",
                place.display()
            );
        }
    }
    assert!(
        places.len() >= 3,
        "the store and logs were read: {places:?}"
    );

    drop(agent);
}
