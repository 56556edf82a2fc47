//! What a person looks at: the paper's numbers as data (paper.rs), run results gathered into
//! tables (tables.rs, polars), charts and sample grids (plots.rs, plotters), the rendered report
//! (render.rs: index.html + report.md) and the discrepancy report (discrepancy.rs).
pub mod discrepancy;
pub mod paper;
pub mod plots;
pub mod render;
pub mod tables;

pub use plots::{loss_curves, sample_grid};
