//! The `rampart` command: a thin shell around the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rampart::config::{Config, LogFormat, LoggingConfig};
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
            workers,
        } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
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
                demo(cfg, config, upstreams_only, workers).await
            })
        }
    }
}

async fn demo(
    cfg: Config,
    path: PathBuf,
    upstreams_only: bool,
    workers: Workers,
) -> Result<(), Box<dyn std::error::Error>> {
    let backend = "127.0.0.1:3001".parse()?;
    let llm = "127.0.0.1:3000".parse()?;
    let (b, l) = rampart::demo::start_upstreams(backend, llm).await?;
    eprintln!("stand-in backend on http://{b}, stand-in LLM (SSE) on http://{l}");
    if upstreams_only {
        std::future::pending::<()>().await;
    }
    let inbound = cfg
        .listeners
        .iter()
        .find(|l| l.name == "inbound")
        .map(|l| l.listen.port());
    let fastgpt = cfg
        .listeners
        .iter()
        .find(|l| l.name == "fastgpt")
        .map(|l| l.listen.port());
    let admin = cfg.admin.listen;
    if let (Some(i), Some(f)) = (inbound, fastgpt) {
        eprintln!("\nTry:");
        eprintln!("  curl -s http://127.0.0.1:{i}/api/agents");
        eprintln!("  curl -s -X POST -d '{{\"q\":\"hi\"}}' http://127.0.0.1:{i}/api/chat");
        eprintln!(
            "  curl -sN http://127.0.0.1:{f}/api/v1/chat/completions   # SSE, a token every 300 ms"
        );
        eprintln!("  curl -s --http2-prior-knowledge http://127.0.0.1:{i}/api/agents");
        eprintln!("  curl -s http://{admin}/readyz");
        eprintln!("Ctrl-C drains and exits (twice: at once); kill -HUP reloads proxy.yaml.\n");
    }
    rampart::app::run(cfg, Some(path), workers).await?;
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
