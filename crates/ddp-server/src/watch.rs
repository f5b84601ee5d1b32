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

use std::collections::VecDeque;
use std::sync::Arc;

use ddp_protocol::Rev;
use ddp_protocol::sync::{Item, ServerMessage};
use ddp_store::{Change, Store, StoreRef};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::hub::{ChangeFrame, CloseReason, Delivery, Hub, SubscriptionGuard};

/// What a watch asks its transport to do.
#[derive(Debug)]
pub enum Step {
    /// Send these messages, in order.
    Send(Vec<Utf8Bytes>),
    /// End the session.
    Close(CloseReason),
}

/// A session's view of one store.
pub struct Watch {
    store: Arc<dyn Store>,
    sub: SubscriptionGuard,
    target: StoreRef,
    last: Rev,
}

fn json(message: &ServerMessage) -> Utf8Bytes {
    Utf8Bytes::from(serde_json::to_string(message).unwrap_or_default())
}

impl Watch {
    /// Subscribes to `target`, then returns the watch and its first messages: a `reload`, or
    /// with `since` inside the history a `resume` followed by the changes after it.
    pub async fn start(
        store: Arc<dyn Store>,
        hub: &Arc<Hub>,
        target: StoreRef,
        principal: Principal,
        since: Option<Rev>,
    ) -> Result<(Watch, Vec<Utf8Bytes>)> {
        let sub = hub.subscribe(target, principal);
        let mut watch = Watch { store, sub, target, last: Rev::ZERO };
        if let Some(since) = since
            && let Some(changes) = watch.store.changes_since(target, since).await?
        {
            watch.last = since;
            let mut first = vec![json(&ServerMessage::Resume { rev: since })];
            watch.push_changes(changes.iter(), &mut first);
            return Ok((watch, first));
        }
        let reload = watch.reload().await?;
        Ok((watch, vec![reload]))
    }

    /// The next delivery from the hub. Cancel-safe: use it in `select!`, then hand the result to
    /// [`Watch::process`] outside the `select!`.
    pub async fn recv(&self) -> Delivery {
        self.sub.recv().await
    }

    /// Turns a delivery into messages to send (or a close).
    pub async fn process(&mut self, delivery: Delivery) -> Result<Step> {
        match delivery {
            Delivery::Closed(reason) => Ok(Step::Close(reason)),
            Delivery::Lagged => Ok(Step::Send(vec![self.reload().await?])),
            Delivery::Changes(frames) => self.forward(frames).await.map(Step::Send),
        }
    }

    async fn forward(&mut self, frames: VecDeque<Arc<ChangeFrame>>) -> Result<Vec<Utf8Bytes>> {
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
                    self.push_changes(before.iter(), &mut out);
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

    fn push_changes<'a>(&mut self, changes: impl Iterator<Item = &'a Change>, out: &mut Vec<Utf8Bytes>) {
        for change in changes {
            if change.rev > self.last {
                out.push(ChangeFrame::new(change.clone()).json);
                self.last = change.rev;
            }
        }
    }

    /// A `reload` of the whole store; later changes are forwarded only above its rev.
    async fn reload(&mut self) -> Result<Utf8Bytes> {
        let snapshot = self.store.snapshot(self.target, None).await.map_err(Error::from)?;
        let items: Vec<Item> = snapshot
            .items
            .into_iter()
            .map(|i| Item { key: i.key, value: i.value, modification_time: i.modified })
            .collect();
        self.last = snapshot.rev;
        Ok(json(&ServerMessage::Reload { rev: snapshot.rev, num_items: items.len(), items }))
    }

    /// The last rev this watch has sent.
    pub fn last_rev(&self) -> Rev {
        self.last
    }
}
