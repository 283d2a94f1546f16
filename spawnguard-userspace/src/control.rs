//! The control socket: one JSON request per connection, one JSON reply. Root only: the socket
//! is mode 0600 and the daemon also checks the peer's credentials (SO_PEERCRED).

use std::{
    io::{Read, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream as StdUnixStream},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
};

use crate::{
    breaker::BreakerView,
    events::{EventRecord, Subscription},
    policy::Policy,
};

pub const SOCKET: &str = "/run/spawnguard/control.sock";

/// Largest request accepted (a policy file is far smaller).
const MAX_REQUEST: u64 = 1 << 20;

/// A request larger than this needs one of [`LARGE_READERS`] permits to be read on: with at
/// most [`MAX_READERS`] connections being read at once, request buffers stay under
/// `MAX_READERS * SMALL_REQUEST + LARGE_READERS * MAX_REQUEST` (32 MiB) whatever clients send.
const SMALL_REQUEST: u64 = 64 << 10;
const LARGE_READERS: usize = 16;

/// Connections served at once; more wait in the listen backlog. A connection holds its slot
/// until its reply is written (at most [`REQUEST_TIMEOUT`] to send the request and as long
/// again to take the reply), or until its request is read when it follows events.
const MAX_READERS: usize = 256;

/// The time a client has to send its whole request (and, later, to take a reply): a client
/// that connects and sends nothing holds a slot no longer than this and delays no one else.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Answered (with nothing) by the daemon's main loop: the watchdog's proof that the socket
    /// and the loop that answers requests both turn.
    Ping,
    PolicyShow,
    /// Validate and apply a policy; `file` names it in errors.
    PolicyApply {
        file: String,
        text: String,
    },
    BreakerOpen {
        type_name: String,
        for_ms: Option<u64>,
        reason: Option<String>,
    },
    BreakerClose {
        type_name: String,
    },
    BreakerReportFailure {
        type_name: String,
        reason: Option<String>,
    },
    /// The recent kernel events, then (with `follow`) every new one until the client hangs up.
    /// Answered with a `Reply` line, then one `EventRecord` JSON line per event.
    Events {
        follow: bool,
        type_name: Option<String>,
    },
}

/// The answer to `PolicyShow`: the policy in force, as written and as parsed.
#[derive(Debug, Serialize, Deserialize)]
pub struct PolicyShown {
    pub text: String,
    pub policy: Value,
}

/// The answer to `PolicyApply`: what changed.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PolicyDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// "type devsecops: max_tasks 64 -> 32", "host: deny_at 0.85 -> 0.9"
    pub changed: Vec<String>,
}

/// The answer to a breaker request: the breaker after it, and the line the daemon logged.
#[derive(Debug, Serialize, Deserialize)]
pub struct BreakerAnswer {
    pub breaker: BreakerView,
    pub message: String,
}

/// One reply line: `result` holds the request's answer (`Status` for `Status`, `PolicyShown`,
/// `PolicyDiff`, `BreakerAnswer`), or `error` says why there is none.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn from(result: Result<Value>) -> Self {
        match result {
            Ok(v) => Self {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Self {
                ok: false,
                result: None,
                error: Some(format!("{e:#}")),
            },
        }
    }
}

/// What answering a request needs from the daemon: the enforcer's maps and the policy in force.
/// The daemon implements it over the real maps; `dispatch` needs nothing else, so it runs
/// without a kernel (the fuzz target `control` gives it a fake).
pub trait Backend {
    /// The status snapshot (`Status` as JSON).
    fn status(&mut self) -> Result<Value>;
    /// The policy in force: its text and its parsed form.
    fn policy_shown(&self) -> Result<PolicyShown>;
    /// Carries out `BreakerOpen`, `BreakerClose` or `BreakerReportFailure`.
    fn breaker(&mut self, request: &Request) -> Result<BreakerAnswer>;
    /// Puts a validated policy in force (all of it or none of it).
    fn apply(&mut self, policy: Policy, text: &str) -> Result<PolicyDiff>;
    /// Told the outcome of every `PolicyApply`, a refused file included (for logs and events).
    fn applied(&mut self, file: &str, text: &str, result: &Result<PolicyDiff>);
}

/// Reads one request line.
pub fn decode(line: &str) -> Result<Request> {
    serde_json::from_str::<Request>(line).map_err(|e| anyhow!("malformed request: {e}"))
}

impl Request {
    /// The type a breaker request is about (None for the other requests).
    pub fn breaker_type(&self) -> Option<&str> {
        match self {
            Request::BreakerOpen { type_name, .. }
            | Request::BreakerClose { type_name }
            | Request::BreakerReportFailure { type_name, .. } => Some(type_name),
            _ => None,
        }
    }
}

