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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{AsyncMessage, NoTls};

use super::{Before, RecordStore, RefreshLock, StoreError, Version};
use crate::secret::Secret;
use crate::sync;
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
        msg.push_str(": ");
        msg.push_str(&s.to_string());
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

pub struct PgStore {
    pool: Pool,
    cache: Arc<Cache>,
    changed: Arc<tokio::sync::Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PgStore {
    /// Connects, migrates the schema and starts listening for changes.
    pub async fn connect(url: &Secret) -> Result<PgStore, StoreError> {
        let config: tokio_postgres::Config = url
            .expose()
            .parse()
            .map_err(|e| StoreError::Database(format!("database_url: {e}")))?;
        let mut config = config;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("mailproxy");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
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
        migrate(&pool).await?;
        let cache = Arc::new(Cache::default());
        let changed = Arc::new(tokio::sync::Notify::new());
        let listener = tokio::spawn(listen(config, cache.clone(), changed.clone()));
        Ok(PgStore {
            pool,
            cache,
            changed,
            listener,
        })
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(db)
    }
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

/// LISTENs for changed records on a connection of its own, reconnecting
/// after failures; while it is down nothing is cached.
async fn listen(config: tokio_postgres::Config, cache: Arc<Cache>, changed: Arc<tokio::sync::Notify>) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!(error = %e, "cannot listen for changes in the token database");
                } else {
                    // Whatever happened while we were not listening: read again.
                    cache.forget(None);
                    cache.listening.store(true, Ordering::SeqCst);
                    changed.notify_waiters();
                    while let Some(account) = rx.recv().await {
                        tracing::debug!(account = %account, "account changed in the token database");
                        cache.forget(Some(&account));
                        changed.notify_waiters();
                    }
                }
                cache.listening.store(false, Ordering::SeqCst);
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the token database for its change feed"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
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
