//! The `ferry` binary: parse arguments, run, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Caps glibc's malloc arenas at one per core. By default every thread that
/// allocates may get an arena of its own (up to eight per core), and each
/// keeps the peak of what its thread once held: buffers decoded on the
/// blocking pool and freed by a writer thread leave most of a restore's
/// resident memory in arenas that are empty. Measured on a restore of
/// 60,000 files: 262 MB resident by default, 147 MB with two arenas.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The environment's setting wins, as glibc's own tunable would.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            let cores = ferry::cores();
            // SAFETY: mallopt only sets an allocator parameter; called before
            // any other thread exists.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, cores.clamp(1, 64) as libc::c_int);
            }
        }
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = ferry::cli::args::Cli::parse();
    // A controller reports what it does; a command only what goes wrong.
    let controller = matches!(cli.command, ferry::cli::args::Command::Controller(_));
    let level = match cli.global.verbose {
        0 if controller => "info",
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("ferry={level}")));
    // Structured logs (one JSON object per line) for log collectors.
    if std::env::var("FERRY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(ferry::cli::run(cli)) {
        Ok(code) => code,
        // A reader that stopped early (`ferry ... | head`) is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
