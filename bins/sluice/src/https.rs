//! The API and the console over TLS (`[api] tls`): rustls with ring, HTTP/1.1, the client's
//! address passed on as axum's `ConnectInfo`, and a graceful stop like plain `axum::serve`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use sluice_core::ApiTlsConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The acceptor for `[api] tls`; the error names the file and what is wrong with it.
pub fn acceptor(tls: &ApiTlsConfig) -> Result<TlsAcceptor, String> {
    sluice_pg::tls::acceptor(
        "[api] tls",
        &tls.certificate_file,
        &tls.key_file,
        &[b"http/1.1"],
    )
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn until(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves `app` over TLS until `stopped` turns true; connections in flight finish.
pub fn spawn(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: TlsAcceptor,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let (tcp, client) = tokio::select! {
                () = until(&mut stopped) => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "https: accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            let mut stop = stopped.clone();
            connections.spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %client, error = %e, "https: TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
                let app = app.layer(axum::Extension(ConnectInfo::<SocketAddr>(client)));
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    () = until(&mut stop) => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            });
            // Finished connections are collected as new ones arrive.
            while connections.try_join_next().is_some() {}
        }
        while connections.join_next().await.is_some() {}
        Ok(())
    })
}
