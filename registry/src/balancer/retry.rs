//! Retries that cannot hurt: which failed calls may be sent again, how often, and how the request is
//! replayed.
//!
//! A call is retried only when that is safe:
//! - the request never reached a server: the connection was refused, or the server refused the
//!   stream before processing it (HTTP/2 `REFUSED_STREAM`, a request cancelled before it was
//!   written, as happens when a connection closes under a GOAWAY);
//! - or the method is declared idempotent and the failure is `UNAVAILABLE` (a reset connection, a
//!   server that answered UNAVAILABLE) or a server's `CANCELLED` (grpc-core cancels calls it drops
//!   while shutting down), so running it twice does no harm.
//!
//! Each retry goes to a different instance when there is one, waits a jittered backoff, and must fit
//! within the call's deadline. A [`RetryPolicy`]'s budget caps retries at a fraction of the calls
//! (plus a small floor per second), so during an outage retries cannot multiply the load.
//!
//! `http::Request` bodies are streams and cannot be cloned. A unary request's body is ready at once
//! (one frame, encoded when first polled), so it is read whole before the first attempt and each
//! attempt sends the same bytes. Any other body is recorded as the first attempt sends it
//! (`Replay`) and replayed to the next attempt; bodies larger than
//! [`RetryPolicy::max_replay_bytes`] are never retried once that much has been sent.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use crate::sync::Unpoisoned;
use bytes::Bytes;
use http_body::Frame;
use tokio::time::Instant;
use tonic::{Status, body::Body};

/// Which calls may be retried, how many times, and within what budget.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per call, the first included; `1` disables retries.
    pub max_attempts: u32,
    /// Methods safe to run twice, as gRPC paths (`/helloworld.Greeter/SayHello`), or whole services
    /// with a trailing slash (`/helloworld.Greeter/`).
    pub idempotent: Vec<String>,
    /// First backoff between attempts (then doubled, jittered, capped at `backoff_max`).
    pub backoff_initial: Duration,
    /// Largest backoff between attempts.
    pub backoff_max: Duration,
    /// Retries allowed as a fraction of calls made (0.2: retries add at most 20 % load).
    pub budget_ratio: f64,
    /// Retries per second allowed regardless of the ratio, so a quiet client can still retry.
    pub budget_min_per_second: f64,
    /// Request bodies are recorded for replay up to this size; a larger request is not retried.
    pub max_replay_bytes: usize,
}

impl Default for RetryPolicy {
    /// Three attempts, no method declared idempotent (so only calls that never reached a server
    /// are retried), 10-100 ms backoff, a 20 % budget with a floor of 10 retries per second.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            idempotent: Vec::new(),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            budget_ratio: 0.2,
            budget_min_per_second: 10.0,
            max_replay_bytes: 64 * 1024,
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn disabled() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Declares a method (`/pkg.Service/Method`) or a whole service (`/pkg.Service/`) idempotent.
    pub fn idempotent(mut self, path: impl Into<String>) -> Self {
        self.idempotent.push(path.into());
        self
    }

    /// Whether the gRPC method at `path` was declared idempotent.
    pub fn is_idempotent(&self, path: &str) -> bool {
        self.idempotent.iter().any(|declared| {
            declared == path || (declared.ends_with('/') && path.starts_with(declared.as_str()))
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_attempts > 1
    }
}

/// A token bucket of retries: each call deposits `ratio` tokens, time deposits
/// `min_per_second` tokens per second, each retry takes one. The balance is capped at ten seconds'
/// worth of the floor, so a long quiet spell cannot save up a retry storm.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    cap: f64,
    state: Mutex<(f64, Instant)>,
    /// Set while the balance is at its cap, where a deposit changes nothing: the normal state
    /// (retries are rare), in which a call's deposit costs one atomic load instead of the lock.
    full: AtomicBool,
}

impl RetryBudget {
    pub(crate) fn new(policy: &RetryPolicy) -> Self {
        let cap = (policy.budget_min_per_second * 10.0).max(1.0);
        Self {
            ratio: policy.budget_ratio.max(0.0),
            min_per_second: policy.budget_min_per_second.max(0.0),
            cap,
            state: Mutex::new((cap, Instant::now())),
            full: AtomicBool::new(true),
        }
    }

