//! The `idsync` binary: parse the command line, set up telemetry, build the application, serve until
//! SIGTERM (or run one subcommand).

use clap::Parser;
use idsync::cli::{self, Cli, Command, TokenCommand};
use idsync::startup::{Application, shutdown_signal};
use idsync::telemetry::LogFormat;
use std::process::ExitCode;

// mimalloc over glibc malloc: glibc's malloc/free and arena locks were 13 % of a warm request's CPU;
// before/after figures are in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs before any constructor, so before mimalloc's first arena (the ELF executable's preinit array:
/// glibc runs it ahead of every `.init_array` entry, mimalloc's included).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".preinit_array")]
static NO_TRANSPARENT_HUGE_PAGES: extern "C" fn() = no_transparent_huge_pages;

/// Runs before mimalloc's constructor reads its options (a prioritised `.init_array` entry runs ahead of
/// the plain ones), and after the C library has set up the environment, which the preinit array is
/// too early for: glibc assigns `environ` after it.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00200")]
static PURGE_FREED_MEMORY_AT_ONCE: extern "C" fn() = purge_freed_memory_at_once;

/// mimalloc keeps pages freed for a second (its default `purge_delay`) before handing them back to the
/// OS; idsync asks for at once. Measured with 100,000 identities cached: 3.6 MiB less RSS (644 -> 608
/// bytes per identity), the warm and cold paths no different (BENCHMARKS.md). An operator's own
/// `MIMALLOC_PURGE_DELAY` wins.
#[cfg(target_os = "linux")]
extern "C" fn purge_freed_memory_at_once() {
    // SAFETY: runs as a constructor: one thread, before any other code reads or writes the environment;
    // both strings are NUL-terminated literals. Failure (no memory) leaves mimalloc's default.
    let _ = unsafe { libc::setenv(c"MIMALLOC_PURGE_DELAY".as_ptr(), c"0".as_ptr(), 0) };
}

/// Opts this process out of transparent huge pages. mimalloc asks for huge pages on its arenas (and
/// kernels set to THP `always` give them to any heap), so each region the heap touched became 2 MiB
/// of resident memory, zeroed at once: measured, idle RSS went from 33.4 to 20.7 MiB with THP off and
/// 100,000 identities from 134.6 to 111.8 MiB (BENCHMARKS.md), and the zeroing showed in the cold
/// path's profile. The warm path measured no different (two A/B pairs, within the machine's noise).
#[cfg(target_os = "linux")]
extern "C" fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours; it sets
    // a flag on this process's address space, checked by the kernel at each page fault. A kernel
    // without it (before 3.15) or a sandbox that refuses prctl only costs memory: the result is ignored.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> ExitCode {
    // Again, for C libraries that skip preinit arrays (musl): the flag is idempotent and still covers
    // every page the heap touches from here on.
    #[cfg(target_os = "linux")]
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let workers = match cli.worker_threads() {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => usize::from(n),
    };
    // One thread: the current-thread scheduler (no work-stealing queues or cross-thread wakeups to
    // pay for when there is no other worker to steal); more: the multi-threaded one.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli, workers)),
        Err(e) => {
            eprintln!("idsync cannot start its runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, workers: usize) -> ExitCode {
    let db = &cli.db;
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Migrate(args)) => return cli::migrate(args, db).await,
        Some(Command::Check(args)) => {
            idsync::telemetry::init(LogFormat::Text, "error");
            return cli::check(&args, db).await;
        }
        Some(Command::Token {
            command: TokenCommand::Inspect(args),
        }) => {
            idsync::telemetry::init(LogFormat::Text, "error");
            return cli::inspect(*args, db).await;
        }
        Some(Command::Orgs(cmd)) => return cli::run_orgs(cmd, db).await,
        Some(Command::Users(cmd)) => return cli::run_users(cmd, db).await,
        Some(Command::Memberships(cmd)) => return cli::run_memberships(cmd, db).await,
        Some(Command::Healthcheck(args)) => return cli::healthcheck(args).await,
        Some(Command::Reconcile(args)) => {
            idsync::telemetry::init(LogFormat::Text, "warn");
            return cli::reconcile(*args, db).await;
        }
        None => cli.serve,
    };
    let settings = match cli::settings_or_exit(&args, db) {
        Ok(s) => s,
        Err(code) => return code,
    };
    idsync::telemetry::init(settings.log_format, &settings.log_level);
    let app = match Application::build(&settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "idsync failed to start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        proxy = %app.proxy_addr(),
        admin = %app.admin_addr(),
        workers,
        upstream = %settings.upstream,
        issuers = ?settings.issuers.iter().map(|i| i.issuer.as_str()).collect::<Vec<_>>(),
        database = %settings.database_url,
        "idsync listening"
    );
    match app.run_until(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "idsync stopped with an error");
            ExitCode::FAILURE
        }
    }
}
