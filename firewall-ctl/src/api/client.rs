//! A blocking client of the API (the CLI needs no runtime), with a typed
//! method per request.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::de::DeserializeOwned;

use super::{
    ApiError, Cancelled, ClientAddressSet, Envelope, ErrorKind, FlowView, Killed, ListWhat,
    PinholeView, Request, Response, SessionClosed, SessionOpened, Status, API_VERSION,
};
use crate::engine::{
    BindRequest, BindResult, FutureConnectRequest, FutureConnectResult, ObjectInfo,
    RedirectRequest, RedirectResult, SessionInfo,
};

/// A blocking client (the CLI needs no runtime).
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: Duration::from_secs(30),
        }
    }

    /// How long to wait for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a daemon answers on the socket.
    pub fn is_alive(&self) -> bool {
        UnixStream::connect(&self.path).is_ok()
    }

    /// One request on a connection of its own, its answer as JSON.
    pub fn call(&self, request: Request) -> Result<serde_json::Value, ApiError> {
        self.connect()?.call(request)
    }

    /// One request on a connection of its own, its answer as the type it
    /// answers with.
    pub fn call_as<T: DeserializeOwned>(&self, request: Request) -> Result<T, ApiError> {
        self.connect()?.call_as(request)
    }

    pub fn status(&self) -> Result<Status, ApiError> {
        self.call_as(Request::Status)
    }

    pub fn open_session(&self, client: Ipv4Addr) -> Result<SessionOpened, ApiError> {
        self.call_as(Request::SessionOpen { client })
    }

    pub fn close_session(&self, session: u64) -> Result<SessionClosed, ApiError> {
        self.call_as(Request::SessionClose { session })
    }

    pub fn bind_for_client(&self, req: BindRequest) -> Result<BindResult, ApiError> {
        self.call_as(Request::BindForClient(req))
    }

    pub fn redirect_connections(&self, req: RedirectRequest) -> Result<RedirectResult, ApiError> {
        self.call_as(Request::RedirectConnections(req))
    }

    pub fn allow_future_connect(
        &self,
        req: FutureConnectRequest,
    ) -> Result<FutureConnectResult, ApiError> {
        self.call_as(Request::AllowFutureConnect(req))
    }

    pub fn kill(&self, id: u64) -> Result<Killed, ApiError> {
        self.call_as(Request::Kill { id })
    }

    pub fn cancel(&self, id: u64) -> Result<Cancelled, ApiError> {
        self.call_as(Request::Cancel { id })
    }

    pub fn set_client_address(
        &self,
        id: u64,
        address: SocketAddrV4,
    ) -> Result<ClientAddressSet, ApiError> {
        self.call_as(Request::SetClientAddress { id, address })
    }

    pub fn sessions(&self) -> Result<Vec<SessionInfo>, ApiError> {
        self.call_as(Request::List {
            what: ListWhat::Sessions,
        })
    }

    pub fn connections(&self) -> Result<Vec<ObjectInfo>, ApiError> {
        self.call_as(Request::List {
            what: ListWhat::Connections,
        })
    }

    pub fn pinholes(&self) -> Result<Vec<PinholeView>, ApiError> {
        self.call_as(Request::List {
            what: ListWhat::Pinholes,
        })
    }

    pub fn flows(&self) -> Result<Vec<FlowView>, ApiError> {
        self.call_as(Request::List {
            what: ListWhat::Flows,
        })
    }

    /// A connection for many requests, one after the other.
    pub fn connect(&self) -> Result<Connection, ApiError> {
        let stream = UnixStream::connect(&self.path).map_err(|e| not_running(&self.path, e))?;
        stream.set_read_timeout(Some(self.timeout)).ok();
        Ok(Connection {
            reader: BufReader::new(stream.try_clone().map_err(|e| not_running(&self.path, e))?),
            stream,
            path: self.path.clone(),
        })
    }
}

fn not_running(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        ErrorKind::NotRunning,
        format!(
            "no firewall daemon answers on {} ({e}); start one with `firewall-ctl up`",
            path.display()
        ),
    )
}

/// An open connection to the daemon's API.
pub struct Connection {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    path: PathBuf,
}

impl Connection {
    /// A request, its answer as JSON.
    pub fn call(&mut self, request: Request) -> Result<serde_json::Value, ApiError> {
        self.call_as(request)
    }

    /// A request, its answer as the type it answers with.
    pub fn call_as<T: DeserializeOwned>(&mut self, request: Request) -> Result<T, ApiError> {
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            request,
        })
        .expect("requests serialize");
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| not_running(&self.path, e))?;
        let mut reply = String::new();
        self.reader
            .read_line(&mut reply)
            .map_err(|e| not_running(&self.path, e))?;
        if reply.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "the daemon closed the connection without answering",
            ));
        }
        match serde_json::from_str::<Response<T>>(&reply) {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Error(e)) => Err(e),
            Err(e) => Err(ApiError::new(
                ErrorKind::Internal,
                format!("unreadable reply from the daemon: {e}"),
            )),
        }
    }
}

impl Client {
    /// Sends `Events` and calls `each` for every event line until it returns
    /// false or the daemon goes away.
    pub fn follow(&self, mut each: impl FnMut(serde_json::Value) -> bool) -> Result<(), ApiError> {
        let not_running = |e: std::io::Error| {
            ApiError::new(
                ErrorKind::NotRunning,
                format!(
                    "no firewall daemon answers on {} ({e})",
                    self.path.display()
                ),
            )
        };
        let mut stream = UnixStream::connect(&self.path).map_err(not_running)?;
        let mut line = serde_json::to_string(&Envelope {
            v: API_VERSION,
            request: Request::Events,
        })
        .expect("requests serialize");
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(not_running)?;
        let reader = BufReader::new(stream);
        let mut lines = reader.lines();
        match lines.next() {
            Some(Ok(first)) => match serde_json::from_str::<Response>(&first) {
                Ok(Response::Ok(_)) => {}
                Ok(Response::Error(e)) => return Err(e),
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("unreadable reply: {e}"),
                    ))
                }
            },
            _ => {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    "the daemon closed the event stream",
                ))
            }
        }
        for l in lines {
            let Ok(l) = l else { break };
            match serde_json::from_str(&l) {
                Ok(v) => {
                    if !each(v) {
                        break;
                    }
                }
                Err(e) => {
                    return Err(ApiError::new(
                        ErrorKind::Internal,
                        format!("unreadable event: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }
}
