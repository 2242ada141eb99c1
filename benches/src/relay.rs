//! A user-space link shaper for the migration bench: this kernel has `tbf` but no `netem`, so
//! the "1 Gbit/s, 20 ms round trip" link is built here, as a relay both migration tools go
//! through, applying the same shaping in each direction:
//!
//! - a token bucket at [`Shape::rate`] bytes/s (1 Gbit/s = 125 MB/s) with a bucket of
//!   [`Shape::burst`] bytes (64 KiB: in the range of tbf's usual `burst` settings for a
//!   gigabit link, `rate/HZ` = 125 KB at HZ=1000). The bucket is a virtual clock: each
//!   datagram/chunk gets its departure time when it arrives (FIFO after everything before it),
//!   so late timer wake-ups on a loaded machine delay single sends but lose no tokens;
//! - then a delay line: each datagram/chunk is released at its departure time +
//!   [`Shape::delay`] (10 ms one way, so 20 ms round trip), in order;
//! - a queue bound like tbf's `latency`: a datagram that would wait more than
//!   [`Shape::max_queue`] (50 ms) for tokens is dropped by the UDP relay (as a router with a
//!   full queue does; counted in [`Stats::dropped`]); the TCP relay drops nothing and instead
//!   stops reading from the sender while the backlog is over that bound (back-pressure).
//!
//! The relay runs on its own std threads (two per direction and per connection), not on a
//! tokio runtime, so that the tools' runtimes cannot starve it.
//!
//! Flavours: [`UdpRelay`] (for QUIC: one client, whose address it remembers, to one target)
//! and [`TcpRelay`] (for QEMU's TCP migration stream: every accepted connection, multifd opens
//! several, gets its own connection to the target; all connections share the relay's bucket
//! of each direction, as they would share a link).
//!
//! Limitation of the TCP flavour: it terminates TCP (a split connection, like a
//! performance-enhancing proxy), so the sender's TCP sees a loopback peer, not the 20 ms
//! round trip: slow start and window growth over the long path are not reproduced (bytes
//! still take the shaped rate and the delay). The UDP flavour forwards QUIC's own datagrams,
//! so QUIC's congestion control does see the 20 ms and the bucket.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The shaping applied in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Token rate, bytes per second.
    pub rate: f64,
    /// Bucket size, bytes.
    pub burst: f64,
    /// One-way delay added after the bucket.
    pub delay: Duration,
    /// Longest wait for tokens before the UDP relay drops / the TCP relay stops reading.
    pub max_queue: Duration,
}

impl Shape {
    /// 1 Gbit/s, 64 KiB bucket, 10 ms each way (20 ms round trip), 50 ms queue.
    pub const GBIT_20MS_RTT: Shape = Shape {
        rate: 125e6,
        burst: 64.0 * 1024.0,
        delay: Duration::from_millis(10),
        max_queue: Duration::from_millis(50),
    };
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} Mbit/s, burst {:.0} KiB, {} ms each way, queue {} ms",
            self.rate * 8.0 / 1e6,
            self.burst / 1024.0,
            self.delay.as_millis(),
            self.max_queue.as_millis()
        )
    }
}

/// Token bucket as a virtual clock.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens at `at`.
    tokens: f64,
    /// The departure time of the last datagram/chunk (or the last refill).
    at: Instant,
}

impl Bucket {
    fn new(shape: &Shape) -> Bucket {
        Bucket {
            rate: shape.rate,
            burst: shape.burst,
            tokens: shape.burst,
            at: Instant::now(),
        }
    }