/// Answers one request (all but `Events`, which the event task streams).
pub fn dispatch(backend: &mut impl Backend, request: Request) -> Result<Value> {
    match request {
        Request::Status => backend.status(),
        Request::Ping => Ok(Value::Null),
        Request::PolicyShow => Ok(serde_json::to_value(backend.policy_shown()?)?),
        Request::BreakerOpen { .. }
        | Request::BreakerClose { .. }
        | Request::BreakerReportFailure { .. } => {
            Ok(serde_json::to_value(backend.breaker(&request)?)?)
        }
        Request::Events { .. } => bail!("events are served by the event task"),
        Request::PolicyApply { file, text } => {
            let result = Policy::parse(&text, &file)
                .map_err(anyhow::Error::from)
                .and_then(|policy| backend.apply(policy, &text));
            backend.applied(&file, &text, &result);
            Ok(serde_json::to_value(result?)?)
        }
    }
}

/// A request on its way to the task that owns the policy, with where to send the answer.
pub type Job = (Request, oneshot::Sender<Reply>);

/// A request for the event stream, on its way to the task that owns the ring buffer.
pub type Subscribe = oneshot::Sender<Subscription>;

/// Creates the socket, root-only from the start (bound under a 0077 umask, then chmod 0600).
pub fn bind() -> Result<UnixListener> {
    let _ = std::fs::remove_file(SOCKET);
    // SAFETY: umask only changes this process's file creation mask; restored right after.
    let old = unsafe { libc::umask(0o077) };
    let listener = UnixListener::bind(SOCKET);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("binding {SOCKET}"))?;
    std::fs::set_permissions(SOCKET, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {SOCKET}"))?;
    Ok(listener)
}

/// Serves the socket until the daemon stops: event requests go to `events`, every other
/// request to `owner`.
pub async fn serve(
    listener: UnixListener,
    owner: mpsc::Sender<Job>,
    events: mpsc::Sender<Subscribe>,
) -> Result<()> {
    let readers = Arc::new(Semaphore::new(MAX_READERS));
    let large = Arc::new(Semaphore::new(LARGE_READERS));
    loop {
        // Wait for a free slot before accepting: a flood waits in the backlog, in no memory of
        // ours, and every slot frees within REQUEST_TIMEOUT.
        let slot = readers.clone().acquire_owned().await?;
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Out of descriptors or memory for a moment: the socket must outlive it.
            Err(e) => {
                tracing::warn!("control socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (owner, events, large) = (owner.clone(), events.clone(), large.clone());
        tokio::spawn(async move {
            if let Err(e) = handle(stream, slot, large, owner, events).await {
                tracing::debug!("control connection: {e:#}");
            }
        });
    }
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
enum Unread {
    #[error("no complete request within {REQUEST_TIMEOUT:?}")]
    TimedOut,
    #[error("request larger than {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("malformed request: not UTF-8 ({0})")]
    NotUtf8(std::str::Utf8Error),
    #[error("reading the request: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request line (its newline, or the client's end of writing, ends it) in bounded
/// memory: past [`SMALL_REQUEST`] only with a `large` permit, never past [`MAX_REQUEST`].
async fn read_request(stream: &mut UnixStream, large: &Semaphore) -> Result<String, Unread> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(&mut *stream);
    (&mut reader)
        .take(SMALL_REQUEST)
        .read_until(b'\n', &mut line)
        .await?;
    let _permit;
    if line.len() as u64 == SMALL_REQUEST && line.last() != Some(&b'\n') {
        _permit = large.acquire().await.map_err(|_| Unread::TooLarge)?;
        // Exactly the most it may hold: growth by doubling would take twice that.
        line.reserve_exact((MAX_REQUEST + 1 - SMALL_REQUEST) as usize);
        (&mut reader)
            .take(MAX_REQUEST + 1 - SMALL_REQUEST)
            .read_until(b'\n', &mut line)
            .await?;
        if line.len() as u64 > MAX_REQUEST {
            return Err(Unread::TooLarge);
        }
    }
    String::from_utf8(line).map_err(|e| Unread::NotUtf8(e.utf8_error()))
}

async fn handle(
    mut stream: UnixStream,
    slot: OwnedSemaphorePermit,
    large: Arc<Semaphore>,
    owner: mpsc::Sender<Job>,
    events: mpsc::Sender<Subscribe>,
) -> Result<()> {
    let uid = stream.peer_cred()?.uid();
    // Read the request in every case: closing with unread data would reset the connection and
    // hide the answer from the client.
    let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream, &large))
        .await
        .unwrap_or(Err(Unread::TimedOut));
    let reply = match read {
        _ if uid != 0 => Reply::from(Err(anyhow!(
            "permission denied: only root may use the spawnguard control socket (peer uid {uid})"
        ))),
        Err(e) => Reply::from(Err(e.into())),
        Ok(line) => match decode(&line) {
            Err(e) => Reply::from(Err(e)),
            Ok(Request::Events { follow, type_name }) => {
                // A follower stays for as long as it likes, in little memory: not in a slot.
                drop(slot);
                return stream_events(stream, events, follow, type_name).await;
            }
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                owner
                    .send((request, tx))
                    .await
                    .map_err(|_| anyhow!("the daemon is stopping"))?;
                rx.await?
            }
        },
    };
    // A client that does not take its reply is dropped after the same time.
    tokio::time::timeout(REQUEST_TIMEOUT, write_line(&mut stream, &reply))
        .await
        .map_err(|_| anyhow!("the client did not take its reply within {REQUEST_TIMEOUT:?}"))??;
    Ok(())
}

