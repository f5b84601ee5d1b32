//! `ddp-bench store`: the storage engine alone, in process — the group-commit ceiling without
//! HTTP, beside the serial fsync rate measured on the same file system in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ddp_protocol::{Key, Value};
use ddp_store::{Condition, KvAction, KvWrite, NewDevice, NoSink, Origin, SqliteOptions, SqliteStore, Store, StoreRef};
use hdrhistogram::Histogram;

use crate::fsync;
use crate::report::WriteLoad;
use crate::report::{RunResult, print_table};

/// Settings of the storage benchmark.
#[derive(clap::Args)]
pub struct StoreArgs {
    #[command(flatten)]
    load: WriteLoad,
}

/// Runs the benchmark and prints its table.
pub async fn run(args: StoreArgs) -> anyhow::Result<()> {
    let work = tempfile::tempdir_in(&args.load.work_dir).context("cannot create a work directory")?;
    let dir = work.path().to_owned();
    let fsync_rate = tokio::task::spawn_blocking(move || fsync::probe(&dir, Duration::from_secs(3))).await??;
    println!("{fsync_rate}");
    let path = work.path().join("bench.sqlite3");
    let store = Arc::new(
        tokio::task::spawn_blocking(move || SqliteStore::open(SqliteOptions::new(path), Arc::new(NoSink))).await??,
    );
    let mut devices = Vec::with_capacity(args.load.devices);
    for i in 0..args.load.devices {
        let mut key_hash = [0u8; 32];
        key_hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let new = NewDevice {
            name: format!("bench-{i}"),
            home: None,
            device_class: String::new(),
            tag: String::new(),
            key_hash,
        };
        devices.push(store.create_device(new).await?.id);
    }
    let devices = Arc::new(devices);
    let value = Value::parse(&format!("\"{}\"", "x".repeat(args.load.value_bytes.saturating_sub(2))))?;
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); args.load.clients.len()];
    for round in 0..args.load.repeat {
        for i in crate::report::alternating(args.load.clients.len(), round) {
            let c = args.load.clients[i];
            let r = load(&store, &devices, c, Duration::from_secs_f64(args.load.seconds), &value).await?;
            eprintln!(
                "  run {}/{}: {c:>3} writers: {:>8.0} writes/s  p50 {:.2} ms  p99 {:.2} ms",
                round + 1,
                args.load.repeat,
                r.per_sec,
                r.p50_ms,
                r.p99_ms
            );
            results[i].push(r);
        }
    }
    store.close().await;
    println!();
    print_table("writers", "durable writes/s, in process", &args.load.clients, &results, fsync_rate.per_sec);
    Ok(())
}

async fn load(
    store: &Arc<SqliteStore>,
    devices: &Arc<Vec<ddp_protocol::DeviceId>>,
    clients: usize,
    duration: Duration,
    value: &Value,
) -> anyhow::Result<RunResult> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let keys: Arc<Vec<Key>> = Arc::new((0..10).map(|k| Key::new(&format!("k{k}"))).collect::<Result<_, _>>()?);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (store, devices, keys, value) = (store.clone(), devices.clone(), keys.clone(), value.clone());
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new(3)?;
                let mut i = c * 7919;
                while Instant::now() < deadline {
                    i += 1;
                    let write = KvWrite {
                        store: StoreRef::Device(devices[i % devices.len()]),
                        key: keys[i % keys.len()].clone(),
                        action: KvAction::Set(value.clone()),
                        condition: Condition::None,
                        max_keys: 1000,
                        origin: Origin::Admin,
                    };
                    let t = Instant::now();
                    store.write(write).await?;
                    hist.record(t.elapsed().as_micros() as u64)?;
                }
                anyhow::Ok(hist)
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    Ok(RunResult::from_histogram(&hist, started.elapsed().as_secs_f64(), 0))
}