    /// How long a datagram arriving `now` would wait for tokens.
    fn backlog(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// The departure time of `len` bytes arriving `now`, after everything before them.
    fn depart(&mut self, now: Instant, len: usize) -> Instant {
        let t = now.max(self.at);
        self.tokens = (self.tokens + (t - self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = t;
        let len = len as f64;
        if self.tokens >= len {
            self.tokens -= len;
        } else {
            self.at = t + Duration::from_secs_f64((len - self.tokens) / self.rate);
            self.tokens = 0.0;
        }
        self.at
    }
}

/// Counters of one relay.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes forwarded client → target.
    pub up_bytes: AtomicU64,
    /// Bytes forwarded target → client.
    pub down_bytes: AtomicU64,
    /// Datagrams (UDP) or chunks (TCP) forwarded client → target.
    pub up_packets: AtomicU64,
    /// Datagrams (UDP) or chunks (TCP) forwarded target → client.
    pub down_packets: AtomicU64,
    /// Datagrams dropped because the queue was over its bound (UDP only).
    pub dropped: AtomicU64,
    /// Connections accepted (TCP only).
    pub connections: AtomicU64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "up {:.1} MiB in {} packets, down {:.1} MiB in {} packets, dropped {}, connections {}",
            g(&self.up_bytes) as f64 / (1024.0 * 1024.0),
            g(&self.up_packets),
            g(&self.down_bytes) as f64 / (1024.0 * 1024.0),
            g(&self.down_packets),
            g(&self.dropped),
            g(&self.connections)
        )
    }
}

/// `None` marks the end of a TCP byte stream.
type Item = Option<Vec<u8>>;

/// A delay line: items come out at their release time, in order (release times only grow,
/// since departures from a FIFO bucket do and the delay is constant).
#[derive(Default)]
struct Line {
    state: Mutex<LineState>,
    cv: Condvar,
}

#[derive(Default)]
struct LineState {
    items: VecDeque<(Instant, Item)>,
    bytes: usize,
    closed: bool,
}

const WAKE: Duration = Duration::from_millis(50);

impl Line {
    /// False once the consumer has gone.
    fn push(&self, release: Instant, item: Item) -> bool {
        let mut s = self.state.lock().unwrap();
        if s.closed {
            return false;
        }
        s.bytes += item.as_ref().map_or(0, Vec::len);
        s.items.push_back((release, item));
        self.cv.notify_all();
        true
    }

    /// Waits while more than `cap` bytes are queued; false once stopped or closed.
    fn wait_below(&self, cap: usize, stop: &AtomicBool) -> bool {
        let mut s = self.state.lock().unwrap();
        while s.bytes > cap && !s.closed && !stop.load(Ordering::Relaxed) {
            s = self.cv.wait_timeout(s, WAKE).unwrap().0;
        }
        !s.closed && !stop.load(Ordering::Relaxed)
    }

    /// The next item once its release time has come; `None` once stopped.
    fn pop(&self, stop: &AtomicBool) -> Option<Item> {
        let mut s = self.state.lock().unwrap();
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let now = Instant::now();
            let wait = match s.items.front() {
                Some((release, _)) if *release <= now => {
                    let (_, item) = s.items.pop_front().unwrap();
                    s.bytes -= item.as_ref().map_or(0, Vec::len);
                    self.cv.notify_all();
                    return Some(item);
                }
                Some((release, _)) => (*release - now).min(WAKE),
                None => WAKE,
            };
            s = self.cv.wait_timeout(s, wait).unwrap().0;
        }
    }

    fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.cv.notify_all();
    }
}

/// Enlarges a UDP socket's kernel buffers (the default ~200 KB holds under 2 ms at
/// 1 Gbit/s; a relay thread descheduled longer on a loaded machine would lose datagrams).
fn enlarge_buffers(socket: &UdpSocket, bytes: i32) {
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_SNDBUF: i32 = 7;
    const SO_RCVBUF: i32 = 8;
    const SO_SNDBUFFORCE: i32 = 32;
    const SO_RCVBUFFORCE: i32 = 33;
    for (name, force) in [(SO_RCVBUF, SO_RCVBUFFORCE), (SO_SNDBUF, SO_SNDBUFFORCE)] {
        // SAFETY: `socket` owns an open fd; the value pointer is valid for 4 bytes for the
        // call's duration, and setsockopt does not keep it.
        let forced = unsafe { setsockopt(socket.as_raw_fd(), SOL_SOCKET, force, &bytes, 4) };
        if forced != 0 {
            // Not privileged: capped at net.core.[rw]mem_max.
            // SAFETY: as above.
            unsafe { setsockopt(socket.as_raw_fd(), SOL_SOCKET, name, &bytes, 4) };
        }
    }
}