    /// Records a call made at `now`.
    pub(crate) fn deposit(&self, now: Instant) {
        if !self.full.load(Ordering::Relaxed) {
            self.deposit_at(now);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    fn deposit_at(&self, now: Instant) {
        let mut state = self.refill(now);
        state.0 = (state.0 + self.ratio).min(self.cap);
        if state.0 >= self.cap {
            self.full.store(true, Ordering::Relaxed);
        }
    }

    fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut state = self.refill(now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            self.full.store(false, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    fn refill(&self, now: Instant) -> MutexGuard<'_, (f64, Instant)> {
        // Only arithmetic happens under the lock; a poisoned value is still a valid number.
        let mut state = self.state.locked();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.min_per_second).min(self.cap);
        state.1 = now;
        state
    }
}

/// True when `error` proves the request was never processed by any server, so sending it again
/// cannot run it twice.
pub(crate) fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        // Canceled: hyper dropped the request before writing it (the connection was closing).
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_canceled() {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<h2::Error>() {
            if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// The gRPC status of a "trailers-only" response (the status in the headers, no message), which
/// is how a server refuses or fails a call before answering it; `None` for a normal answer. The
/// one place responses are classified: see [`is_unavailable`] and [`is_failing`].
pub(crate) fn trailers_only_status<B>(response: &http::Response<B>) -> Option<u32> {
    let value = response.headers().get(&GRPC_STATUS)?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse().ok()
}

/// `UNAVAILABLE`, or `CANCELLED`, which a server sends for calls it drops while shutting down
/// (grpc-core does): we never cancel a call and then read its response, so a CANCELLED here came
/// from the server. Either is safe to retry for an idempotent method.
pub(crate) fn is_unavailable(status: u32) -> bool {
    matches!(status, 14 | 1)
}

/// A status saying the server is failing, rather than the request being wrong (UNKNOWN,
/// INTERNAL, UNAVAILABLE, DATA_LOSS): it counts towards the instance's outlier ejection.
pub(crate) fn is_failing(status: u32) -> bool {
    matches!(status, 2 | 13 | 14 | 15)
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The deadline a call carries in its `grpc-timeout` header, if any (`"100m"`, `"5S"`, `"1H"`).
pub(crate) fn grpc_timeout<B>(request: &http::Request<B>) -> Option<Duration> {
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let value = request.headers().get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (amount, unit) = value.split_at(value.len().checked_sub(1)?);
    // The spec allows at most 8 digits.
    if amount.is_empty() || amount.len() > 8 {
        return None;
    }
    let amount: u64 = amount.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// A request body kept so that a later attempt can send it again.
#[derive(Debug)]
pub(crate) enum Replay {
    /// The whole body, read before the first attempt because it was ready at once, as a unary
    /// request's is: every attempt sends these bytes (`None`: an empty body), with nothing shared
    /// between attempts and nothing to lock.
    Whole(Option<Bytes>),
    /// A body still coming when the call started (a client stream): recorded as it is sent.
    Recorded(Recorded),
}

/// A body recorded as the first attempt sends it, shared by every attempt.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    state: Arc<Mutex<ReplayState>>,
}

/// What polling a body once gave: `None` when it was not ready.
type Polled = Option<Option<Result<Frame<Bytes>, Status>>>;

/// Polls `body` once, without waiting.
async fn poll_now(body: &mut Body) -> Polled {
    std::future::poll_fn(
        |cx| match http_body::Body::poll_frame(Pin::new(&mut *body), cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => Poll::Ready(None),
        },
    )
    .await
}

#[derive(Debug)]
struct ReplayState {
    /// The original body, until it ends.
    inner: Option<Body>,
    /// What was read from `inner` before the first attempt and is not sent yet.
    held: Polled,
    /// The data frames taken from `inner` so far.
    recorded: Vec<Bytes>,
    recorded_bytes: usize,
    limit: usize,
    /// More than `limit` bytes were sent: the recording is incomplete, no replay is possible.
    overflowed: bool,
    trailers: Option<http::HeaderMap>,
    /// Which attempt owns the body; bodies of earlier attempts stop.
    generation: u64,
}

impl Replay {
    /// Keeps `body` for replaying. What it has ready now is read at once, without waiting: a
    /// body that ends within its first data frame (a unary request) is kept whole, anything else
    /// (held, up to `limit` bytes, from the frames read) is recorded as the first attempt sends it.
    pub(crate) async fn new(body: Body, limit: usize) -> Self {
        Self::read(body, limit, limit).await
    }

    /// The body of a call sent once (retries off). A body ready whole goes as one frame, as on
    /// the retrying path; any other goes as it comes, nothing recorded.
    pub(crate) async fn once(body: Body) -> CallBody {
        Self::read(body, usize::MAX, 0).await.attempt()
    }

    /// Reads what `body` has ready: kept whole if it ends within a first data frame of at most
    /// `whole_limit` bytes (reading the end too is what lets that frame carry `END_STREAM`, where
    /// tonic's body sends an empty frame after it), otherwise recorded up to `record_limit`.
    async fn read(mut body: Body, whole_limit: usize, record_limit: usize) -> Self {
        let mut recorded = Vec::new();
        let held = match poll_now(&mut body).await {
            Some(None) => return Replay::Whole(None),
            Some(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| d.len() <= whole_limit) => {
                let data = frame.into_data().unwrap_or_default();
                match poll_now(&mut body).await {
                    Some(None) => return Replay::Whole(Some(data)),
                    second => {
                        recorded.push(data);
                        second
                    }
                }
            }
            first => first,
        };
        let recorded_bytes: usize = recorded.iter().map(Bytes::len).sum();
        Replay::Recorded(Recorded {
            state: Arc::new(Mutex::new(ReplayState {
                inner: Some(body),
                held,
                recorded,
                recorded_bytes,
                limit: record_limit,
                // A first frame read before the first attempt is sent by it even when it is over
                // the limit; then there is no second attempt.
                overflowed: recorded_bytes > record_limit,
                trailers: None,
                generation: 0,
            })),
        })
    }

    /// The body for the next attempt: the whole body, or everything sent so far, then the rest
    /// of the original.
    pub(crate) fn attempt(&self) -> CallBody {
        match self {
            Replay::Whole(data) => CallBody::Whole(data.clone()),
            Replay::Recorded(recorded) => {
                let generation = {
                    let mut state = recorded.lock();
                    state.generation += 1;
                    state.generation
                };
                CallBody::Replayed(AttemptBody {
                    replay: recorded.clone(),
                    generation,
                    next: 0,
                    trailers_sent: false,
                })
            }
        }
    }

    /// Whether another attempt could send the whole body again.
    pub(crate) fn replayable(&self) -> bool {
        match self {
            Replay::Whole(_) => true,
            Replay::Recorded(recorded) => !recorded.lock().overflowed,
        }
    }
}

impl Recorded {
    fn lock(&self) -> MutexGuard<'_, ReplayState> {
        // Polling happens under the lock but never panics midway through an update.
        self.state.locked()
    }
}

/// A request body as a connection sends it: the caller's own, or an attempt's copy or view of a
/// [`Replay`]. An enum rather than a boxed body, so that an attempt allocates nothing for it.
pub(crate) enum CallBody {
    /// The caller's body, sent once (no retry possible, or a health check).
    Direct(Body),
    /// An attempt's copy of a body kept whole ([`Replay::Whole`]), until it is sent.
    Whole(Option<Bytes>),
    /// An attempt of a call that may be retried, its body recorded as it goes.
    Replayed(AttemptBody),
}

impl http_body::Body for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // Both variants are Unpin.
        match self.get_mut() {
            CallBody::Direct(body) => Pin::new(body).poll_frame(cx),
            CallBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            CallBody::Replayed(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            CallBody::Direct(body) => body.is_end_stream(),
            CallBody::Whole(data) => data.is_none(),
            CallBody::Replayed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            CallBody::Direct(body) => body.size_hint(),
            // No exact size, like tonic's own bodies: hyper would send it as a `content-length`
            // header, one more header to encode and decode on every call.
            CallBody::Whole(_) => http_body::SizeHint::default(),
            CallBody::Replayed(body) => body.size_hint(),
        }
    }
}

/// One attempt's view of a [`Recorded`] body.
pub(crate) struct AttemptBody {
    replay: Recorded,
    generation: u64,
    /// Index of the next recorded frame to send.
    next: usize,
    trailers_sent: bool,
}

impl http_body::Body for AttemptBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // Every field is Unpin; borrowing them apart lets the state stay locked through the
        // shared handle without cloning it on every poll.
        let this = self.get_mut();
        let mut state = this.replay.lock();
        if state.generation != this.generation {
            // A later attempt took over; this one has already failed.
            return Poll::Ready(Some(Err(Status::cancelled("superseded by a retry"))));
        }
        if let Some(data) = state.recorded.get(this.next) {
            let data = data.clone();
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let polled = match state.held.take() {
            Some(held) => Poll::Ready(held),
            None => {
                let Some(inner) = state.inner.as_mut() else {
                    if let (Some(trailers), false) = (&state.trailers, this.trailers_sent) {
                        let trailers = trailers.clone();
                        this.trailers_sent = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    return Poll::Ready(None);
                };
                Pin::new(inner).poll_frame(cx)
            }
        };
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.inner = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !state.overflowed {
                        if state.recorded_bytes + data.len() <= state.limit {
                            state.recorded_bytes += data.len();
                            state.recorded.push(data.clone());
                            this.next += 1;
                        } else {
                            state.overflowed = true;
                            state.recorded.clear();
                        }
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[test]
    fn idempotent_methods_match_exactly_or_by_service() {
        let policy = RetryPolicy::default()
            .idempotent("/helloworld.Greeter/SayHello")
            .idempotent("/pkg.Reads/");
        assert!(policy.is_idempotent("/helloworld.Greeter/SayHello"));
        assert!(!policy.is_idempotent("/helloworld.Greeter/SayGoodbye"));
        assert!(policy.is_idempotent("/pkg.Reads/Get"));
        assert!(!policy.is_idempotent("/pkg.ReadsMore/Get"));
        assert!(!RetryPolicy::disabled().enabled());
    }

    #[test]
    fn budget_allows_the_floor_then_the_ratio() {
        let policy = RetryPolicy {
            budget_ratio: 0.5,
            budget_min_per_second: 1.0,
            ..RetryPolicy::default()
        };
        let budget = RetryBudget::new(&policy);
        let t0 = Instant::now();
        // Starts full: ten seconds' worth of the floor.
        for _ in 0..10 {
            assert!(budget.try_withdraw_at(t0));
        }
        assert!(!budget.try_withdraw_at(t0));
        // Two calls earn one retry.
        budget.deposit_at(t0);
        assert!(!budget.try_withdraw_at(t0));
        budget.deposit_at(t0);
        assert!(budget.try_withdraw_at(t0));
        // A second of time earns one more, never more than the cap.
        assert!(budget.try_withdraw_at(t0 + Duration::from_secs(1)));
        assert!(!budget.try_withdraw_at(t0 + Duration::from_secs(1)));
        let much_later = t0 + Duration::from_secs(3600);
        assert_eq!(
            (0..20)
                .filter(|_| budget.try_withdraw_at(much_later))
                .count(),
            10
        );
    }

    #[test]
    fn grpc_timeouts_are_parsed() {
        let with = |v: &str| {
            let request = http::Request::builder()
                .header("grpc-timeout", v)
                .body(())
                .unwrap();
            grpc_timeout(&request)
        };
        assert_eq!(with("100m"), Some(Duration::from_millis(100)));
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("250u"), Some(Duration::from_micros(250)));
        assert_eq!(with("123456789m"), None);
        assert_eq!(with("m"), None);
        assert_eq!(with("5x"), None);
        assert_eq!(grpc_timeout(&http::Request::new(())), None);
    }

    #[test]
    fn trailers_only_unavailable_is_recognised() {
        let response = |status: &str| {
            http::Response::builder()
                .header("grpc-status", status)
                .body(())
                .unwrap()
        };
        fn unavailable(r: &http::Response<()>) -> bool {
            trailers_only_status(r).is_some_and(is_unavailable)
        }
        fn failing(r: &http::Response<()>) -> bool {
            trailers_only_status(r).is_some_and(is_failing)
        }
        assert!(unavailable(&response("14")));
        assert!(unavailable(&response("1")));
        assert!(!unavailable(&response("0")));
        assert!(!unavailable(&http::Response::new(())));
        assert!(failing(&response("13")) && failing(&response("14")));
        assert!(!failing(&response("3")) && !failing(&response("1")));
        assert_eq!(trailers_only_status(&response("x")), None);
    }

    async fn collect(mut body: CallBody) -> Result<Vec<u8>, Status> {
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                out.extend_from_slice(&data);
            }
        }
        Ok(out)
    }

    fn chunks(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        Body::new(frames_body(frames))
    }

    /// A body yielding the given frames (no extra dependency for a test).
    fn frames_body(
        frames: Vec<Result<Frame<Bytes>, Status>>,
    ) -> impl http_body::Body<Data = Bytes, Error = Status> + Send + 'static {
        Frames {
            pending_first: false,
            frames: frames.into(),
        }
    }

    /// Like [`frames_body`], but not ready on its first poll: what a client stream's body can do.
    fn late_body(
        frames: Vec<Result<Frame<Bytes>, Status>>,
    ) -> impl http_body::Body<Data = Bytes, Error = Status> + Send + 'static {
        Frames {
            pending_first: true,
            frames: frames.into(),
        }
    }

