//! A lean MQTT 3.1.1 client over mutual TLS: one connection per device, its TLS stream split into a packet
//! reader and a writer that sends whole bursts at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::packet::{self, Packet};

/// The name both brokers' server certificates are valid for.
const SERVER_NAME: &str = "localhost";

/// A device's TLS client configuration: trusts only the platform CA, presents the device certificate.
/// Session resumption is off, so every connection in every run pays a full handshake on both brokers.
pub fn tls_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("CA certificate PEM")?)?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("device certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("device key PEM")?;
    // The broker's provider (aws-lc-rs's X25519): the load generator shares the broker's two cores, and this
    // makes its half of each key exchange as cheap as the broker's.
    let provider = Arc::new(antumbra::mqtt::kx::provider());
    let webpki =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(OnceVerified(webpki)))
        .with_client_auth_cert(chain, key)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Server chains this process has verified (chain DER and name), shared by every device's configuration.
static VERIFIED_SERVERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// The load generator plays thousands of devices on the brokers' own cores, so it checks the one server
/// chain both brokers present once instead of on every connection (chain building and an ECDSA verification
/// that a real device would spend on its own CPU). The server's handshake signature is still verified on every
/// connection, so the broker's side of each handshake is exactly what a device causes.
#[derive(Debug)]
struct OnceVerified(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for OnceVerified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut key = format!("{server_name:?}").into_bytes();
        for cert in std::iter::once(end_entity).chain(intermediates) {
            key.extend_from_slice(&(cert.len() as u32).to_be_bytes());
            key.extend_from_slice(cert);
        }
        if VERIFIED_SERVERS.lock().expect("verified servers").contains(&key) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        let verified =
            self.0
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        VERIFIED_SERVERS.lock().expect("verified servers").push(key);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Reads whole packets from the broker.
pub struct Reader {
    half: ReadHalf<TlsStream<TcpStream>>,
    buf: BytesMut,
}

impl Reader {
    /// The next packet; waits for the network only when none is buffered. Cancel-safe: a partial packet
    /// stays in the buffer.
    pub async fn next(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = packet::parse(&mut self.buf)? {
                return Ok(packet);
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            if self.half.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// A packet that is already buffered, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Packet>> {
        packet::parse(&mut self.buf)
    }
}

/// Sends bursts of encoded packets.
pub struct Writer {
    half: WriteHalf<TlsStream<TcpStream>>,
    /// Packets encoded since the last [`Writer::send`].
    pub buf: Vec<u8>,
}

impl Writer {
    /// Writes and flushes everything encoded into `buf`.
    pub async fn send(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.half.write_all(&self.buf).await?;
            self.half.flush().await?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Sends DISCONNECT and closes the TLS session and the socket, bounded in time.
    pub async fn disconnect(mut self) {
        packet::disconnect(&mut self.buf);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.send().await;
            let _ = self.half.shutdown().await;
        })
        .await;
    }
}

/// Connects a device: TCP, TLS with its client certificate, CONNECT (clean session) and a successful
/// CONNACK. The caller bounds the time.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    client_id: &str,
    keep_alive_secs: u16,
) -> Result<(Reader, Writer)> {
    connect_session(addr, tls, client_id, keep_alive_secs, true).await
}

/// [`connect`], with a persistent session when `clean` is false.
pub async fn connect_session(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    client_id: &str,
    keep_alive_secs: u16,
    clean: bool,
) -> Result<(Reader, Writer)> {
    let mut connect = Vec::new();
    packet::connect(&mut connect, client_id, keep_alive_secs, clean);
    connect_with(addr, tls, &connect).await
}

/// Connects over mutual TLS with `connect` (a whole CONNECT packet, of any protocol version) and waits for a
/// CONNACK that accepts it.
pub async fn connect_with(
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
    connect: &[u8],
) -> Result<(Reader, Writer)> {
    let tcp = TcpStream::connect(addr).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let (read, write) = tokio::io::split(stream);
    let mut reader = Reader {
        half: read,
        buf: BytesMut::with_capacity(4096),
    };
    let mut writer = Writer {
        half: write,
        buf: Vec::with_capacity(4096),
    };
    writer.buf.extend_from_slice(connect);
    writer.send().await.context("sending CONNECT")?;
    match reader.next().await.context("waiting for CONNACK")? {
        Packet::ConnAck { code: 0 } => Ok((reader, writer)),
        Packet::ConnAck { code } => bail!("CONNACK refused with return code {code}"),
        other => bail!("expected CONNACK, got {other:?}"),
    }
}

/// Subscribes to one filter and waits for its SUBACK; fails when the broker refuses the filter.
pub async fn subscribe(reader: &mut Reader, writer: &mut Writer, filter: &str, qos: u8) -> Result<()> {
    packet::subscribe(&mut writer.buf, 1, filter, qos);
    writer.send().await?;
    match reader.next().await? {
        Packet::SubAck { granted, .. } if granted < 0x80 => Ok(()),
        Packet::SubAck { granted, .. } => bail!("SUBACK refused {filter} (0x{granted:02x})"),
        other => bail!("expected SUBACK, got {other:?}"),
    }
}
