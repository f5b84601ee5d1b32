//! The one watch path, shared by every transport: **subscribe, then snapshot, then live**.
//!
//! [`Watch::start`] subscribes to the hub first and only then reads the store, so nothing
//! committed in between can be missed: every change is either in the snapshot (rev ≤ R) or
//! arrives through the subscription (rev > R), and the watch forwards only revs above the last
//! one it sent. With `since` (PROTOCOL.md §4.1 `sinceRev`) it starts from the change history
//! instead, when the history still covers it. A lagging subscription is answered with a fresh
//! reload; a gap (possible only when changes arrive from elsewhere out of order) is filled from
//! the history, or answered with a reload.
//!
//! The output is the JSON text of each sync message; transports put it in a WebSocket text frame
//! or an MQTT payload as it is. A watch that takes batches (`?batches=1`, PROTOCOL.md §11) holds
//! back the changes of a batch until its last one and sends them as one `batch` message; every
//! other watch sends each change on its own, so Part I clients see ordinary `set`/`delete`s.
//!
//! A watch of a session of the device's own key carries an
//! [`Attachment`](crate::progress::Attachment): once the transport has sent what the watch gave
//! it, it calls [`Watch::sent`], which moves the device's `deliveredRev` (PROTOCOL.md §10).
//!
//! A watch is only ever started by the gate ([`Kv::watch`](crate::kv::Kv::watch)), for a
//! session it admitted to that store: there is no way to watch a store without having been
//! authorized to read it.

use std::collections::VecDeque;
use std::sync::Arc;

use ddp_protocol::Rev;
use ddp_protocol::sync::{Item, ServerMessage};
use ddp_store::{Change, Store, StoreRef};

use crate::error::{Error, Result};
use crate::hub::{ChangeFrame, Delivery, Hub, SubscriptionGuard};
use crate::json::Json;
use crate::progress::Attachment;

/// A session's view of one store.
pub(crate) struct Watch {
    store: Arc<dyn Store>,
    sub: SubscriptionGuard,
    target: StoreRef,
    /// The last rev taken in (sent, or held back in `batch`).
    last: Rev,
    /// The last rev sent.
    sent: Rev,
    progress: Option<Attachment>,
    /// Whether this watch sends a batch's changes as one `batch` message.
    batches: bool,
    /// The messages of a batch whose last change has not arrived yet.
    batch: Vec<Json>,
}

