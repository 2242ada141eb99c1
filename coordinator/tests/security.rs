//! Security of the coordinator's port with real processes: tokens and roles on the public API,
//! agent certificates that speak only for their host, certificates from another CA refused at
//! the handshake, the Raft transport only for coordinators, and the `init`/`token`/`context`
//! commands. Every refused request is checked to change nothing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use novacron_coordinator::auth::{unix_now, Claims, Role, TokenVerifier};
use novacron_coordinator::testing::{Client, ClusterOptions, Creds, TestCluster, TestPki};
use novacron_coordinator::tls::{self, ClientTls};
use novacron_proto::coordinator::v1 as pb;
use novacron_proto::coordinator::v1::raft_transport_client::RaftTransportClient;
use tonic::Code;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_novacron-coordinator"))
}

fn opts() -> ClusterOptions {
    ClusterOptions {
        // No liveness transition may write while a test compares log indexes.
        down_after_secs: 3600,
        ..Default::default()
    }
}

fn host(id: &str) -> pb::RegisterHostRequest {
    pb::RegisterHostRequest {
        id: id.into(),
        address: format!("{id}.local:7300"),
        capacity: Some(pb::Resources {
            vcpus: 64,
            memory_mib: 65_536,
        }),
        labels: Default::default(),
        vms: vec![],
    }
}

fn vm(name: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.into(),
        resources: Some(pb::Resources {
            vcpus: 1,
            memory_mib: 64,
        }),
        start: true,
        ..Default::default()
    }
}

fn hb(id: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        host_id: id.into(),
        cpu_utilisation: 0.5,
        memory_used_mib: 1024,
        ..Default::default()
    }
}

/// Everything a refusal must leave alone: the last log index and the records.
async fn snapshot(admin: &mut Client) -> (u64, Vec<pb::Vm>, Vec<(String, String, i32)>) {
    let st = admin
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let vms = admin
        .list_vms(pb::ListRequest { consistent: true })
        .await
        .unwrap()
        .into_inner()
        .vms;
    let hosts = admin
        .list_hosts(pb::ListRequest { consistent: true })
        .await
        .unwrap()
        .into_inner()
        .hosts
        .into_iter()
        .map(|h| (h.id, h.address, h.state))
        .collect();
    (st.last_log_index, vms, hosts)
}

fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, says: &str) {
    let e = r.expect_err("the request should have been refused");
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(says),
        "message {:?} should say {says:?}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_and_refusals_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(bin(), dir.path(), 1, opts());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let addr = cluster.nodes[0].addr.clone();
    let pki = &cluster.pki;
    let mut admin = cluster.client(&addr);
    admin.register_host(host("h1")).await.unwrap();
    admin.create_vm(vm("existing")).await.unwrap();
    let before = snapshot(&mut admin).await;

    // No token.
    let mut anon = pki.creds(None, None).client(&addr);
    refused(
        anon.create_vm(vm("x")).await,
        Code::Unauthenticated,
        "missing bearer token",
    );
    refused(
        anon.list_vms(pb::ListRequest::default()).await,
        Code::Unauthenticated,
        "missing bearer token",
    );

    // Viewer reads, but may not create, drain or change membership.
    let viewer_token = pki.token(Role::Viewer, "val");
    let mut viewer = pki.creds(Some(&viewer_token), None).client(&addr);
    let listed = viewer
        .list_vms(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.vms.len(), 1);
    viewer
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap();
    refused(
        viewer.create_vm(vm("x")).await,
        Code::PermissionDenied,
        "CreateVm needs role operator",
    );
    refused(
        viewer.drain_host(pb::HostRef { id: "h1".into() }).await,
        Code::PermissionDenied,
        "needs role operator",
    );
    refused(
        viewer
            .add_member(pb::AddMemberRequest {
                id: 9,
                address: "127.0.0.1:1".into(),
            })
            .await,
        Code::PermissionDenied,
        "AddMember needs role admin",
    );
    // A viewer is not an agent either.
    refused(
        viewer.heartbeat(hb("h1")).await,
        Code::PermissionDenied,
        "agent call",
    );

    // Forged: the viewer's token with the role raised to admin, signature kept.
    let parts: Vec<&str> = viewer_token.split('.').collect();
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Claims = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims.role = Role::Admin;
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    );
    let mut forger = pki.creds(Some(&forged), None).client(&addr);
    refused(
        forger.create_vm(vm("x")).await,
        Code::Unauthenticated,
        "signature is invalid",
    );
    // Signed by another cluster's key.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(other_dir.path());
    let foreign_token = other.token(Role::Admin, "mallory");
    refused(
        pki.creds(Some(&foreign_token), None)
            .client(&addr)
            .create_vm(vm("x"))
            .await,
        Code::Unauthenticated,
        "signature is invalid",
    );
    // Expired.
    let now = unix_now().unwrap();
    let expired = pki
        .signer()
        .mint_claims(&Claims {
            sub: "old".into(),
            role: Role::Admin,
            iat: now - 7200,
            exp: now - 3600,
        })
        .unwrap();
    refused(
        pki.creds(Some(&expired), None)
            .client(&addr)
            .create_vm(vm("x"))
            .await,
        Code::Unauthenticated,
        "expired",
    );
    refused(
        pki.creds(Some("not-a-token"), None)
            .client(&addr)
            .list_vms(pb::ListRequest::default())
            .await,
        Code::Unauthenticated,
        "malformed token",
    );

    // Nothing changed: no log entry, same records.
    assert_eq!(snapshot(&mut admin).await, before);

    // Operator creates, but may not change membership.
    let mut operator = pki
        .creds(Some(&pki.token(Role::Operator, "olga")), None)
        .client(&addr);
    let v = operator
        .create_vm(vm("by-operator"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.vm.unwrap().name, "by-operator");
    refused(
        operator
            .remove_member(pb::RemoveMemberRequest { id: 1 })
            .await,
        Code::PermissionDenied,
        "RemoveMember needs role admin",
    );
    let after = snapshot(&mut admin).await;
    assert_eq!(after.1.len(), 2);
    assert!(after.0 > before.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificates_speak_only_for_their_own_host() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(bin(), dir.path(), 1, opts());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let addr = cluster.nodes[0].addr.clone();
    let pki = &cluster.pki;
    let mut admin = cluster.client(&addr);

    let mut h1 = pki.creds(None, Some("h1")).client(&addr);
    let mut h2 = pki.creds(None, Some("h2")).client(&addr);
    let mut h3 = pki.creds(None, Some("h3")).client(&addr);
    h1.register_host(host("h1")).await.unwrap();
    h2.register_host(host("h2")).await.unwrap();
    h3.register_host(host("h3")).await.unwrap();
    h1.heartbeat(hb("h1")).await.unwrap();
    let before = snapshot(&mut admin).await;

    // h1 cannot register or heartbeat as h2.
    let mut hijack = host("h2");
    hijack.address = "evil.local:7300".into();
    refused(
        h1.register_host(hijack).await,
        Code::PermissionDenied,
        "may only speak for its own host, not \"h2\"",
    );
    refused(
        h1.heartbeat(hb("h2")).await,
        Code::PermissionDenied,
        "names \"h1\"",
    );
    // An agent certificate carries no role.
    refused(
        h1.list_vms(pb::ListRequest::default()).await,
        Code::Unauthenticated,
        "missing bearer token",
    );
    // A coordinator's own certificate is no agent's.
    let coord_ident = tls::load_identity(
        &pki.dir.path().join("coord-1.pem"),
        &pki.dir.path().join("coord-1.key"),
    )
    .unwrap();
    let ca = tls::load_ca(&pki.dir.ca_cert_path()).unwrap();
    let mut as_coord =
        Creds::new(ClientTls::new(ca, Some(coord_ident), "coordinator"), None).client(&addr);
    refused(
        as_coord.heartbeat(hb("h1")).await,
        Code::PermissionDenied,
        "coord-1",
    );
    assert_eq!(snapshot(&mut admin).await, before);

    // Migrations: only the source's or target's agent may report.
    let v = admin
        .create_vm(vm("web"))
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    let target = if v.host_id == "h1" { "h2" } else { "h1" };
    let op = admin
        .start_migration(pb::StartMigrationRequest {
            vm_id: v.id.clone(),
            target_host: target.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let outsider = [&mut h1, &mut h2, &mut h3]
        .into_iter()
        .zip(["h1", "h2", "h3"])
        .find(|(_, n)| *n != v.host_id && *n != target)
        .map(|(c, _)| c.clone())
        .unwrap();
    let report = |phase: pb::MigrationPhase| pb::ReportMigrationRequest {
        name: op.name.clone(),
        phase: phase as i32,
        bytes_done: 1,
        bytes_total: 1,
        error: String::new(),
    };
    let before = snapshot(&mut admin).await;
    refused(
        outsider
            .clone()
            .report_migration(report(pb::MigrationPhase::Succeeded))
            .await,
        Code::PermissionDenied,
        "may only speak for its own host",
    );
    assert_eq!(snapshot(&mut admin).await, before);
    let mut target_agent = pki.creds(None, Some(target)).client(&addr);
    let done = target_agent
        .report_migration(report(pb::MigrationPhase::Succeeded))
        .await
        .unwrap()
        .into_inner();
    assert!(done.done);
    let moved = admin
        .get_vm(pb::GetRequest {
            id: v.id.clone(),
            consistent: true,
        })
        .await
        .unwrap()
        .into_inner()
        .vm
        .unwrap();
    assert_eq!(moved.host_id, target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificates_fail_the_handshake_and_raft_is_for_coordinators() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = TestCluster::start(bin(), dir.path(), 1, opts());
    cluster.wait_leader(Duration::from_secs(20)).await;
    let addr = cluster.nodes[0].addr.clone();
    let pki = &cluster.pki;
    let admin_token = pki.token(Role::Admin, "root");
    let ca = tls::load_ca(&pki.dir.ca_cert_path()).unwrap();

    // A client certificate from another CA, with a valid admin token: refused at the
    // handshake, before any token is looked at.
    let other_dir = tempfile::tempdir().unwrap();
    let other = TestPki::create(other_dir.path());
    let (cert, key) = other.issue_agent("h1");
    let foreign = tls::load_identity(&cert, &key).unwrap();
    let mut c = Creds::new(
        ClientTls::new(ca.clone(), Some(foreign), "coordinator"),
        Some(&admin_token),
    )
    .client(&addr);
    let e = c
        .register_host(host("h1"))
        .await
        .expect_err("a certificate from another CA must be refused");
    // The server ends the connection during the handshake: the client sees a transport error
    // (an alert, a closed or broken connection, depending on timing), never a gRPC answer.
    let transport = std::error::Error::source(&e)
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(
        transport
            && matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
        "expected the connection to be refused, got {e:?}"
    );
    // The same token without that certificate works (the refusal was the certificate's),
    // and the host was not registered.
    let mut ok = pki.creds(Some(&admin_token), None).client(&addr);
    assert!(ok
        .list_hosts(pb::ListRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts
        .is_empty());

    // A client that trusts another CA does not accept this coordinator.
    let other_ca = tls::load_ca(&other.dir.ca_cert_path()).unwrap();
    let e = Creds::new(ClientTls::anonymous(other_ca), Some(&admin_token))
        .client(&addr)
        .list_hosts(pb::ListRequest::default())
        .await
        .expect_err("the server's certificate is not from the trusted CA");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // The Raft transport: an agent's certificate, or none, is refused.
    let payload = || pb::RaftPayload {
        json: b"{}".to_vec(),
    };
    let agent = pki.creds(None, Some("h1"));
    let e = RaftTransportClient::new(agent.channel(&addr))
        .vote(payload())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("not a coordinator"), "{e:?}");
    let e = RaftTransportClient::new(pki.creds(Some(&admin_token), None).channel(&addr))
        .forward(payload())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // A coordinator certificate of a non-member (coord-7) is refused too.
    pki.issue_coordinator(7);
    let c7 = tls::load_identity(
        &pki.dir.path().join("coord-7.pem"),
        &pki.dir.path().join("coord-7.key"),
    )
    .unwrap();
    let e = RaftTransportClient::new(
        ClientTls::new(ca, Some(c7), "coordinator")
            .channel(&addr, Duration::from_secs(10))
            .unwrap(),
    )
    .vote(payload())
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "novacron-coordinator {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn init_token_and_context_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cd = dir.path().join("cluster");
    let cds = cd.to_str().unwrap();
    let out = run(&["init", "--cluster-dir", cds, "--issue", "1", "--issue", "2"]);
    for f in [
        "ca.pem",
        "ca.key",
        "coord-1.pem",
        "coord-1.key",
        "coord-2.pem",
        "token.key",
        "token.pub",
    ] {
        assert!(cd.join(f).is_file(), "{f} missing; init said:\n{out}");
    }
    // A second init keeps the CA and the token keys.
    let ca = std::fs::read(cd.join("ca.pem")).unwrap();
    let key = std::fs::read(cd.join("token.pub")).unwrap();
    run(&["init", "--cluster-dir", cds]);
    assert_eq!(std::fs::read(cd.join("ca.pem")).unwrap(), ca);
    assert_eq!(std::fs::read(cd.join("token.pub")).unwrap(), key);

    let token = run(&[
        "token",
        "--cluster-dir",
        cds,
        "--role",
        "operator",
        "--subject",
        "alice",
        "--ttl",
        "24h",
    ]);
    let claims = TokenVerifier::load(&cd)
        .unwrap()
        .verify(token.trim(), unix_now().unwrap())
        .unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.role),
        ("alice", Role::Operator)
    );
    assert!((86_390..=86_400).contains(&(claims.exp - claims.iat)));

    for (args, says) in [
        (vec!["--role", "root", "--subject", "a"], "invalid role"),
        (
            vec!["--role", "viewer", "--subject", "a", "--ttl", "1w"],
            "invalid ttl",
        ),
    ] {
        let out = Command::new(bin())
            .args(["token", "--cluster-dir", cds])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }

    let ctx = run(&[
        "context",
        "--cluster-dir",
        cds,
        "--endpoint",
        "127.0.0.1:7400",
        "--role",
        "viewer",
        "--subject",
        "bob",
    ]);
    assert!(ctx.contains("endpoints = [\"127.0.0.1:7400\"]"), "{ctx}");
    assert!(ctx.contains("ca.pem\""), "{ctx}");
    assert!(ctx.contains("token = \"ey"), "{ctx}");
}