    struct Frames {
        pending_first: bool,
        frames: std::collections::VecDeque<Result<Frame<Bytes>, Status>>,
    }

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if std::mem::take(&mut self.pending_first) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.frames.pop_front())
        }
    }

    #[tokio::test]
    async fn a_body_ready_at_once_in_one_frame_is_kept_whole_for_every_attempt() {
        let replay = Replay::new(chunks(&[b"hello"]), 1024).await;
        assert!(matches!(&replay, Replay::Whole(Some(d)) if d == "hello"));
        let first = replay.attempt();
        assert_eq!(first.size_hint().exact(), None, "no content-length header");
        assert!(!first.is_end_stream());
        assert_eq!(collect(first).await.unwrap(), b"hello");
        assert!(replay.replayable());
        assert_eq!(collect(replay.attempt()).await.unwrap(), b"hello");

        let empty = Replay::new(chunks(&[]), 1024).await;
        assert!(matches!(empty, Replay::Whole(None)));
        assert!(empty.attempt().is_end_stream());
        assert!(collect(empty.attempt()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_body_sent_once_goes_whole_or_as_it_comes_and_is_not_kept() {
        assert!(matches!(
            Replay::once(chunks(&[b"hello"])).await,
            CallBody::Whole(Some(d)) if d == "hello"
        ));
        let stream = Replay::once(chunks(&[b"ab", b"cd", b"ef"])).await;
        let CallBody::Replayed(attempt) = &stream else {
            panic!("a body of three frames is not whole");
        };
        let replay = attempt.replay.clone();
        assert_eq!(collect(stream).await.unwrap(), b"abcdef");
        {
            // Nothing recorded beyond the frame read before sending (which the attempt sent).
            let state = replay.lock();
            assert!(state.overflowed);
            assert_eq!(state.recorded_bytes, 2);
        }
        assert!(!Replay::Recorded(replay).replayable());
    }

    #[tokio::test]
    async fn a_body_not_ready_at_once_is_recorded_as_it_is_sent() {
        let late = late_body(vec![Ok(Frame::data(Bytes::from_static(b"late")))]);
        let replay = Replay::new(Body::new(late), 1024).await;
        assert!(matches!(replay, Replay::Recorded(_)));
        assert_eq!(collect(replay.attempt()).await.unwrap(), b"late");
        assert!(replay.replayable());
        assert_eq!(collect(replay.attempt()).await.unwrap(), b"late");
    }

    #[tokio::test]
    async fn an_error_read_before_the_first_attempt_reaches_it() {
        let failing = Body::new(frames_body(vec![Err(Status::internal("cannot encode"))]));
        let replay = Replay::new(failing, 1024).await;
        assert_eq!(
            collect(replay.attempt()).await.unwrap_err().message(),
            "cannot encode"
        );
    }

    #[tokio::test]
    async fn a_body_is_replayed_whole_after_a_partial_or_complete_send() {
        let replay = Replay::new(chunks(&[b"ab", b"cd", b"ef"]), 1024).await;
        let mut first = replay.attempt();
        // The first attempt sends one frame, then "fails".
        let frame = std::future::poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "ab");
        assert!(replay.replayable());
        let second = replay.attempt();
        // The abandoned attempt can no longer take frames.
        assert!(collect(first).await.is_err());
        assert_eq!(collect(second).await.unwrap(), b"abcdef");
        assert_eq!(collect(replay.attempt()).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayable() {
        let replay = Replay::new(chunks(&[b"0123456789", b"0123456789"]), 15).await;
        assert_eq!(collect(replay.attempt()).await.unwrap().len(), 20);
        assert!(!replay.replayable());
    }
}