/// `{"action":"batch","rev":<last>,"changes":[…]}` around the messages of one batch.
fn batch_message(rev: Rev, changes: &[Json]) -> Json {
    Json::wrap(&format!(r#"{{"action":"batch","rev":{rev},"changes":["#), changes, "]}")
}

impl Watch {
    /// Subscribes to `target`, then returns the watch and its first messages: a `reload`, or
    /// with `since` inside the history a `resume` followed by the changes after it. With
    /// `progress` (a session of the device's own key), what is sent counts as delivered; with
    /// `batches`, a batch's changes go out as one `batch` message.
    pub(crate) async fn start(
        store: Arc<dyn Store>,
        hub: &Arc<Hub>,
        target: StoreRef,
        since: Option<Rev>,
        progress: Option<Attachment>,
        batches: bool,
    ) -> Result<(Watch, Vec<Json>)> {
        let sub = hub.subscribe(target)?;
        let mut watch =
            Watch { store, sub, target, last: Rev::ZERO, sent: Rev::ZERO, progress, batches, batch: Vec::new() };
        if let Some(since) = since
            && let Some(changes) = watch.store.changes_since(target, since).await?
        {
            watch.last = since;
            watch.sent = since;
            let mut first = vec![Json::encode(&ServerMessage::Resume { rev: since })?];
            watch.push_changes(changes.iter(), &mut first)?;
            return Ok((watch, first));
        }
        let reload = watch.reload().await?;
        Ok((watch, vec![reload]))
    }

    /// The next delivery from the hub. Cancel-safe: use it in `select!`, then hand the result to
    /// [`Watch::process`] outside the `select!`.
    pub(crate) async fn recv(&self) -> Delivery {
        self.sub.recv().await
    }

    /// Turns a delivery into the messages to send, in order.
    pub(crate) async fn process(&mut self, delivery: Delivery) -> Result<Vec<Json>> {
        match delivery {
            Delivery::Lagged => Ok(vec![self.reload().await?]),
            Delivery::Changes(frames) => self.forward(frames).await,
        }
    }

    async fn forward(&mut self, frames: VecDeque<Arc<ChangeFrame>>) -> Result<Vec<Json>> {
        let mut out = Vec::with_capacity(frames.len());
        for frame in frames {
            let rev = frame.rev();
            if rev <= self.last {
                continue; // already in the snapshot, or already sent
            }
            if rev > self.last.next() {
                // A gap: changes arrived out of order. Fill it from the history, or start over.
                if let Some(missing) = self.store.changes_since(self.target, self.last).await? {
                    let before: Vec<Change> = missing.into_iter().filter(|c| c.rev < rev).collect();
                    self.push_changes(before.iter(), &mut out)?;
                }
                if rev > self.last.next() {
                    out.clear();
                    out.push(self.reload().await?);
                    if rev != self.last.next() {
                        continue; // covered by the reload (or by the next one)
                    }
                }
            }
            self.take(&frame.change, frame.json.clone(), &mut out);
        }
        Ok(out)
    }

    /// Takes in the next change (rev `last + 1`) and its message: sent at once, or held back
    /// until its batch is whole.
    fn take(&mut self, change: &Change, json: Json, out: &mut Vec<Json>) {
        self.last = change.rev;
        if !self.batches || (self.batch.is_empty() && change.batch_last.is_none()) {
            out.push(json);
            self.sent = change.rev;
            return;
        }
        self.batch.push(json);
        if change.ends_batch() {
            out.push(batch_message(change.rev, &self.batch));
            self.batch.clear();
            self.sent = change.rev;
        }
    }

    fn push_changes<'a>(&mut self, changes: impl Iterator<Item = &'a Change>, out: &mut Vec<Json>) -> Result<()> {
        for change in changes {
            if change.rev > self.last {
                let json = ChangeFrame::new(change.clone())?.json;
                self.take(change, json, out);
            }
        }
        Ok(())
    }

    /// A `reload` of the whole store; later changes are forwarded only above its rev.
    async fn reload(&mut self) -> Result<Json> {
        let snapshot = self.store.snapshot(self.target, None).await.map_err(Error::from)?;
        let items: Vec<Item> = snapshot
            .items
            .into_iter()
            .map(|i| Item { key: i.key, value: i.value, modification_time: i.modified })
            .collect();
        let reload = Json::encode(&ServerMessage::Reload { rev: snapshot.rev, num_items: items.len(), items })?;
        self.last = snapshot.rev;
        self.sent = snapshot.rev;
        self.batch.clear(); // the snapshot holds every batch up to its rev whole
        Ok(reload)
    }

    /// The last rev this watch has sent.
    pub(crate) fn last_rev(&self) -> Rev {
        self.sent
    }

    /// The transport has handed every message this watch gave it to the connection: for a
    /// session of the device's own key, the device's store is delivered up to [`Watch::last_rev`].
    pub(crate) fn sent(&self) {
        if let Some(progress) = &self.progress {
            progress.delivered(self.sent);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The watch path's rare branches, on a real embedded store: changes are written to it
    //! directly (its commit sink goes nowhere), and only some of them are published to the hub,
    //! as when changes reach a node out of order.

    use super::*;
    use crate::testing::{Embedded, embedded, set};

    struct Fixture {
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        target: StoreRef,
        _embedded: Embedded,
    }

    async fn fixture() -> Fixture {
        let embedded = embedded().await;
        let target = StoreRef::Device(embedded.device);
        Fixture { store: embedded.store.clone(), hub: Arc::new(Hub::new(64)), target, _embedded: embedded }
    }

    impl Fixture {
        async fn write(&self, n: u64) -> Change {
            self.store.write(set(self.target, "k", &n.to_string())).await.expect("written")
        }
    }

    fn revs(messages: &[Json]) -> Vec<(String, u64)> {
        messages
            .iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_str(m.text()).expect("json");
                (v["action"].as_str().unwrap_or_default().to_owned(), v["rev"].as_u64().unwrap_or_default())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_gap_is_filled_from_the_history_in_rev_order() {
        let f = fixture().await;
        for n in 1..=3 {
            f.write(n).await;
        }
        let (mut watch, first) =
            Watch::start(f.store.clone(), &f.hub, f.target, None, None, false).await.expect("watch");
        assert_eq!(revs(&first), [("reload".to_owned(), 3)]);
        f.write(4).await;
        f.write(5).await;
        let sixth = f.write(6).await;
        f.hub.publish(&sixth); // 4 and 5 never reach the hub
        let sent = watch.process(watch.recv().await).await.expect("forwarded");
        assert_eq!(revs(&sent), [("set".into(), 4), ("set".into(), 5), ("set".into(), 6)], "filled in, in order");
        f.hub.publish(&sixth);
        let again = watch.process(watch.recv().await).await.expect("forwarded");
        assert!(again.is_empty(), "a rev already sent is not sent twice");
        assert_eq!(watch.last_rev(), Rev(6));
    }

    #[tokio::test]
    async fn a_gap_the_history_no_longer_covers_is_answered_with_a_reload() {
        let f = fixture().await;
        f.write(1).await;
        let (mut watch, _) = Watch::start(f.store.clone(), &f.hub, f.target, None, None, false).await.expect("watch");
        for n in 2..=8 {
            f.write(n).await;
        }
        f.store.trim_history(1, 0).await.expect("trimmed"); // only rev 8 stays in the history
        let ninth = f.write(9).await;
        f.hub.publish(&ninth);
        let sent = watch.process(watch.recv().await).await.expect("forwarded");
        assert_eq!(revs(&sent), [("reload".into(), 9)], "a fresh reload covers the gap and the change itself");
        let tenth = f.write(10).await;
        f.hub.publish(&tenth);
        let next = watch.process(watch.recv().await).await.expect("forwarded");
        assert_eq!(revs(&next), [("set".into(), 10)], "and the stream goes on from the reload");
    }

    #[tokio::test]
    async fn resuming_inside_the_history_sends_only_what_was_missed_and_a_lag_reloads() {
        let f = fixture().await;
        for n in 1..=4 {
            f.write(n).await;
        }
        let (mut watch, first) =
            Watch::start(f.store.clone(), &f.hub, f.target, Some(Rev(2)), None, false).await.expect("watch");
        assert_eq!(revs(&first), [("resume".into(), 2), ("set".into(), 3), ("set".into(), 4)]);
        let sent = watch.process(Delivery::Lagged).await.expect("reloaded");
        assert_eq!(revs(&sent), [("reload".into(), 4)]);
    }
}
