//! The Redis store over TLS (`rediss://`, the `redis-tls` feature): against a `redis-server`
//! this test starts on a free port with a certificate from a CA it makes with `openssl`,
//! the CA trusted through `tls_root_certificates` or skipped with the `#insecure` URL fragment.

use diesel::prelude::*;
use diesel_memclone::store::RedisStore;
use diesel_memclone::Cache;
use diesel_memclone_tests::schema::users;
use diesel_memclone_tests::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` speaking only TLS, killed (and its directory removed) when dropped.
struct TlsRedis {
    child: Child,
    dir: PathBuf,
    port: u16,
    certificate: Vec<u8>,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsRedis {
    /// Makes a certificate for 127.0.0.1 and starts the server, or `None` (reported) when
    /// `openssl` or `redis-server` is missing.
    async fn start() -> Option<TlsRedis> {
        let dir = std::env::temp_dir().join(unique("memclone_tls"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (ca, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        // A CA, then the server's certificate for 127.0.0.1 signed by it (rustls refuses a CA
        // certificate presented as the server's own).
        let openssl = |extra: &[&std::ffi::OsStr]| {
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let os = |path: &PathBuf| path.as_os_str().to_owned();
        let made = openssl(&[
            "-subj".as_ref(),
            "/CN=memclone-test-ca".as_ref(),
            "-keyout".as_ref(),
            &os(&ca_key),
            "-out".as_ref(),
            &os(&ca),
        ])
        .and_then(|made_ca| {
            if !made_ca.success() {
                return Ok(made_ca);
            }
            openssl(&[
                "-subj".as_ref(),
                "/CN=127.0.0.1".as_ref(),
                "-addext".as_ref(),
                "subjectAltName=IP:127.0.0.1".as_ref(),
                "-addext".as_ref(),
                "basicConstraints=critical,CA:FALSE".as_ref(),
                "-CA".as_ref(),
                &os(&ca),
                "-CAkey".as_ref(),
                &os(&ca_key),
                "-keyout".as_ref(),
                &os(&key),
                "-out".as_ref(),
                &os(&cert),
            ])
        });
        match made {
            Ok(status) if status.success() => {}
            Ok(status) => panic!("openssl could not make the certificates: {status}"),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                server_missing("openssl", e);
                return None;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                server_missing("redis-server", e);
                return None;
            }
        };
        let certificate = std::fs::read(&ca).expect("CA certificate");
        let mut server = TlsRedis {
            child,
            dir,
            port,
            certificate,
        };
        // Up once a store connects to it over TLS.
        let mut last = None;
        for _ in 0..100 {
            if let Some(status) = server.child.try_wait().expect("redis-server") {
                panic!("redis-server exited ({status}): was it built without TLS?");
            }
            let store = server.store(&server.url()).build().unwrap();
            match store.connect().await {
                Ok(_) => return Some(server),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server did not answer over TLS on port {port}: {last:?}");
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A store that trusts the server's certificate.
    fn store(&self, url: &str) -> diesel_memclone::store::RedisStoreBuilder {
        tolerant(url).tls_root_certificates(self.certificate.clone())
    }
}

/// Options with room for TLS handshakes on a busy machine in a debug build.
fn tolerant(url: &str) -> diesel_memclone::store::RedisStoreBuilder {
    RedisStore::builder(url).connect_timeout(Duration::from_secs(10))
}

/// A miss, a hit, an invalidating write and a miss again, counted at PostgreSQL.
async fn miss_hit_write_miss(store: RedisStore, schema: &str) {
    let mut conn = postgres_again(schema).await;
    let cache = Cache::builder()
        .store(store)
        .namespace(unique("tls"))
        .store_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    diesel_memclone::insert_into(users::table)
        .values(&User {
            id: 1,
            name: "Ann".into(),
            status: "a".into(),
        })
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let counter = QueryCounter::default();
    counter.attach(&mut conn);
    let (read, queries) = counted!(counter, user_names(&cache, &mut conn).await);
    assert_eq!((read, queries), (vec!["Ann".to_string()], 1), "a miss");
    let (read, queries) = counted!(counter, user_names(&cache, &mut conn).await);
    assert_eq!((read, queries), (vec!["Ann".to_string()], 0), "a hit");
    diesel_memclone::update(users::table.find(1))
        .set(users::name.eq("Anne"))
        .using(&cache)
        .execute(&mut conn)
        .await
        .unwrap();
    let (read, queries) = counted!(counter, user_names(&cache, &mut conn).await);
    assert_eq!(
        (read, queries),
        (vec!["Anne".to_string()], 1),
        "a miss again"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.store_errors), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn a_store_over_tls_caches_and_invalidates() {
    let schema = unique("tls");
    let Some(_) = postgres(&schema).await else {
        return;
    };
    let Some(server) = TlsRedis::start().await else {
        return;
    };
    let store = server.store(&server.url()).build().unwrap();
    store.connect().await.expect("a TLS connection");
    miss_hit_write_miss(store, &schema).await;
}

#[tokio::test]
async fn the_insecure_fragment_skips_the_certificate_check() {
    let schema = unique("tls");
    let Some(_) = postgres(&schema).await else {
        return;
    };
    let Some(server) = TlsRedis::start().await else {
        return;
    };
    let untrusted = tolerant(&server.url()).build().unwrap();
    assert!(
        untrusted.connect().await.is_err(),
        "a self-signed certificate is refused by default"
    );
    let insecure = tolerant(&format!("{}/#insecure", server.url()))
        .build()
        .unwrap();
    insecure.connect().await.expect("#insecure connects");
    miss_hit_write_miss(insecure, &schema).await;
}
