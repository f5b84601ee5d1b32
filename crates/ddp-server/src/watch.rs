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
//! or an MQTT payload as it is.
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

/// A session's view of one store.
pub(crate) struct Watch {
    store: Arc<dyn Store>,
    sub: SubscriptionGuard,
    target: StoreRef,
    last: Rev,
}

impl Watch {
    /// Subscribes to `target`, then returns the watch and its first messages: a `reload`, or
    /// with `since` inside the history a `resume` followed by the changes after it.
    pub(crate) async fn start(
        store: Arc<dyn Store>,
        hub: &Arc<Hub>,
        target: StoreRef,
        since: Option<Rev>,
    ) -> Result<(Watch, Vec<Json>)> {
        let sub = hub.subscribe(target)?;
        let mut watch = Watch { store, sub, target, last: Rev::ZERO };
        if let Some(since) = since
            && let Some(changes) = watch.store.changes_since(target, since).await?
        {
            watch.last = since;
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
            out.push(frame.json.clone());
            self.last = rev;
        }
        Ok(out)
    }

    fn push_changes<'a>(&mut self, changes: impl Iterator<Item = &'a Change>, out: &mut Vec<Json>) -> Result<()> {
        for change in changes {
            if change.rev > self.last {
                out.push(ChangeFrame::new(change.clone())?.json);
                self.last = change.rev;
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
        Ok(reload)
    }

    /// The last rev this watch has sent.
    pub(crate) fn last_rev(&self) -> Rev {
        self.last
    }
}
