//! What a person looks at: the paper's numbers as data (paper.rs), what a report knows of a
//! run (runs.rs), the results frame (frame.rs, polars: `mfr results`), verdicts, orderings and
//! typed tables (tables.rs), charts and sample grids (plots.rs, plotters), the rendered report
//! (render.rs: index.html + report.md through templates.rs) and the discrepancy report
//! (discrepancy.rs). Every string that comes from a run is escaped for where it lands
//! (safe.rs, templates.rs).
pub mod discrepancy;
pub mod frame;
pub mod paper;
pub mod plots;
pub mod render;
pub mod runs;
pub mod safe;
pub mod tables;
pub mod templates;

pub use plots::{loss_curves, sample_grid};
