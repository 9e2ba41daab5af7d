//! `novacron simulate --scenario FILE`: what-if analysis before a policy is
//! applied. Replays the scenario's trace through the real scheduler, reconciler
//! and autoscaler on a virtual clock (`novacron_common::sim`), once with its
//! policies and once as a static fleet sized for the peak, and reports cost,
//! availability, reaction time and placements. Runs locally; no controller needed.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use novacron_common::sim::{self, Report};

use super::CliError;
use super::output::{self, OutputError, OutputFormat};

/// The largest scenario file read.
pub const MAX_SCENARIO_BYTES: u64 = 1024 * 1024;

/// `novacron simulate` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct SimulateArgs {
    /// The scenario (YAML, `kind: Scenario`; see packaging/scenarios/).
    #[arg(long, value_name = "FILE")]
    pub scenario: PathBuf,
    /// Overrides the scenario's seed (the same seed gives the same report).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also print every scale event and fault of the autoscaled run.
    #[arg(long)]
    pub events: bool,
}

/// Runs `novacron simulate`.
pub fn run(args: &SimulateArgs, format: OutputFormat, out: &mut dyn Write) -> Result<(), CliError> {
    let report = simulate(args)?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            writeln!(out, "{report}").map_err(OutputError::Io)?;
            if args.events {
                writeln!(out, "\nevents (autoscaled):").map_err(OutputError::Io)?;
                for e in &report.autoscaled.events {
                    writeln!(out, "  {e}").map_err(OutputError::Io)?;
                }
            }
        }
        _ => output::write_value(out, format, &report)?,
    }
    Ok(())
}

/// Reads, validates and simulates the scenario.
pub fn simulate(args: &SimulateArgs) -> Result<Report, CliError> {
    let path = &args.scenario;
    let read_error = |source| CliError::ReadManifest {
        path: path.clone(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_SCENARIO_BYTES {
        return Err(CliError::Usage(format!(
            "{}: {len} bytes; a scenario may have at most {MAX_SCENARIO_BYTES} bytes",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let scenario = sim::parse_scenario(&path.display().to_string(), &text)
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    let scenario = match args.seed {
        Some(seed) => scenario.with_seed(seed),
        None => scenario,
    };
    Ok(sim::simulate(&scenario))
}
