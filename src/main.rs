//! The `rampart` command: a thin shell around the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rampart::config::{Config, LogFormat, LoggingConfig};
use rampart::demo::DemoPorts;
use rampart::workers::Workers;

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
        #[arg(long, short, env = "RAMPART_CONFIG", default_value = "proxy.yaml")]
        config: PathBuf,
        /// Worker threads serving traffic, each with its own event loop, sockets and
        /// upstream connections (default: one per CPU).
        #[arg(long, env = "RAMPART_WORKERS")]
        workers: Option<usize>,
    },
    /// Validate a configuration file and print a summary (exit 2 when invalid).
    Check {
        #[arg(long, short, env = "RAMPART_CONFIG", default_value = "proxy.yaml")]
        config: PathBuf,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load_checked(&config) {
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
                eprintln!("{}: {} problem(s)", e.source_name, e.problems.len());
                ExitCode::from(2)
            }
        },
        Command::Run { config, workers } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
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
                    return ExitCode::from(2);
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
    }
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