/// Threads and stop flag shared by both flavours.
struct Threads {
    stop: Arc<AtomicBool>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// TCP sockets to shut down on stop (unblocks writers).
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Threads {
    fn new() -> Threads {
        Threads {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Arc::new(Mutex::new(Vec::new())),
            sockets: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn spawn(
        handles: &Mutex<Vec<JoinHandle<()>>>,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        let h = std::thread::Builder::new().name(name.into()).spawn(f)?;
        handles.lock().unwrap().push(h);
        Ok(())
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        loop {
            let h = self.handles.lock().unwrap().pop();
            match h {
                Some(h) => {
                    let _ = h.join();
                }
                None => break,
            }
        }
    }
}

/// UDP relay: datagrams from the client (the latest source address seen on [`Self::addr`])
/// go to the target, the target's answers go back to the client, both shaped.
pub struct UdpRelay {
    addr: SocketAddr,
    stats: Arc<Stats>,
    threads: Threads,
}

impl UdpRelay {
    /// Listens on an ephemeral loopback port and forwards to `target`.
    pub fn start(target: SocketAddr, shape: Shape) -> io::Result<UdpRelay> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(target)?;
        for s in [&front, &back] {
            enlarge_buffers(s, 8 << 20);
            s.set_read_timeout(Some(WAKE))?;
        }
        let addr = front.local_addr()?;
        let (front, back) = (Arc::new(front), Arc::new(back));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let stats = Arc::new(Stats::default());
        let threads = Threads::new();
        let (up, down) = (Arc::new(Line::default()), Arc::new(Line::default()));

        // Receivers: bucket, then the delay line.
        for (dir, sock, line, is_up) in [
            ("up", front.clone(), up.clone(), true),
            ("down", back.clone(), down.clone(), false),
        ] {
            let (stop, stats, client) = (threads.stop.clone(), stats.clone(), client.clone());
            Threads::spawn(
                &threads.handles,
                &format!("relay-udp-{dir}-rx"),
                move || {
                    let mut bucket = Bucket::new(&shape);
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(Ordering::Relaxed) {
                        let n = match sock.recv_from(&mut buf) {
                            Ok((n, from)) => {
                                if is_up {
                                    *client.lock().unwrap() = Some(from);
                                }
                                n
                            }
                            // Timeouts, and ICMP errors reported on the connected socket.
                            Err(_) => continue,
                        };
                        let now = Instant::now();
                        if bucket.backlog(now) > shape.max_queue {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let release = bucket.depart(now, n) + shape.delay;
                        line.push(release, Some(buf[..n].to_vec()));
                    }
                },
            )?;
        }
        // Senders: release in order at the due time.
        for (dir, line, is_up) in [("up", up, true), ("down", down, false)] {
            let (stop, stats, client) = (threads.stop.clone(), stats.clone(), client.clone());
            let (front, back) = (front.clone(), back.clone());
            Threads::spawn(
                &threads.handles,
                &format!("relay-udp-{dir}-tx"),
                move || {
                    while let Some(item) = line.pop(&stop) {
                        let Some(data) = item else { continue };
                        let sent = if is_up {
                            back.send(&data)
                        } else {
                            match *client.lock().unwrap() {
                                Some(c) => front.send_to(&data, c),
                                None => continue,
                            }
                        };
                        if sent.is_ok() {
                            let (bytes, packets) = if is_up {
                                (&stats.up_bytes, &stats.up_packets)
                            } else {
                                (&stats.down_bytes, &stats.down_packets)
                            };
                            bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            packets.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
            )?;
        }
        Ok(UdpRelay {
            addr,
            stats,
            threads,
        })
    }

    /// Where the client sends its datagrams.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.threads.stop();
    }
}

/// TCP relay: each accepted connection gets its own connection to the target; bytes go both
/// ways through the delay line, and through a bucket per direction shared by all connections.
pub struct TcpRelay {
    addr: SocketAddr,
    stats: Arc<Stats>,
    threads: Threads,
}

/// TCP chunk size: 16 KiB is 131 µs at 1 Gbit/s.
const CHUNK: usize = 16 * 1024;
/// Bytes queued in one delay line before its reader waits (a slow receiver, not the link).
const LINE_CAP: usize = 16 << 20;

impl TcpRelay {
    /// Listens on an ephemeral loopback port and forwards connections to `target`.
    pub fn start(target: SocketAddr, shape: Shape) -> io::Result<TcpRelay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let threads = Threads::new();
        let up = Arc::new(Mutex::new(Bucket::new(&shape)));
        let down = Arc::new(Mutex::new(Bucket::new(&shape)));
        let (stop, handles, sockets) = (
            threads.stop.clone(),
            threads.handles.clone(),
            threads.sockets.clone(),
        );
        let stats2 = stats.clone();
        Threads::spawn(&threads.handles, "relay-tcp-accept", move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => {
                        eprintln!("relay: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let server = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("relay: connecting to {target}: {e}");
                        continue;
                    }
                };
                n += 1;
                stats2.connections.fetch_add(1, Ordering::Relaxed);
                let ok = (|| -> io::Result<()> {
                    client.set_nonblocking(false)?;
                    for s in [&client, &server] {
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(WAKE))?;
                        sockets.lock().unwrap().push(s.try_clone()?);
                    }
                    for (dir, from, to, bucket) in [
                        ("up", client.try_clone()?, server.try_clone()?, up.clone()),
                        (
                            "down",
                            server.try_clone()?,
                            client.try_clone()?,
                            down.clone(),
                        ),
                    ] {
                        pipe(
                            &handles,
                            &format!("relay-tcp{n}-{dir}"),
                            from,
                            to,
                            bucket,
                            shape,
                            stop.clone(),
                            stats2.clone(),
                            dir == "up",
                        )?;
                    }
                    Ok(())
                })();
                if let Err(e) = ok {
                    eprintln!("relay: setting up connection {n}: {e}");
                }
            }
        })?;
        Ok(TcpRelay {
            addr,
            stats,
            threads,
        })
    }

    /// Where the client connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.threads.stop();
    }
}

