//! Account records in PostgreSQL (`token_store = "postgres"`), shared by any
//! number of instances.
//!
//! * Tables are created and migrated by mailproxy: `mailproxy_schema` holds
//!   the applied versions, each migration runs once under an advisory lock,
//!   so instances starting together do not race.
//! * A record is one row: the generation (the compare-and-write counter)
//!   and the record as JSON (sealed tokens, the password verifier, metadata;
//!   nothing in the clear).
//! * A refresh takes `pg_advisory_xact_lock` on the account, re-reads the
//!   row, and commits the next record with a compare on the generation before
//!   the new access token is handed out. A crash mid-refresh ends the
//!   transaction: the old record stays, never none.
//! * Every write fires a trigger that NOTIFYs the account's name; each
//!   instance LISTENs and re-reads what changed. Cached versions also expire
//!   after a few seconds, in case a notification is lost.
//! * The same feed keeps the set of account names with a row (`names`), so
//!   a domain entry's mailbox set up on any instance is known on every one.
//! * Connections go through rustls (the binary's one TLS stack), with the
//!   checks `database_url`'s `sslmode` and `sslrootcert` ask for.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Before, RecordStore, RefreshLock, StoreError, Version};
use crate::config::database::{DatabaseUrl, SslMode};
use crate::sync;
use crate::tls::ServerCheck;
use crate::vault::{AccountRecord, Written};

const CHANNEL: &str = "mailproxy_accounts";
/// How long a cached version counts without a notification.
const CACHE_FOR: Duration = Duration::from_secs(5);
/// Waiting longer than this for another instance's refresh is a failure.
const LOCK_TIMEOUT: &str = "60s";

/// Versioned migrations: index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE mailproxy_accounts (
    account     text PRIMARY KEY,
    generation  bigint NOT NULL,
    record      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION mailproxy_accounts_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mailproxy_accounts', COALESCE(NEW.account, OLD.account));
    RETURN NULL;
END $$;
CREATE TRIGGER mailproxy_accounts_changed
    AFTER INSERT OR UPDATE OR DELETE ON mailproxy_accounts
    FOR EACH ROW EXECUTE FUNCTION mailproxy_accounts_notify();
"#];

/// The error and its causes (the driver's own message says little alone).
fn db(e: impl std::error::Error) -> StoreError {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        // Wrappers often show their cause already.
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        src = s.source();
    }
    StoreError::Database(msg)
}

fn key(account: &str) -> String {
    account.to_lowercase()
}

#[derive(Default)]
struct Cache {
    versions: Mutex<HashMap<String, (Option<u64>, Instant)>>,
    /// Bumped by every notification, so a read that raced one is not cached.
    epoch: AtomicU64,
    /// The LISTEN connection is up: only then is anything cached.
    listening: AtomicBool,
}

impl Cache {
    fn get(&self, account: &str) -> Option<Option<u64>> {
        if !self.listening.load(Ordering::SeqCst) {
            return None;
        }
        let m = sync::lock(&self.versions);
        m.get(account)
            .filter(|(_, at)| at.elapsed() < CACHE_FOR)
            .map(|(v, _)| *v)
    }

    fn put(&self, account: &str, v: Option<u64>, epoch: u64) {
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let mut m = sync::lock(&self.versions);
        m.insert(account.to_string(), (v, Instant::now()));
    }

    fn forget(&self, account: Option<&str>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut m = sync::lock(&self.versions);
        match account {
            Some(a) => {
                m.remove(a);
            }
            None => m.clear(),
        }
    }
}

/// The names of the accounts that have a row, as far as this instance has
/// heard (the change feed and its own writes): what a domain entry's
/// mailbox is looked up in without waiting. As large as the table.
#[derive(Default)]
struct Names(RwLock<HashSet<String>>);

impl Names {
    fn set(&self, account: &str, present: bool) {
        let mut n = sync::write(&self.0);
        if present {
            n.insert(key(account));
        } else {
            n.remove(&key(account));
        }
    }

    fn replace(&self, all: HashSet<String>) {
        *sync::write(&self.0) = all;
    }
}

