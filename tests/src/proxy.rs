//! A TCP proxy in front of a real server (Postgres, Redis) that a test can
//! take down and bring back: down, every open connection is cut and the port
//! refuses new ones, as when the server itself is down.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpSocket, task::AbortHandle};

#[derive(Default)]
struct State {
    /// The accept loop, while up.
    listening: Option<AbortHandle>,
    connections: Vec<AbortHandle>,
}

/// A running proxy.
pub struct Proxy {
    pub port: u16,
    target: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn listen(port: u16) -> tokio::net::TcpListener {
    let socket = TcpSocket::new_v4().expect("a socket");
    // Up again on the same port at once, with cut connections in TIME_WAIT.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .expect("the proxy's port");
    socket.listen(128).expect("listening")
}

impl Proxy {
    /// Starts forwarding a free local port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = listen(0);
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            target,
            state: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (state, target) = (self.state.clone(), self.target);
        let accepting = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut state = accepting.lock().unwrap();
                state.connections.retain(|c| !c.is_finished());
                state.connections.push(relay.abort_handle());
            }
        });
        state.lock().unwrap().listening = Some(task.abort_handle());
    }

    /// Cuts every connection and closes the port.
    pub fn down(&self) {
        cut(&self.state);
    }

    /// A handle that takes this proxy down from any thread, at the moment a
    /// test needs (from an SMTP sink's callback, say).
    pub fn cutter(&self) -> Cutter {
        Cutter(self.state.clone())
    }

    /// Forwards again, on the same port.
    pub fn up(&self) {
        if self.state.lock().unwrap().listening.is_none() {
            self.serve(listen(self.port));
        }
    }
}

/// Takes a [`Proxy`] down ([`Proxy::down`]) from anywhere; [`Proxy::up`]
/// brings it back.
#[derive(Clone)]
pub struct Cutter(Arc<Mutex<State>>);

impl Cutter {
    pub fn cut(&self) {
        cut(&self.0);
    }
}

fn cut(state: &Mutex<State>) {
    let mut state = state.lock().unwrap();
    if let Some(listening) = state.listening.take() {
        listening.abort();
    }
    for connection in state.connections.drain(..) {
        connection.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
    }
}