/// One direction of one TCP connection: a reader (bucket, delay line, back-pressure) and a
/// writer (releases chunks when due).
#[allow(clippy::too_many_arguments)]
fn pipe(
    handles: &Mutex<Vec<JoinHandle<()>>>,
    name: &str,
    mut from: TcpStream,
    mut to: TcpStream,
    bucket: Arc<Mutex<Bucket>>,
    shape: Shape,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    is_up: bool,
) -> io::Result<()> {
    let line = Arc::new(Line::default());
    let (line2, stop2) = (line.clone(), stop.clone());
    Threads::spawn(handles, &format!("{name}-rx"), move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            if !line2.wait_below(LINE_CAP, &stop2) {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(_) => 0,
            };
            if n == 0 {
                line2.push(Instant::now() + shape.delay, None);
                break;
            }
            let now = Instant::now();
            let departure = bucket.lock().unwrap().depart(now, n);
            if !line2.push(departure + shape.delay, Some(buf[..n].to_vec())) {
                break;
            }
            // Back-pressure: stop reading while the backlog is over the queue bound.
            let backlog = departure.saturating_duration_since(now);
            if backlog > shape.max_queue {
                std::thread::sleep(backlog - shape.max_queue);
            }
        }
    })?;
    Threads::spawn(handles, &format!("{name}-tx"), move || {
        while let Some(item) = line.pop(&stop) {
            match item {
                Some(data) => {
                    if to.write_all(&data).is_err() {
                        break;
                    }
                    let (bytes, packets) = if is_up {
                        (&stats.up_bytes, &stats.up_packets)
                    } else {
                        (&stats.down_bytes, &stats.down_packets)
                    };
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    packets.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    let _ = to.shutdown(Shutdown::Write);
                    break;
                }
            }
        }
        line.close();
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape::GBIT_20MS_RTT;

    #[test]
    fn bucket_paces_at_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&SHAPE);
        let mut last = t0;
        for _ in 0..1000 {
            last = b.depart(t0, 125_000);
        }
        // 125 MB at 125 MB/s, less the initial bucket.
        let s = (last - t0).as_secs_f64();
        assert!((s - (125e6 - SHAPE.burst) / 125e6).abs() < 1e-3, "{s}");
    }

    #[test]
    fn udp_ping_takes_the_round_trip() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        let e = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            for _ in 0..10 {
                let (n, from) = echo.recv_from(&mut buf).unwrap();
                echo.send_to(&buf[..n], from).unwrap();
            }
        });
        let relay = UdpRelay::start(target, SHAPE).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rtts = Vec::new();
        for i in 0..10u8 {
            let t0 = Instant::now();
            client.send_to(&[i; 100], relay.addr()).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            rtts.push(t0.elapsed());
            assert_eq!((n, from, buf[0]), (100, relay.addr(), i));
        }
        e.join().unwrap();
        println!("UDP RTTs through the relay: {rtts:?}; {}", relay.stats());
        assert!(rtts.iter().all(|r| *r >= 2 * SHAPE.delay), "{rtts:?}");
    }

    #[test]
    fn tcp_ping_takes_the_round_trip() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let e = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut buf = [0u8; 1];
            while s.read_exact(&mut buf).is_ok() {
                s.write_all(&buf).unwrap();
            }
        });
        let relay = TcpRelay::start(target, SHAPE).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let mut rtts = Vec::new();
        for i in 0..5u8 {
            let t0 = Instant::now();
            c.write_all(&[i]).unwrap();
            let mut buf = [0u8; 1];
            c.read_exact(&mut buf).unwrap();
            rtts.push(t0.elapsed());
            assert_eq!(buf[0], i);
        }
        drop(c);
        e.join().unwrap();
        println!("TCP RTTs through the relay: {rtts:?}");
        assert!(rtts.iter().all(|r| *r >= 2 * SHAPE.delay), "{rtts:?}");
    }

    /// Two connections at once share the bucket: together they stay near 125 MB/s.
    #[test]
    fn tcp_bulk_is_capped_at_the_rate() {
        const PER_CONN: usize = 24 << 20;
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let sink = std::thread::spawn(move || {
            let mut readers = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = server.accept().unwrap();
                readers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    let (mut total, mut sum, mut first) = (0usize, 0u64, None);
                    loop {
                        let n = s.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        first.get_or_insert_with(Instant::now);
                        total += n;
                        sum += buf[..n].iter().map(|&b| b as u64).sum::<u64>();
                    }
                    (total, sum, first.unwrap(), Instant::now())
                }));
            }
            readers
                .into_iter()
                .map(|r| r.join().unwrap())
                .collect::<Vec<_>>()
        });
        let relay = TcpRelay::start(target, SHAPE).unwrap();
        let senders: Vec<_> = (0..2)
            .map(|_| {
                let addr = relay.addr();
                std::thread::spawn(move || {
                    let mut c = TcpStream::connect(addr).unwrap();
                    let data: Vec<u8> = (0..PER_CONN).map(|i| (i % 251) as u8).collect();
                    c.write_all(&data).unwrap();
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        let got = sink.join().unwrap();
        let expected_sum: u64 = (0..PER_CONN).map(|i| (i % 251) as u64).sum();
        for (total, sum, _, _) in &got {
            assert_eq!((*total, *sum), (PER_CONN, expected_sum));
        }
        let first = got.iter().map(|g| g.2).min().unwrap();
        let last = got.iter().map(|g| g.3).max().unwrap();
        let rate = (2 * PER_CONN) as f64 / (last - first).as_secs_f64();
        println!(
            "TCP bulk through the relay: {:.1} MB/s; {}",
            rate / 1e6,
            relay.stats()
        );
        assert!(rate <= 1.1 * SHAPE.rate, "{:.1} MB/s", rate / 1e6);
    }

    /// A UDP blast at loopback speed: capped near the rate, the excess dropped at the bound.
    #[test]
    fn udp_bulk_is_capped_at_the_rate() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        enlarge_buffers(&sink, 8 << 20);
        sink.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let target = sink.local_addr().unwrap();
        let relay = UdpRelay::start(target, SHAPE).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = 20_000usize;
        let addr = relay.addr();
        let tx = std::thread::spawn(move || {
            for i in 0..sent {
                client.send_to(&[(i % 251) as u8; 1200], addr).unwrap();
            }
        });
        let mut buf = [0u8; 2048];
        let (mut bytes, mut first, mut last) = (0usize, None, Instant::now());
        while let Ok(n) = sink.recv(&mut buf) {
            first.get_or_insert_with(Instant::now);
            last = Instant::now();
            bytes += n;
        }
        tx.join().unwrap();
        let rate = bytes as f64 / (last - first.unwrap()).as_secs_f64();
        println!(
            "UDP bulk through the relay: {:.1} MB/s, {} of {sent} datagrams arrived; {}",
            rate / 1e6,
            bytes / 1200,
            relay.stats()
        );
        assert!(rate <= 1.1 * SHAPE.rate, "{:.1} MB/s", rate / 1e6);
    }
}