async fn write_line(stream: &mut UnixStream, v: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec(v)?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await?;
    Ok(())
}

/// Writes the recent events, then (following) the live ones until the client hangs up.
async fn stream_events(
    mut stream: UnixStream,
    events: mpsc::Sender<Subscribe>,
    follow: bool,
    type_name: Option<String>,
) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    events
        .send(tx)
        .await
        .map_err(|_| anyhow!("the daemon is stopping"))?;
    let (history, mut live) = rx.await?;
    write_line(&mut stream, &Reply::from(Ok(Value::Null))).await?;
    let wanted =
        |r: &EventRecord| type_name.is_none() || r.type_name.as_deref() == type_name.as_deref();
    for r in history.iter().filter(|r| wanted(r)) {
        write_line(&mut stream, r.as_ref()).await?;
    }
    if !follow {
        return Ok(());
    }
    loop {
        match live.recv().await {
            Ok(r) if wanted(&r) => write_line(&mut stream, r.as_ref()).await?,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                write_line(&mut stream, &EventRecord::lagged(n)).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// Asks the daemon's own control socket for a `Ping` (the watchdog's probe).
pub async fn ping() -> Result<()> {
    let mut stream = UnixStream::connect(SOCKET)
        .await
        .with_context(|| format!("connecting to {SOCKET}"))?;
    write_line(&mut stream, &Request::Ping).await?;
    stream.shutdown().await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let reply: Reply =
        serde_json::from_str(&answer).with_context(|| format!("malformed reply {answer:?}"))?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_default());
    }
    Ok(())
}

/// Streams events from the daemon to `each` (one record at a time) until the stream ends.
pub fn follow_events(
    follow: bool,
    type_name: Option<String>,
    mut each: impl FnMut(EventRecord) -> Result<()>,
) -> Result<(), Unreachable> {
    use std::io::BufRead;
    let stream = connect()?;
    let exchange = || -> Result<()> {
        let mut bytes = serde_json::to_vec(&Request::Events { follow, type_name })?;
        bytes.push(b'\n');
        (&stream).write_all(&bytes)?;
        let mut lines = std::io::BufReader::new(&stream).lines();
        let first = lines
            .next()
            .ok_or_else(|| anyhow!("the daemon hung up"))??;
        let reply: Reply =
            serde_json::from_str(&first).with_context(|| format!("malformed reply {first:?}"))?;
        if !reply.ok {
            bail!("{}", reply.error.unwrap_or_default());
        }
        for line in lines {
            let line = line?;
            each(
                serde_json::from_str(&line).with_context(|| format!("malformed event {line:?}"))?,
            )?;
        }
        Ok(())
    };
    exchange().map_err(Unreachable::Other)
}

/// Why the CLI could not reach the daemon.
#[derive(Debug)]
pub enum Unreachable {
    NotRunning,
    Other(anyhow::Error),
}

fn connect() -> Result<StdUnixStream, Unreachable> {
    match StdUnixStream::connect(SOCKET) {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(Unreachable::NotRunning)
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(Unreachable::Other(anyhow!(
                "permission denied on {SOCKET}: the control socket is for root only (try sudo)"
            )))
        }
        Err(e) => Err(Unreachable::Other(anyhow!("connecting to {SOCKET}: {e}"))),
    }
}

/// `call`, with the answer read as the type the request is answered with.
pub fn ask<T: serde::de::DeserializeOwned>(request: &Request) -> Result<Result<T>, Unreachable> {
    Ok(call(request)?.and_then(|v| {
        serde_json::from_value(v).context("the daemon's answer is not what was asked for")
    }))
}

/// Sends one request from the CLI and returns the daemon's result.
pub fn call(request: &Request) -> Result<Result<Value>, Unreachable> {
    let mut stream = connect()?;
    let mut exchange = || -> Result<Reply> {
        let mut bytes = serde_json::to_vec(request)?;
        bytes.push(b'\n');
        stream.write_all(&bytes)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        serde_json::from_str(&answer).with_context(|| format!("malformed reply {answer:?}"))
    };
    let reply = exchange().map_err(Unreachable::Other)?;
    Ok(if reply.ok {
        Ok(reply.result.unwrap_or(Value::Null))
    } else {
        Err(anyhow!(reply.error.unwrap_or_default()))
    })
}
