//! `taskfleet-examples`: runs the example workloads on a running fleet (`make dev`) and prints
//! their figures as one table; exits 1 when a figure misses its target.

use clap::Parser;
use taskfleet_examples::harness::{Figure, Fleet, Options, print_table};

/// Runs the example workloads on the fleet named by the `TASKFLEET_*` environment.
#[derive(Parser)]
#[command(name = "taskfleet-examples", version)]
struct Args {
    /// Which: `all`, or one of research, quorum, document, content, beam.
    #[arg(default_value = "all")]
    example: String,
    /// With `worker`: the example whose worker alone runs (the beam example's kill figure).
    #[arg(hide = true)]
    worker_of: Option<String>,
    /// A small, fast run: per-minute limits become per-second, latencies a tenth, fewer runs.
    #[arg(long, env = "EXAMPLES_QUICK")]
    quick: bool,
    /// Print the rows as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EXAMPLES_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let opts = Options { quick: args.quick };
    let fleet = Fleet::connect().await?;
    if args.example == "worker" {
        return match args.worker_of.as_deref() {
            Some("beam") => taskfleet_examples::beam::worker_process(&fleet).await,
            other => anyhow::bail!("no example worker named {other:?}"),
        };
    }
    let names: Vec<&str> = match args.example.as_str() {
        "all" => vec!["research", "quorum", "document", "content", "beam"],
        one => vec![one],
    };
    let mut rows: Vec<Figure> = Vec::new();
    for name in names {
        eprintln!("running the {name} example{}", if opts.quick { " (quick)" } else { "" });
        let figures = match name {
            "research" => taskfleet_examples::research::run(&fleet, opts).await?,
            "quorum" => taskfleet_examples::quorum::run(&fleet, opts).await?,
            "document" => taskfleet_examples::document::run(&fleet, opts).await?,
            "content" => taskfleet_examples::content::run(&fleet, opts).await?,
            "beam" => taskfleet_examples::beam::run(&fleet, opts).await?,
            other => anyhow::bail!("no example named {other:?}"),
        };
        rows.extend(figures);
    }
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print_table(&rows);
    }
    if rows.iter().any(|r| !r.pass) {
        std::process::exit(1);
    }
    Ok(())
}
