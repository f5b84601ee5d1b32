//! PostgreSQL for the suites that run on it: a fresh database per server.

/// Whether this run's servers use PostgreSQL (`DDP_TEST_STORE=postgres`).
pub fn suite_on_postgres() -> bool {
    std::env::var("DDP_TEST_STORE").is_ok_and(|s| s.eq_ignore_ascii_case("postgres"))
}

/// A fresh, empty PostgreSQL database on the test server named by `DDP_TEST_DATABASE_URL` (whose
/// user may create databases); returns its URL.
pub async fn fresh_database() -> String {
    let url = std::env::var("DDP_TEST_DATABASE_URL")
        .expect("DDP_TEST_DATABASE_URL must name a PostgreSQL database (scripts/test starts one)");
    create_database(&url, "ddp_test").await.unwrap_or_else(|e| panic!("{e}"))
}

/// Creates an empty database named `{prefix}_{random}` on the PostgreSQL server of `url` (a
/// `postgres://…/db` URL whose user may create databases); returns the new database's URL.
pub async fn create_database(url: &str, prefix: &str) -> Result<String, String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
    tokio::spawn(conn);
    let name = format!("{prefix}_{:016x}", rand::random::<u64>());
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.map_err(|e| format!("CREATE DATABASE: {e}"))?;
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (prefix, _) = base.rsplit_once('/').ok_or("the PostgreSQL URL must end in /database")?;
    Ok(format!("{prefix}/{name}{query}"))
}
