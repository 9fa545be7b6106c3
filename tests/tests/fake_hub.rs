//! The fake hub answers like the Hugging Face hub for the endpoints kandle uses.

use kandle_tests::fake_hub::FakeHub;

async fn get(url: &str, token: Option<&str>, range: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(r) = range {
        req = req.header("Range", r);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_branch_resolves_to_its_commit_and_moves_with_a_new_commit() {
    let hub = FakeHub::start().unwrap();
    let first = hub.add_repo("org/model", [("config.json", b"{}".to_vec())]);
    assert_eq!(first.len(), 40);
    let info: serde_json::Value =
        get(&format!("{}/api/models/org/model/revision/main", hub.url()), None, None).await.json().await.unwrap();
    assert_eq!(info["sha"], first.as_str());
    assert_eq!(info["siblings"][0]["rfilename"], "config.json");

    let second = hub.commit("org/model", "main", [("weights.bin", vec![1u8, 2, 3])]);
    assert_ne!(first, second);
    let info: serde_json::Value =
        get(&format!("{}/api/models/org/model/revision/main", hub.url()), None, None).await.json().await.unwrap();
    assert_eq!(info["sha"], second.as_str());
    // The old commit is still addressable by its sha.
    let old = get(&format!("{}/org/model/resolve/{first}/config.json", hub.url()), None, None).await;
    assert_eq!(old.status(), 200);
    assert_eq!(old.headers()["x-repo-commit"], first.as_str());
}

#[tokio::test]
async fn files_are_served_whole_or_by_range() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo("m", [("f.bin", (0u8..100).collect::<Vec<_>>())]);
    let whole = get(&format!("{}/m/resolve/main/f.bin", hub.url()), None, None).await;
    assert_eq!(whole.headers()["x-linked-size"], "100");
    assert_eq!(whole.bytes().await.unwrap().len(), 100);
    let part = get(&format!("{}/m/resolve/main/f.bin", hub.url()), None, Some("bytes=10-19")).await;
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 10-19/100");
    assert_eq!(part.bytes().await.unwrap().to_vec(), (10u8..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn unknown_repos_revisions_and_files_are_404_with_the_hub_error_code() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo("org/m", [("a", b"x".to_vec())]);
    let cases = [
        ("/api/models/org/nope/revision/main", "RepoNotFound"),
        ("/api/models/org/m/revision/v9", "RevisionNotFound"),
        ("/org/m/resolve/main/missing.json", "EntryNotFound"),
    ];
    for (path, code) in cases {
        let r = get(&format!("{}{path}", hub.url()), None, None).await;
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.headers()["x-error-code"], code, "{path}");
    }
}

#[tokio::test]
async fn a_private_repo_needs_its_token_and_the_log_never_keeps_it() {
    let hub = FakeHub::start().unwrap();
    hub.add_repo("org/private", [("a", b"x".to_vec())]);
    hub.require_token("org/private", "hf_secret_value");
    let url = format!("{}/api/models/org/private/revision/main", hub.url());
    assert_eq!(get(&url, None, None).await.status(), 401);
    assert_eq!(get(&url, Some("hf_wrong"), None).await.status(), 401);
    assert_eq!(get(&url, Some("hf_secret_value"), None).await.status(), 200);
    let log = format!("{:?}", hub.requests());
    assert!(!log.contains("hf_secret_value"), "{log}");
    assert_eq!(hub.requests().iter().filter(|r| r.authorized).count(), 2);
}
