//! `novacron-anomaly`: runs the detector over a NAB data folder and prints NAB scores.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use novacron_anomaly::detector::Parts;
use novacron_anomaly::eval::{evaluate, RunConfig};
use novacron_anomaly::nab::Corpus;

#[derive(Parser)]
#[command(name = "novacron-anomaly", about = "NovaCron anomaly detector tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the detector over a NAB folder (data/, labels/, config/), writes one results CSV
    /// per series, and prints the normalised scores of the three profiles.
    Nab {
        /// The NAB folder.
        #[arg(long)]
        data: PathBuf,
        /// Where to write results CSVs (none if absent).
        #[arg(long)]
        results: Option<PathBuf>,
        /// Worker threads (series run independently).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Which runs: `all` (full, LSTM alone, without LSTM), `full`, `lstm`, `nolstm`.
        #[arg(long, default_value = "all")]
        runs: String,
        /// Parameter overrides NAME=VALUE (exploration only; defaults are the shipped method).
        #[arg(long = "set")]
        set: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Nab {
            data,
            results,
            jobs,
            runs: which,
            set,
        } => {
            let corpus = match Corpus::load(&data) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("novacron-anomaly: {e}");
                    return ExitCode::from(2);
                }
            };
            let all = [
                ("novacron", "full", Parts::Full),
                ("novacron_lstm", "lstm", Parts::LstmOnly),
                ("novacron_nolstm", "nolstm", Parts::NoLstm),
            ];
            let runs: Vec<(&str, Parts)> = all
                .iter()
                .filter(|r| which == "all" || which.split(',').any(|w| w == r.1))
                .map(|r| (r.0, r.2))
                .collect();
            if runs.is_empty() {
                eprintln!("novacron-anomaly: --runs {which:?}: expected all, full, lstm or nolstm");
                return ExitCode::from(2);
            }
            let mut base = RunConfig::default();
            for kv in &set {
                if let Err(e) = base.set(kv) {
                    eprintln!("novacron-anomaly: --set {e}");
                    return ExitCode::from(2);
                }
            }
            println!(
                "{} series, {} records",
                corpus.series.len(),
                corpus.series.iter().map(|s| s.values.len()).sum::<usize>()
            );
            for (name, parts) in runs {
                let cfg = base.with_parts(parts);
                let t = std::time::Instant::now();
                let res = results.as_deref().map(|d| (d, name));
                match evaluate(&corpus, &cfg, jobs, res) {
                    Ok(ev) => {
                        for p in &ev.profiles {
                            println!(
                                "{name:<16} {:<20} {:>7.2}  (threshold {:.4}, windows {}/{}, fp {})",
                                p.profile, p.normalised, p.threshold, p.tp_windows, p.windows, p.fp
                            );
                        }
                        println!("{name:<16} took {:.1} s", t.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        eprintln!("novacron-anomaly: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
