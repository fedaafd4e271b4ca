//! The `rampart` command: a thin shell around the library.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use rampart::config::{Config, LogFormat, LoggingConfig};
use rampart::demo::DemoPorts;
use rampart::workers::Workers;

/// mimalloc rather than glibc's malloc (Cargo feature `mimalloc`, on by default): with
/// hundreds of requests in flight per worker, glibc's per-thread cache overflows and a
/// request's allocations come from memory out of the core's cache; mimalloc's per-thread
/// pages hand back what was freed last. docs/benchmarks.md, "Both at once for GETs, and the
/// allocator".
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status of a command line rampart cannot make sense of (sysexits' EX_USAGE), apart
/// from 2, an invalid configuration.
const EX_USAGE: u8 = 64;
/// Exit status of an invalid or unreadable configuration.
const EX_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "rampart",
    version,
    about = "A reverse proxy that keeps an LLM chat product up"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic as configured.
    Run {
        #[command(flatten)]
        config: ConfigPath,
        /// Worker threads serving traffic, each with its own event loop, sockets and
        /// upstream connections (default: one per CPU).
        #[arg(long, env = "RAMPART_WORKERS")]
        workers: Option<usize>,
    },
    /// Validate a configuration file and print a summary (exit 2 when invalid).
    Check {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Try it: stand-in upstreams (a JSON backend on 127.0.0.1:3001 and an SSE "LLM" on
    /// 127.0.0.1:3000) behind rampart, configured by proxy.yaml.
    Demo {
        #[arg(long, short, env = "RAMPART_CONFIG", default_value = "proxy.yaml")]
        config: PathBuf,
        /// Only start the stand-in upstreams (for benchmarks and for trying your own config).
        #[arg(long)]
        upstreams_only: bool,
        /// Move all five ports: inbound N (8080), egress N+1 (8081), admin N+2 (9901),
        /// stand-in LLM N+3 (3000), stand-in backend N+4 (3001). Turns off reloading the
        /// file (it holds the shipped ports).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=65531))]
        port_base: Option<u16>,
        #[arg(long, env = "RAMPART_WORKERS")]
        workers: Option<usize>,
    },
    /// Start a drain in a running rampart (POST /admin/drain with the token from
    /// RAMPART_ADMIN_TOKEN), e.g. from a Kubernetes preStop exec hook.
    Drain {
        #[command(flatten)]
        admin: AdminAddr,
    },
    /// Ask a running rampart's /livez or /readyz: exit 0 on 2xx, 1 otherwise (for a
    /// container HEALTHCHECK without curl).
    Probe {
        probe: Probe,
        #[command(flatten)]
        admin: AdminAddr,
    },
}

/// The configuration file: positional or `--config`.
#[derive(Args)]
struct ConfigPath {
    /// The configuration file (default: $RAMPART_CONFIG, else proxy.yaml).
    #[arg(value_name = "FILE", conflicts_with = "config")]
    file: Option<PathBuf>,
    /// The same, as an option.
    // No `env` here: a variable would count as given and conflict with the positional path.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigPath {
    fn path(self) -> PathBuf {
        self.file
            .or(self.config)
            .or_else(|| std::env::var_os("RAMPART_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("proxy.yaml"))
    }
}

/// Where the admin listener is.
#[derive(Args)]
struct AdminAddr {
    /// The admin listener's address (default: admin.listen in --config's file, else
    /// 127.0.0.1:9901).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Read the admin address from this configuration file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "admin")]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Probe {
    Livez,
    Readyz,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version come this way too, and are not errors.
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Check { config } => match Config::load_checked(&config.path()) {
            Ok((cfg, warnings)) => {
                print!("{}", cfg.summary());
                // Valid, so still exit 0: these work but are likely mistakes.
                for w in &warnings {
                    eprintln!("{w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                // A file that could not be read has one problem, said in full above.
                if e.problems.iter().any(|p| p.line > 0) {
                    eprintln!("{}: {} problem(s)", e.source_name, e.problems.len());
                }
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config, workers } => {
            let config = config.path();
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            init_logging(&cfg.logging);
            // Kept for SIGHUP and POST /admin/reload.
            let workers = match start_workers(workers) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("cannot start the worker threads: {e}");
                    return ExitCode::FAILURE;
                }
            };
            block_on(1, async move {
                rampart::app::run(cfg, Some(config), workers).await
            })
        }
        Command::Demo {
            config,
            upstreams_only,
            port_base,
            workers,
        } => {
            let mut cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let ports = match port_base {
                None => DemoPorts::SHIPPED,
                // The range above keeps N+4 a port.
                Some(base) => match DemoPorts::from_base(base) {
                    Some(p) => p,
                    None => {
                        eprintln!("--port-base {base}: {base}+4 is past 65535");
                        return ExitCode::from(2);
                    }
                },
            };
            // A reload would read the shipped ports back from the file.
            let config = if port_base.is_some() {
                if let Err(e) = ports.apply(&mut cfg) {
                    eprintln!("--port-base: {e}");
                    return ExitCode::from(2);
                }
                None
            } else {
                Some(config)
            };
            init_logging(&cfg.logging);
            // The stand-in upstreams run on the main runtime: alone, they get the workers'
            // threads; beside rampart, one.
            let (threads, workers) = if upstreams_only {
                (workers.filter(|n| *n > 0), Ok(Workers::current()))
            } else {
                (Some(1), start_workers(workers))
            };
            let workers = match workers {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("cannot start the worker threads: {e}");
                    return ExitCode::FAILURE;
                }
            };
            block_on(threads, async move {
                demo(cfg, config, ports, upstreams_only, workers).await
            })
        }
        Command::Drain { admin } => admin_command(admin, http::Method::POST, "/admin/drain"),
        Command::Probe { probe, admin } => {
            let path = match probe {
                Probe::Livez => "/livez",
                Probe::Readyz => "/readyz",
            };
            admin_command(admin, http::Method::GET, path)
        }
    }
}

// === drain and probe: one call to the admin listener ===

/// How long `drain` and `probe` wait for the whole exchange: a probe that hangs is a
/// failed probe.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// One request to the admin listener: exit 0 on 2xx, 1 otherwise with a one-line reason.
fn admin_command(args: AdminAddr, method: http::Method, path: &'static str) -> ExitCode {
    let addr = match (args.admin, args.config) {
        (Some(addr), _) => addr,
        (None, Some(file)) => match Config::load(&file) {
            Ok(cfg) => cfg.admin.listen,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
        (None, None) => SocketAddr::from((Ipv4Addr::LOCALHOST, 9901)),
    };
    // A listener on every address is reached on loopback.
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let token = std::env::var("RAMPART_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let call = admin_call(addr, method, path, token);
    let result = rt.block_on(async {
        match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(ADMIN_CALL_TIMEOUT)
            )),
        }
    });
    match result {
        Ok((status, body)) if status.is_success() => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("rampart: http://{addr}{path}: {status} {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("rampart: http://{addr}{path}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status and the first line of the body.
async fn admin_call(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    token: Option<String>,
) -> Result<(http::StatusCode, String), String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body);
    Ok((status, body.lines().next().unwrap_or("").trim().to_owned()))
}

async fn demo(
    cfg: Config,
    path: Option<PathBuf>,
    ports: DemoPorts,
    upstreams_only: bool,
    workers: Workers,
) -> Result<(), Box<dyn std::error::Error>> {
    let backend = ([127, 0, 0, 1], ports.backend).into();
    let llm = ([127, 0, 0, 1], ports.llm).into();
    let (b, l) = rampart::demo::start_upstreams(backend, llm).await?;
    eprintln!("stand-in backend on http://{b}, stand-in LLM (SSE) on http://{l}");
    if upstreams_only {
        std::future::pending::<()>().await;
    }
    let reloads = path.is_some();
    // Printed only once every listener is bound: a start that fails prints none of it.
    rampart::app::run_then(cfg, path, workers, |running| {
        let (Some(i), Some(f)) = (running.addr("inbound"), running.addr("fastgpt")) else {
            return;
        };
        let (i, f, admin) = (i.port(), f.port(), running.admin_addr);
        eprintln!("\nTry:");
        eprintln!("  curl -s http://127.0.0.1:{i}/api/agents");
        eprintln!("  curl -s -X POST -d '{{\"q\":\"hi\"}}' http://127.0.0.1:{i}/api/chat");
        eprintln!(
            "  curl -sN http://127.0.0.1:{f}/api/v1/chat/completions   # SSE, a token every 300 ms"
        );
        eprintln!("  curl -s --http2-prior-knowledge http://127.0.0.1:{i}/api/agents");
        eprintln!("  curl -s http://{admin}/readyz");
        if reloads {
            eprintln!("Ctrl-C drains and exits (twice: at once); kill -HUP reloads proxy.yaml.\n");
        } else {
            eprintln!("Ctrl-C drains and exits (twice: at once).\n");
        }
    })
    .await?;
    Ok(())
}

/// `n` traffic workers (default: one per CPU).
fn start_workers(n: Option<usize>) -> std::io::Result<Workers> {
    let n = n.filter(|n| *n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    Workers::start(n)
}

/// The main runtime: the control plane (admin, health checks, alerts, reloads, signals)
/// beside the workers, or the demo's stand-in upstreams. `threads`: None, one per CPU.
fn block_on<F, E>(threads: impl Into<Option<usize>>, fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads.into() {
        rt.worker_threads(n);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &LoggingConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file or a pipe gets plain text, and
    // NO_COLOR (any non-empty value, no-color.org) turns it off there too.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