/// Every account name with a row.
async fn all_names(c: &tokio_postgres::Client) -> Result<HashSet<String>, StoreError> {
    let rows = c
        .query("SELECT account FROM mailproxy_accounts", &[])
        .await
        .map_err(db)?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

pub struct PgStore {
    pool: Pool,
    cache: Arc<Cache>,
    names: Arc<Names>,
    changed: Arc<tokio::sync::Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// The rustls connector for the checks `url` asks for.
fn connector(url: &DatabaseUrl) -> Result<MakeRustlsConnect, StoreError> {
    let t = &url.tls;
    let check = match t.mode {
        SslMode::VerifyFull => ServerCheck::ChainAndName,
        _ if t.checks_chain() => ServerCheck::Chain,
        _ => ServerCheck::Nothing,
    };
    let config = crate::tls::checking(t.root_cert.as_deref(), check)
        .map_err(|e| StoreError::Database(format!("database_url's sslrootcert: {e}")))?;
    Ok(MakeRustlsConnect::new((*config).clone()))
}

impl PgStore {
    /// Connects, migrates the schema and starts listening for changes.
    pub async fn connect(url: DatabaseUrl) -> Result<PgStore, StoreError> {
        let tls = connector(&url)?;
        let mut config = url.driver.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("mailproxy");
        }
        tracing::info!(
            database = %url.shown,
            sslmode = url.tls.mode.name(),
            chosen_from_host = url.tls.defaulted,
            "token database"
        );
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(15)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(db)?;
        migrate(&pool).await.map_err(|e| at(&url, e))?;
        let names = Arc::new(Names::default());
        let c = pool.get().await.map_err(db)?;
        names.replace(all_names(&c).await?);
        drop(c);
        let cache = Arc::new(Cache::default());
        let changed = Arc::new(tokio::sync::Notify::new());
        let feed = Feed {
            config,
            tls,
            cache: cache.clone(),
            names: names.clone(),
            changed: changed.clone(),
        };
        let listener = tokio::spawn(feed.listen());
        Ok(PgStore {
            pool,
            cache,
            names,
            changed,
            listener,
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(db)
    }
}

/// `e` from the first connection, saying which database (the password
/// hidden) and, for a refused certificate, what to look at.
fn at(url: &DatabaseUrl, e: StoreError) -> StoreError {
    let StoreError::Database(msg) = e else { return e };
    let hint = if msg.contains("invalid peer certificate") {
        match &url.tls.root_cert {
            Some(ca) => format!(
                " (sslmode={}: the database's certificate must be signed by a CA in {})",
                url.tls.mode.name(),
                ca.display()
            ),
            None => format!(
                " (sslmode={}: the database's certificate must be signed by a CA the platform trusts; name its CA with sslrootcert=FILE)",
                url.tls.mode.name()
            ),
        }
    } else {
        String::new()
    };
    StoreError::Database(format!("{}: {msg}{hint}", url.shown))
}

/// Applies the migrations this build knows and the database lacks.
async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    let mut c = pool.get().await.map_err(db)?;
    let tx = c.transaction().await.map_err(db)?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('mailproxy schema', 0));
         CREATE TABLE IF NOT EXISTS mailproxy_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await
    .map_err(db)?;
    let row = tx
        .query_one("SELECT COALESCE(max(version), 0) FROM mailproxy_schema", &[])
        .await
        .map_err(db)?;
    let have: i32 = row.get(0);
    let known = MIGRATIONS.len() as i32;
    if have > known {
        return Err(StoreError::Database(format!(
            "the database schema is version {have}, newer than this mailproxy knows ({known}); upgrade mailproxy"
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(have as usize) {
        let v = i as i32 + 1;
        tx.batch_execute(m)
            .await
            .map_err(|e| StoreError::Database(format!("migration {v}: {e}")))?;
        tx.execute("INSERT INTO mailproxy_schema (version) VALUES ($1)", &[&v])
            .await
            .map_err(db)?;
        tracing::info!(version = v, "token database migrated");
    }
    tx.commit().await.map_err(db)
}

/// What the change feed keeps up to date.
struct Feed {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    cache: Arc<Cache>,
    names: Arc<Names>,
    changed: Arc<tokio::sync::Notify>,
}

impl Feed {
    /// LISTENs for changed records on a connection of its own, reconnecting
    /// after failures; while it is down nothing is cached.
    async fn listen(self) {
        loop {
            match self.config.connect(self.tls.clone()).await {
                Ok((client, mut conn)) => {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    let driver = tokio::spawn(async move {
                        let mut msgs = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                        use futures_util::StreamExt;
                        while let Some(m) = msgs.next().await {
                            match m {
                                Ok(AsyncMessage::Notification(n)) => {
                                    if tx.send(n.payload().to_string()).is_err() {
                                        break;
                                    }
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "the token database's change feed failed");
                                    break;
                                }
                            }
                        }
                    });
                    if let Err(e) = self.follow(&client, rx).await {
                        tracing::warn!(error = %e, "cannot listen for changes in the token database");
                    }
                    self.cache.listening.store(false, Ordering::SeqCst);
                    driver.abort();
                }
                Err(e) => tracing::warn!(error = %e, "cannot reach the token database for its change feed"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Follows the notifications until the connection ends.
    async fn follow(
        &self,
        client: &tokio_postgres::Client,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Result<(), StoreError> {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(db)?;
        // Whatever happened while we were not listening: read again.
        self.names.replace(all_names(client).await?);
        self.cache.forget(None);
        self.cache.listening.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
        while let Some(account) = rx.recv().await {
            tracing::debug!(account = %account, "account changed in the token database");
            self.cache.forget(Some(&account));
            let row = client
                .query_opt("SELECT 1 FROM mailproxy_accounts WHERE account = $1", &[&account])
                .await
                .map_err(db)?;
            self.names.set(&account, row.is_some());
            self.changed.notify_waiters();
        }
        Ok(())
    }
}

fn parse_row(account: &str, generation: i64, record: serde_json::Value) -> Result<AccountRecord, StoreError> {
    let mut rec: AccountRecord = serde_json::from_value(record)
        .map_err(|e| StoreError::Database(format!("the record of {account} is not valid: {e}")))?;
    if !rec.account.eq_ignore_ascii_case(account) {
        return Err(StoreError::Database(format!(
            "the row of {account} holds the record of `{}`",
            rec.account
        )));
    }
    rec.generation = generation as u64;
    Ok(rec)
}

fn to_json(rec: &AccountRecord) -> serde_json::Value {
    serde_json::to_value(rec).expect("records always serialize")
}

fn gen(g: u64) -> i64 {
    i64::try_from(g).unwrap_or(i64::MAX)
}

async fn read(c: &impl deadpool_postgres::GenericClient, account: &str) -> Result<Option<AccountRecord>, StoreError> {
    let row = c
        .query_opt(
            "SELECT generation, record FROM mailproxy_accounts WHERE account = $1",
            &[&key(account)],
        )
        .await
        .map_err(db)?;
    row.map(|r| parse_row(account, r.get(0), r.get(1))).transpose()
}

/// The compare-and-write of `rec` based on generation `base`, inside a
/// transaction that already serialises this account.
async fn write_if(
    tx: &impl deadpool_postgres::GenericClient,
    rec: &mut AccountRecord,
    base: Option<u64>,
) -> Result<Written, StoreError> {
    let k = key(&rec.account);
    let next = base.unwrap_or(0).saturating_add(1);
    rec.generation = next;
    let n = match base {
        Some(b) => tx
            .execute(
                "UPDATE mailproxy_accounts SET generation = $2::bigint, record = $3, updated_at = now()
                 WHERE account = $1 AND generation = $4::bigint",
                &[&k, &gen(next), &to_json(rec), &gen(b)],
            )
            .await
            .map_err(db)?,
        None => tx
            .execute(
                "INSERT INTO mailproxy_accounts (account, generation, record) VALUES ($1, $2::bigint, $3)
                 ON CONFLICT (account) DO NOTHING",
                &[&k, &gen(next), &to_json(rec)],
            )
            .await
            .map_err(db)?,
    };
    if n == 1 {
        return Ok(Written::Stored);
    }
    let on_disk = tx
        .query_opt("SELECT generation FROM mailproxy_accounts WHERE account = $1", &[&k])
        .await
        .map_err(db)?
        .map(|r| r.get::<_, i64>(0) as u64);
    Ok(Written::Stale { on_disk })
}

#[async_trait]
impl RecordStore for PgStore {
    fn describe(&self) -> &'static str {
        "PostgreSQL"
    }

    fn shared(&self) -> bool {
        true
    }

    fn names_now(&self) -> Vec<String> {
        sync::read(&self.names.0).iter().cloned().collect()
    }

    fn has_record_now(&self, account: &str) -> bool {
        sync::read(&self.names.0).contains(&key(account))
    }

    async fn load(&self, account: &str) -> Result<Option<AccountRecord>, StoreError> {
        read(&self.client().await?, account).await
    }

    async fn version(&self, account: &str) -> Result<Option<Version>, StoreError> {
        let k = key(account);
        if let Some(v) = self.cache.get(&k) {
            return Ok(v.map(Version::Row));
        }
        let epoch = self.cache.epoch.load(Ordering::SeqCst);
        let c = self.client().await?;
        let v = c
            .query_opt("SELECT generation FROM mailproxy_accounts WHERE account = $1", &[&k])
            .await
            .map_err(db)?
            .map(|r| r.get::<_, i64>(0) as u64);
        self.cache.put(&k, v, epoch);
        Ok(v.map(Version::Row))
    }

    async fn store(&self, rec: &AccountRecord) -> Result<u64, StoreError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "INSERT INTO mailproxy_accounts (account, generation, record) VALUES ($1, $2::bigint + 1, $3)
                 ON CONFLICT (account) DO UPDATE
                   SET generation = GREATEST(mailproxy_accounts.generation, $2::bigint) + 1,
                       record = EXCLUDED.record, updated_at = now()
                 RETURNING generation",
                &[&key(&rec.account), &gen(rec.generation), &to_json(rec)],
            )
            .await
            .map_err(db)?;
        self.cache.forget(Some(&key(&rec.account)));
        self.names.set(&rec.account, true);
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn store_if(&self, rec: &mut AccountRecord, base: Option<u64>, hook: Before) -> Result<Written, StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db)?;
        let on_disk = tx
            .query_opt(
                "SELECT generation FROM mailproxy_accounts WHERE account = $1 FOR UPDATE",
                &[&key(&rec.account)],
            )
            .await
            .map_err(db)?
            .map(|r| r.get::<_, i64>(0) as u64);
        if on_disk != base {
            return Ok(Written::Stale { on_disk });
        }
        hook()?;
        let w = write_if(&tx, rec, base).await?;
        if w == Written::Stored {
            tx.commit().await.map_err(db)?;
            self.cache.forget(Some(&key(&rec.account)));
            self.names.set(&rec.account, true);
        }
        Ok(w)
    }

    async fn erase(&self, account: &str) -> Result<Vec<String>, StoreError> {
        let c = self.client().await?;
        let n = c
            .execute("DELETE FROM mailproxy_accounts WHERE account = $1", &[&key(account)])
            .await
            .map_err(db)?;
        self.cache.forget(Some(&key(account)));
        self.names.set(account, false);
        Ok(if n > 0 {
            vec![format!("the record of {account} in PostgreSQL")]
        } else {
            vec![]
        })
    }

    async fn refresh_lock(&self, account: &str) -> Result<Option<Box<dyn RefreshLock>>, StoreError> {
        let c = self.client().await?;
        c.batch_execute(&format!("BEGIN; SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            .await
            .map_err(db)?;
        let mut lock = PgRefreshLock {
            client: Some(c),
            record: None,
            cache: self.cache.clone(),
        };
        let c = lock.client.as_ref().expect("just set");
        c.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('mailproxy refresh ' || $1, 0))",
            &[&key(account)],
        )
        .await
        .map_err(|e| StoreError::Database(format!("waiting for another instance's refresh: {e}")))?;
        lock.record = read(c, account).await?;
        Ok(Some(Box::new(lock)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.client().await?.simple_query("SELECT 1").await.map_err(db)?;
        Ok(())
    }

    fn changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.changed.clone())
    }
}

struct PgRefreshLock {
    /// `None` once committed.
    client: Option<Object>,
    record: Option<AccountRecord>,
    cache: Arc<Cache>,
}

#[async_trait]
impl RefreshLock for PgRefreshLock {
    fn record(&self) -> Option<&AccountRecord> {
        self.record.as_ref()
    }

    async fn commit(mut self: Box<Self>, rec: &mut AccountRecord) -> Result<Written, StoreError> {
        let base = self.record.as_ref().map(|r| r.generation);
        let c = self.client.as_ref().expect("not committed yet");
        let w = write_if(c, rec, base).await?;
        let end = if w == Written::Stored { "COMMIT" } else { "ROLLBACK" };
        c.batch_execute(end).await.map_err(db)?;
        self.cache.forget(Some(&key(&rec.account)));
        // Back to the pool, outside any transaction.
        self.client.take();
        Ok(w)
    }
}

impl Drop for PgRefreshLock {
    fn drop(&mut self) {
        // Not committed: close the connection, which ends the transaction
        // and releases the lock at once (no async work in a destructor).
        if let Some(c) = self.client.take() {
            drop(Object::take(c));
        }
    }
}
