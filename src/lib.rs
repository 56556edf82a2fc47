//! meanflow-repro: reproduces "Mean Flows for One-step Generative Modeling" on tch (libtorch).
//! See README.md for the flow of data and the `mfr` commands.
pub mod assets;
pub mod bench;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod import;
pub mod meanflow;
pub mod model;
pub mod report;
pub mod runs;
pub mod sample;
pub mod site;
pub mod spec;
pub mod train;
